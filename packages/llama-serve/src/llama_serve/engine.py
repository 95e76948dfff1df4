"""The inference engine: continuous batching over a paged KV cache, in PyTorch, through
`llama_model`'s attention seam (the model's forward is never copied).

`Engine.generate(prompts, params)` is vLLM's offline `LLM.generate`; `add_request` / `step` /
`abort` are the loop a server drives (see `llama_serve.AsyncEngine`). Each `step` asks the
`Scheduler` which sequences run and with how many tokens, runs every chunk (the one-token decodes
and the longer chunks: a prompt, a piece of a long prompt, a recomputation after preemption) in
one forward over one packed row (`llama_serve.packed`; with `compile=True`, decode-only steps go
through a compiled `llama_model.decode_one_token` instead), then samples a token for every
sequence whose chunk reached its end.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llama_kernels import bf16_is_fast
from llama_model import (
    ChatFormat,
    Llama,
    Message,
    Tokenizer,
    decode_one_token,
    format_validation_error,
    load_checkpoint,
)
from llama_serve.cpu_linear import PackedLinear, can_pack, pack_linear_layers
from llama_serve.fp8 import quantize_fp8
from llama_serve.fp8_checkpoint import is_fp8_checkpoint, load_fp8_checkpoint
from llama_serve.packed import PackedChunk, PackedPagedAttention
from llama_serve.paged_cache import NULL_BLOCK, BlockPool, PagedKVCache
from llama_serve.params import CompletionOutput, RequestOutput, SamplingParams
from llama_serve.sampling import sample_rows, top_logprobs
from llama_serve.scheduler import ScheduledChunk, Scheduler, Status
from llama_serve.scheduler import Sequence as Sample

__all__ = ["Engine", "EngineConfig", "Prompt"]

Prompt: TypeAlias = str | Sequence[int] | Sequence[Message | dict[str, Any]]
"""Text (encoded with a leading `<|begin_of_text|>`), token ids as they are, or chat messages
(`llama_model.Message` or dicts of its fields), encoded with the Llama 3.1 chat format and an
assistant header to answer after."""

DEFAULT_KV_CACHE_BYTES = 4 << 30


class EngineConfig(BaseModel):
    """How the engine lays out its KV cache and batches its work (vLLM's names)."""

    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(default=16, ge=1)
    """Positions per KV cache block (vLLM's default, 16)."""

    num_blocks: int | None = Field(default=None, ge=2)
    """KV cache blocks (one is reserved for padding). None: as many as `kv_cache_memory_bytes`
    holds, but no more than `max_num_seqs` sequences of `max_model_len` tokens need."""

    kv_cache_memory_bytes: int = Field(default=DEFAULT_KV_CACHE_BYTES, ge=1)
    """Memory for the KV cache when `num_blocks` is None, in bytes (default 4 GiB, vLLM-CPU's
    default KV space)."""

    max_num_seqs: int = Field(default=64, ge=1)
    """The most sequences (samples) running at once."""

    max_num_batched_tokens: int = Field(default=2048, ge=1)
    """Tokens per step over all sequences: a longer prompt is prefilled in chunks of at most
    this many, between the running sequences' decode steps (chunked prefill). A step's tokens
    run as one packed row, so the engine uses at most the model's max_seq_len."""

    max_model_len: int | None = Field(default=None, ge=1)
    """The most tokens (prompt + output) of one sequence. None: the model's max_seq_len."""

    enable_prefix_caching: bool = True
    """Reuse the KV cache blocks of earlier prompts that start with the same tokens."""

    compile: bool = False
    """Run decode steps through `torch.compile(fullgraph=True)` with static shapes: batches are
    padded to a power of two and block tables to `max_model_len`, so each batch size compiles
    once. Pays on long runs; the first steps of each size are slow."""

    pack_weights: bool = True
    """On a CPU (bf16 with CPU support, or float32), run the linear layers and the output
    projection with oneDNN-packed weights (`llama_serve.cpu_linear`; decode matmuls 2.5-4x faster
    than `F.linear`). `Engine(model)` packs copies and leaves `model` unchanged (its linear
    weights are then held twice); `from_pretrained` packs the blocks in place. The output
    projection is always a packed copy (vocab_size x dim more weights). The packed weights are
    read when the engine is built: after changing the model's weights, build a new engine. Not
    combined with `compile`."""


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_text: str | None
    prompt: list[int]
    params: SamplingParams
    samples: list[Sample]
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


class Engine:
    """Serve a `llama_model.Llama`: batched, paged, streaming-ready generation.

    `model` is used as it is (its dtype and device; call `.eval()`-free: the engine runs under
    `torch.inference_mode`). `tokenizer` is needed for text and chat prompts, stop strings and
    `text` in the outputs; token-id prompts work without one. `eos_token_ids` are the ids that end
    a sample unless `SamplingParams.ignore_eos` (default: the tokenizer's stop tokens).
    """

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer | None = None,
        config: EngineConfig | None = None,
        *,
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        if not isinstance(model, Llama):
            raise TypeError(f"Engine serves a llama_model.Llama, got {type(model).__name__}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config if config is not None else EngineConfig()
        model_config = model.config
        self.max_model_len = self.config.max_model_len or model_config.max_seq_len
        if self.max_model_len > model_config.max_seq_len:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's max_seq_len "
                f"{model_config.max_seq_len}"
            )
        if eos_token_ids is None:
            eos_token_ids = tokenizer.stop_tokens if tokenizer is not None else ()
        self.eos_token_ids = frozenset(eos_token_ids)
        weight = model.output_weight()
        self.device, self.dtype = weight.device, weight.dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            self.dtype = torch.bfloat16  # a quantized output projection: compute in bf16
        self._logits: Callable[[torch.Tensor], torch.Tensor] = self.model.logits
        if (
            self.config.pack_weights
            and not self.config.compile
            and can_pack(weight.device, weight.dtype)
        ):
            self.model = pack_linear_layers(self.model)
            self._logits = PackedLinear(weight)
        block_size = self.config.block_size
        self.max_blocks_per_seq = -(-self.max_model_len // block_size)
        num_blocks = self.config.num_blocks
        if num_blocks is None:
            per_block = PagedKVCache.bytes_per_block(model_config, block_size, self.dtype)
            wanted = self.config.max_num_seqs * self.max_blocks_per_seq + 1
            num_blocks = max(2, min(wanted, self.config.kv_cache_memory_bytes // per_block))
        self.cache = PagedKVCache(
            model_config, num_blocks, block_size, dtype=self.dtype, device=self.device
        )
        self.pool = BlockPool(num_blocks, enable_prefix_caching=self.config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.pool,
            block_size,
            max_num_seqs=self.config.max_num_seqs,
            # A step's tokens form one packed row, which the model takes up to its max_seq_len.
            max_num_batched_tokens=min(
                self.config.max_num_batched_tokens, model_config.max_seq_len
            ),
        )
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._special_ids = (
            frozenset(tokenizer.special_tokens.values()) if tokenizer is not None else frozenset()
        )
        self._decode: Callable[..., torch.Tensor] = decode_one_token
        if self.config.compile:
            self._decode = torch.compile(decode_one_token, fullgraph=True, dynamic=False)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "cached_tokens": 0, "steps": 0}
        """Counters: prompt positions computed ("prefill_tokens", recomputations after preemption
        included), other positions computed ("decode_tokens"), prompt tokens taken from the prefix
        cache ("cached_tokens") and forwards run ("steps")."""

    # ------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: Literal["auto", "bfloat16", "float16", "float32"] | torch.dtype = "auto",
        quantization: Literal["fp8"] | None = None,
        device: torch.device | str | None = None,
        tokenizer: Tokenizer | None = None,
        **options: Any,
    ) -> Engine:
        """An engine over the checkpoint directory `path` (Hugging Face or Meta layout, as
        `llama_model.load_checkpoint` reads).

        `dtype` "auto" is bfloat16 where bf16 matmuls are native (`llama_kernels.bf16_is_fast`:
        recent GPUs, CPUs with AMX or AVX512-BF16), else float32. `quantization="fp8"` applies
        §6.2's recipe (`llama_serve.quantize_fp8`) after loading; a checkpoint written by
        `llama-serve quantize` (config.json declares `fbgemm_fp8`, as Meta's Llama 3.1 405B FP8
        does, or compressed-tensors FP8, served with no activation bound) is served in FP8 from
        its stored weights and scales whatever `quantization` says. `device` defaults to CUDA when
        available. `tokenizer` defaults to Llama 3's when the vocabulary is Llama 3's (128,256).
        Stop ids come from the checkpoint's `generation_config.json` (`eos_token_id`) when it has
        one. `options` are `EngineConfig` fields.
        """
        directory = Path(path)
        if not directory.exists():
            raise FileNotFoundError(f"checkpoint {str(directory)!r} does not exist")
        config = _engine_config(options)
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if bf16_is_fast(target) else torch.float32
        elif isinstance(dtype, torch.dtype):
            torch_dtype = dtype
        else:
            torch_dtype = getattr(torch, dtype)
        if quantization not in (None, "fp8"):
            raise ValueError(f"quantization must be None or 'fp8', got {quantization!r}")
        if is_fp8_checkpoint(directory):  # already quantized: its FP8 weights are used as stored
            model = load_fp8_checkpoint(directory, device=target, dtype=torch_dtype)
        else:
            model = load_checkpoint(directory, device=target, dtype=torch_dtype)
            if quantization == "fp8":
                quantize_fp8(model)
        if config.pack_weights and not config.compile:
            model = pack_linear_layers(model, in_place=True)  # nobody else holds this model
        if tokenizer is None and model.config.vocab_size == 128_256:
            tokenizer = Tokenizer.llama3()
        eos = _generation_config_eos(directory)
        return cls(model, tokenizer, config, eos_token_ids=eos)

    # ---------------------------------------------------------------------------- requests

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> str:
        """Queue `prompt` (see `Prompt`) and return its request id. Bad input raises ValueError
        naming the value, and leaves the engine as it was."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, tokens = self._encode(prompt)
        self._check_request(tokens, params)
        seed = params.seed if params.seed is not None else random.randrange(2**62)
        arrival = self.scheduler.next_arrival()
        samples = [
            Sample(
                request_id=request_id,
                index=index,
                prompt=tokens,
                params=params,
                generator=None
                if params.greedy
                else torch.Generator(self.device).manual_seed(seed + index),
                arrival=arrival,
            )
            for index in range(params.n)
        ]
        self._requests[request_id] = _Request(
            request_id, text, tokens, params, samples, time.perf_counter()
        )
        self.scheduler.add(samples)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now: its samples finish with reason "abort" and free their blocks.
        False if no such request is running (unknown, or already finished)."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self.scheduler.followers.pop(request_id, None)
        for sample in request.samples:
            if sample.status is not Status.FINISHED:
                self.scheduler.finish(sample)
                sample.finish_reason = "abort"
        del self._requests[request_id]
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # -------------------------------------------------------------------------------- steps

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one forward and return the state of every request it advanced (finished requests
        are then forgotten by the engine)."""
        return [self._output(request) for request in self._step()]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (one `SamplingParams` for all, or one per prompt) and return
        the finished outputs in prompt order. Every prompt is checked before any runs."""
        batch = _prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(batch)
        if len(params) != len(batch):
            raise ValueError(f"{len(params)} SamplingParams for {len(batch)} prompts")
        for i, (prompt, request_params) in enumerate(zip(batch, params, strict=True)):
            try:
                self._check_request(self._encode(prompt)[1], request_params)
            except (ValueError, TypeError) as error:
                raise type(error)(f"prompt {i}: {error}") from None
        ids = [self.add_request(p, q) for p, q in zip(batch, params, strict=True)]
        progress = _progress(len(ids), use_tqdm)
        finished: dict[str, RequestOutput] = {}
        with torch.inference_mode():
            while len(finished) < len(ids):
                for request in self._step():
                    if request.finished_time is not None:
                        finished[request.request_id] = self._output(request)
                        progress(1)
        progress(0, close=True)
        return [finished[request_id] for request_id in ids]

    # ---------------------------------------------------------------------------- internals

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            tokenizer = self._need_tokenizer("a text prompt")
            if not prompt:
                raise ValueError("the prompt is empty: give at least one character or token")
            return prompt, tokenizer.encode(prompt, bos=True, eos=False)
        items = list(prompt)
        if not items:
            raise ValueError("the prompt is empty: give at least one token id or message")
        if all(isinstance(item, Message | dict) for item in items):
            tokenizer = self._need_tokenizer("a chat prompt")
            messages = [m if isinstance(m, Message) else Message.model_validate(m) for m in items]
            return None, ChatFormat(tokenizer).encode_dialog(messages).tokens
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in items):
            kinds = sorted({type(item).__name__ for item in items})
            raise TypeError(
                f"a prompt is a string, a list of token ids or a list of chat messages; got a "
                f"list of {', '.join(kinds)}"
            )
        return None, [int(item) for item in items]  # type: ignore[arg-type]

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: pass one to Engine, or give token ids")
        return self.tokenizer

    def _check_request(self, tokens: list[int], params: SamplingParams) -> None:
        vocab_size = self.model.config.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
            )
        bad = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass one to Engine")
        total = len(tokens) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"the prompt ({len(tokens)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the maximum length {self.max_model_len}; shorten the prompt or lower "
                "max_tokens"
            )
        blocks = -(-total // self.config.block_size)
        if blocks > self.pool.num_usable:
            raise ValueError(
                f"a sequence of {total} tokens needs {blocks} KV cache blocks of "
                f"{self.config.block_size} but the cache has {self.pool.num_usable}; give the "
                "cache more memory (num_blocks or kv_cache_memory_bytes)"
            )

    def _step(self) -> list[_Request]:
        """One scheduler step and one forward; the requests it advanced."""
        chunks = self.scheduler.schedule()
        if not chunks:
            if self.scheduler.has_work():
                raise RuntimeError("the scheduler found nothing to run while requests wait")
            return []
        self.stats["steps"] += 1
        for source, target in self.scheduler.copies:
            self.cache.copy_block(source, target)
        decodes = [chunk for chunk in chunks if chunk.num_tokens == 1]
        decodes.sort(key=lambda chunk: -chunk.start)  # longest first: attention groups pad less
        prefills = [chunk for chunk in chunks if chunk.num_tokens > 1]
        if self.config.compile and not prefills:
            rows = self._run_decodes(decodes)  # static shapes, compiled once per batch bucket
            rows = rows[[i for i, chunk in enumerate(decodes) if chunk.samples]]
        else:
            decodes, rows = decodes + prefills, self._run_packed(decodes + prefills)
        sampling = [chunk for chunk in decodes if chunk.samples]
        row_of = {id(chunk): row for row, chunk in enumerate(sampling)}
        samples: list[Sample] = []
        sample_rows_of: list[int] = []  # each sample's row of `rows`
        for chunk in chunks:
            sequence = chunk.sequence
            self.scheduler.computed(chunk)
            prompt_part = max(0, min(chunk.num_tokens, len(sequence.prompt) - chunk.start))
            self.stats["prefill_tokens"] += prompt_part
            self.stats["decode_tokens"] += chunk.num_tokens - prompt_part
            if not chunk.samples:
                continue
            samples.append(sequence)
            sample_rows_of.append(row_of[id(chunk)])
            if sequence.index == 0 and not sequence.output:  # the prompt is in: fork the rest
                self.stats["cached_tokens"] += sequence.num_cached
                for follower in self.scheduler.fork(sequence):
                    samples.append(follower)
                    sample_rows_of.append(row_of[id(chunk)])
        if not samples:
            return []
        if sample_rows_of != list(range(len(rows))):
            rows = rows[sample_rows_of]  # one row per sample (the n samples of a new prompt)
        tokens = sample_rows(rows, [s.params for s in samples], [s.generator for s in samples])
        now = time.perf_counter()
        advanced: dict[str, _Request] = {}
        for i, (sequence, token) in enumerate(zip(samples, tokens, strict=True)):
            request = self._requests[sequence.request_id]
            request.first_token_time = request.first_token_time or now
            sequence.output.append(token)
            if sequence.params.logprobs is not None:
                sequence.logprobs.append(top_logprobs(rows[i], token, sequence.params.logprobs))
            self._check_stop(sequence)
            advanced[request.request_id] = request
        for request in advanced.values():
            if all(sample.status is Status.FINISHED for sample in request.samples):
                request.finished_time = now
                del self._requests[request.request_id]
        return list(advanced.values())

    def _run_decodes(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """The one-token chunks as one batch [B, 1]; their next-token logits [B, vocab]."""
        count = len(chunks)
        if self.config.compile:  # static shapes: a power-of-two batch, full-length tables
            batch, width = 1 << (count - 1).bit_length(), self.max_blocks_per_seq
        else:
            batch = count
            width = max(chunk.start // self.config.block_size + 1 for chunk in chunks)
        tokens = torch.zeros(batch, dtype=torch.long)
        positions = torch.zeros(batch, dtype=torch.long)
        tables = torch.full((batch, width), NULL_BLOCK, dtype=torch.int32)
        for row, chunk in enumerate(chunks):
            sequence = chunk.sequence
            tokens[row] = sequence.tokens[chunk.start]
            positions[row] = chunk.start
            blocks = sequence.blocks[:width]
            tables[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        view = self.cache.view(tables.to(self.device, torch.long))
        logits = self._decode(self.model, tokens.to(self.device), positions.to(self.device), view)
        return logits[:count]

    def _run_packed(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Every chunk (decodes first) in one forward over one packed row of tokens; the
        next-token logits [S, vocab] of the S chunks that sample, in order."""
        tokens = [t for c in chunks for t in c.sequence.tokens[c.start : c.start + c.num_tokens]]
        packed = [PackedChunk(c.sequence.blocks, c.start, c.num_tokens) for c in chunks]
        attention = PackedPagedAttention(self.cache, packed, self.device)
        hidden = self.model.hidden_states(
            torch.tensor([tokens], device=self.device), attention=attention
        )
        ends = list(itertools.accumulate(chunk.num_tokens for chunk in chunks))
        last = [end - 1 for end, chunk in zip(ends, chunks, strict=True) if chunk.samples]
        return self._logits(hidden[0, last])

    def _check_stop(self, sequence: Sample) -> None:
        """Finish `sequence` if its last token, its text or its length says so."""
        params, token = sequence.params, sequence.output[-1]
        reason: str | None = None
        if token in params.stop_token_ids:
            reason, sequence.stop_reason = "stop", token
        elif not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif params.stop:
            text = self._text(sequence.output, params)
            hits = [(text.find(stop), stop) for stop in params.stop if stop in text]
            if hits:
                position, stop = min(hits)
                reason, sequence.stop_reason = "stop", stop
                sequence.text = text[:position]
        if reason is None and (
            len(sequence.output) >= params.max_tokens or sequence.num_tokens >= self.max_model_len
        ):
            reason = "length"
        if reason is not None:
            sequence.finish_reason = reason
            self.scheduler.finish(sequence)

    def _text(self, tokens: list[int], params: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        if params.skip_special_tokens:
            tokens = [t for t in tokens if t not in self._special_ids]
        return self.tokenizer.decode(tokens)

    def _output(self, request: _Request) -> RequestOutput:
        outputs = []
        for sample in request.samples:
            text = sample.text
            if sample.finish_reason == "stop" and isinstance(sample.stop_reason, int):
                # A stop token id is kept in token_ids, not in the text (as in vLLM).
                text = self._text(sample.output[:-1], request.params)
            elif not (sample.finish_reason == "stop" and isinstance(sample.stop_reason, str)):
                text = self._text(sample.output, request.params)
            outputs.append(
                CompletionOutput(
                    index=sample.index,
                    text=text,
                    token_ids=list(sample.output),
                    logprobs=list(sample.logprobs) if request.params.logprobs is not None else None,
                    finish_reason=sample.finish_reason,
                    stop_reason=sample.stop_reason,
                )
            )
        metrics: dict[str, float] = {}
        if request.first_token_time is not None:
            metrics["first_token"] = request.first_token_time - request.arrival_time
        if request.finished_time is not None:
            metrics["finished"] = request.finished_time - request.arrival_time
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt_text,
            prompt_token_ids=list(request.prompt),
            outputs=outputs,
            finished=request.finished_time is not None,
            num_cached_tokens=request.samples[0].num_cached,
            metrics=metrics,
        )


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, token ids, chat messages) as a list of one; a list of prompts as is."""
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and isinstance(items[0], int | Message | dict):
        return [prompts]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _engine_config(options: dict[str, Any]) -> EngineConfig:
    try:
        return EngineConfig(**options)
    except ValidationError as error:
        raise ValueError(
            "invalid engine options:\n" + format_validation_error(error, EngineConfig)
        ) from None


def _generation_config_eos(directory: Path) -> list[int] | None:
    """`eos_token_id` of the checkpoint's generation_config.json (an id or a list), if any."""
    import json

    path = directory / "generation_config.json"
    if not path.is_file():
        return None
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return None
    return [eos] if isinstance(eos, int) else list(eos)


def _progress(total: int, enabled: bool) -> Callable[..., None]:
    """A tqdm bar's update(n) / close, or a no-op."""
    if not enabled:
        return lambda n, close=False: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="requests", unit="req")

    def update(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()

    return update

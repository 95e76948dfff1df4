"""`AsyncEngine`: concurrent streams get what the offline engine gives, and a stream closed early
aborts its request and frees its blocks."""

from __future__ import annotations

import asyncio

import pytest

from llama_model import Llama, LlamaConfig
from llama_serve import AsyncEngine, Engine, EngineConfig, RequestOutput, SamplingParams


@pytest.fixture(scope="module")
def model() -> Llama:
    config = LlamaConfig.model_validate({"dim": 64, "n_layers": 2, "n_heads": 4,
        "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32, "max_seq_len": 128})  # fmt: skip
    model = Llama(config)
    model.init_weights(seed=0, std=0.1)
    return model.eval()


def _engine(model: Llama) -> Engine:
    return Engine(model, config=EngineConfig(block_size=4, num_blocks=64, max_num_seqs=3))


PROMPTS = [[1, 2, 3], [7] * 20, [9, 8, 7, 6, 5], [42] * 11]
PARAMS = SamplingParams(max_tokens=12, temperature=0.8, seed=1, ignore_eos=True, n=2)


async def _collect(engine: AsyncEngine, prompt: list[int]) -> list[RequestOutput]:
    return [output async for output in engine.generate(prompt, PARAMS)]


def test_concurrent_streams_equal_offline_generation(model: Llama) -> None:
    """Four concurrent streams (more than max_num_seqs samples at once): each stream's updates
    grow token by token and its last one equals the offline result."""
    expected = _engine(model).generate(PROMPTS, PARAMS)

    async def main() -> list[list[RequestOutput]]:
        engine = AsyncEngine(_engine(model))
        streams = await asyncio.gather(*(_collect(engine, prompt) for prompt in PROMPTS))
        await engine.close()
        return streams

    streams = asyncio.run(main())
    for stream, offline in zip(streams, expected, strict=True):
        assert [output.finished for output in stream] == [False] * (len(stream) - 1) + [True]
        assert len(stream) >= 12  # one update per step that advanced it
        final = stream[-1]
        assert [o.token_ids for o in final.outputs] == [o.token_ids for o in offline.outputs]
        lengths = [sum(len(o.token_ids) for o in update.outputs) for update in stream]
        assert lengths == sorted(lengths)


def test_bad_input_raises_in_its_stream_only(model: Llama) -> None:
    async def main() -> tuple[str, RequestOutput]:
        engine = AsyncEngine(_engine(model))
        with pytest.raises(ValueError) as error:
            await _collect(engine, [1, 10_000])
        good = await _collect(engine, [1, 2])
        await engine.close()
        return str(error.value), good[-1]

    message, good = asyncio.run(main())
    assert "prompt token id 10000 is outside the vocabulary" in message
    assert good.finished and all(len(o.token_ids) == 12 for o in good.outputs)


def test_closing_a_stream_aborts_its_request(model: Llama) -> None:
    """A consumer that stops after two updates: its request is aborted and every block is free."""
    inner = _engine(model)

    async def main() -> None:
        engine = AsyncEngine(inner)
        stream = engine.generate([5] * 30, SamplingParams(max_tokens=90, ignore_eos=True))
        updates = 0
        async for _ in stream:
            updates += 1
            if updates == 2:
                break
        await stream.aclose()
        await _collect(engine, [1, 2])  # the loop runs on, applying the abort first
        await engine.close()

    asyncio.run(main())
    assert not inner.has_unfinished_requests()
    assert inner.pool.num_free == inner.pool.num_usable

"""The engine against independent references, in float32.

References: `llama_model.generate` (the model's own single-sequence KV-cached loop), a plain
full-sequence forward of the model (for log-probabilities: no cache at all), and transformers'
`generate` on the same checkpoint written by `llama_model.save_checkpoint`. Every continuous-batch
feature is switched on in the same runs: mixed prompt lengths, requests arriving while others
decode, chunked prefill, preemption forced by a tiny block pool, shared prefixes and n > 1.

Tolerances: log-probabilities within 1e-4 of the full forward's (float32 over a 2-layer model:
measured differences are ~1e-6; the cache gathers and the chunked prefill reorder sums). Tokens
are compared exactly: the weights (std 0.1) make next-token distributions peaked enough that
float32 rounding does not flip an argmax.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from llama_model import Llama, LlamaConfig, generate, save_checkpoint
from llama_serve import Engine, EngineConfig, SamplingParams
from llama_serve.engine import Prompt

VOCAB = 256


def _model(seed: int = 0, *, n_layers: int = 2, max_seq_len: int = 256) -> Llama:
    config = LlamaConfig.model_validate({"dim": 64, "n_layers": n_layers, "n_heads": 4,
        "n_kv_heads": 2, "vocab_size": VOCAB, "multiple_of": 32, "max_seq_len": max_seq_len})  # fmt: skip
    model = Llama(config)
    model.init_weights(seed=seed, std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Llama:
    return _model()


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(length)] for length in lengths]


def _reference(model: Llama, prompt: list[int], max_tokens: int) -> list[int]:
    return generate(model, prompt, max_new_tokens=max_tokens)


@torch.inference_mode()
def _full_forward_logprobs(model: Llama, tokens: list[int]) -> torch.Tensor:
    """log-softmax of a cache-free forward over the whole sequence [len(tokens), vocab]."""
    return torch.log_softmax(model(torch.tensor([tokens]))[0].float(), dim=-1)


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3)


def _check_greedy(model: Llama, prompt: list[int], output: list[int], logprobs: object) -> None:
    assert output == _reference(model, prompt, len(output))
    full = _full_forward_logprobs(model, prompt + output)
    assert isinstance(logprobs, list) and len(logprobs) == len(output)
    top = full[len(prompt) - 1 : -1].topk(3)  # the distributions each output token came from
    for i, (token, entry) in enumerate(zip(output, logprobs, strict=True)):
        expected = {token: float(full[len(prompt) - 1 + i, token])}
        expected.update(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True))
        assert entry.keys() == expected.keys()
        for key, value in expected.items():
            assert entry[key] == pytest.approx(value, abs=1e-4)


# ------------------------------------------------------------------------------- exactness


def test_continuous_batch_equals_one_request_at_a_time(model: Llama) -> None:
    """Mixed lengths, arrivals between steps, chunked prefill (budget 24 tokens), preemption
    (a pool of 20 blocks of 4 positions) and n = 2: every sample equals `llama_model.generate`
    alone and its log-probabilities the full forward's; every block comes back."""
    engine = Engine(
        model,
        config=EngineConfig(block_size=4, num_blocks=20, max_num_batched_tokens=24, max_num_seqs=4),
    )
    prompts = _prompts([5, 37, 12, 3, 50, 21, 8])
    params = [GREEDY.model_copy(update={"n": 2 if i % 3 == 0 else 1}) for i in range(len(prompts))]
    ids = [engine.add_request(prompts[i], params[i]) for i in range(3)]
    finished = {}
    pending = list(range(3, len(prompts)))
    while engine.has_unfinished_requests() or pending:
        if pending and engine.stats["steps"] % 3 == 2:  # arrive while others decode
            i = pending.pop(0)
            ids.append(engine.add_request(prompts[i], params[i], request_id=f"late-{i}"))
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        if not engine.has_unfinished_requests() and pending:
            i = pending.pop(0)
            ids.append(engine.add_request(prompts[i], params[i], request_id=f"late-{i}"))
    assert engine.scheduler.num_preemptions > 0  # the tiny pool forced recomputation
    assert engine.stats["prefill_tokens"] > sum(map(len, prompts))  # ... which re-ran tokens
    assert len(finished) == len(prompts)
    for request_id, prompt, request_params in zip(ids, prompts, params, strict=True):
        output = finished[request_id]
        assert output.prompt_token_ids == prompt
        assert len(output.outputs) == request_params.n
        for sample in output.outputs:
            assert sample.finish_reason == "length" and len(sample.token_ids) == 24
            _check_greedy(model, prompt, sample.token_ids, sample.logprobs)
    assert engine.pool.num_free == engine.pool.num_usable
    assert all(count == 0 for count in engine.pool.ref_count)


def test_chunked_prefill_interleaves_with_decodes(model: Llama) -> None:
    """A 120-token prompt under an 8-token budget is prefilled over many steps while an earlier
    request keeps decoding: both equal the reference."""
    engine = Engine(
        model, config=EngineConfig(block_size=8, num_blocks=64, max_num_batched_tokens=8)
    )
    short, long = _prompts([4, 120], seed=1)
    engine.add_request(short, GREEDY, request_id="short")
    engine.step()  # the short prompt is in; it decodes from now on
    engine.add_request(long, GREEDY, request_id="long")
    decoded_while_prefilling = 0
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id] = output
            if output.request_id == "short" and not outputs.get("long"):
                decoded_while_prefilling += 1
    assert decoded_while_prefilling >= 10  # 120 tokens / 7 per step: the short one kept going
    for name, prompt in (("short", short), ("long", long)):
        sample = outputs[name].outputs[0]
        _check_greedy(model, prompt, sample.token_ids, sample.logprobs)


def test_same_tokens_as_transformers_generate(model: Llama, tmp_path: Path) -> None:
    """Greedy tokens equal transformers' `generate` on the checkpoint save_checkpoint wrote."""
    transformers = pytest.importorskip("transformers")
    save_checkpoint(model, tmp_path / "ckpt")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    engine = Engine.from_pretrained(tmp_path / "ckpt", dtype="float32", block_size=4, num_blocks=64)
    prompts = _prompts([6, 19, 33], seed=2)
    outputs = engine.generate(
        prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    )
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()  # fmt: skip
        assert output.outputs[0].token_ids == expected


# ------------------------------------------------------------------------ shared prompts


def test_n_samples_prefill_the_prompt_once_and_share_its_blocks(model: Llama) -> None:
    """n = 16 samples of a 200-token prompt: 200 prefill tokens (not 3,200), about one prompt's
    blocks in use (not 16), and a shared partly-filled block is copied on write."""
    block_size = 16
    engine = Engine(
        model,
        config=EngineConfig(block_size=block_size, num_blocks=200, enable_prefix_caching=False),
    )
    prompt = _prompts([200], seed=3)[0]
    params = SamplingParams(n=16, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    engine.add_request(prompt, params)
    peak = 0
    outputs = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        peak = max(peak, engine.pool.num_usable - engine.pool.num_free)
    assert engine.stats["prefill_tokens"] == 200
    prompt_blocks = -(-200 // block_size)  # 13, the last one partly filled
    # 12 full prompt blocks shared by all; each sample has its own copy of the partial block.
    assert peak <= prompt_blocks + 16
    assert peak < 2 * prompt_blocks + 16 < 16 * prompt_blocks
    assert len(outputs[0].outputs) == 16
    assert len({tuple(o.token_ids) for o in outputs[0].outputs}) > 1  # samples differ
    assert engine.pool.num_free == engine.pool.num_usable


def test_prefix_cache_reuses_blocks_across_requests(model: Llama) -> None:
    """A second request with the same 40-token start takes its full blocks from the cache
    (num_cached_tokens) and still equals the reference; switched off, nothing is reused."""
    shared = _prompts([40], seed=4)[0]
    first, second = [*shared, 1, 2, 3], [*shared, 9, 8]
    for caching in (True, False):
        engine = Engine(
            model, config=EngineConfig(block_size=8, num_blocks=64, enable_prefix_caching=caching)
        )
        engine.generate(first, GREEDY)
        (output,) = engine.generate(second, GREEDY)
        assert output.num_cached_tokens == (40 if caching else 0)
        assert engine.stats["cached_tokens"] == (40 if caching else 0)
        _check_greedy(model, second, output.outputs[0].token_ids, output.outputs[0].logprobs)
        assert engine.pool.num_free == engine.pool.num_usable


def test_a_fully_cached_prompt_recomputes_its_last_token(model: Llama) -> None:
    """The same prompt twice (a multiple of the block size): the last block is recomputed for its
    logits, never written into while the cache holds it, and the outputs are equal."""
    engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=64))
    prompt = _prompts([32], seed=5)[0]
    (a,) = engine.generate(prompt, GREEDY)
    (b,) = engine.generate(prompt, GREEDY)
    assert b.num_cached_tokens == 24
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


# -------------------------------------------------------------------------------- sampling


def test_seeded_samples_do_not_depend_on_the_batch(model: Llama) -> None:
    """Sample i of a request with seed s equals a one-sample request with seed s + i, alone or
    batched with other requests (different batch sizes, positions and arrival orders)."""
    prompt = _prompts([11], seed=6)[0]
    params = SamplingParams(n=3, max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=100,
        ignore_eos=True)  # fmt: skip
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=128))
    (together,) = engine.generate(prompt, params)
    others = _prompts([7, 30, 2], seed=7)
    for i in range(3):
        single = params.model_copy(update={"n": 1, "seed": 100 + i})
        batch = [*others[:i], prompt, *others[i:]]
        outputs = engine.generate(batch, [params.model_copy(update={"seed": 5})] * i + [single]
            + [params.model_copy(update={"seed": 6})] * (3 - i))  # fmt: skip
        assert outputs[i].outputs[0].token_ids == together.outputs[i].token_ids


def test_stop_token_ids_eos_and_max_tokens(model: Llama) -> None:
    """A sample stops at a stop token (kept in token_ids), at an EOS id unless ignore_eos, and
    at max_tokens ("length")."""
    prompt = _prompts([9], seed=8)[0]
    free = _reference(model, prompt, 20)
    stop_at = free[5]
    first = free.index(stop_at)
    engine = Engine(
        model, config=EngineConfig(block_size=4, num_blocks=64), eos_token_ids=[stop_at]
    )
    greedy = SamplingParams(max_tokens=20, temperature=0)
    (output,) = engine.generate(prompt, greedy)
    assert output.outputs[0].token_ids == free[: first + 1]
    assert output.outputs[0].finish_reason == "stop"
    (output,) = engine.generate(prompt, greedy.model_copy(update={"ignore_eos": True}))
    assert output.outputs[0].token_ids == free and output.outputs[0].finish_reason == "length"
    stop_ids = greedy.model_copy(update={"ignore_eos": True, "stop_token_ids": [free[3]]})
    (output,) = engine.generate(prompt, stop_ids)
    assert output.outputs[0].token_ids == free[: free.index(free[3]) + 1]
    assert output.outputs[0].stop_reason == free[3]


def test_temperature_below_eps_is_greedy(model: Llama) -> None:
    """A temperature so small that dividing the logits by it overflows decodes greedily (as in
    vLLM), instead of sampling from NaN probabilities."""
    prompt = _prompts([9], seed=8)[0]
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64))
    tiny = SamplingParams(max_tokens=12, temperature=1e-40, ignore_eos=True, seed=0)
    (output,) = engine.generate(prompt, tiny)
    assert output.outputs[0].token_ids == _reference(model, prompt, 12)


def test_filters_keep_exactly_top_k_and_top_p() -> None:
    """top_k keeps the k largest logits; top_p keeps the smallest prefix of sorted tokens whose
    mass reaches p (computed here with a Python loop over sorted probabilities)."""
    from llama_serve.sampling import filter_logits

    torch.manual_seed(0)
    logits = torch.randn(50)
    kept = filter_logits(logits, SamplingParams(top_k=7)).isfinite()
    assert kept.sum() == 7 and set(kept.nonzero().flatten().tolist()) == set(
        logits.topk(7).indices.tolist()
    )
    probs = torch.softmax(logits, dim=-1)
    order = probs.argsort(descending=True).tolist()
    expected, mass = set(), 0.0
    for token in order:
        expected.add(token)
        mass += float(probs[token])
        if mass >= 0.8:
            break
    kept = filter_logits(logits, SamplingParams(top_p=0.8)).isfinite()
    assert set(kept.nonzero().flatten().tolist()) == expected


def test_sampling_follows_the_filtered_distribution(model: Llama) -> None:
    """Draws with temperature 0.7 and top_k 3 land only in the top 3 tokens, with frequencies
    near softmax(logits / 0.7) over them (2,000 one-token samples; 4 sigma)."""
    prompt = _prompts([5], seed=9)[0]
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64))
    params = SamplingParams(n=2000, max_tokens=1, temperature=0.7, top_k=3, seed=0, ignore_eos=True)
    (output,) = engine.generate(prompt, params)
    logits = model(torch.tensor([prompt]))[0, -1].detach()
    top = logits.topk(3)
    expected = torch.softmax(top.values / 0.7, dim=-1)
    counts = torch.zeros(3)
    for sample in output.outputs:
        counts[top.indices.tolist().index(sample.token_ids[0])] += 1
    frequencies = counts / counts.sum()
    sigma = (expected * (1 - expected) / 2000).sqrt()
    assert ((frequencies - expected).abs() <= 4 * sigma + 1e-3).all(), (frequencies, expected)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("prompt", "update", "message"),
    [
        ([], {}, "the prompt is empty"),
        ([3, VOCAB], {}, f"prompt token id {VOCAB} is outside the vocabulary"),
        ([-1], {}, "prompt token id -1"),
        ([1, 2, 3], {"max_tokens": 300}, "the prompt (3 tokens) + max_tokens (300) = 303"),
        ([1, 2], {"stop_token_ids": [VOCAB + 5]}, f"stop token id {VOCAB + 5}"),
        ("hello", {}, "a text prompt needs a tokenizer"),
        (
            [1.5, 2],
            {},
            "a prompt is a string, a list of token ids or a list of chat messages; got a list of float, int",
        ),
    ],
)
def test_bad_requests_are_refused_and_the_engine_keeps_serving(
    model: Llama, prompt: Prompt, update: dict[str, object], message: str
) -> None:
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64))
    params = SamplingParams(max_tokens=4, temperature=0).model_copy(update=update)
    with pytest.raises((ValueError, TypeError)) as error:
        engine.generate([[5, 6], prompt], [SamplingParams(max_tokens=4), params])  # none runs
    assert f"prompt 1: {message}" in str(error.value)
    assert not engine.has_unfinished_requests()
    (output,) = engine.generate(
        [5, 6], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    )
    assert output.outputs[0].token_ids == _reference(model, [5, 6], 4)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n", 0, "n = 0: must be greater than or equal to 1"),
        ("temperature", -0.5, "temperature = -0.5: must be greater than or equal to 0"),
        ("top_p", 0.0, "top_p = 0.0: must be greater than 0"),
        ("top_p", 1.5, "top_p = 1.5: must be less than or equal to 1"),
        ("max_tokens", 0, "max_tokens = 0: must be greater than or equal to 1"),
        ("stop", [""], "stop strings must not be empty"),
        ("best_of", 2, "best_of: unknown key; valid keys: n, max_tokens"),
    ],
)
def test_bad_sampling_params_name_the_value(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError) as error:
        SamplingParams(**{field: value})
    assert message in str(error.value) and "pydantic.dev" not in str(error.value)


def test_a_sequence_longer_than_the_cache_is_refused(model: Llama) -> None:
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=5))
    with pytest.raises(ValueError, match="needs 5 KV cache blocks of 4 but the cache has 4"):
        engine.add_request([1] * 10, SamplingParams(max_tokens=10))


def test_checkpoints_that_do_not_exist_or_are_not_llama(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine.from_pretrained(tmp_path / "missing")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        Engine.from_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="block_size"):
        Engine.from_pretrained(tmp_path / "gpt2", block_size=0)


def test_abort_frees_the_blocks(model: Llama) -> None:
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64))
    request_id = engine.add_request(_prompts([30])[0], SamplingParams(n=4, max_tokens=50))
    engine.step()
    engine.step()
    assert engine.pool.num_free < engine.pool.num_usable
    engine.abort(request_id)
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free == engine.pool.num_usable

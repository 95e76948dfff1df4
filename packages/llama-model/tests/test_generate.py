"""KV-cached decoding and generation: the cache reproduces a full forward; generate matches HF greedy."""

from __future__ import annotations

import pytest
import torch
import transformers

from llama_model import (
    CachedAttention,
    KVCache,
    Llama,
    LlamaConfig,
    RopeScaling,
    decode_one_token,
    generate,
)
from llama_model.generate import sample

# float32. Decoding one row at a time runs different matmul shapes than the full forward, so the
# accumulation order differs: ulp-level noise on logits that reach |x| ~ 11 here is ~1e-5 absolute.
# atol 5e-5 (5e-6 of the largest logit) still catches any wrong position, mask or cache slot (>1e-2).
TOL = {"atol": 5e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def model() -> Llama:
    config = LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
        rope_scaling=RopeScaling(factor=8.0), max_seq_len=128,
    )  # fmt: skip
    model = Llama(config).eval()
    model.init_weights(seed=0, std=0.3)  # large weights: sharp, seed-sensitive distributions
    return model


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(seed))


def test_token_by_token_decoding_equals_full_forward(model: Llama) -> None:
    """Logits from decoding one token at a time with the cache equal one full causal forward."""
    x = tokens(20)
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=32)
    with torch.no_grad():
        full = model(x)
        steps = [model(x[:, i : i + 1], attention=cache.append(1)) for i in range(20)]
        stepwise = torch.cat(steps, dim=1)
    torch.testing.assert_close(stepwise, full, **TOL)
    assert cache.length == 20


def test_chunked_prefill_equals_full_forward(model: Llama) -> None:
    """Prefilling in chunks (7, then 9, then 1 tokens) equals one full forward."""
    x = tokens(17, seed=1)
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=17)
    with torch.no_grad():
        full = model(x)
        chunks = [
            model(x[:, a:b], attention=cache.append(b - a)) for a, b in ((0, 7), (7, 16), (16, 17))
        ]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, **TOL)


def test_cache_reset_reuses_memory(model: Llama) -> None:
    """After reset the cache gives the same logits again, in the same storage."""
    x = tokens(5)
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=8)
    storage = cache.keys.data_ptr()
    with torch.no_grad():
        first = model(x, attention=cache.append(5))
        cache.reset()
        second = model(x, attention=cache.append(5))
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert cache.keys.data_ptr() == storage


def test_cache_overflow_and_mismatch_are_errors(model: Llama) -> None:
    """A full cache (appended or at an explicit position), a batch-size mismatch and a too-large
    cache fail. (A cache and packed documents can no longer be combined: one backend per call.)"""
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=4)
    with torch.no_grad():
        model(tokens(4), attention=cache.append(4))
        with pytest.raises(ValueError, match="KV cache is full"):
            model(tokens(1), attention=cache.append(1))
        with pytest.raises(ValueError, match="KV cache is full: position 4"):
            CachedAttention(cache, torch.tensor([[4], [0]]))
        with pytest.raises(ValueError, match="batch size 1"):
            model(tokens(1)[:1], attention=KVCache.for_model(model, batch_size=2).append(1))
    with pytest.raises(ValueError, match="max_seq_len must be in"):
        KVCache(model.config, 1, 1000)


def test_rows_at_different_positions_decode_as_if_alone(model: Llama) -> None:
    """Two rows decoded together at different positions (continuous batching: one row 5 tokens
    in, the other 11) give each row the logits of its own full forward."""
    x = tokens(14, seed=5)
    lengths = (5, 11)
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=16)
    with torch.no_grad():
        for row, length in enumerate(lengths):  # prefill each row alone into its cache row
            alone = KVCache.for_model(model, batch_size=1, max_seq_len=16)
            model(x[row : row + 1, :length], attention=alone.append(length))
            cache.keys[:, row], cache.values[:, row] = alone.keys[:, 0], alone.values[:, 0]
        positions = torch.tensor(lengths)
        for _step in range(3):
            token = x[torch.arange(2), positions]
            logits = decode_one_token(model, token, positions, cache)  # [2, vocab]
            for row in range(2):
                full = model(x[row : row + 1, : int(positions[row]) + 1])[0, -1]
                torch.testing.assert_close(logits[row], full, **TOL)
            positions = positions + 1
        # The mask matters: attending over the unwritten slots too changes the logits.
        positions = positions - 1
        leaky = CachedAttention(cache, positions[:, None])
        leaky.mask = torch.ones_like(leaky.mask)
        unmasked = model.logits(model.hidden_states(token[:, None], attention=leaky))[:, -1]
        assert not torch.allclose(unmasked, logits, **TOL)


def test_compiled_decode_step_compiles_once(model: Llama) -> None:
    """torch.compile(decode_one_token, fullgraph=True) traces one graph that serves 32 decode
    steps at moving, per-row positions (a recompile raises), and gives the eager logits."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(decode_one_token, backend=counter, fullgraph=True)
    x = tokens(40, seed=6)
    eager_cache = KVCache.for_model(model, batch_size=2, max_seq_len=48)
    compiled_cache = KVCache.for_model(model, batch_size=2, max_seq_len=48)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for cache in (eager_cache, compiled_cache):
            model(x[:, :6], attention=cache.append(6))
        positions = torch.tensor([6, 4])  # rows at different positions
        for i in range(32):
            token = x[:, 6 + i]
            expected = decode_one_token(model, token, positions, eager_cache)
            got = step(model, token, positions, compiled_cache)
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
            positions = positions + 1
    assert counter.frame_count == 1


def test_greedy_generate_matches_transformers(model: Llama) -> None:
    """Greedy generation gives the same tokens as transformers' generate(do_sample=False)."""
    hf_config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=model.config.ffn_dim,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=8193, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    from llama_model.checkpoint import to_hf_name

    hf.load_state_dict({to_hf_name(k): v for k, v in model.state_dict().items()}, strict=True)
    prompt = tokens(9, seed=4)[0].tolist()
    ours = generate(model, prompt, max_new_tokens=24)
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
            attention_mask=torch.ones(1, 9, dtype=torch.long),
        )[0, 9:].tolist()  # fmt: skip
    assert ours == theirs
    assert len(set(ours)) > 1  # not a degenerate repetition that any model would produce


def test_generate_stops_at_stop_token(model: Llama) -> None:
    """Generation ends right after a stop token, which is included."""
    prompt = [1, 2, 3]
    free = generate(model, prompt, max_new_tokens=10)
    stop = free[3]
    stopped = generate(model, prompt, max_new_tokens=10, stop_tokens=[stop])
    assert stopped == free[: free.index(stop) + 1]


def test_sampling_is_seeded_and_top_p_restricts(model: Llama) -> None:
    """Same seed, same sample; a tiny top_p always picks the most likely token (greedy)."""
    prompt = [5, 6, 7, 8]
    a = generate(model, prompt, max_new_tokens=12, temperature=1.0, seed=11)
    b = generate(model, prompt, max_new_tokens=12, temperature=1.0, seed=11)
    c = generate(model, prompt, max_new_tokens=12, temperature=1.0, seed=12)
    assert a == b and a != c
    greedy = generate(model, prompt, max_new_tokens=12)
    assert generate(model, prompt, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_top_p_keeps_smallest_nucleus() -> None:
    """With probabilities (0.5, 0.3, 0.2) and top_p=0.7 only the first two tokens are ever drawn."""
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).expand(4000, 3)
    drawn = sample(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=3)
    assert counts[0] == 0 and counts[1] > 0 and counts[2] > 0
    assert counts[1] / counts[2] == pytest.approx(5 / 3, rel=0.15)


def test_generate_rejects_bad_input(model: Llama) -> None:
    """Empty prompts, out-of-vocabulary ids, too long requests and bad sampling settings fail."""
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [1, 9999], max_new_tokens=3)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 128"):
        generate(model, [1] * 100, max_new_tokens=29)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], max_new_tokens=2, temperature=-1.0)
    small = KVCache.for_model(model, batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="needs 1 row of at least 12"):
        generate(model, [1, 2, 3], max_new_tokens=10, cache=small)  # checked before any work
    with pytest.raises(ValueError, match="holds 2 row"):
        generate(model, [1], max_new_tokens=2, cache=KVCache.for_model(model, batch_size=2))


def test_generate_leaves_the_cache_ready_to_continue(model: Llama) -> None:
    """After generate, `cache.length` counts the positions written (prompt + all but the last new
    token), so feeding the last token with `append` continues the sequence exactly."""
    prompt = [3, 1, 4, 1, 5]
    cache = KVCache.for_model(model, batch_size=1, max_seq_len=16)
    new = generate(model, prompt, max_new_tokens=6, cache=cache)
    assert cache.length == len(prompt) + len(new) - 1
    with torch.no_grad():
        continued = model(torch.tensor([new[-1:]]), attention=cache.append(1))[0, -1]
        full = model(torch.tensor([prompt + new]))[0, -1]
    torch.testing.assert_close(continued, full, **TOL)


def test_training_after_generation_in_inference_mode(model: Llama) -> None:
    """What the model caches on its first forward (the RoPE frequencies) stays usable by autograd
    when that first forward ran under `torch.inference_mode` (as generation does)."""
    fresh = Llama(model.config)
    fresh.init_weights(seed=0)
    generate(fresh, [1, 2, 3], max_new_tokens=2)  # under inference_mode
    fresh(torch.tensor([[1, 2, 3]])).sum().backward()
    assert fresh.output_weight().grad is not None

"""KV-cached decoding and generation: the cache reproduces a full forward; generate matches HF greedy."""

from __future__ import annotations

import pytest
import torch
import transformers

from llama_model import KVCache, Llama, LlamaConfig, RopeScaling, generate, sample

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
        stepwise = torch.cat([model(x[:, i : i + 1], cache=cache) for i in range(20)], dim=1)
    torch.testing.assert_close(stepwise, full, **TOL)
    assert cache.length == 20


def test_chunked_prefill_equals_full_forward(model: Llama) -> None:
    """Prefilling in chunks (7, then 9, then 1 tokens) equals one full forward."""
    x = tokens(17, seed=1)
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=17)
    with torch.no_grad():
        full = model(x)
        chunks = [model(x[:, a:b], cache=cache) for a, b in ((0, 7), (7, 16), (16, 17))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, **TOL)


def test_cache_reset_reuses_memory(model: Llama) -> None:
    """After reset the cache gives the same logits again, in the same storage."""
    x = tokens(5)
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=8)
    storage = cache.keys.data_ptr()
    with torch.no_grad():
        first = model(x, cache=cache)
        cache.reset()
        second = model(x, cache=cache)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert cache.keys.data_ptr() == storage


def test_cache_overflow_and_mismatch_are_errors(model: Llama) -> None:
    """A full cache, a batch-size mismatch, a too-large cache and document_ids with a cache fail."""
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=4)
    with torch.no_grad():
        model(tokens(4), cache=cache)
        with pytest.raises(ValueError, match="KV cache is full"):
            model(tokens(1), cache=cache)
        with pytest.raises(ValueError, match="batch size 1"):
            model(tokens(1)[:1], cache=KVCache.for_model(model, batch_size=2))
        with pytest.raises(ValueError, match="document_ids"):
            model(tokens(2), cache=KVCache.for_model(model, batch_size=2),
                  document_ids=torch.zeros(2, 2, dtype=torch.long))  # fmt: skip
    with pytest.raises(ValueError, match="max_seq_len must be in"):
        KVCache(model.config, 1, 1000)


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

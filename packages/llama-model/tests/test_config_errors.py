"""`llama_model.format_validation_error` on llama-model's own configs, plus what the contract lacks.

The formatter's contract (the line format, suggested keys, lists, dicts, unions, validators'
messages, prefixes, no pydantic noise) is the root `tests/test_config_errors.py`, which runs every
case against both homes of the formatter (this package's and llama-data's twin). This file holds
what that contract does not: the formatter on `LlamaConfig` (its presets, its nested
`RopeScaling`, the validators of both) and one case the contract does not pin (an element index
other than 0, inside a section). It is also what runs the formatter in CI's isolated llama-model
environment, where the root tests do not run. Expected lines are written out by hand from the
format in the module docstring, never produced by the code under test.
"""

from __future__ import annotations

from typing import Any

import pydantic
import pytest
from pydantic import BaseModel, ConfigDict

from llama_model import LlamaConfig, format_validation_error

NOISE = ("pydantic.dev", "[type=", "Extra inputs are not permitted", "Value error,")


def _llama_config_error(**overrides: Any) -> pydantic.ValidationError:
    """What `LlamaConfig.from_preset("debug", **overrides)` raises."""
    with pytest.raises(pydantic.ValidationError) as info:
        LlamaConfig.from_preset("debug", **overrides)
    return info.value


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_layerz": 2},
        {"n_layers": 0},
        {"n_heads": 7},
        {"rope_scaling": {"factr": 8.0}},
        {"rope_scaling": {"low_freq_factor": 4.0, "high_freq_factor": 1.0}},
    ],
)
def test_llama_config_errors_carry_no_library_noise(overrides: dict[str, Any]) -> None:
    """Each LlamaConfig error is indented lines without pydantic's URL, "[type=...]", "Extra
    inputs" or "Value error," wording (negative control: pydantic's own text has one of them)."""
    error = _llama_config_error(**overrides)
    assert any(word in str(error) for word in NOISE)
    lines = format_validation_error(error, LlamaConfig).splitlines()
    assert lines and not [line for line in lines for word in NOISE if word in line]
    assert all(line.startswith("  ") and line.strip() for line in lines)


def test_bad_llama_config_value_names_the_field_and_the_value() -> None:
    """A preset override out of range reads `<prefix>.<field> = <value>: <what is wrong>`."""
    error = _llama_config_error(n_layers=0)
    assert format_validation_error(error, LlamaConfig, prefix="model.overrides") == (
        "  model.overrides.n_layers = 0: must be greater than 0"
    )


def test_prefix_places_the_model_in_a_larger_config() -> None:
    """With `prefix`, keys are written from the larger config's root: a LlamaConfig built from
    `model.overrides` names `model.overrides.<field>` and lists LlamaConfig's fields."""
    error = _llama_config_error(n_layerz=2)
    fields = ", ".join(LlamaConfig.model_fields)
    assert format_validation_error(error, LlamaConfig, prefix="model.overrides") == (
        f"  model.overrides.n_layerz: unknown key; did you mean 'n_layers'? valid keys: {fields}"
    )


def test_nested_model_of_llama_config_is_followed() -> None:
    """An Optional nested model (`rope_scaling: RopeScaling | None`) gives its own valid keys, its
    validator's message (which names its key) is kept as written, and LlamaConfig's root
    validator's message is put after the prefix it does not name."""
    error = _llama_config_error(rope_scaling={"factr": 8.0})
    assert format_validation_error(error, LlamaConfig) == (
        "  rope_scaling.factr: unknown key; did you mean 'factor'? valid keys: factor, "
        "low_freq_factor, high_freq_factor, original_max_seq_len"
    )
    error = _llama_config_error(rope_scaling={"low_freq_factor": 4.0, "high_freq_factor": 1.0})
    assert format_validation_error(error, LlamaConfig) == (
        "  rope_scaling.high_freq_factor (1.0) must be greater than low_freq_factor (4.0); "
        "Llama 3.1 uses 4 and 1"
    )
    error = _llama_config_error(n_heads=7)
    assert format_validation_error(error, LlamaConfig, prefix="model.overrides") == (
        "  model.overrides: dim (256) must be divisible by n_heads (7); "
        "choose n_heads among the divisors of 256"
    )


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Strict):
    path: str
    name: str | None = None


class Data(_Strict):
    sources: tuple[Source, ...] = ()


class Run(_Strict):
    data: Data = Data()


def test_list_element_in_a_section_is_named_by_its_index() -> None:
    """The second element of a tuple of models inside a section reads `data.sources[1]` (the root
    contract pins index 0 at the top level only), with the element's own keys; its missing
    required key is reported too, and the valid first element gives no line."""
    with pytest.raises(pydantic.ValidationError) as info:
        Run.model_validate({"data": {"sources": [{"path": "a"}, {"paht": "b"}]}})
    assert format_validation_error(info.value, Run).splitlines() == [
        "  data.sources[1].path: missing; this key is required",
        "  data.sources[1].paht: unknown key; did you mean 'path'? valid keys: path, name",
    ]

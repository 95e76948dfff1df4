"""Tests for `llama_model.format_validation_error`: pydantic errors as lines a person can act on.

The expected lines are written out by hand from the format in the module docstring
(``<key> = <value>: <what is wrong>``, ``<key>: unknown key; did you mean ...? valid keys: ...``),
never produced by the code under test.
"""

from __future__ import annotations

from typing import Any, Self

import pydantic
import pytest
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from llama_model import LlamaConfig, format_validation_error


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Strict):
    path: str
    weight: float = Field(default=1.0, gt=0)
    name: str | None = None


class Optimizer(_Strict):
    peak_lr: float = Field(default=1e-3, gt=0)
    final_lr: float = Field(default=1e-4, ge=0)
    warmup_steps: int = 0

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.final_lr > self.peak_lr:
            raise ValueError(
                f"optimizer.final_lr ({self.final_lr}) exceeds optimizer.peak_lr ({self.peak_lr})"
            )
        return self


class Data(_Strict):
    sources: tuple[Source, ...] = ()
    named: dict[str, Source] = Field(default_factory=dict)
    seq_len: PositiveInt = 8

    @field_validator("seq_len")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two, e.g. 256")
        return value


class Run(_Strict):
    optimizer: Optimizer = Optimizer()
    data: Data = Data()
    steps: PositiveInt = 10
    fallback: Source | int | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.optimizer.warmup_steps >= self.steps:
            raise ValueError(
                f"optimizer.warmup_steps ({self.optimizer.warmup_steps}) must be smaller than "
                f"steps ({self.steps})"
            )
        return self


def _format(data: dict[str, Any], model: type[BaseModel] = Run, prefix: str = "") -> str:
    with pytest.raises(pydantic.ValidationError) as info:
        model.model_validate(data)
    return format_validation_error(info.value, model, prefix=prefix)


OPTIMIZER_KEYS = "peak_lr, final_lr, warmup_steps"
RUN_KEYS = "optimizer, data, steps, fallback"


def test_unknown_key_suggests_the_closest_and_lists_the_section() -> None:
    """A misspelt key names itself, the closest valid key and the valid keys of its section."""
    assert _format({"optimizer": {"peak_lrr": 1e-3}}) == (
        f"  optimizer.peak_lrr: unknown key; did you mean 'peak_lr'? valid keys: {OPTIMIZER_KEYS}"
    )


def test_unknown_key_matching_a_word_of_a_key_is_suggested() -> None:
    """`lr` is no near spelling of any key but is a word of `peak_lr` (the most similar such key)."""
    assert _format({"optimizer": {"lr": -1}}) == (
        f"  optimizer.lr: unknown key; did you mean 'peak_lr'? valid keys: {OPTIMIZER_KEYS}"
    )


def test_unknown_section_is_named_with_the_top_level_keys() -> None:
    """An unknown section is an unknown key of the root: suggested among the root's keys."""
    assert _format({"optimiser": {"peak_lr": 1e-3}}) == (
        f"  optimiser: unknown key; did you mean 'optimizer'? valid keys: {RUN_KEYS}"
    )


def test_nothing_close_means_no_suggestion() -> None:
    """When no valid key is close, the line lists the valid keys without a guess."""
    assert _format({"bogus": 3}) == f"  bogus: unknown key; valid keys: {RUN_KEYS}"


def test_bad_value_names_the_key_and_the_value() -> None:
    """A value out of range is shown with its dotted key and its repr, without pydantic's noise."""
    assert (
        _format({"optimizer": {"peak_lr": -1}})
        == "  optimizer.peak_lr = -1: must be greater than 0"
    )
    assert _format({"steps": "many"}) == (
        "  steps = 'many': must be a valid integer, unable to parse string as an integer"
    )


def test_unknown_key_in_a_list_of_models_is_named_by_index() -> None:
    """A key inside the second element of a tuple of models: `data.sources[1].paht`, with the
    element's own keys; its missing required key is reported too."""
    text = _format({"data": {"sources": [{"path": "a"}, {"paht": "b"}]}})
    assert text.splitlines() == [
        "  data.sources[1].path: missing; this key is required",
        "  data.sources[1].paht: unknown key; did you mean 'path'? valid keys: path, weight, name",
    ]


def test_value_in_a_dict_of_models_is_named_by_its_key() -> None:
    """Errors below a dict of models are named by the dict key, and its models' keys are listed."""
    assert _format({"data": {"named": {"web": {"path": "w", "weigth": 2}}}}) == (
        "  data.named.web.weigth: unknown key; did you mean 'weight'? valid keys: path, weight, name"
    )


def test_union_member_names_are_not_keys() -> None:
    """Pydantic's location part naming a union member (`Source`, `int`) is dropped from the key;
    the key below the member is looked up in that member's fields."""
    text = _format({"fallback": {"path": "x", "wieght": 2}})
    assert text.splitlines() == [
        "  fallback.wieght: unknown key; did you mean 'weight'? valid keys: path, weight, name",
        "  fallback = {'path': 'x', 'wieght': 2}: must be a valid integer",
    ]


def test_our_model_validator_message_passes_through() -> None:
    """A ValueError raised by a model validator keeps its message (it names the fields), without
    pydantic's "Value error, " prefix, nested or at the root."""
    assert _format({"optimizer": {"peak_lr": 1e-4, "final_lr": 1e-3}}) == (
        "  optimizer.final_lr (0.001) exceeds optimizer.peak_lr (0.0001)"
    )
    assert _format({"steps": 5, "optimizer": {"warmup_steps": 5}}) == (
        "  optimizer.warmup_steps (5) must be smaller than steps (5)"
    )


def test_our_field_validator_message_gets_the_key_and_value() -> None:
    """A field validator's message, which does not name the field, is put after key and value."""
    assert _format({"data": {"seq_len": 12}}) == (
        "  data.seq_len = 12: must be a power of two, e.g. 256"
    )


def test_a_section_given_a_value_lists_its_keys() -> None:
    """A scalar where a section belongs says so and lists the section's keys."""
    assert _format({"optimizer": 3}) == (
        f"  optimizer = 3: must be a section (a TOML table) with keys: {OPTIMIZER_KEYS}"
    )


def test_every_problem_gets_its_own_line() -> None:
    """Several problems give several lines, in pydantic's order."""
    text = _format({"optimizer": {"peak_lr": 0, "eps": 1}, "steps": 0})
    assert text.splitlines() == [
        "  optimizer.peak_lr = 0: must be greater than 0",
        f"  optimizer.eps: unknown key; valid keys: {OPTIMIZER_KEYS}",
        "  steps = 0: must be greater than 0",
    ]


def test_long_values_are_cut() -> None:
    """An offending value's repr is cut at 60 characters, so one line stays one line."""
    line = _format({"steps": "x" * 500})
    value = line.split(" = ", 1)[1].split(": ", 1)[0]
    assert len(value) == 60 and value.endswith("...")


def test_prefix_places_the_model_in_a_larger_config() -> None:
    """With `prefix`, keys are written from the larger config's root: a LlamaConfig built from
    `model.overrides` names `model.overrides.<field>` and lists LlamaConfig's fields."""
    with pytest.raises(pydantic.ValidationError) as info:
        LlamaConfig.from_preset("debug", n_layerz=2)
    fields = ", ".join(LlamaConfig.model_fields)
    assert format_validation_error(info.value, LlamaConfig, prefix="model.overrides") == (
        f"  model.overrides.n_layerz: unknown key; did you mean 'n_layers'? valid keys: {fields}"
    )


def test_nested_model_of_llama_config_is_followed() -> None:
    """An Optional nested model (`rope_scaling: RopeScaling | None`) gives its own valid keys, and
    a root validator's message is put after the prefix it does not name."""
    with pytest.raises(pydantic.ValidationError) as info:
        LlamaConfig.from_preset("debug", rope_scaling={"factr": 8.0})
    assert format_validation_error(info.value, LlamaConfig) == (
        "  rope_scaling.factr: unknown key; did you mean 'factor'? valid keys: factor, "
        "low_freq_factor, high_freq_factor, original_max_seq_len"
    )
    with pytest.raises(pydantic.ValidationError) as info:
        LlamaConfig.from_preset("debug", n_heads=7)
    assert format_validation_error(info.value, LlamaConfig, prefix="model.overrides") == (
        "  model.overrides: dim (256) must be divisible by n_heads (7); "
        "choose n_heads among the divisors of 256"
    )


@pytest.mark.parametrize(
    "data",
    [
        {"optimizer": {"peak_lrr": 1}},
        {"optimizer": {"peak_lr": -1}},
        {"optimizer": {"peak_lr": 1e-4, "final_lr": 1e-3}},
        {"data": {"sources": [{"paht": "b"}]}},
        {"fallback": {"wieght": 2}},
        {"optimizer": 3},
    ],
)
def test_no_library_noise(data: dict[str, Any]) -> None:
    """None of pydantic's URL, "[type=...]", "Extra inputs" or "Value error," wording survives
    (negative control: pydantic's own text has at least one of them)."""
    noise = ("pydantic.dev", "[type=", "Extra inputs are not permitted", "Value error,")
    with pytest.raises(pydantic.ValidationError) as info:
        Run.model_validate(data)
    assert any(word in str(info.value) for word in noise)
    text = format_validation_error(info.value, Run)
    assert not [word for word in noise if word in text]
    assert all(line.startswith("  ") and line.strip() for line in text.splitlines())

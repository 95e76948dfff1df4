"""The one config-errors contract, checked against both of its homes.

STYLE.md: "Errors are messages to a person: what was wrong, the offending value, what to do".
Every CLI prints a rejected config through `format_validation_error(error, model, *, prefix="")`,
which exists once per dependency boundary: `llama_model.format_validation_error` (torch side:
llama-train and the CLIs after it) and `llama_data._config_errors.format_validation_error`
(llama-data, which may not import torch or llama-model). Every test here runs against both, and
the expected lines are written out by hand from the format in the modules' docstrings
(``<key> = <value>: <what is wrong>``, ``<key>: unknown key; did you mean ...? valid keys: ...``),
never produced by either implementation. The models are defined here (frozen, extra="forbid"), so
the contract depends on neither package's configs.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any, Literal, Self

import pydantic
import pytest
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

Formatter = Callable[..., str]
IMPLEMENTATIONS = {
    "llama_model": "llama_model",
    "llama_data": "llama_data._config_errors",
}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def format_validation_error(request: pytest.FixtureRequest) -> Formatter:
    """The implementation under test."""
    module = importlib.import_module(IMPLEMENTATIONS[request.param])
    formatter: Formatter = module.format_validation_error
    return formatter


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Strict):
    path: str
    weight: float = Field(default=1.0, gt=0)
    format: Literal["jsonl", "parquet"] = "jsonl"


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


class Run(_Strict):
    optimizer: Optimizer = Optimizer()
    warmup: Optimizer | None = None
    sources: tuple[Source, ...] = ()
    named: dict[str, Source] = Field(default_factory=dict)
    fallback: Source | int | None = None
    steps: PositiveInt = 10
    seq_len: int = 8

    @field_validator("seq_len")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two, e.g. 256")
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.steps == 7:
            raise ValueError("7 steps is unlucky; pick another number of steps")
        return self


RUN_KEYS = "optimizer, warmup, sources, named, fallback, steps, seq_len"
OPTIMIZER_KEYS = "peak_lr, final_lr, warmup_steps"
SOURCE_KEYS = "path, weight, format"


def _lines(formatter: Formatter, data: dict[str, Any], prefix: str | None = None) -> list[str]:
    """`formatter`'s lines for the error `Run.model_validate(data)` raises."""
    with pytest.raises(pydantic.ValidationError) as info:
        Run.model_validate(data)
    if prefix is None:
        return formatter(info.value, Run).splitlines()
    return formatter(info.value, Run, prefix=prefix).splitlines()


def test_unknown_key_suggests_the_closest_and_lists_the_section(
    format_validation_error: Formatter,
) -> None:
    """A misspelt key names itself, the closest valid key and the valid keys of its own section."""
    assert _lines(format_validation_error, {"optimiser": {}}) == [
        f"  optimiser: unknown key; did you mean 'optimizer'? valid keys: {RUN_KEYS}"
    ]
    assert _lines(format_validation_error, {"optimizer": {"peak_lrr": 1}}) == [
        f"  optimizer.peak_lrr: unknown key; did you mean 'peak_lr'? valid keys: {OPTIMIZER_KEYS}"
    ]


def test_unknown_key_sharing_a_word_is_suggested(format_validation_error: Formatter) -> None:
    """`lr` is no near spelling of any key (difflib < 0.6) but a word of `peak_lr` and `final_lr`;
    the more similar, `peak_lr`, is suggested."""
    assert _lines(format_validation_error, {"optimizer": {"lr": -1}}) == [
        f"  optimizer.lr: unknown key; did you mean 'peak_lr'? valid keys: {OPTIMIZER_KEYS}"
    ]


def test_nothing_close_means_no_suggestion(format_validation_error: Formatter) -> None:
    """When no valid key is close, the line lists the valid keys without a guess."""
    assert _lines(format_validation_error, {"bogus": 3}) == [
        f"  bogus: unknown key; valid keys: {RUN_KEYS}"
    ]


class Empty(_Strict):
    pass


class WithEmpty(_Strict):
    dedup: Empty = Empty()


def test_a_section_without_keys_says_so(format_validation_error: Formatter) -> None:
    """An unknown key in a section that takes none says that, not an empty list of keys."""
    with pytest.raises(pydantic.ValidationError) as info:
        WithEmpty.model_validate({"dedup": {"x": 1}})
    assert format_validation_error(info.value, WithEmpty).splitlines() == [
        "  dedup.x: unknown key; this section takes no keys"
    ]


def test_bad_value_names_the_key_and_the_value(format_validation_error: Formatter) -> None:
    """A rejected value is shown with its key and its repr, pydantic's "Input should be" as
    "must be"."""
    assert _lines(format_validation_error, {"steps": 0}) == ["  steps = 0: must be greater than 0"]
    assert _lines(format_validation_error, {"steps": "many"}) == [
        "  steps = 'many': must be a valid integer, unable to parse string as an integer"
    ]
    assert _lines(format_validation_error, {"sources": [{"path": "a", "format": "csv"}]}) == [
        "  sources[0].format = 'csv': must be 'jsonl' or 'parquet'"
    ]


def test_long_values_are_cut(format_validation_error: Formatter) -> None:
    """An offending value's repr is cut to 60 characters ending in "...", so a line stays short."""
    assert _lines(format_validation_error, {"steps": "x" * 500}) == [
        "  steps = '" + "x" * 56 + "...: must be a valid integer, unable to parse string as an "
        "integer"
    ]


def test_nested_model_keys_are_dotted(format_validation_error: Formatter) -> None:
    """A bad value inside a section reads `section.key = value`; an optional section (`warmup:
    Optimizer | None`) lists its own keys."""
    assert _lines(format_validation_error, {"optimizer": {"peak_lr": -1}}) == [
        "  optimizer.peak_lr = -1: must be greater than 0"
    ]
    assert _lines(format_validation_error, {"warmup": {"final_lrr": 0}}) == [
        f"  warmup.final_lrr: unknown key; did you mean 'final_lr'? valid keys: {OPTIMIZER_KEYS}"
    ]


def test_list_items_are_named_by_index(format_validation_error: Formatter) -> None:
    """A key inside a tuple of models reads `sources[0].paht`, with the element's own keys; its
    missing required key is reported too."""
    assert _lines(format_validation_error, {"sources": [{"paht": "a"}]}) == [
        "  sources[0].path: missing; this key is required",
        f"  sources[0].paht: unknown key; did you mean 'path'? valid keys: {SOURCE_KEYS}",
    ]


def test_dict_values_are_named_by_their_key(format_validation_error: Formatter) -> None:
    """Below a dict of models, the dict key is part of the dotted key and the model's keys are
    listed."""
    assert _lines(format_validation_error, {"named": {"web": {"path": "w", "weigth": 2}}}) == [
        f"  named.web.weigth: unknown key; did you mean 'weight'? valid keys: {SOURCE_KEYS}"
    ]
    assert _lines(format_validation_error, {"named": {"web": {"path": "w", "weight": 0}}}) == [
        "  named.web.weight = 0: must be greater than 0"
    ]


def test_union_member_names_are_not_keys(format_validation_error: Formatter) -> None:
    """Pydantic's location parts naming union members (`Source`, `int`) are dropped from the key;
    a key below a member is looked up in that member's fields; alternatives rejected for the same
    value share one line."""
    assert _lines(format_validation_error, {"fallback": {"path": "x", "wieght": 2}}) == [
        f"  fallback.wieght: unknown key; did you mean 'weight'? valid keys: {SOURCE_KEYS}",
        "  fallback = {'path': 'x', 'wieght': 2}: must be a valid integer",
    ]
    assert _lines(format_validation_error, {"fallback": "many"}) == [
        f"  fallback = 'many': must be a section (a TOML table) with keys: {SOURCE_KEYS} or must "
        "be a valid integer, unable to parse string as an integer"
    ]


def test_our_validator_messages_are_kept(format_validation_error: Formatter) -> None:
    """A model validator's message is kept as written, without "Value error, " and without a key
    in front when it names its key or sits at the root; a field validator's message, which does
    not name its field, follows the key and the value."""
    assert _lines(format_validation_error, {"optimizer": {"peak_lr": 1e-4, "final_lr": 1e-3}}) == [
        "  optimizer.final_lr (0.001) exceeds optimizer.peak_lr (0.0001)"
    ]
    assert _lines(format_validation_error, {"steps": 7}) == [
        "  7 steps is unlucky; pick another number of steps"
    ]
    assert _lines(format_validation_error, {"seq_len": 12}) == [
        "  seq_len = 12: must be a power of two, e.g. 256"
    ]


def test_a_value_where_a_section_belongs_lists_its_keys(format_validation_error: Formatter) -> None:
    """A scalar given for a section says it must be a table and lists the section's keys."""
    assert _lines(format_validation_error, {"optimizer": 3}) == [
        f"  optimizer = 3: must be a section (a TOML table) with keys: {OPTIMIZER_KEYS}"
    ]


def test_prefix_places_the_model_in_a_larger_config(format_validation_error: Formatter) -> None:
    """`prefix` goes in front of every key (a trailing dot is not doubled), and a root validator's
    message, which does not name the prefix, is put after it."""
    assert _lines(format_validation_error, {"sources": [{}]}, prefix="data") == [
        "  data.sources[0].path: missing; this key is required"
    ]
    assert _lines(format_validation_error, {"bogus": 1}, prefix="data.") == [
        f"  data.bogus: unknown key; valid keys: {RUN_KEYS}"
    ]
    assert _lines(format_validation_error, {"steps": 7}, prefix="run") == [
        "  run: 7 steps is unlucky; pick another number of steps"
    ]


def test_every_problem_gets_its_own_line(format_validation_error: Formatter) -> None:
    """Several problems give as many lines, in pydantic's order."""
    assert _lines(format_validation_error, {"optimizer": {"peak_lr": 0, "eps": 1}, "steps": 0}) == [
        "  optimizer.peak_lr = 0: must be greater than 0",
        f"  optimizer.eps: unknown key; valid keys: {OPTIMIZER_KEYS}",
        "  steps = 0: must be greater than 0",
    ]


NOISE = ("pydantic.dev", "[type=", "Extra inputs are not permitted")


@pytest.mark.parametrize(
    "data",
    [
        {"optimiser": {}},
        {"optimizer": {"peak_lr": -1}},
        {"optimizer": {"peak_lr": 1e-4, "final_lr": 1e-3}},
        {"sources": [{"paht": "b"}]},
        {"fallback": {"wieght": 2}},
        {"optimizer": 3},
        {"steps": 7},
    ],
)
def test_no_library_noise(format_validation_error: Formatter, data: dict[str, Any]) -> None:
    """No line carries pydantic's URL, "[type=...]" or "Extra inputs are not permitted" (negative
    control: pydantic's own text has at least one), and every line is an indented problem."""
    with pytest.raises(pydantic.ValidationError) as info:
        Run.model_validate(data)
    assert any(word in str(info.value) for word in NOISE)
    lines = format_validation_error(info.value, Run).splitlines()
    assert lines and not [line for line in lines for word in NOISE if word in line]
    assert all(line.startswith("  ") and line.strip() for line in lines)


def test_llama_data_twin_imports_neither_torch_nor_llama_model() -> None:
    """llama-data's formatter loads no torch and no llama_model (DESIGN.md: llama-data has no
    torch), which is why it is a twin and not an import."""
    check = (
        "import sys, llama_data._config_errors\n"
        "print(sorted(m for m in ('torch', 'llama_model') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"

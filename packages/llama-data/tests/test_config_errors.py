"""`format_validation_error`: pydantic errors as one line per problem, in the project's format."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llama_data._config_errors import format_validation_error, unknown_name


class Optimizer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(default=3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    kind: Literal["adamw", "sgd"] = "adamw"


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    weight: float = Field(default=1.0, ge=0)


class Run(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=10, ge=1)
    optimizer: Optimizer = Optimizer()
    sources: list[Source] = []
    named: dict[str, Source] = {}
    warmup: Optimizer | None = None

    @model_validator(mode="after")
    def _check(self) -> Run:
        if self.steps == 7:
            raise ValueError("steps=7 is unlucky; pick another")
        return self


def _message(data: object, *, prefix: str = "") -> list[str]:
    with pytest.raises(ValidationError) as info:
        Run.model_validate(data)
    return format_validation_error(info.value, Run, prefix=prefix).splitlines()


def test_bad_value_names_the_dotted_key_and_the_value() -> None:
    """A nested bad value reads `  optimizer.lr = -1: <what is wrong>`."""
    assert _message({"optimizer": {"lr": -1}}) == [
        "  optimizer.lr = -1: Input should be greater than 0"
    ]


def test_unknown_key_suggests_the_closest_and_lists_the_section() -> None:
    """An unknown key lists the keys of its own section (not the top level), in declaration
    order, and the closest."""
    assert _message({"optimizer": {"lrr": 0.1}}) == [
        "  optimizer.lrr: unknown key; did you mean 'lr'? valid keys: lr, betas, kind"
    ]
    assert _message({"stepz": 3}) == [
        "  stepz: unknown key; did you mean 'steps'? valid keys: steps, optimizer, sources, "
        "named, warmup"
    ]


def test_unknown_key_without_a_close_match_only_lists() -> None:
    """No suggestion when nothing is close; the valid keys are still listed."""
    assert _message({"zzz": 1}) == [
        "  zzz: unknown key; valid keys: steps, optimizer, sources, named, warmup"
    ]


def test_keys_inside_lists_dicts_and_optionals() -> None:
    """List items read `sources[1].x`, dict values `named.web.x`, an optional model its fields."""
    assert _message(
        {
            "sources": [{"path": "a"}, {"path": "b", "wieght": 2}],
            "named": {"web": {"path": "c", "weight": -1}},
            "warmup": {"kindd": "sgd"},
        }
    ) == [
        "  sources[1].wieght: unknown key; did you mean 'weight'? valid keys: path, weight",
        "  named.web.weight = -1: Input should be greater than or equal to 0",
        "  warmup.kindd: unknown key; did you mean 'kind'? valid keys: lr, betas, kind",
    ]


def test_missing_key_and_prefix() -> None:
    """A missing required key says so; `prefix` goes in front of every key."""
    assert _message({"sources": [{}]}, prefix="data") == [
        "  data.sources[0].path: missing; this key is required"
    ]


def test_check_across_keys_drops_pydantics_wrapping() -> None:
    """A model validator's ValueError reads `  <prefix>: <message>` without "Value error, "."""
    assert _message({"steps": 7}, prefix="run") == ["  run: steps=7 is unlucky; pick another"]
    assert _message({"steps": 7}) == ["  Run: steps=7 is unlucky; pick another"]


def test_no_pydantic_url_and_one_line_per_problem() -> None:
    """Several problems give as many lines, and none carries pydantic's documentation URL."""
    lines = _message({"steps": 0, "optimizer": {"kind": "adam", "lrr": 1}})
    assert lines == [
        "  steps = 0: Input should be greater than or equal to 1",
        "  optimizer.kind = 'adam': Input should be 'adamw' or 'sgd'",
        "  optimizer.lrr: unknown key; did you mean 'lr'? valid keys: lr, betas, kind",
    ]
    with pytest.raises(ValidationError) as info:
        Run.model_validate({"steps": 0})
    assert "errors.pydantic.dev" in str(info.value)  # what pydantic itself prints (the control)
    assert "pydantic.dev" not in format_validation_error(info.value, Run)


def test_unknown_name_for_other_kinds() -> None:
    """The same wording serves unknown step types (valid names in the order given)."""
    assert unknown_name("gopher", ["pii", "gopher_quality"], "step type") == (
        "unknown step type; did you mean 'gopher_quality'? valid step types: pii, gopher_quality"
    )

"""`load_config`: defaults < TOML file < ``key=value`` overrides, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from llama_model import load_config


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = 1e-5
    names: list[str] = []


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = 10
    inner: _Inner = _Inner()


def test_overrides_win_over_the_file_which_wins_over_defaults(tmp_path: Path) -> None:
    """A file sets two keys, an override replaces one; TOML literals are parsed."""
    path = tmp_path / "c.toml"
    path.write_text("steps = 5\n[inner]\nlr = 0.5\n")
    config = load_config(_Outer, path, ["inner.lr=3e-4", 'inner.names=["a", "b"]'])
    assert (config.steps, config.inner.lr, config.inner.names) == (5, 3e-4, ["a", "b"])
    assert load_config(_Outer).steps == 10


def test_an_override_without_value_names_the_key() -> None:
    """``steps`` alone (no ``=``) is refused, naming the key and the form to write."""
    with pytest.raises(ValueError, match="steps: no value"):
        load_config(_Outer, None, ["steps"])


def test_an_override_into_a_value_names_the_key() -> None:
    """``steps.x=1`` is refused: steps is a value, not a section."""
    with pytest.raises(ValueError, match="'steps' is a value, not a section"):
        load_config(_Outer, None, ["steps=3", "steps.x=1"])

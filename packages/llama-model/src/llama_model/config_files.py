"""Configs from TOML files and ``key.sub=value`` overrides: the one loader every command line of
the project uses (`llama-train`, `llama-align`), so their configs read the same way.

Precedence is CLI > TOML > defaults: the file's tables are read, then each override replaces one
dotted key (values parsed as TOML literals, so ``steps=200``, ``lr=3e-4``, ``name="a b"`` and
``sources=[...]`` work; anything that is not a TOML literal is taken as a string). The result is
validated by the pydantic model; print a rejection with `format_validation_error`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

__all__ = ["load_config"]

Config = TypeVar("Config", bound=BaseModel)


def load_config(
    model: type[Config], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> Config:
    """`model`'s defaults, updated by the TOML file at `path`, updated by ``key.sub=value``
    overrides.

    Raises `pydantic.ValidationError` for a config that does not validate, `ValueError` for an
    override that is not ``key=value`` (its message reads ``key: what is wrong``),
    `tomllib.TOMLDecodeError` and `OSError` for the file.
    """
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ValueError(
                f"{item!r}: no key; an override must look like section.key=value "
                "(a TOML value), e.g. optimizer.peak_lr=3e-4"
            )
        if not sep:
            raise ValueError(
                f"{key}: no value; an override must look like section.key=value "
                f"(a TOML value): write {key}=<value>"
            )
        _set_dotted(data, key, _parse_value(raw.strip()))
    return model.model_validate(data)


def _parse_value(raw: str) -> Any:
    """A TOML literal (number, bool, string, array, inline table), else the raw string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(
                f"{key}: {part!r} is a value, not a section; override the value itself: "
                f"{'.'.join(parts[:depth])}=<value>"
            )
        node = child
    node[parts[-1]] = value

"""Config validation errors as messages to a person (DESIGN.md: "validated with messages that name
the field"; STYLE.md: "Errors are messages to a person").

pydantic's own text for a bad config file reads "Extra inputs are not permitted" followed by a URL
to its documentation, and never says which keys would have been right. `format_validation_error`
turns a `pydantic.ValidationError` into one line per problem, in the format every CLI of the
project shares:

```
  <dotted.key> = <value repr>: <what is wrong>
  <dotted.key>: unknown key; did you mean '<closest>'? valid keys: a, b, c
```

Valid keys are listed in the order the model declares them; the closest is found with
`difflib.get_close_matches` (omitted when nothing is close). llama-model's `config_errors` writes
the same format for the torch side (llama-data cannot import it).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pydantic
from pydantic import BaseModel

__all__ = ["format_validation_error", "unknown_name"]

_CLOSE_ENOUGH = 0.6  # difflib's default similarity cutoff
_LIBRARY_PREFIXES = ("Value error, ", "Assertion failed, ")  # pydantic's wrapping of our errors


def unknown_name(name: str, valid: Iterable[str], kind: str = "key") -> str:
    """What to say about an unknown `name`: "unknown <kind>; did you mean '<closest>'? valid
    <kind>s: a, b, c", `valid` in the order given (the suggestion only when one is close)."""
    choices = list(valid)
    closest = difflib.get_close_matches(name, choices, n=1, cutoff=_CLOSE_ENOUGH)
    suggestion = f"; did you mean {closest[0]!r}?" if closest else ";"
    listing = ", ".join(choices) if choices else "(none)"
    return f"unknown {kind}{suggestion} valid {kind}s: {listing}"


def _dotted(prefix: str, loc: Sequence[int | str]) -> str:
    """("steps", 0, "min_words") under prefix "run" -> "run.steps[0].min_words"."""
    key = prefix
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key = f"{key}.{part}" if key else str(part)
    return key


def _unwrap(annotation: Any) -> list[Any]:
    """The types an annotation may hold: the members of a union, the inside of Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _step_into(annotation: Any, part: int | str) -> Any:
    """The annotation of `annotation[part]`: a model's field, a sequence's item, a mapping's value."""
    for candidate in _unwrap(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            field = candidate.model_fields.get(str(part))
            if field is not None:
                return field.annotation
            continue
        origin = typing.get_origin(candidate)
        args = typing.get_args(candidate)
        if isinstance(origin, type) and issubclass(origin, Mapping) and len(args) == 2:
            return args[1]
        if isinstance(part, int) and args:  # list[X], tuple[X, ...], set[X]: the item type
            return args[0]
    return None


def _valid_keys(model: type[BaseModel], path: Sequence[int | str]) -> list[str]:
    """The field names of the model found at `path` inside `model` (empty if it is not a model)."""
    annotation: Any = model
    for part in path:
        annotation = _step_into(annotation, part)
        if annotation is None:
            return []
    for candidate in _unwrap(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return list(candidate.model_fields)
    return []


def _what_is_wrong(message: str) -> str:
    for library_prefix in _LIBRARY_PREFIXES:
        if message.startswith(library_prefix):
            return message[len(library_prefix) :]
    return message


def format_validation_error(
    error: pydantic.ValidationError, model: type[BaseModel], *, prefix: str = ""
) -> str:
    """One line per problem in `error` (raised validating `model`), keys dotted under `prefix`.

    ``  <dotted.key> = <value repr>: <what is wrong>`` for a bad value,
    ``  <dotted.key>: unknown key; did you mean '<closest>'? valid keys: a, b, c`` for a key the
    model does not have, ``  <dotted.key>: missing; this key is required`` for an absent one, and
    ``  <prefix>: <what is wrong>`` for a check across several keys. No pydantic URLs.
    """
    lines = []
    for problem in error.errors(include_url=False):
        loc = tuple(problem["loc"])
        key = _dotted(prefix, loc)
        if problem["type"] == "extra_forbidden" and loc:
            valid = _valid_keys(model, loc[:-1])
            lines.append(f"  {key}: {unknown_name(str(loc[-1]), valid)}")
        elif problem["type"] == "missing":
            lines.append(f"  {key}: missing; this key is required")
        elif not loc:
            lines.append(f"  {key or model.__name__}: {_what_is_wrong(problem['msg'])}")
        else:
            lines.append(f"  {key} = {problem['input']!r}: {_what_is_wrong(problem['msg'])}")
    return "\n".join(lines)

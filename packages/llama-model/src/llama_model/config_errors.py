"""Configuration errors as messages to a person: one line per problem, naming the key.

Every command line of the project (`llama-train`, and `llama-serve` and `llama-align` after it)
prints a rejected config through `format_validation_error`; `llama-data`, which has no torch and so
no `llama_model`, keeps its twin (`llama_data._config_errors`), and the root test
`tests/test_config_errors.py` holds both to one contract. The format, one line per problem:

    <dotted.key> = <value repr>: <what is wrong>
    <dotted.key>: unknown key; did you mean '<closest>'? valid keys: a, b, c

Keys are written as a person types them in a TOML file or a ``section.key=value`` override
(``data.sources[0].path``), the valid keys are those of the section the unknown key sits in
(nested models, and tuples, lists and dicts of models, are followed through the field
annotations), and the closest one is suggested when one is close (`difflib`). Messages raised by
our own validators already name their fields and are kept as written. Pydantic's documentation
URL, its ``[type=...]`` suffix and its "Extra inputs are not permitted" wording never appear.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

__all__ = ["format_validation_error"]

_MAX_VALUE_REPR = 60  # characters of an offending value shown before it is cut with "..."
_OWN_MESSAGE_TYPES = frozenset({"value_error", "assertion_error"})  # raised by our validators
_SECTION_TYPES = frozenset({"model_type", "model_attributes_type", "dict_type"})


def format_validation_error(
    error: ValidationError, model: type[BaseModel], *, prefix: str = ""
) -> str:
    """`error`, raised while validating `model`, as lines a person can act on.

    Args:
        error: what ``model.model_validate(...)`` (or a constructor) raised.
        model: the model that was validated; its fields give the valid keys of each section.
        prefix: where `model` sits in a larger config, written before every key (e.g.
            ``"model.overrides"`` for a `LlamaConfig` built from a training config's overrides).

    Returns:
        One line per problem, each indented by two spaces, no trailing newline. Alternatives of a
        union rejected for the same value share one line ("must be ... or must be ...").
    """
    lines: dict[str, list[str]] = {}  # head -> its messages (several for union alternatives)
    for detail in error.errors(include_url=False):
        for head, message in _describe(detail, model, prefix.rstrip(".")):
            messages = lines.setdefault(head, [])
            if message not in messages:
                messages.append(message)
    return "\n".join(
        f"  {head}: {' or '.join(messages)}" if messages[0] else f"  {head}"
        for head, messages in lines.items()
    )


# ---------------------------------------------------------------------------- one error


def _describe(
    detail: Mapping[str, Any], model: type[BaseModel], prefix: str
) -> list[tuple[str, str]]:
    """(head, message) pairs for one pydantic error; an empty message means the head says it all."""
    kind: str = detail["type"]
    loc: tuple[int | str, ...] = tuple(detail["loc"])
    place = _walk(model, loc, prefix)
    if kind == "extra_forbidden":
        container = _walk(model, loc[:-1], prefix).annotation
        return [(place.key, _unknown_key(str(loc[-1]), container))]
    if kind == "missing":
        return [(place.key, "missing; this key is required")]
    if kind in _OWN_MESSAGE_TYPES:
        text = _own_message(detail)
        if not place.key or _names(text, place.key):  # the message already says where
            return [(line, "") for line in text.splitlines() if line.strip()]
        head = place.key if _model(place.annotation) else f"{place.key} = {_value(detail)}"
        first, *rest = text.splitlines()
        return [(head, first), *((line, "") for line in rest if line.strip())]
    section = _model(place.annotation)
    if kind in _SECTION_TYPES and section is not None:
        message = f"must be a section (a TOML table) with keys: {_keys(section)}"
    else:
        message = _rephrase(str(detail["msg"]))
    return [(f"{place.key} = {_value(detail)}" if place.key else _value(detail), message)]


def _unknown_key(name: str, container: Any) -> str:
    section = _model(container)
    if section is None:
        return "unknown key"
    valid = list(section.model_fields)
    if not valid:
        return "unknown key; this section takes no keys"
    closest = _closest(name, valid)
    hint = f" did you mean {closest!r}?" if closest else ""
    return f"unknown key;{hint} valid keys: {', '.join(valid)}"


def _closest(name: str, valid: Sequence[str]) -> str | None:
    """The valid key most like `name`: a near spelling (difflib ratio >= 0.6), else a key that
    shares one of its ``_``-separated words (``lr`` -> ``peak_lr``), the most similar first."""
    folded = {key.lower(): key for key in valid}
    wanted = name.lower().replace("-", "_")
    near = difflib.get_close_matches(wanted, list(folded), n=1, cutoff=0.6)
    if near:
        return folded[near[0]]
    words = {word for word in wanted.split("_") if len(word) >= 2}
    sharing = [key for key in folded if words & set(key.split("_"))]
    if not sharing:
        return None
    best = max(sharing, key=lambda key: difflib.SequenceMatcher(None, wanted, key).ratio())
    return folded[best]


def _own_message(detail: Mapping[str, Any]) -> str:
    """The message our validator raised, without pydantic's "Value error, " prefix."""
    raised = (detail.get("ctx") or {}).get("error")
    if isinstance(raised, BaseException) and str(raised):
        return str(raised)
    text = str(detail["msg"])
    for noise in ("Value error, ", "Assertion failed, "):
        text = text.removeprefix(noise)
    return text


def _names(message: str, key: str) -> bool:
    """True when `message` starts by naming `key` (``data.sources names ...`` names ``data``)."""
    return message.startswith(key) and message[len(key) : len(key) + 1] in ("", ".", "[", " ", ":")


def _rephrase(message: str) -> str:
    for said, meant in (("Input should be", "must be"), ("Input is not", "is not")):
        if message.startswith(said):
            return meant + message[len(said) :]
    return message[:1].lower() + message[1:]


def _value(detail: Mapping[str, Any]) -> str:
    text = repr(detail.get("input"))
    return text if len(text) <= _MAX_VALUE_REPR else text[: _MAX_VALUE_REPR - 3] + "..."


def _keys(section: type[BaseModel]) -> str:
    return ", ".join(section.model_fields)


# ---------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class _Place:
    key: str  # dotted, as typed: "data.sources[0].path"
    annotation: Any  # the type expected there; None when it could not be followed


def _walk(model: type[BaseModel], loc: Sequence[int | str], prefix: str) -> _Place:
    """Follow `loc` through the field annotations from `model`, writing the key as it goes.

    Pydantic names the union member it tried as an extra location part (``"int"``,
    ``"function-after[_check(), SourceConfig]"``): such parts pick the member and are not keys.
    """
    key: str = prefix
    annotation: Any = model
    for part in loc:
        options = _alternatives(annotation)
        if len(options) > 1 and isinstance(part, str):
            annotation = _member(options, part)
            continue
        current = options[0] if options else None
        if isinstance(part, int):
            key = f"{key}[{part}]"
            annotation = _item(current, part)
            continue
        key = f"{key}.{part}" if key else part
        section = _model(current)
        if section is not None:
            field = section.model_fields.get(part)
            annotation = field.annotation if field is not None else None
        else:
            annotation = _mapping_value(current)
    return _Place(key, annotation)


def _alternatives(annotation: Any) -> list[Any]:
    """The members of a union (None dropped, `Annotated` unwrapped); ``[annotation]`` otherwise."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = (_alternatives(arg) for arg in get_args(annotation))
        return [m for member in members for m in member if m is not type(None)]
    return [annotation]


def _member(options: Sequence[Any], tag: str) -> Any:
    """The union member pydantic's location part `tag` names, else None."""
    tag = tag.lower()
    for option in options:
        name = str(getattr(option, "__name__", "")).lower()
        if name and (tag == name or tag.startswith(f"{name}[") or tag.endswith(f", {name}]")):
            return option
    return None


def _item(annotation: Any, index: int) -> Any:
    """The element type at `index` of a tuple/list/sequence annotation, else None."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        return args[index] if 0 <= index < len(args) else None
    if isinstance(origin, type) and issubclass(origin, Sequence | set | frozenset) and args:
        return args[0]
    return None


def _mapping_value(annotation: Any) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(origin, type) and issubclass(origin, Mapping) and len(args) == 2:
        return args[1]
    return None


def _model(annotation: Any) -> type[BaseModel] | None:
    """`annotation` as a pydantic model class (an optional model counts), else None."""
    options = _alternatives(annotation)
    if len(options) == 1 and isinstance(options[0], type) and issubclass(options[0], BaseModel):
        return options[0]
    return None

"""A stable description of a step's configuration, for the fingerprints that decide whether
finished work from an earlier run can be reused (`Pipeline` parts, `StreamedStep`)."""

from __future__ import annotations

import functools
import os
import types
from typing import Any

from pydantic import BaseModel

__all__ = ["describe"]


def describe(obj: Any, depth: int = 0) -> Any:
    """A stable, comparable description of a step's configuration: pydantic models by their
    fields, functions and classes by name, objects by their attributes (recursively)."""
    if depth > 6:
        return type(obj).__qualname__
    if obj is None or isinstance(obj, str | int | float | bool | bytes):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, BaseModel):
        return (type(obj).__qualname__, obj.model_dump_json())
    if isinstance(obj, dict):
        return sorted(((repr(k), describe(v, depth + 1)) for k, v in obj.items()), key=repr)
    if isinstance(obj, list | tuple | set | frozenset):
        items = [describe(v, depth + 1) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, set | frozenset) else items
    if isinstance(obj, functools.partial):
        return ("partial", describe((obj.func, obj.args, obj.keywords), depth + 1))
    if isinstance(obj, types.FunctionType):  # by name and code, so an edited lambda differs
        code = obj.__code__
        constants = [c for c in code.co_consts if not isinstance(c, types.CodeType)]
        closure = [cell.cell_contents for cell in obj.__closure__ or ()]
        return (f"{obj.__module__}.{obj.__qualname__}", code.co_code.hex(), code.co_names,
                describe((constants, closure), depth + 1))  # fmt: skip
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    state = obj.__getstate__()
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__ or None, __slots__ values)
        state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
        return (type(obj).__qualname__, repr(state))
    return (type(obj).__qualname__, describe(state, depth + 1))

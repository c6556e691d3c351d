"""One validation rule for every config dataclass: a field typed ``Literal[...]`` only takes one of its values.

``dacite`` enforces this when a config is loaded from YAML / ``--set``; calling :func:`check_choices` from a
dataclass's ``__post_init__`` enforces it too when code builds the config directly, with the same message (the
dotted key and the allowed values). Torch-free, so configs load (and fail) before any model is built.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import types
import typing
from typing import Any, Literal

from cdad_dist.errors import ConfigError


@functools.cache
def _choices(cls: type) -> dict[str, tuple]:
    hints = typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        if typing.get_origin(hint) is Literal:
            out[f.name] = typing.get_args(hint)
        elif typing.get_origin(hint) in (typing.Union, types.UnionType):
            literals = [a for a in typing.get_args(hint) if typing.get_origin(a) is Literal]
            if literals:  # e.g. Literal["a", "b"] | None
                out[f.name] = tuple(v for a in literals for v in typing.get_args(a)) + (
                    (None,) if type(None) in typing.get_args(hint) else ())
    return out


def check_choices(obj: Any, section: str) -> None:
    """Raise a ConfigError naming ``section.field`` when a Literal-typed field holds another value."""
    for name, allowed in _choices(type(obj)).items():
        value = getattr(obj, name)
        if value not in allowed:
            shown = [a for a in allowed if a is not None]
            raise ConfigError(f"{section}.{name} must be one of {shown}, got {value!r}")

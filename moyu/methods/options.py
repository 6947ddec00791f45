"""Typed method options: one frozen dataclass per method, validated in one place.

Every method's options derive from :class:`CalibOptions` (the calibration sampling all
methods share) and add their own fields; a method wanting another ``per_window`` default
redeclares it with :func:`per_window_field`. A field's type is its contract: ``int``,
``float``, ``bool``, ``str`` or a ``Literal[...]`` of allowed values; ``metadata`` may
carry ``min`` (inclusive lower bound) and ``help`` (one line for ``moyu methods``).
The CLI's ``--option KEY=VALUE`` and the library's keyword arguments both go through
:func:`make_options`, so a bad value fails the same way everywhere, in one line.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import MoyuError


def per_window_field(default: int) -> Any:
    """The ``per_window`` option with a method's own default (the same bound and help everywhere)."""
    return field(default=default, metadata={"min": 1, "help": "scored positions sampled per calibration window"})


@dataclass(frozen=True)
class CalibOptions:
    """Calibration sampling shared by every method."""

    per_window: int = per_window_field(64)
    calib_windows: int = field(default=16, metadata={"min": 2, "help": "calibration windows read (default 8 on models of >= 1B parameters)"})


def option_fields(cls: type) -> dict[str, tuple[Any, Any, dict]]:
    """``name -> (type, default, metadata)`` for every field of an options class."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.default, dict(f.metadata)) for f in dataclasses.fields(cls)}


def type_name(tp: Any) -> str:
    """A short human name of an option type (``int``, ``one of a|b``)."""
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(str(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(method: str, key: str, tp: Any, value: Any, meta: dict) -> Any:
    """``value`` (a Python value or a command-line string) as type ``tp``; MoyuError if it is not one."""
    def bad(what: str) -> MoyuError:
        return MoyuError(f"bad option {key}={value!r} for method '{method}': {what}")

    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise bad(f"allowed values are {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        raise bad("must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad("must be an int")
        try:
            out = int(value) if isinstance(value, (int, str)) else None
        except ValueError:
            out = None
        if out is None or (isinstance(value, float)):
            raise bad("must be an int")
    elif tp is float:
        try:
            out = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            out = None
        if out is None:
            raise bad("must be a float")
    elif tp is str:
        out = str(value)
    else:  # pragma: no cover - options are declared with the types above
        raise bad(f"unsupported option type {tp}")
    if "min" in meta and out < meta["min"]:
        raise bad(f"must be >= {meta['min']}")
    return out


def make_options(cls: type, method: str, values: dict[str, Any]) -> Any:
    """An instance of options class ``cls`` from ``values`` (strings allowed), validated.

    Unknown keys and ill-typed or out-of-range values raise a one-line :class:`MoyuError`
    that lists what the method accepts.
    """
    fields = option_fields(cls)
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise MoyuError(f"unknown option '{unknown[0]}' for method '{method}': it takes "
                        f"{', '.join(f'{k}=<{type_name(t)}>' for k, (t, _, _) in fields.items())}")
    kw = {k: _coerce(method, k, fields[k][0], v, fields[k][2]) for k, v in values.items()}
    return cls(**kw)


def parse_pairs(cls: type, method: str, pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (the CLI's ``--option``) as validated, typed values."""
    raw = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise MoyuError(f"bad --option '{pair}': write KEY=VALUE (see `moyu methods`)")
        raw[key] = value
    opts = make_options(cls, method, raw)
    return {k: getattr(opts, k) for k in raw}


def describe(cls: type) -> list[dict[str, Any]]:
    """Each option as ``{name, type, default, help}`` (for ``moyu methods``)."""
    return [{"name": k, "type": type_name(t), "default": d, "help": m.get("help", "")}
            for k, (t, d, m) in option_fields(cls).items()]

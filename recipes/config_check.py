"""Checks of recipe configurations before anything is built: unknown keys and ill-typed values.

A misspelled key (``langevin.num_sampls``, ``model.lora_rnak``, ``trainer.max_step``) or a value of
the wrong type (``trainer.max_steps: "3=4"``) would otherwise surface as a traceback from deep inside
a constructor. Here each is one :class:`ConfigError` whose message fits on one line: it names the
key and lists the valid ones, the closest matches (:func:`difflib.get_close_matches`) first.

Valid keys come from the signature of what the section builds (``inspect.signature``; a
constructor with ``**kwargs`` accepts any key) and value types from its annotations
(``typing.get_type_hints``). A type the checker does not know (a class, a callable) accepts any
value, so a check never refuses what the constructor would take.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import sys
import types
import typing
from collections import abc as cabc
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any, NoReturn

SEQUENCES = (list, tuple, cabc.Sequence, cabc.Iterable, cabc.Collection)
MAPPINGS = (dict, cabc.Mapping)

__all__ = ["ConfigError", "check_keys", "check_section", "check_value", "exit_on_config_error", "one_line",
           "signature_keys", "suggest", "type_hints"]


class ConfigError(ValueError):
    """A configuration mistake, described in one line."""


def one_line(message: str, limit: int = 2000) -> str:
    """``message`` with its whitespace collapsed, cut at ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def exit_on_config_error(prog: str, error: BaseException) -> NoReturn:
    """Print ``<prog>: error: <one line>`` to stderr and exit with status 2 (argparse's usage error)."""
    sys.stderr.write(f"{prog}: error: {one_line(str(error))}\n")
    raise SystemExit(2)


def suggest(key: str, valid: Iterable[str]) -> str:
    """The valid keys as one comma-separated list, close matches to ``key`` first."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(key, valid, n=5, cutoff=0.6)
    return ", ".join(close + [v for v in valid if v not in close])


def check_keys(section: str, mapping: Mapping[str, Any], valid: Iterable[str], where: str = "",
               label: str | None = None) -> None:
    """Every key of ``mapping`` must be in ``valid``; else :class:`ConfigError` naming the first
    unknown one as ``section.key`` (and ``where`` it was found) and listing the valid keys of
    ``label`` (default: the section), close matches first."""
    valid = set(valid)
    for key in mapping:
        if key not in valid:
            dotted = f"{section}.{key}" if section else str(key)
            src = f" ({where})" if where else ""
            raise ConfigError(f"unknown key {dotted!r}{src}; valid keys of {label or section or 'the config'}, "
                              f"closest first: {suggest(str(key), valid)}")


def signature_keys(obj: Any) -> set[str] | None:
    """Keyword names ``obj`` (a class, function or dataclass) accepts; ``None`` when it takes ``**kwargs``."""
    if dataclasses.is_dataclass(obj) and isinstance(obj, type):
        return {f.name for f in dataclasses.fields(obj) if f.init}
    params = inspect.signature(obj).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def type_hints(obj: Any) -> dict[str, Any]:
    """Resolved annotations of ``obj``'s keyword arguments (a class's ``__init__``, a dataclass's
    fields, a function); ``{}`` when they cannot be resolved."""
    target = obj.__init__ if isinstance(obj, type) and not dataclasses.is_dataclass(obj) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no type checks, keys still checked
        return {}


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    if tp in names:
        return names[tp]
    if (origin or tp) in SEQUENCES:
        return "a list"
    if (origin or tp) in MAPPINGS:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` (parsed from YAML) fits annotation ``tp``; unknown types accept anything."""
    if tp is Any or isinstance(tp, (typing.TypeVar, str)):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (os.PathLike,) or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        return isinstance(value, (str, os.PathLike))
    kind = origin if origin is not None else tp
    if kind in SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        elem = args[0] if args else Any
        return all(_matches(v, elem) for v in value)
    if kind in MAPPINGS:
        return isinstance(value, dict)
    return True  # classes, callables, ...: left to the constructor


def check_value(name: str, value: Any, tp: Any) -> None:
    """``value`` must fit annotation ``tp``; else :class:`ConfigError` naming ``name``."""
    if not _matches(value, tp):
        hint = ""
        if isinstance(value, str) and "=" in value:
            hint = "; a --set value is everything after the first '=', parsed as YAML"
        raise ConfigError(f"Invalid {name}: {value!r} (expected {_describe(tp)}){hint}")


def check_section(section: str, mapping: Any, target: Any, *, reserved: Mapping[str, str] | None = None,
                  where: str = "") -> None:
    """Keys of ``mapping`` against the keyword arguments of ``target``, then each value against its
    annotation. ``reserved`` maps keys the recipe sets itself to the reason they cannot be given."""
    if mapping is None:
        return
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"Invalid {section}: {mapping!r} (expected a mapping of {section} keys)")
    for key, reason in (reserved or {}).items():
        if key in mapping:
            raise ConfigError(f"Invalid key {section}.{key}: {reason}")
    valid = signature_keys(target)
    if valid is not None:
        check_keys(section, mapping, valid - set(reserved or {}), where)
    hints = type_hints(target)
    for key, value in mapping.items():
        if key in hints:
            check_value(f"{section}.{key}", value, hints[key])

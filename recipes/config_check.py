"""One-line configuration errors for the recipes' two command lines (:mod:`recipes.compare` and the
LightningCLI recipes of :mod:`recipes.cli`).

jsonargparse parses: it loads the YAML files, applies ``--section.key value`` options, checks
every value against its annotation and prints ``--print_config``. What it does not do is say which
key was *meant*: a misspelled key (``langevin.num_sampls``, ``model.lora_rnak``,
``trainer.max_step``) is refused without the valid ones, and an empty unknown section is dropped
silently. :func:`check_given` closes that gap before parsing: every key the user gave (in a
``--config`` file or as an option, :func:`given_items`) is checked against the keys of the
section it lands in, and the first unknown one is a :class:`ConfigError` whose message fits on
one line, naming the key and listing the valid ones, closest matches first
(:func:`difflib.get_close_matches`). Valid keys come from the signature of what a section builds
(:func:`signature_keys`; a constructor with ``**kwargs`` accepts any key), and for a
``{class_path, init_args}`` entry (a Trainer callback) from the class named.
:func:`exit_on_config_error` prints the one line and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

__all__ = ["ConfigError", "GivenItem", "check_class_paths", "check_given", "check_keys", "exit_on_config_error",
           "given_items", "one_line", "option_items", "signature_keys", "suggest"]

#: The options that name a config file (jsonargparse's ``ActionConfigFile``).
CONFIG_OPTIONS = ("--config", "-c")


class ConfigError(ValueError):
    """A configuration mistake, described in one line."""


def one_line(message: Any, limit: int = 2000) -> str:
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


@dataclasses.dataclass(frozen=True)
class GivenItem:
    """One thing the user set: ``key`` (dotted, ``langevin.num_samples``), its ``value`` (YAML-loaded)
    and ``where`` it was given (``in path.yaml`` or ``option --langevin.num_samples``)."""

    key: str
    value: Any
    where: str


def _yaml_value(text: str) -> Any:
    """An option's value as jsonargparse reads it: YAML when it parses, else the text itself."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def option_items(args: Sequence[str], start: int = 0, stop: int | None = None) -> Iterator[GivenItem | str]:
    """``--key value`` / ``--key=value`` options of ``args[start:stop]`` as :class:`GivenItem`, and
    the ``--config`` values as they are (a path or a config string); other tokens (a subcommand, ``--help``,
    ``--print_config``) are skipped."""
    args = list(args)[start:stop]
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("--") and token not in CONFIG_OPTIONS:
            continue
        name, eq, value = token.partition("=")
        if not eq and i < len(args) and not args[i].startswith("--"):
            value, i = args[i], i + 1
        if name in CONFIG_OPTIONS:
            yield value   # a file's path, or a config string (given_items tells them apart)
            continue
        name = name[2:].rstrip("+")
        if name in ("", "help") or name.startswith("print_config"):
            continue
        yield GivenItem(name, _yaml_value(value) if (eq or value) else None, f"option --{name}")


def given_items(args: Sequence[str], start: int = 0, stop: int | None = None) -> list[GivenItem]:
    """What ``args`` set, in order: each top-level key of each ``--config`` (a file, or a YAML string
    as jsonargparse also takes; read with ``yaml.safe_load`` only to name its keys) and each option.
    A file that is missing or not YAML gives nothing here: jsonargparse says what is wrong with it."""
    out: list[GivenItem] = []
    for item in option_items(args, start, stop):
        if isinstance(item, GivenItem):
            out.append(item)
            continue
        try:
            path = Path(item)
            cfg, where = (yaml.safe_load(path.read_text()), f"in {item}") if path.is_file() else \
                (yaml.safe_load(item), f"in --config {one_line(item)}")
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(cfg, Mapping):
            out += [GivenItem(str(k), v, where) for k, v in cfg.items() if k != "__path__"]
    return out


def check_given(items: Iterable[GivenItem], sections: Mapping[str, Iterable[str] | None]) -> None:
    """Each item's key, and the keys of a mapping it sets, against ``sections`` (dotted section
    name -> its valid keys; ``""``: the top level; ``None`` or absent: not checked here). The first
    unknown key is a one-line :class:`ConfigError` (:func:`check_keys`); a key below a plain value
    (``langevin.temperature.x``) says the value has no keys. The ``init_args`` of every
    ``class_path`` entry are checked against that class (:func:`check_class_paths`)."""
    sections = {k: None if v is None else set(v) for k, v in sections.items()}

    def visit(parts: list[str], value: Any, where: str) -> None:
        for i, part in enumerate(parts):
            section = ".".join(parts[:i])
            valid = sections.get(section)
            if valid is None:
                continue
            check_keys(section, {part: None}, valid, where)
            here = ".".join(parts[: i + 1])
            if i < len(parts) - 1 and here not in sections:
                raise ConfigError(f"unknown key {'.'.join(parts)!r} ({where}); {here} takes a value, not keys")
        dotted = ".".join(parts)
        if isinstance(value, Mapping) and sections.get(dotted) is not None:
            for key, sub in value.items():
                if key != "__path__":
                    visit([*parts, str(key)], sub, where)
        else:
            check_class_paths(value, dotted, where)

    for item in items:
        visit(item.key.split("."), item.value, item.where)


def _import_class(path: Any) -> Any:
    if not isinstance(path, str) or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # jsonargparse resolves (or refuses) it


def check_class_paths(node: Any, dotted: str, where: str) -> None:
    """``init_args`` of every ``{class_path, init_args}`` entry below ``node`` against the class's signature."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            check_class_paths(item, f"{dotted}[{i}]", where)
        return
    if not isinstance(node, Mapping):
        return
    cls = _import_class(node.get("class_path"))
    init_args = node.get("init_args")
    if cls is not None and isinstance(init_args, Mapping):
        valid = signature_keys(cls)
        if valid is not None:
            check_keys(f"{dotted}.init_args", init_args, valid, where, label=cls.__name__)
    for key, value in node.items():
        if key != "class_path":
            check_class_paths(value, f"{dotted}.{key}", where)

"""The recipes' LightningCLI: a configuration mistake ends in one line and exit status 2.

``python -m recipes.seq_cls|causal_lm|gibbs fit --config ... [--section.key value ...]`` runs
:class:`RecipeCLI`. Before jsonargparse parses anything, every key of every ``--config`` file and
every ``--section.key`` option is checked against the keys the parser accepts (the model's, the
data module's and the Trainer's arguments, and the ``init_args`` of each ``class_path`` such as the
``LangevinLoRA`` callback); an unknown key prints

    python -m recipes.seq_cls: error: unknown key 'model.lora_rnak' (...); valid keys of model,
    closest first: lora_r, lora_alpha, ...

(on one line) and exits with status 2. Abbreviated options (``--trainer.max_step`` for
``--trainer.max_steps``) are refused the same way. Errors jsonargparse finds itself (a value of
the wrong type) and a constructor's refusal of a value (``ValueError``/``TypeError``) are printed
as one line too, without the usage text or a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from recipes.config_check import ConfigError, check_keys, exit_on_config_error, signature_keys

__all__ = ["RecipeCLI", "check_cli_args"]

_CONFIG_OPTIONS = ("--config", "-c")


class _OneLineParser(LightningArgumentParser):
    """A LightningArgumentParser whose fatal errors are one line on stderr and exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        try:
            from jsonargparse._common import debug_mode_active
        except ImportError:  # pragma: no cover - other jsonargparse layouts
            def debug_mode_active() -> bool:
                return False
        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)
        exit_on_config_error(getattr(self, "recipe_prog", None) or self.prog, ConfigError(message))


def _accepted(parser: argparse.ArgumentParser) -> set[str]:
    """Dotted destinations the parser accepts (``model.lora_r``, ``trainer.callbacks``, ...)."""
    out = set()
    for action in parser._actions:
        dest = action.dest
        if dest in (argparse.SUPPRESS, "help") or dest.endswith(".help"):
            continue
        out.add(dest)
    return out


def _children(accepted: set[str], prefix: str) -> set[str]:
    n = len(prefix) + 1
    return {d[n:].split(".")[0] for d in accepted if d.startswith(prefix + ".")}


def _import_class(path: Any) -> Any:
    if not isinstance(path, str) or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # jsonargparse resolves (or refuses) it


def _check_class_paths(node: Any, dotted: str, where: str) -> None:
    """``init_args`` of every ``{class_path, init_args}`` entry below ``node`` against the class's signature."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_class_paths(item, f"{dotted}[{i}]", where)
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
            _check_class_paths(value, f"{dotted}.{key}", where)


def _check_config(cfg: Any, accepted: set[str], where: str) -> None:
    if not isinstance(cfg, Mapping):
        return  # jsonargparse says what is wrong
    top = {d.split(".")[0] for d in accepted}
    check_keys("", _public(cfg), top, where)
    for section, value in cfg.items():
        keys = _children(accepted, section)
        if keys and isinstance(value, Mapping):
            check_keys(section, _public(value), keys, where)
            _check_class_paths(value, section, where)


def _public(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``mapping`` without jsonargparse's bookkeeping key ``__path__``."""
    return {k: v for k, v in mapping.items() if k != "__path__"}


def _option_name(token: str) -> str:
    return token[2:].split("=", 1)[0].rstrip("+")


def check_cli_args(parser: argparse.ArgumentParser, args: Iterable[str]) -> None:
    """Raise :class:`ConfigError` for the first unknown key in ``args`` (options and ``--config`` files)."""
    args = list(args)
    sub_action = getattr(parser, "_subcommands_action", None)
    target, start = parser, 0
    if sub_action is not None:
        for i, token in enumerate(args):
            if token in sub_action.choices:
                target, start = sub_action.choices[token], i + 1
                break
        else:
            return  # no subcommand: jsonargparse explains
    accepted = _accepted(target)
    top = {d.split(".")[0] for d in accepted}
    i = start
    while i < len(args):
        token = args[i]
        if token in _CONFIG_OPTIONS or token.startswith("--config="):
            path = token.split("=", 1)[1] if "=" in token else (args[i + 1] if i + 1 < len(args) else None)
            i += 1 if "=" in token else 2
            if path is not None and os.path.isfile(path):
                with open(path) as fh:
                    try:
                        cfg = yaml.safe_load(fh)
                    except yaml.YAMLError:
                        continue  # jsonargparse reports the parse error
                _check_config(cfg, accepted, f"in {path}")
            continue
        i += 1
        if not token.startswith("--") or token == "--":
            continue
        name = _option_name(token)
        if name in ("help", "print_config") or name.startswith("print_config"):
            continue
        parts = name.split(".")
        check_keys("", {parts[0]: None}, top, f"option {token.split('=', 1)[0]}")
        keys = _children(accepted, parts[0])
        if len(parts) > 1 and keys:
            check_keys(parts[0], {parts[1]: None}, keys, f"option {token.split('=', 1)[0]}")


class RecipeCLI(LightningCLI):
    """:class:`~lightning.pytorch.cli.LightningCLI` with one-line configuration errors (exit 2).

    Args:
        prog: the command shown in messages, e.g. ``python -m recipes.seq_cls``.
        *args, **kwargs: as for LightningCLI.
    """

    def __init__(self, *args: Any, prog: str | None = None, **kwargs: Any) -> None:
        self._prog = prog or os.path.basename(sys.argv[0])
        kwargs.setdefault("parser_class", _OneLineParser)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("prog", self._prog)
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.recipe_prog = self._prog  # subcommand parsers too: every message starts with the command
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        raw = sys.argv[1:] if args is None else args
        if isinstance(raw, (list, tuple)):
            try:
                check_cli_args(parser, [str(a) for a in raw])
            except ConfigError as exc:
                exit_on_config_error(self._prog, exc)
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as exc:
            kind = "" if type(exc) is ValueError else f"{type(exc).__name__}: "
            exit_on_config_error(self._prog, ConfigError(f"{kind}{exc}"))

"""The recipes' LightningCLI: a configuration mistake ends in one line and exit status 2.

``python -m recipes.seq_cls|causal_lm|gibbs fit --config ... [--section.key value ...]`` runs
:class:`RecipeCLI`. Its parsers are built with ``exit_on_error=False`` (LightningCLI's
``parser_kwargs``), so jsonargparse raises instead of printing its usage text, and
:meth:`RecipeCLI.parse_arguments` turns the error into one line. Before parsing, every key of every
``--config`` file and every ``--section.key`` option that lands in ``model``, ``data`` or
``trainer`` is checked against the signature of the class that section builds, and the
``init_args`` of each ``class_path`` (such as the ``LangevinLoRA`` callback) against that class
(:func:`recipes.config_check.check_given`); an unknown key prints

    python -m recipes.seq_cls: error: unknown key 'model.lora_rnak' (...); valid keys of model,
    closest first: lora_r, lora_alpha, ...

(on one line) and exits with status 2. Abbreviated options (``--trainer.max_step`` for
``--trainer.max_steps``) are refused the same way. Errors jsonargparse finds itself (a value of
the wrong type) and a constructor's refusal of a value (``ValueError``/``TypeError``) are printed
as one line too, without the usage text or a traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from recipes.config_check import ConfigError, check_given, exit_on_config_error, given_items, signature_keys

__all__ = ["RecipeCLI"]


class RecipeCLI(LightningCLI):
    """:class:`~lightning.pytorch.cli.LightningCLI` with one-line configuration errors (exit 2).

    Args:
        prog: the command shown in messages, e.g. ``python -m recipes.seq_cls``.
        run: as for LightningCLI (``True``: the first argument is a subcommand such as ``fit``).
        *args, **kwargs: as for LightningCLI.
    """

    def __init__(self, *args: Any, prog: str | None = None, run: bool = True, **kwargs: Any) -> None:
        self._prog = prog or os.path.basename(sys.argv[0])
        self._recipe_run = run
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("prog", self._prog)
        parser_kwargs.setdefault("exit_on_error", False)  # subcommand parsers inherit it (jsonargparse)
        super().__init__(*args, parser_kwargs=parser_kwargs, run=run, **kwargs)

    def _sections(self) -> dict[str, set[str] | None]:
        """Valid keys of the sections whose classes this CLI knows (subclass mode: left to jsonargparse)."""
        return {"model": None if self.subclass_mode_model else signature_keys(self.model_class),
                "data": None if self.subclass_mode_data or self.datamodule_class is None
                else signature_keys(self.datamodule_class),
                "trainer": signature_keys(self.trainer_class)}

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        raw = sys.argv[1:] if args is None else args
        try:
            if isinstance(raw, (list, tuple)):
                raw = [str(a) for a in raw]
                start = 0
                if self._recipe_run:
                    start = next((i + 1 for i, a in enumerate(raw) if a in self.subcommands()), len(raw))
                check_given(given_items(raw, start), self._sections())
            super().parse_arguments(parser, args)
        except (ConfigError, ArgumentError) as exc:
            exit_on_config_error(self._prog, exc)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as exc:
            kind = "" if type(exc) is ValueError else f"{type(exc).__name__}: "
            exit_on_config_error(self._prog, ConfigError(f"{kind}{exc}"))

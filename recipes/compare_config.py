r"""What a comparison config is: its sections, the Langevin settings, loading and checking.

A config (YAML) has the sections ``seeds``, ``output_dir``, ``task`` (``text``; ``choice`` for
causal-LM multiple choice), ``methods``, ``threads``, ``data`` (data-module arguments), ``model``
(module arguments), ``trainer`` (Lightning Trainer arguments, passed unchanged) and ``langevin``
(:class:`LangevinSettings`; its ``diagnostics`` mapping holds
:class:`~langevin_lora.diagnostics.GibbsDiagnostics` arguments). :func:`load_config` reads it,
applies ``section.key=value`` overrides and runs :func:`validate_config`, which refuses an unknown
key or an ill-typed value with one line naming it (:class:`~recipes.config_check.ConfigError`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from langevin_lora.temperature import weight_decay_from_prior_std
from recipes.config_check import ConfigError, check_keys, check_section, suggest

__all__ = ["LangevinSettings", "TASKS", "SECTIONS", "load_config", "validate_config"]

SECTIONS = ("seeds", "output_dir", "task", "data", "model", "trainer", "langevin", "methods", "threads")
METHODS = ("adamw", "langevin")
# keys the comparison sets itself (given twice they would crash the constructor)
RESERVED_TRAINER = {"callbacks": "the comparison sets the Trainer's callbacks itself (loss trace, LangevinLoRA, "
                                 "GibbsDiagnostics)"}
RESERVED_DIAGNOSTICS = {k: "the comparison sets it itself" for k in
                        ("log_every_n_steps", "center_window", "report_dir", "plots", "seed")}


@dataclasses.dataclass
class LangevinSettings:
    r"""Hyperparameters of the Langevin run (the AdamW run ignores them).

    Attributes:
        temperature: :math:`T`; :math:`\beta = N/T` (1 = the Bayesian posterior of the mean-NLL
            loss with the Gaussian prior below; < 1 "cold").
        prior_std: :math:`\sigma_p` of the Gaussian prior on every LoRA coordinate; the coupled
            decay is :math:`\lambda = 1/(N\sigma_p^2)`
            (:func:`~langevin_lora.temperature.weight_decay_from_prior_std`) unless
            ``weight_decay`` is given.
        weight_decay: :math:`\lambda` directly (overrides ``prior_std``).
        burn_in: AdamW steps before sampling, as a fraction of the total steps (< 1) or a count.
        num_samples: posterior samples kept; ``sample_every`` is chosen so they span the
            sampling phase, unless given.
        sample_every: optimizer steps between kept samples (``None``: automatic).
        precond_clamp: clamp of the frozen preconditioner relative to its median.
        head_temperature: temperature of the non-LoRA trainable tensors (0: noise-free).
        lr_scale: the learning rate is multiplied by it where sampling starts (both methods).
        diagnostics: extra :class:`~langevin_lora.diagnostics.GibbsDiagnostics` arguments.
    """

    temperature: float = 1.0
    prior_std: float = 0.1
    weight_decay: float | None = None
    burn_in: float = 0.5
    num_samples: int = 16
    sample_every: int | None = None
    precond_clamp: tuple[float, float] = (0.01, 100.0)
    head_temperature: float = 0.0
    lr_scale: float = 0.01
    diagnostics: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("temperature", "prior_std", "head_temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (name == "prior_std" and v == 0):
                raise ConfigError(f"Invalid langevin.{name}: {v!r} (expected a real number "
                                  f"{'> 0' if name == 'prior_std' else '>= 0'})")
        if self.weight_decay is not None and (not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0):
            raise ConfigError(f"Invalid langevin.weight_decay: {self.weight_decay!r} (expected a real number >= 0)")
        if not isinstance(self.diagnostics, dict):
            raise ConfigError(f"Invalid langevin.diagnostics: {self.diagnostics!r} (expected a mapping of "
                              "GibbsDiagnostics arguments)")
        if not isinstance(self.burn_in, (int, float)) or self.burn_in < 0:
            raise ConfigError(f"Invalid langevin.burn_in: {self.burn_in!r} (expected a fraction in [0, 1) "
                              "or a step count >= 1)")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ConfigError(f"Invalid langevin.num_samples: {self.num_samples!r} (expected an integer >= 1)")
        if self.sample_every is not None and (not isinstance(self.sample_every, int) or self.sample_every < 1):
            raise ConfigError(f"Invalid langevin.sample_every: {self.sample_every!r} (expected an integer >= 1)")
        if not isinstance(self.lr_scale, (int, float)) or not 0 < self.lr_scale <= 1:
            raise ConfigError(f"Invalid langevin.lr_scale: {self.lr_scale!r} (expected a real number in (0, 1])")
        self.precond_clamp = tuple(self.precond_clamp)

    def plan(self, total_steps: int, num_data: int) -> dict[str, Any]:
        """Burn-in, sampling interval and decay for a run of ``total_steps`` optimizer steps."""
        if total_steps < 2:
            raise ConfigError(f"Invalid budget: {total_steps} optimizer steps; need at least 2")
        burn = int(round(self.burn_in * total_steps)) if self.burn_in < 1 else int(self.burn_in)
        if burn >= total_steps:
            raise ConfigError(f"Invalid langevin.burn_in: {self.burn_in!r} leaves no sampling step out of "
                              f"{total_steps}")
        sampling = total_steps - burn
        every = self.sample_every or max(1, sampling // self.num_samples)
        lam = self.weight_decay if self.weight_decay is not None else weight_decay_from_prior_std(self.prior_std,
                                                                                                   num_data)
        return {"burn_in_steps": burn, "sampling_steps": sampling, "sample_every": every,
                "num_samples": min(self.num_samples, sampling // every), "weight_decay": float(lam),
                "beta": math.inf if self.temperature == 0 else num_data / self.temperature}


# -- tasks ------------------------------------------------------------------------------------------
def _text_task():
    from recipes.data import TextClassificationData
    from recipes.models import LoRAClassifier, forward_logits
    return TextClassificationData, LoRAClassifier, forward_logits


def _choice_task():
    from recipes.causal_lm import ChoiceData, LoRAChoiceLM, forward_choice_logits
    return ChoiceData, LoRAChoiceLM, forward_choice_logits


TASKS = {"text": _text_task, "choice": _choice_task}


# -- loading and checking ---------------------------------------------------------------------------
def _apply_override(cfg: dict[str, Any], item: Any) -> None:
    """``section.key=value`` into ``cfg``; the value is everything after the first ``=``, parsed as YAML."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"Invalid override: {item!r} (expected section.key=value)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"Invalid override: {item!r} (empty key part in {key!r}; expected section.key=value)")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"Invalid override: {item!r}: unknown section {parts[0]!r}; valid sections, closest first: "
                          f"{suggest(parts[0], SECTIONS)}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Invalid override: {item!r} (the value {value!r} is not valid YAML: "
                          f"{' '.join(str(exc).split())})") from None
    node = cfg
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"Invalid override: {item!r} ({'.'.join(parts[:i + 1])} is {child!r}, not a section "
                              "with keys)")
        node = child
    node[parts[-1]] = parsed


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a YAML config, apply ``section.key=value`` overrides (values parsed as YAML) and
    :func:`validate_config` it. Every mistake is a :class:`ConfigError` (a ``ValueError``)."""
    cfg: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Invalid config: {str(p)!r} does not exist")
        try:
            cfg = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Invalid config: {str(p)!r} is not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"Invalid config: {str(p)!r} holds a {type(cfg).__name__}, not a mapping of sections")
    cfg = copy.deepcopy(cfg)
    unknown = sorted(set(cfg) - set(SECTIONS), key=str)
    if unknown:
        raise ConfigError(f"Invalid config: unknown sections {unknown} in {str(path)!r}; valid sections, closest "
                          f"first: {suggest(str(unknown[0]), SECTIONS)}")
    for item in overrides:
        _apply_override(cfg, item)
    validate_config(cfg)
    return cfg


def validate_config(cfg: dict[str, Any]) -> LangevinSettings:
    """Check every section's keys against what it builds (data module, LightningModule, Trainer,
    :class:`LangevinSettings`, GibbsDiagnostics) and their values against the annotations; return
    the Langevin settings. Raises :class:`ConfigError` naming the first bad key."""
    import lightning.pytorch as pl

    check_keys("", cfg, SECTIONS)
    task = cfg.get("task", "text")
    if task not in TASKS:
        raise ConfigError(f"Invalid task: {task!r} (expected one of {', '.join(TASKS)})")
    seeds = cfg.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                            for s in seeds):
        raise ConfigError(f"Invalid seeds: {seeds!r} (expected a non-empty list of integers >= 0)")
    methods = cfg.get("methods", list(METHODS))
    if not isinstance(methods, list) or not methods or any(m not in METHODS for m in methods):
        raise ConfigError(f"Invalid methods: {methods!r} (expected a list of {' and/or '.join(METHODS)})")
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"Invalid threads: {threads!r} (expected an integer >= 1)")
    if not isinstance(cfg.get("output_dir", ""), str):
        raise ConfigError(f"Invalid output_dir: {cfg['output_dir']!r} (expected a folder path)")
    data_cls, module_cls, _ = TASKS[task]()
    check_section("data", cfg.get("data"), data_cls)
    check_section("model", cfg.get("model"), module_cls)
    check_section("trainer", cfg.get("trainer"), pl.Trainer, reserved=RESERVED_TRAINER)
    langevin = cfg.get("langevin") or {}
    check_section("langevin", langevin, LangevinSettings)
    if langevin.get("diagnostics"):
        from langevin_lora.diagnostics import GibbsDiagnostics

        check_section("langevin.diagnostics", langevin["diagnostics"], GibbsDiagnostics,
                      reserved=RESERVED_DIAGNOSTICS)
    return LangevinSettings(**langevin)

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
import inspect
import math
import re
from pathlib import Path
from typing import Any

import yaml

from langevin_lora.temperature import weight_decay_from_prior_std
from recipes.config_check import ConfigError, check_keys, check_section, check_value, suggest, type_hints

__all__ = ["LangevinSettings", "SelectionSettings", "TASKS", "SECTIONS", "METHODS", "load_config", "validate_config",
           "callback_signature"]

SECTIONS = ("seeds", "output_dir", "task", "data", "model", "trainer", "selection", "langevin", "methods", "threads")
#: The arms, in report order (module docstring of :mod:`recipes.compare`).
METHODS = ("adamw", "adamw_best", "adamw_ts", "langevin", "langevin_ts")
# keys the comparison sets itself (given twice they would crash the constructor)
RESERVED_TRAINER = {"callbacks": "the comparison sets the Trainer's callbacks itself (loss trace, validation "
                                 "selection, LangevinLoRA, GibbsDiagnostics)"}
RESERVED_DIAGNOSTICS = {k: "the comparison sets it itself" for k in
                        ("log_every_n_steps", "center_window", "report_dir", "plots", "seed")}
#: LangevinLoRA arguments the comparison sets itself (from the data, the seed and the plan).
RESERVED_CALLBACK = {
    "num_data": "the comparison passes N, the number of training examples",
    "beta": "the comparison passes num_data = N; set langevin.temperature instead",
    "burn_in_steps": "set langevin.burn_in (best, a fraction or a step count) instead",
    "seed": "the comparison seeds the sampler with the run's seed",
    "sample_dir": "the comparison keeps the samples in memory",
    "balance": "not configurable from YAML (a BalanceSchedule object)",
    "gauge_moves": "not configurable from YAML (a GaugeMoves object)",
}


def callback_signature() -> dict[str, inspect.Parameter]:
    """Keyword arguments of :class:`~langevin_lora.LangevinLoRA` (read with :mod:`inspect`, so
    arguments added to it later are accepted in ``langevin:`` without a change here)."""
    from langevin_lora.callback import LangevinLoRA

    return {n: p for n, p in inspect.signature(LangevinLoRA).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@dataclasses.dataclass
class SelectionSettings:
    """How the AdamW run is watched on the validation split (``adamw_best``, ``burn_in: best``).

    Attributes:
        every_n_steps: evaluate the validation NLL every this many optimizer steps; ``None``
            (default): at the end of every epoch.
    """

    every_n_steps: int | None = None

    def __post_init__(self) -> None:
        v = self.every_n_steps
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"Invalid selection.every_n_steps: {v!r} (expected an integer >= 1 or null)")


@dataclasses.dataclass
class _RecipeFields:
    r"""The ``langevin:`` keys the comparison reads itself (the other keys are LangevinLoRA's).

    Attributes:
        burn_in: where sampling starts. ``auto`` (default): the zero-config drop-in, one run from
            the same initialisation and data order as the AdamW run, with ``LangevinLoRA`` deciding
            everything from the validation curve (only the ``langevin:`` keys that are LangevinLoRA
            arguments are passed, none by default). ``best``: from the AdamW run's best-validation
            checkpoint, resuming its weights *and* optimizer state (so the frozen preconditioner
            comes from AdamW's moments there); a fraction in [0, 1) of the AdamW steps, or a step
            count >= 1: from the AdamW run's checkpoint at that step.
        sampling_steps: Langevin steps after burn-in; ``None``: the rest of the AdamW budget (the
            Langevin arm takes as many optimizer steps as AdamW), at least ``num_samples``.
        num_samples: posterior samples kept for the average.
        sample_every: steps between kept samples (``None``: ``num_samples`` spread evenly over the
            last ``sample_span`` of the sampling steps).
        sample_span: fraction of the sampling steps, at their end, that the kept samples span (the
            chain relaxes to its target during the rest).
        prior_std: :math:`\sigma_p` of the Gaussian prior on every LoRA coordinate,
            :math:`\lambda = 1/(N\sigma_p^2)` (:func:`~langevin_lora.temperature.weight_decay_from_prior_std`);
            passed to LangevinLoRA as ``prior_std`` when it takes one, else as ``weight_decay``;
            ignored when ``weight_decay`` is given.
        lr_scale: the param groups' learning rate is multiplied by it when sampling starts (the
            Langevin step size is the group's lr unless LangevinLoRA chooses it: then set 1).
        temperature_scaling_bounds: search interval of the ``*_ts`` arms' temperature.
        dropout: keep the model's dropout on while sampling; ``False`` (default): the module runs in
            eval mode from the first Langevin step (:class:`~recipes.callbacks.NoDropout`), so the chain
            samples the posterior of the deterministic network.
        diagnostics: extra :class:`~langevin_lora.diagnostics.GibbsDiagnostics` arguments.
    """

    burn_in: float | str = "auto"
    sampling_steps: int | None = None
    num_samples: int = 16
    sample_every: int | None = None
    sample_span: float = 0.5
    prior_std: float = 0.1
    lr_scale: float = 0.01
    temperature_scaling_bounds: tuple[float, float] = (0.05, 20.0)
    dropout: bool = False
    diagnostics: dict = dataclasses.field(default_factory=dict)


RECIPE_FIELDS = {f.name: f for f in dataclasses.fields(_RecipeFields)}


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class LangevinSettings:
    r"""The ``langevin:`` section: the recipe's own keys (:class:`_RecipeFields`: ``burn_in``,
    ``sampling_steps``, ``num_samples``, ``sample_every``, ``sample_span``, ``prior_std``,
    ``lr_scale``, ``temperature_scaling_bounds``, ``dropout``, ``diagnostics``) and any
    keyword argument of
    :class:`~langevin_lora.LangevinLoRA` (``temperature``, ``weight_decay``, ``head_temperature``,
    ``precond_clamp``, ...), passed to it unchanged (:meth:`callback_kwargs`) except the ones the
    comparison sets itself (:data:`RESERVED_CALLBACK`). An unknown key, or a value LangevinLoRA
    refuses, is a one-line :class:`~recipes.config_check.ConfigError` naming ``langevin.<key>``.

    Attributes of both kinds read as attributes (``settings.temperature`` is LangevinLoRA's default
    when not given).
    """

    def __init__(self, **settings: Any) -> None:
        signature = callback_signature()
        for key, reason in RESERVED_CALLBACK.items():
            if key in settings:
                raise ConfigError(f"Invalid key langevin.{key}: {reason}")
        check_keys("langevin", settings, set(RECIPE_FIELDS) | set(signature) - set(RESERVED_CALLBACK))
        recipe = {k: settings.pop(k) for k in list(settings) if k in RECIPE_FIELDS}
        self._fields = dataclasses.asdict(_RecipeFields(**recipe))
        self.callback = dict(settings)
        self._defaults = {n: p.default for n, p in signature.items()}
        self._check_recipe_fields()
        self._check_callback_values()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._fields:
            return self._fields[name]
        if name in self.callback:
            return self.callback[name]
        if name in self._defaults:
            return self._defaults[name]
        raise AttributeError(f"LangevinSettings has no attribute {name!r}")

    def as_dict(self) -> dict[str, Any]:
        return {**self._fields, **self.callback}

    def _check_recipe_fields(self) -> None:
        f = self._fields
        b = f["burn_in"]
        if not (b in ("best", "auto") or (_real(b) and (0 <= b < 1 or (b >= 1 and float(b).is_integer())))):
            raise ConfigError(f"Invalid langevin.burn_in: {b!r} (expected auto, best, a fraction in [0, 1) or a step "
                              "count >= 1)")
        for name in ("num_samples",):
            if isinstance(f[name], bool) or not isinstance(f[name], int) or f[name] < 1:
                raise ConfigError(f"Invalid langevin.{name}: {f[name]!r} (expected an integer >= 1)")
        for name in ("sample_every", "sampling_steps"):
            v = f[name]
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"Invalid langevin.{name}: {v!r} (expected an integer >= 1 or null)")
        if not _real(f["sample_span"]) or not 0 < f["sample_span"] <= 1:
            raise ConfigError(f"Invalid langevin.sample_span: {f['sample_span']!r} (expected a fraction in (0, 1])")
        if not _real(f["prior_std"]) or f["prior_std"] <= 0:
            raise ConfigError(f"Invalid langevin.prior_std: {f['prior_std']!r} (expected a real number > 0)")
        if not _real(f["lr_scale"]) or not 0 < f["lr_scale"] <= 1:
            raise ConfigError(f"Invalid langevin.lr_scale: {f['lr_scale']!r} (expected a real number in (0, 1])")
        if not isinstance(f["dropout"], bool):
            raise ConfigError(f"Invalid langevin.dropout: {f['dropout']!r} (expected true or false)")
        lo_hi = f["temperature_scaling_bounds"]
        if (not isinstance(lo_hi, (list, tuple)) or len(lo_hi) != 2 or not all(_real(x) for x in lo_hi)
                or not 0 < lo_hi[0] < lo_hi[1]):
            raise ConfigError(f"Invalid langevin.temperature_scaling_bounds: {lo_hi!r} (expected [low, high] with "
                              "0 < low < high)")
        f["temperature_scaling_bounds"] = tuple(float(x) for x in lo_hi)
        if not isinstance(f["diagnostics"], dict):
            raise ConfigError(f"Invalid langevin.diagnostics: {f['diagnostics']!r} (expected a mapping of "
                              "GibbsDiagnostics arguments)")

    def _check_callback_values(self) -> None:
        """Build a LangevinLoRA with the given arguments once: a value it refuses becomes a
        ConfigError naming ``langevin.<key>``."""
        from langevin_lora.callback import LangevinLoRA

        kwargs = self.dropin_kwargs() if self._fields["burn_in"] == "auto" else self.callback_kwargs(num_data=1)
        try:
            LangevinLoRA(**kwargs, num_data=1, diagnostics=False)
        except (ValueError, TypeError) as exc:
            msg = str(exc)
            m = re.match(r"Invalid (\w+)", msg)
            if m and m.group(1) in self.callback:
                msg = msg.replace(f"Invalid {m.group(1)}", f"Invalid langevin.{m.group(1)}", 1)
            else:
                msg = f"langevin: {msg}"
            raise ConfigError(msg) from exc

    def weight_decay(self, num_data: int) -> float:
        r""":math:`\lambda`: ``weight_decay`` when given, else :math:`1/(N\sigma_p^2)`."""
        if self.callback.get("weight_decay") is not None:
            return float(self.callback["weight_decay"])
        return float(weight_decay_from_prior_std(self._fields["prior_std"], num_data))

    def dropin_kwargs(self) -> dict[str, Any]:
        """The LangevinLoRA keyword arguments given in the ``langevin:`` section, and nothing else
        (``burn_in: auto``: the callback's own defaults for the rest)."""
        kwargs = dict(self.callback)
        if "precond_clamp" in kwargs:
            kwargs["precond_clamp"] = tuple(kwargs["precond_clamp"])
        return kwargs

    def callback_kwargs(self, num_data: int) -> dict[str, Any]:
        """The LangevinLoRA keyword arguments of the ``langevin:`` section, with the prior: ``prior_std``
        passed on when LangevinLoRA takes it, else ``weight_decay`` = :math:`1/(N\sigma_p^2)`."""
        kwargs = dict(self.callback)
        if kwargs.get("weight_decay") is None:
            kwargs.pop("weight_decay", None)
            if "prior_std" in self._defaults:
                kwargs.setdefault("prior_std", self._fields["prior_std"])
            else:
                kwargs["weight_decay"] = self.weight_decay(num_data)
        if "precond_clamp" in kwargs:
            kwargs["precond_clamp"] = tuple(kwargs["precond_clamp"])
        return kwargs

    def plan(self, total_steps: int, num_data: int, best_step: int | None = None) -> dict[str, Any]:
        """Burn-in, sampling steps, sampling interval, decay and β for an AdamW run of
        ``total_steps`` optimizer steps (``best_step``: the selected step, for ``burn_in: best``)."""
        f = self._fields
        if total_steps < 2:
            raise ConfigError(f"Invalid budget: {total_steps} optimizer steps; need at least 2")
        if f["burn_in"] == "auto":   # LangevinLoRA plans the run itself
            return {"burn_in_steps": None, "sampling_steps": None, "sample_every": None, "num_samples": None,
                    "weight_decay": None, "beta": num_data / float(self.temperature) if self.temperature else math.inf,
                    "extended": False, "burn_in_mode": "auto"}
        if f["burn_in"] == "best":
            if best_step is None:
                raise ValueError("plan: burn_in 'best' needs best_step (the AdamW run's best-validation step)")
            burn = int(best_step)
        else:
            burn = int(round(f["burn_in"] * total_steps)) if f["burn_in"] < 1 else int(f["burn_in"])
            if burn >= total_steps:
                raise ConfigError(f"Invalid langevin.burn_in: {f['burn_in']!r} leaves no sampling step out of "
                                  f"{total_steps}")
        sampling = f["sampling_steps"] or total_steps - burn
        extended = f["sampling_steps"] is None and sampling < f["num_samples"]
        if extended:   # the best checkpoint is (nearly) the last: sample beyond the AdamW budget
            sampling = f["num_samples"]
        span = max(1, int(round(f["sample_span"] * sampling)))
        every = f["sample_every"] or max(1, span // f["num_samples"])
        temperature = float(self.temperature)
        return {"burn_in_steps": burn, "sampling_steps": sampling, "sample_every": every,
                "num_samples": min(f["num_samples"], sampling // every), "weight_decay": self.weight_decay(num_data),
                "beta": math.inf if temperature == 0 else num_data / temperature, "extended": extended,
                "burn_in_mode": "best" if f["burn_in"] == "best" else "fixed"}


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
    :class:`SelectionSettings`, :class:`LangevinSettings` = recipe keys + LangevinLoRA's arguments,
    GibbsDiagnostics) and their values against the annotations; return the Langevin settings.
    Raises :class:`ConfigError` naming the first bad key."""
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
        raise ConfigError(f"Invalid methods: {methods!r} (expected a list of some of {', '.join(METHODS)})")
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"Invalid threads: {threads!r} (expected an integer >= 1)")
    if not isinstance(cfg.get("output_dir", ""), str):
        raise ConfigError(f"Invalid output_dir: {cfg['output_dir']!r} (expected a folder path)")
    data_cls, module_cls, _ = TASKS[task]()
    check_section("data", cfg.get("data"), data_cls)
    check_section("model", cfg.get("model"), module_cls)
    check_section("trainer", cfg.get("trainer"), pl.Trainer, reserved=RESERVED_TRAINER)
    check_section("selection", cfg.get("selection"), SelectionSettings)
    SelectionSettings(**(cfg.get("selection") or {}))
    langevin = cfg.get("langevin") or {}
    if not isinstance(langevin, dict):
        raise ConfigError(f"Invalid langevin: {langevin!r} (expected a mapping of langevin keys)")
    from langevin_lora.callback import LangevinLoRA

    hints = type_hints(LangevinLoRA) | type_hints(_RecipeFields)
    for key, value in langevin.items():
        if key in hints and key not in RESERVED_CALLBACK:
            check_value(f"langevin.{key}", value, hints[key])
    settings = LangevinSettings(**langevin)
    if settings.diagnostics:
        from langevin_lora.diagnostics import GibbsDiagnostics

        check_section("langevin.diagnostics", settings.diagnostics, GibbsDiagnostics, reserved=RESERVED_DIAGNOSTICS)
    return settings

r"""What a comparison config is: its sections, the Langevin settings, and the parser that reads it.

A config (YAML) has the sections ``seeds``, ``output_dir``, ``task`` (``text``; ``choice`` for
causal-LM multiple choice), ``methods``, ``threads``, ``data`` (data-module arguments), ``model``
(module arguments), ``trainer`` (Lightning Trainer arguments, passed unchanged), ``selection``
(:class:`SelectionSettings`) and ``langevin`` (:class:`LangevinSettings`: the recipe's keys plus
any :class:`~langevin_lora.LangevinLoRA` argument; its ``diagnostics`` mapping holds
:class:`~langevin_lora.diagnostics.GibbsDiagnostics` arguments).

:func:`compare_parser` is a jsonargparse parser of it: ``data``, ``model`` and ``trainer`` are the
signatures of the task's data module, LightningModule and :class:`~lightning.pytorch.Trainer`,
``selection`` the :class:`SelectionSettings` dataclass, ``langevin`` the recipe's
:class:`RecipeFields` dataclass and the ``LangevinLoRA`` signature (:func:`langevin_parser`).
jsonargparse loads the YAML, applies ``--section.key value`` overrides, checks each value against
its annotation and prints ``--print_config``. :func:`parse_args` (the command line) and
:func:`load_config` (a file and ``section.key=value`` overrides) run it and return the config as
given (the keys the user set, not the defaults); a mistake is one
:class:`~recipes.config_check.ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from langevin_lora.core.temperature import weight_decay_from_prior_std
from recipes.config_check import ConfigError, GivenItem, check_given, given_items, one_line, signature_keys

__all__ = ["LangevinSettings", "SelectionSettings", "RecipeFields", "TASKS", "SECTIONS", "METHODS", "PROG",
           "compare_parser", "langevin_parser", "parse_args", "load_config", "validate_config", "callback_signature"]

PROG = "python -m recipes.compare"
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
    from langevin_lora.lightning.callback import LangevinLoRA

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
class RecipeFields:
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
            :math:`\lambda = 1/(N\sigma_p^2)` (:func:`~langevin_lora.core.temperature.weight_decay_from_prior_std`);
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

    burn_in: float | Literal["auto", "best"] = "auto"
    sampling_steps: int | None = None
    num_samples: int = 16
    sample_every: int | None = None
    sample_span: float = 0.5
    prior_std: float = 0.1
    lr_scale: float = 0.01
    temperature_scaling_bounds: tuple[float, float] = (0.05, 20.0)
    dropout: bool = False
    diagnostics: dict = dataclasses.field(default_factory=dict)


RECIPE_FIELDS = {f.name: f for f in dataclasses.fields(RecipeFields)}


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class LangevinSettings:
    r"""The ``langevin:`` section: the recipe's own keys (:class:`RecipeFields`: ``burn_in``,
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
        check_given([GivenItem("langevin", settings, "")], _langevin_sections())
        given = [GivenItem(f"langevin.{k}", v, "") for k, v in settings.items()]
        recipe = {k: settings.pop(k) for k in list(settings) if k in RECIPE_FIELDS}
        self._fields = dataclasses.asdict(RecipeFields(**recipe))
        self.callback = dict(settings)
        self._defaults = {n: p.default for n, p in signature.items()}
        self._check_recipe_fields()
        parser = langevin_parser()
        _parsed(lambda: parser.parse_object({**recipe, **self.callback}, defaults=False), parser, given,
                _langevin_sections(), prefix="langevin.")
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
        """Build a LangevinLoRA with the given arguments once. When it refuses them, each given
        argument is tried alone (with the recipe's prior) to name the key it refuses: a one-line
        ConfigError ``Invalid langevin.<key>: <value> (<LangevinLoRA's message>)``."""
        from langevin_lora.lightning.callback import LangevinLoRA

        kwargs = self.dropin_kwargs() if self._fields["burn_in"] == "auto" else self.callback_kwargs(num_data=1)
        try:
            LangevinLoRA(**kwargs, num_data=1, diagnostics=False)
        except (ValueError, TypeError) as exc:
            for key in self.callback:
                alone = {k: v for k, v in kwargs.items() if k == key or k not in self.callback}
                try:
                    LangevinLoRA(**alone, num_data=1, diagnostics=False)
                except (ValueError, TypeError) as key_exc:
                    raise ConfigError(f"Invalid langevin.{key}: {self.callback[key]!r} ({one_line(key_exc)})") from exc
            raise ConfigError(f"langevin: {one_line(exc)}") from exc

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


# -- the parser --------------------------------------------------------------------------------------
def _langevin_sections() -> dict[str, set[str] | None]:
    """Valid keys of ``langevin`` and ``langevin.diagnostics`` (reserved keys included: they are
    refused with their reason, not as unknown)."""
    from langevin_lora.diagnostics import GibbsDiagnostics

    return {"langevin": set(RECIPE_FIELDS) | set(callback_signature()),
            "langevin.diagnostics": signature_keys(GibbsDiagnostics)}


def langevin_parser():
    """The ``langevin:`` section as a jsonargparse parser: :class:`RecipeFields`, ``diagnostics``
    as the :class:`~langevin_lora.diagnostics.GibbsDiagnostics` signature, and the ``LangevinLoRA``
    signature less the recipe's own names (read when called: an argument LangevinLoRA gains later is
    a key at once)."""
    from jsonargparse import ArgumentParser

    from langevin_lora.lightning.callback import LangevinLoRA
    from langevin_lora.diagnostics import GibbsDiagnostics

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RecipeFields, skip={"diagnostics"})
    parser.add_class_arguments(GibbsDiagnostics, "diagnostics")
    parser.add_class_arguments(LangevinLoRA, skip=set(RECIPE_FIELDS))
    return parser


def config_sections(task: Any = "text") -> dict[str, set[str] | None]:
    """Valid keys of each section (``""``: the top level), from the signatures of what it builds."""
    import lightning.pytorch as pl

    data_cls, module_cls, _ = TASKS[task if task in TASKS else "text"]()
    return {"": set(SECTIONS), "data": signature_keys(data_cls), "model": signature_keys(module_cls),
            "trainer": signature_keys(pl.Trainer), "selection": signature_keys(SelectionSettings),
            **_langevin_sections()}


def compare_parser(task: Any = "text"):
    """The jsonargparse parser of a comparison config whose ``task`` is ``task`` (it picks the data
    module and LightningModule): ``--config FILE``, ``--section.key value``, ``--print_config``."""
    import lightning.pytorch as pl
    from jsonargparse import ActionConfigFile, ActionParser, ArgumentParser

    data_cls, module_cls, _ = TASKS[task if task in TASKS else "text"]()
    parser = ArgumentParser(prog=PROG, exit_on_error=False, description="AdamW LoRA, its cheap fixes and Langevin "
                            "LoRA on the same data, seeds, initialisation and data order (recipes/README.md).")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (recipes/configs/compare_*.yaml)")
    parser.add_argument("--seeds", type=list[int], default=[0], help="seeds, e.g. --seeds 0 1 2")
    parser.add_argument("--output_dir", type=str, default="outputs/compare")
    parser.add_argument("--task", type=Literal[tuple(TASKS)], default="text")
    parser.add_argument("--methods", type=list[Literal[METHODS]], default=list(METHODS),
                        help="arms, e.g. --methods adamw langevin")
    parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads")
    parser.add_class_arguments(data_cls, "data")
    parser.add_class_arguments(module_cls, "model")
    parser.add_class_arguments(pl.Trainer, "trainer")
    parser.add_class_arguments(SelectionSettings, "selection")
    parser.add_argument("--langevin", action=ActionParser(parser=langevin_parser()))
    return parser


def _nest(key: str, value: Any) -> dict[str, Any]:
    head, _, rest = key.partition(".")
    return {head: _nest(rest, value) if rest else value}


def _leaves(item: GivenItem, sections: Mapping[str, Any]) -> Iterator[GivenItem]:
    """``item`` split down to the keys of the sections it sets (``data: {...}`` -> ``data.x``, ...)."""
    if isinstance(item.value, Mapping) and sections.get(item.key) is not None:
        for k, v in item.value.items():
            yield from _leaves(GivenItem(f"{item.key}.{k}", v, item.where), sections)
    else:
        yield item


def _parsed(parse: Callable[[], Any], parser, items: Sequence[GivenItem], sections: Mapping[str, Any],
            prefix: str = "") -> Any:
    """``parse()``; when jsonargparse refuses, each given key is parsed alone (``parser.parse_object``)
    and the first one refused is a one-line :class:`ConfigError` naming it, its value and
    jsonargparse's reason (else jsonargparse's message)."""
    from jsonargparse import ArgumentError

    try:
        return parse()
    except ArgumentError as exc:
        for leaf in (leaf for item in items for leaf in _leaves(item, sections)):
            try:
                parser.parse_object(_nest(leaf.key.removeprefix(prefix), leaf.value), defaults=False)
            except ArgumentError as leaf_exc:
                raise ConfigError(f"Invalid {leaf.key}: {leaf.value!r} ({one_line(leaf_exc)})") from None
            except Exception:  # noqa: BLE001 - a key that cannot be parsed alone: jsonargparse's message below
                continue
        raise ConfigError(one_line(exc)) from None


def _task(items: Sequence[GivenItem]) -> Any:
    """The ``task`` the items set last (a file's ``task:`` or ``--task``); ``text`` by default."""
    return next((item.value for item in reversed(items) if item.key == "task"), "text")


def _check_sections(cfg: Mapping[str, Any]) -> LangevinSettings:
    """What the annotations do not say (non-empty ``seeds``/``methods``, ``threads`` >= 1, the keys
    the comparison sets itself), then the Langevin settings (:class:`LangevinSettings`)."""
    seeds = cfg.get("seeds", [0])
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"Invalid seeds: {seeds!r} (expected a non-empty list of integers >= 0)")
    if not cfg.get("methods", METHODS):
        raise ConfigError(f"Invalid methods: [] (expected a list of some of {', '.join(METHODS)})")
    if cfg.get("threads") is not None and cfg["threads"] < 1:
        raise ConfigError(f"Invalid threads: {cfg['threads']!r} (expected an integer >= 1)")
    langevin = cfg.get("langevin") or {}
    for section, given, reserved in (("trainer", cfg.get("trainer") or {}, RESERVED_TRAINER),
                                     ("langevin.diagnostics", langevin.get("diagnostics") or {}, RESERVED_DIAGNOSTICS)):
        for key in given:
            if key in reserved:
                raise ConfigError(f"Invalid key {section}.{key}: {reserved[key]}")
    SelectionSettings(**(cfg.get("selection") or {}))
    return LangevinSettings(**langevin)


def _command_line(argv: Sequence[str]) -> list[str]:
    """The arguments as jsonargparse reads them. ``--set section.key=value`` (the value is everything
    after the first ``=``, parsed as YAML as in the file) becomes a one-key config string
    ``--config '{section: {key: value}}'``, merged over the file by jsonargparse; ``--seeds 0 1 2``
    and ``--methods adamw langevin`` become YAML lists."""
    argv, out, i = list(argv), [], 0
    while i < len(argv):
        token, i = argv[i], i + 1
        if token == "--set" or token.startswith("--set="):
            item = token[len("--set="):] if token.startswith("--set=") else (argv[i] if i < len(argv) else "")
            i += token == "--set"
            key, eq, value = item.partition("=")
            if not eq or not all(key.strip().split(".")):
                raise ConfigError(f"Invalid override: {item!r} (expected section.key=value)")
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"Invalid override: {item!r} (the value {value!r} is not valid YAML: "
                                  f"{one_line(exc)})") from None
            out += ["--config", yaml.safe_dump(_nest(key.strip(), parsed), default_flow_style=True).strip()]
        elif token in ("--seeds", "--methods"):
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values, i = [*values, argv[i]], i + 1
            one_list = len(values) == 1 and values[0].startswith("[")
            out.append(f"{token}={values[0]}" if one_list else f"{token}=[{', '.join(values)}]")
        else:
            out.append(token)
    return out


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """The comparison's command line (``--config FILE``, ``--section.key value``, ``--set
    section.key=value``, ``--print_config``) as a config: the keys given (file and overrides; no
    defaults added), checked. Every mistake is a one-line :class:`ConfigError`."""
    from jsonargparse import strip_meta

    args = _command_line(argv)
    items = given_items(args)
    sections = config_sections(_task(items))
    check_given(items, sections)
    parser = compare_parser(_task(items))
    cfg = strip_meta(_parsed(lambda: parser.parse_args(args, defaults=False), parser, items, sections)).as_dict()
    cfg.pop("config", None)
    _check_sections(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML config with ``section.key=value`` overrides (values parsed as YAML): the command line
    ``--config path --set override ...`` (:func:`parse_args`)."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"Invalid config: {str(path)!r} does not exist")
    return parse_args([*(["--config", str(path)] if path is not None else []),
                       *(a for item in overrides for a in ("--set", item))])


def validate_config(cfg: Mapping[str, Any]) -> LangevinSettings:
    """Check a config mapping (as :func:`load_config` returns it, perhaps edited) as the command line
    is checked; return its Langevin settings."""
    items = [GivenItem(str(k), v, "in the config") for k, v in cfg.items()]
    sections = config_sections(_task(items))
    check_given(items, sections)
    parser = compare_parser(_task(items))
    _parsed(lambda: parser.parse_object(dict(cfg), defaults=False), parser, items, sections)
    return _check_sections(cfg)

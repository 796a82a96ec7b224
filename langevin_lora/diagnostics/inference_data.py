r"""Export to ArviZ: the diagnostics' traces and the sample bank's log-likelihoods as an ArviZ
``DataTree`` (ArviZ 1.x's InferenceData), so ``arviz_stats.summary``, ``arviz_stats.rhat``,
``arviz_stats.loo`` and ``arviz_plots.plot_trace`` run on them.

Needs the optional extra ``pip install langevin-lora[arviz]`` (``arviz-base``, which brings
``xarray``); the statistics themselves only need ``arviz-stats`` (a core dependency).

- :func:`to_inference_data`: traces (a mapping, a :class:`~langevin_lora.diagnostics.GibbsRecorder`,
  a :class:`~langevin_lora.diagnostics.GibbsDiagnostics` or a
  :class:`~langevin_lora.diagnostics.StationarityReport`) into the ``sample_stats`` group, one
  variable per trace, dims ``(chain, draw)``; a trace ``name/part`` (per group or module) becomes
  the variable ``name_parts`` with a dimension ``name_part`` whose coordinates are the parts.
  With ``beta``, ``lp = -beta * U`` (ArviZ's log density, up to a constant). Other groups
  (``posterior``, ``log_likelihood``, ``observed_data``) from mappings of arrays.
- :func:`bank_log_likelihood`: the held-out log-likelihood :math:`\log p(y_n\mid x_n,\theta_s)` of
  every banked sample and example, ``(samples, examples)``, for the ``log_likelihood`` group
  (``arviz_stats.loo`` then gives PSIS-LOO over the held-out set; the samples are one chain).

The report's numbers are reproduced by ArviZ on the export: ``summary(dt, group="sample_stats")``
gives the same R-hat, bulk ESS and MCSE for a trace passed as ``(chains, draws)``; for a single run
cut into segments, pass ``segments=4`` here (the draws are then laid out as the report's chains).
Tail ESS: pass ``prob=(0.05, 0.95)`` to ``arviz_stats.ess`` (its default follows ``stats.ci_prob``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import numpy as np

from langevin_lora._validation import check_int, check_positive
from langevin_lora.diagnostics.chains import segment_chain

__all__ = ["to_inference_data", "bank_log_likelihood", "bank_to_inference_data"]


def _arviz_base():
    try:
        import arviz_base
    except ImportError as err:
        raise ImportError("to_inference_data needs arviz-base: pip install 'langevin-lora[arviz]' "
                          "(or pip install 'arviz-base>=0.8')") from err
    return arviz_base


def _traces_of(source: Any) -> Mapping[str, Any]:
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return source
    traces = getattr(source, "traces", None)
    if isinstance(traces, Mapping):
        return traces
    raise TypeError(f"Invalid traces: {type(source).__name__} (expected a mapping name -> trace, a GibbsRecorder, "
                    "a GibbsDiagnostics or a StationarityReport)")


def _sample_array(name: str, value: Any, segments: int | None, event_ndim: int = 0) -> np.ndarray:
    """``(chain, draw, *event)``: a 1-d trace (or ``(draws, *event)``) is one chain, cut into ``segments``."""
    x = np.asarray(value, dtype=np.float64)
    if x.ndim == event_ndim + 1:
        if segments:
            if event_ndim:
                size = x.shape[0] // segments
                x = x[x.shape[0] - size * segments:].reshape(segments, size, *x.shape[1:])
            else:
                x = segment_chain(x, segments)
        else:
            x = x[None]
    if x.ndim != event_ndim + 2:
        raise ValueError(f"Invalid {name}: shape {x.shape} (expected (draws{', ...' if event_ndim else ''}) for one "
                         f"chain or (chains, draws{', ...' if event_ndim else ''}))")
    if x.shape[0] > x.shape[1]:
        raise ValueError(f"Invalid {name}: shape {x.shape} has more chains ({x.shape[0]}) than draws per chain "
                         f"({x.shape[1]}); expected (chains, draws): pass the transpose if this is (draws, chains)")
    return x


def _sample_stats(traces: Mapping[str, Any], segments: int | None, beta: float | None
                  ) -> tuple[dict[str, np.ndarray], dict[str, list[str]], dict[str, list[str]]]:
    data: dict[str, np.ndarray] = {}
    parts: dict[str, dict[str, np.ndarray]] = {}
    scalars = {k: float(v) for k, v in traces.items() if np.ndim(v) == 0}
    for name, value in traces.items():
        if name in scalars:
            continue
        x = _sample_array(f"traces[{name!r}]", value, segments)
        if "/" in name:
            base, part = name.split("/", 1)
            parts.setdefault(base, {})[part] = x
        else:
            data[name] = x
    dims: dict[str, list[str]] = {}
    coords: dict[str, list[str]] = {}
    for base, by_part in parts.items():
        names = list(by_part)
        shapes = {by_part[p].shape for p in names}
        if len(shapes) > 1:
            raise ValueError(f"Invalid traces: the {base}/<part> traces have different shapes {sorted(shapes)}")
        data[f"{base}_parts"] = np.stack([by_part[p] for p in names], axis=-1)
        dims[f"{base}_parts"] = [f"{base}_part"]
        coords[f"{base}_part"] = names
    if scalars:   # constants of the run (a fixed step size, the guard's cut count): one value per draw
        if not data:
            raise ValueError(f"Invalid traces: only constants ({sorted(scalars)}); give at least one trace")
        shape = next(iter(data.values())).shape[:2]
        data.update({k: np.full(shape, v) for k, v in scalars.items()})
    if beta is not None and "U" in data:
        data["lp"] = -check_positive("beta", beta) * data["U"]
    lengths = {k: v.shape[:2] for k, v in data.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Invalid traces: (chains, draws) differ between traces ({lengths}); pass traces of one "
                         "length (e.g. the last n steps of each)")
    return data, dims, coords


def to_inference_data(traces: Any = None, *, posterior: Mapping[str, Any] | None = None,
                      log_likelihood: Mapping[str, Any] | None = None,
                      observed_data: Mapping[str, Any] | None = None, beta: float | None = None,
                      segments: int | None = None, attrs: Mapping[str, Any] | None = None):
    """An ArviZ ``DataTree`` (``xarray.DataTree``, ArviZ 1.x's InferenceData) of a run.

    Args:
        traces: per-step scalar traces for the ``sample_stats`` group: a mapping (1-d per run, or
            ``(chains, draws)``), or a ``GibbsRecorder`` / ``GibbsDiagnostics`` / ``StationarityReport``
            (their ``traces``). ``U``, ``virial_temperature``, ``config_temperature``,
            ``kinetic_temperature``, ``theta_sq``, step sizes and guard cuts (add them to a mapping,
            per step from your logger's ``langevin/step_size`` and ``langevin/step_cuts``, or as a
            number, repeated for every draw) all go there.
        posterior: quantities of :math:`\\theta` along the chain, ``(draws,)`` (one run) or
            ``(chains, draws, ...)``, for the ``posterior`` group.
        log_likelihood: name -> ``(samples, examples)`` or ``(chains, samples, examples)`` pointwise
            log-likelihoods (:func:`bank_log_likelihood`), for ``arviz_stats.loo``.
        observed_data: name -> observed values (e.g. the held-out labels).
        beta: adds ``lp = -beta * U`` to ``sample_stats``.
        segments: cut a single run's traces into this many chains (as the report does, 4); default
            one chain.
        attrs: attributes of every group (``created_by`` with the package version is always set).
    """
    ab = _arviz_base()
    if segments is not None:
        segments = check_int("segments", segments, low=2)
    groups: dict[str, dict[str, np.ndarray]] = {}
    dims: dict[str, list[str]] = {}
    coords: dict[str, Any] = {}
    stats, d, c = _sample_stats(_traces_of(traces), segments, beta)
    if stats:
        groups["sample_stats"] = stats
        dims.update(d)
        coords.update(c)
    if posterior:
        groups["posterior"] = {}
        for k, v in posterior.items():
            arr = np.asarray(v, dtype=np.float64)
            if arr.ndim == 1:
                arr = _sample_array(f"posterior[{k!r}]", arr, segments)
            elif arr.ndim < 2 or arr.shape[0] > arr.shape[1]:
                raise ValueError(f"Invalid posterior[{k!r}]: shape {arr.shape} (expected (draws,) for one chain or "
                                 "(chains, draws, ...) with no more chains than draws)")
            groups["posterior"][k] = arr
    if log_likelihood:
        groups["log_likelihood"] = {}
        for k, v in log_likelihood.items():
            arr = np.asarray(v, dtype=np.float64)
            if arr.ndim == 2:
                arr = arr[None]
            if arr.ndim != 3:
                raise ValueError(f"Invalid log_likelihood[{k!r}]: shape {arr.shape} (expected (samples, examples) or "
                                 "(chains, samples, examples))")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"Invalid log_likelihood[{k!r}]: contains inf or NaN")
            groups["log_likelihood"][k] = arr
            dims.setdefault(k, [f"{k}_obs"])
    if observed_data:
        groups["observed_data"] = {k: np.asarray(v) for k, v in observed_data.items()}
        for k in observed_data:
            dims.setdefault(k, [f"{k}_obs"])
    if not groups:
        raise ValueError("Invalid arguments: nothing to export (give traces, posterior or log_likelihood)")
    from langevin_lora import __version__

    meta = {"created_by": f"langevin_lora {__version__}", **dict(attrs or {})}
    return ab.from_dict(groups, dims=dims, coords=coords, attrs={g: dict(meta) for g in groups})


def _labels_of(batches: Iterable[Any]) -> np.ndarray:
    import torch

    ys = []
    for b in batches:
        if isinstance(b, Mapping):
            key = "labels" if "labels" in b else "label" if "label" in b else None
            if key is None:
                raise ValueError("Invalid batches: a dict batch has no 'labels' or 'label'; pass labels=")
            ys.append(torch.as_tensor(b[key]).reshape(-1))
        elif isinstance(b, (tuple, list)) and len(b) >= 2:
            ys.append(torch.as_tensor(b[1]).reshape(-1))
        else:
            raise ValueError("Invalid batches: cannot find the labels in a batch; pass labels=")
    return torch.cat(ys).cpu().numpy()


def bank_log_likelihood(model: Any, bank: Any, dataloader_or_batches: Iterable[Any], *, labels: Any = None,
                        forward_fn: Callable[[Any, Any], Any] | None = None) -> np.ndarray:
    r"""Pointwise held-out log-likelihoods :math:`\log p(y_n \mid x_n, \theta_s)` =
    ``log_softmax(forward_fn(model, batch))[y_n]`` of every banked sample ``s`` and example ``n``,
    ``(samples, examples)`` float64, in the bank's and the data's order.

    ``labels``: the examples' class indices; default read from each batch (``batch["labels"]`` or
    ``batch["label"]`` for a dict, ``batch[1]`` for a tuple ``(x, y)``). The model's own tensors and
    train/eval mode are restored after (:meth:`SampleBank.averaging`); a non-finite value raises
    ``FloatingPointError`` naming the sample.
    """
    import torch

    from langevin_lora.posterior.averaging import fixed_batches

    batches = fixed_batches(dataloader_or_batches, "bank_log_likelihood")
    y = torch.as_tensor(np.asarray(_labels_of(batches) if labels is None else labels)).reshape(-1)
    rows = []
    with bank.averaging(model) as averager:
        for logp in averager.per_sample(batches, forward_fn, log=True, where="bank_log_likelihood"):
            if logp.shape[0] != y.numel():
                raise ValueError(f"Invalid labels: {y.numel()} labels for {logp.shape[0]} examples")
            ll = logp.gather(1, y.to(logp.device).long().view(-1, 1)).squeeze(1)
            rows.append(ll.double().cpu().numpy())
    return np.stack(rows)


def bank_to_inference_data(model: Any, bank: Any, dataloader_or_batches: Iterable[Any], *, labels: Any = None,
                           forward_fn: Callable[[Any, Any], Any] | None = None, name: str = "y"):
    r"""The sample bank on held-out data as an ArviZ ``DataTree``: ``log_likelihood[name]``
    (:func:`bank_log_likelihood`, ``(1, samples, examples)``), ``observed_data[name]`` (the labels) and
    ``posterior.theta_sq`` (:math:`\lVert\theta_s\rVert^2` of each banked sample, one chain, so
    ``arviz_stats.loo`` finds its relative efficiency, 1 for one chain). Draws are the samples in
    bank order (their optimizer steps in ``posterior.sample_step``)."""
    from langevin_lora.posterior.averaging import fixed_batches

    batches = fixed_batches(dataloader_or_batches, "bank_to_inference_data")
    ll = bank_log_likelihood(model, bank, batches, labels=labels, forward_fn=forward_fn)
    labels = _labels_of(batches) if labels is None else labels
    theta_sq = np.array([sum(float(t.double().pow(2).sum()) for t in sample.values()) for sample in bank])
    steps = np.asarray(bank.steps, dtype=np.float64)
    return to_inference_data(posterior={"theta_sq": theta_sq, "sample_step": steps}, log_likelihood={name: ll},
                             observed_data={name: np.asarray(labels).reshape(-1)})

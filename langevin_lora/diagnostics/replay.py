r"""Running a LightningModule's ``training_step`` again without a trace in the user's run.

The curvature probes evaluate the training loss several times at (or near) the current
parameters. Replaying ``training_step`` would otherwise leave two kinds of trace:

- values passed to ``self.log`` / ``self.log_dict`` land in the training loop's result collection,
  from which Lightning fills ``trainer.callback_metrics``, the progress bar and the loggers (an
  ``on_epoch`` mean would average the replays in, a step value would be overwritten by one at
  :math:`\theta \pm \epsilon v`);
- ``torchmetrics.Metric`` objects updated inside the step would count the replayed batch again.

:func:`isolated_training_step` runs the replay against a scratch result collection, with the hook
name set to ``training_step`` (so Lightning validates the step's ``self.log`` calls exactly as in
the real step), and restores every Metric's state afterwards. The user's module and its methods
are left untouched. Lightning has no public API for this; the private names used are listed in
``_LIGHTNING_PRIVATE`` and checked, and when they are missing (another Lightning version) the
replay runs without isolation after one warning.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator

from torch import Tensor

__all__ = ["isolated_training_step"]

# Lightning 2.x: trainer.fit_loop.epoch_loop._results (the training loop's _ResultCollection),
# pl_module._current_fx_name (the hook being run) and trainer._logger_connector._current_fx.
_LIGHTNING_PRIVATE = ("fit_loop.epoch_loop._results", "_current_fx_name", "_logger_connector._current_fx")


def _metric_states(pl_module: Any) -> list[tuple[Any, dict[str, Any], tuple]]:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return []
    saved = []
    for m in pl_module.modules():
        if isinstance(m, Metric):
            state = {k: v.clone() if isinstance(v, Tensor) else list(v) for k, v in m.metric_state.items()}
            saved.append((m, state, (m._update_count, m._forward_cache, m._computed)))
    return saved


def _restore_metrics(saved: list[tuple[Any, dict[str, Any], tuple]]) -> None:
    for m, state, (count, forward_cache, computed) in saved:
        for k, v in state.items():
            setattr(m, k, v)
        m._update_count, m._forward_cache, m._computed = count, forward_cache, computed


@contextmanager
def isolated_training_step(trainer: Any, pl_module: Any) -> Iterator[None]:
    """Inside the block, ``pl_module.training_step`` may be called again: its logged values are
    discarded and its Metric updates undone on exit (module docstring)."""
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection

    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    connector = getattr(trainer, "_logger_connector", None)
    results = getattr(loop, "_results", None)
    if not isinstance(results, _ResultCollection) or not hasattr(connector, "_current_fx") \
            or not hasattr(pl_module, "_current_fx_name"):
        if getattr(trainer, "training", False):
            warnings.warn("GibbsDiagnostics: this Lightning version does not expose the training loop's result "
                          "collection; values logged by the replayed training_step may reach your metrics "
                          "(pass loss_fn=... to avoid the replay)", RuntimeWarning, stacklevel=3)
        yield
        return
    saved_fx, saved_connector_fx = pl_module._current_fx_name, connector._current_fx
    metrics = _metric_states(pl_module)
    scratch = _ResultCollection(training=results.training)
    scratch.batch = results.batch
    loop._results = scratch
    pl_module._current_fx_name = "training_step"
    try:
        yield
    finally:
        loop._results = results
        pl_module._current_fx_name, connector._current_fx = saved_fx, saved_connector_fx
        _restore_metrics(metrics)

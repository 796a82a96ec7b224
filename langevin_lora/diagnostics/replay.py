r"""Running a LightningModule's ``training_step`` again without a trace in the user's run.

Used by the diagnostics' curvature probes (configurational temperature, :math:`\eta\lambda_{\max}`)
and by :class:`~langevin_lora.LangevinLoRA`'s automatic step size, which measures the curvature on
replays of the training step. It lives in the diagnostics layer, below the Lightning front-end.

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

:func:`replayed_training_loss` combines it with :class:`~langevin_lora.core.curvature.RngSnapshot`: a
closure computing the mean training loss over fixed batches with fixed dropout masks, the same
function of :math:`\theta` at every call, as Hessian-vector products need.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

from torch import Tensor

from langevin_lora.core.curvature import RngSnapshot

__all__ = ["ProbeBatches", "batch_size_of", "isolated_training_step", "loss_tensor", "replayed_training_loss"]

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
def isolated_training_step(trainer: Any, pl_module: Any, owner: str = "GibbsDiagnostics") -> Iterator[None]:
    """Inside the block, ``pl_module.training_step`` may be called again: its logged values are
    discarded and its Metric updates undone on exit (module docstring). ``owner`` names the caller
    in the warning given when the isolation is unavailable."""
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection

    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    connector = getattr(trainer, "_logger_connector", None)
    results = getattr(loop, "_results", None)
    if not isinstance(results, _ResultCollection) or not hasattr(connector, "_current_fx") \
            or not hasattr(pl_module, "_current_fx_name"):
        if getattr(trainer, "training", False):
            warnings.warn(f"{owner}: this Lightning version does not expose the training loop's result "
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


def loss_tensor(out: Any) -> Tensor | None:
    """The loss a ``training_step`` returned (a tensor, or a mapping's ``"loss"``), else ``None``."""
    loss = out.get("loss") if isinstance(out, Mapping) else out
    return loss if isinstance(loss, Tensor) else None


def batch_size_of(batch: Any) -> int | None:
    """Leading size of the first tensor found in ``batch`` (tensor, mapping or sequence), or ``None``."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        size = batch_size_of(value)
        if size is not None:
            return size
    return None


@contextmanager
def replayed_training_loss(trainer: Any, pl_module: Any, batches: Sequence[tuple[Any, int]], *,
                           loss_fn: Callable[[Any, Any], Tensor] | None = None, snapshot: RngSnapshot | None = None,
                           owner: str = "LangevinLoRA") -> Iterator[Callable[[], Tensor]]:
    r"""Yield ``closure() -> loss``: the mean of the training losses of ``batches`` (``(batch, batch_idx)``
    pairs, weighted by their sizes when :func:`batch_size_of` finds them), at the current parameters.

    Every call restarts the global RNG from ``snapshot`` (default: its state on entry), so dropout
    draws the same masks each time; the global RNG is left as it was, logged values are discarded
    and Metric updates undone (:func:`isolated_training_step`). ``loss_fn(pl_module, batch)``
    replaces the training step when given. Raises ``RuntimeError`` when a step returns no loss."""
    if not batches:
        raise ValueError("Invalid batches: expected at least one (batch, batch_idx) pair")
    sizes = [batch_size_of(b) for b, _ in batches]
    weights = [float(s) for s in sizes] if all(sizes) else [1.0] * len(batches)
    total = sum(weights)
    snapshot = snapshot if snapshot is not None else RngSnapshot()
    with snapshot.replaying() as deterministic, isolated_training_step(trainer, pl_module, owner):
        def one(batch: Any, batch_idx: int) -> Tensor:
            out = loss_fn(pl_module, batch) if loss_fn is not None else pl_module.training_step(batch, batch_idx)
            loss = loss_tensor(out)
            if loss is None:
                raise RuntimeError(f"{owner}: training_step returned no loss tensor to differentiate")
            return loss

        def mean_loss() -> Tensor:
            acc = None
            for (batch, batch_idx), w in zip(batches, weights):
                term = one(batch, batch_idx) * (w / total)
                acc = term if acc is None else acc + term
            return acc

        yield deterministic(mean_loss)


class ProbeBatches:
    """The training batches a curvature probe replays: the newest ones whose sizes add up to at least
    ``examples`` (at least one batch; sizes from :func:`batch_size_of`, 1 per batch when unknown).

    While not :attr:`frozen` every :meth:`add` keeps the newest batches (a rolling window over
    burn-in); :meth:`freeze` fixes the set (the probe is then the same function at every
    measurement), and a frozen set that is not yet full keeps taking batches until it is."""

    def __init__(self, examples: int) -> None:
        self.examples = examples
        self.clear()

    def clear(self) -> None:
        self.batches: list[tuple[Any, int]] = []
        self._sizes: list[int] = []
        self.frozen = False

    @property
    def size(self) -> int:
        """Examples held."""
        return sum(self._sizes)

    @property
    def full(self) -> bool:
        return self.size >= self.examples

    def add(self, batch: Any, batch_idx: int) -> None:
        if self.frozen and self.full:
            return
        self.batches.append((batch, batch_idx))
        self._sizes.append(batch_size_of(batch) or 1)
        while not self.frozen and len(self._sizes) > 1 and self.size - self._sizes[0] >= self.examples:
            self.batches.pop(0)
            self._sizes.pop(0)

    def freeze(self) -> None:
        self.frozen = True

    def state_dict(self) -> dict[str, Any] | None:
        """The probe set on the CPU, when every batch is made of tensors and builtins (so a checkpoint
        stays loadable with ``weights_only``), else ``None`` (not saved: a resumed run collects a new one)."""
        if not all(_plain(b) for b, _ in self.batches):
            return None
        return {"frozen": self.frozen, "sizes": list(self._sizes),
                "batches": [(_to_cpu(b), int(i)) for b, i in self.batches]}

    def load_state_dict(self, state: dict[str, Any] | None, device: Any = None) -> None:
        """Restore :meth:`state_dict`'s probe set, its tensors moved to ``device``."""
        self.clear()
        if state is None:
            return
        from lightning.fabric.utilities.apply_func import move_data_to_device

        self.frozen = bool(state["frozen"])
        self._sizes = [int(x) for x in state["sizes"]]
        self.batches = [(b if device is None else move_data_to_device(b, device), int(i)) for b, i in state["batches"]]


def _plain(obj: Any) -> bool:
    """Tensors and builtins only (plain ``dict``/``list``/``tuple`` containers)."""
    if isinstance(obj, Tensor) or obj is None or type(obj) in (bool, int, float, str):
        return True
    if type(obj) in (list, tuple):
        return all(_plain(x) for x in obj)
    if type(obj) is dict:
        return all(type(k) in (str, int) and _plain(v) for k, v in obj.items())
    return False


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if type(obj) in (list, tuple):
        return type(obj)(_to_cpu(x) for x in obj)
    if type(obj) is dict:
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj

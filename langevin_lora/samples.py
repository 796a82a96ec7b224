r"""Posterior sample bank and Bayesian model averaging (BMA).

A *sample* is a copy of the trainable tensors of a model at one Langevin step: the LoRA factors
:math:`(A, B)` of every adapted module plus the other trainable tensors (classification heads,
PEFT ``modules_to_save``). The frozen base model is never copied, so a sample of MiniLM with LoRA
r=8 is about 1 MB instead of 90 MB.

Bayesian model averaging approximates the posterior predictive by the sample average

.. math::
    p(y \mid x, \mathcal D) = \int p(y \mid x, \theta)\, \pi(\mathrm d\theta)
    \approx \frac1S \sum_{s=1}^{S} \operatorname{softmax}\big(f_{\theta_s}(x)\big)_y ,

with :math:`\theta_1, \dots, \theta_S` the banked samples. :func:`bma_predict_proba` loads each
sample into the model *in place* (``Tensor.copy_`` into the live parameters, no deep copy of the
model), runs the forward pass, averages the probabilities and restores the model's own tensors.

Storage: CPU memory by default, or one PEFT adapter folder per sample under ``directory``
(``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained(base_model, folder)``). Folders are written under a temporary name
and renamed into place, so a crash never leaves a half-written sample.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from langevin_lora._validation import check_int

__all__ = ["SampleBank", "bma_predict_proba", "default_forward"]

EXTRA_FILE = "langevin_extra.safetensors"
SAMPLE_PREFIX = "sample-"


def _find_peft_model(module: nn.Module) -> tuple[str, nn.Module] | None:
    """``(prefix, peft_model)`` of the first :class:`peft.PeftModel` inside ``module`` (itself included)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a core dependency
        return None
    for name, m in module.named_modules():
        if isinstance(m, PeftModel):
            return (f"{name}." if name else ""), m
    return None


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_publish(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``; an existing ``target`` is replaced only
    after the new folder is complete, so readers see the old or the new sample, never a mix."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)


class SampleBank:
    r"""At most ``num_samples`` posterior samples of a model's trainable (adapter) tensors.

    When full, adding a sample drops the oldest one (the bank keeps the **most recent**
    ``num_samples``, the best-mixed part of the chain).

    Args:
        num_samples: capacity, an integer >= 0 (0: the bank keeps nothing).
        directory: ``None`` keeps samples in CPU memory; a folder writes each sample as a PEFT
            adapter folder ``directory/sample-<step>`` (atomically) and keeps only the index.
        device: where in-memory samples live (default ``"cpu"``).

    The bank is bound to a root module (the LightningModule or the PEFT model) on the first
    :meth:`add` or by :meth:`bind`; sample keys are that module's parameter names.
    Indexing returns ``{name: tensor}`` dicts; ``bank.steps[i]`` is the optimizer step of sample ``i``.

    Example:
        >>> bank = SampleBank(num_samples=2)
        >>> model = nn.Linear(3, 1)
        >>> for step in range(3):
        ...     with torch.no_grad():
        ...         _ = model.bias.fill_(step)
        ...     bank.add(model, step)
        >>> len(bank), bank.steps, float(bank[0]["bias"])
        (2, [1, 2], 1.0)
    """

    def __init__(self, num_samples: int = 0, directory: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.num_samples = check_int("num_samples", num_samples, low=0)
        self.directory = Path(directory) if directory is not None else None
        self.device = torch.device(device)
        self.adapter_name: str | None = None
        self._memory: list[dict[str, Tensor]] = []
        self._paths: list[str] = []
        self.steps: list[int] = []
        self._names: list[str] | None = None
        self._root_ref: nn.Module | None = None
        self._peft_keys: dict[str, str] | None = None  # PEFT file key -> root name (trainable only)

    # -- binding -----------------------------------------------------------------------------------
    def bind(self, root: nn.Module, adapter_name: str | None = None) -> None:
        """Fix the set of tensors a sample holds (the trainable parameters of ``root``) and, for
        PEFT models, the mapping to PEFT adapter-file keys used by :meth:`save_peft`."""
        self._root_ref = root
        names = list(_trainable(root))
        if not names:
            raise ValueError(f"SampleBank.bind: {type(root).__name__} has no trainable parameters to sample")
        if self._names is not None and self._names != names:
            raise ValueError("SampleBank.bind: the model's trainable parameters differ from those of the "
                             f"banked samples ({len(names)} vs {len(self._names)} tensors)")
        self._names = names
        found = _find_peft_model(root)
        if found is not None:
            prefix, peft_model = found
            self.adapter_name = adapter_name or getattr(peft_model, "active_adapter", "default")
        if self.directory is not None and found is None:
            raise ValueError("SampleBank: directory (sample_dir) needs a peft.PeftModel inside the module to write "
                             f"PEFT adapter folders; none found in {type(root).__name__}")

    def _peft(self) -> tuple[str, nn.Module]:
        root = self._require_root()
        found = _find_peft_model(root)
        if found is None:
            raise ValueError(f"SampleBank.save_peft: no peft.PeftModel inside {type(root).__name__}")
        return found

    def _require_root(self) -> nn.Module:
        if self._root_ref is None:
            raise ValueError("SampleBank is not bound to a model yet: call bank.bind(model) or bank.add(model, step)")
        return self._root_ref

    def _peft_state(self) -> tuple[nn.Module, dict[str, tuple[str | None, Tensor]]]:
        """PEFT file key -> (root parameter name or None for frozen tensors, live tensor)."""
        from peft import get_peft_model_state_dict

        prefix, peft_model = self._peft()
        live = peft_model.state_dict(keep_vars=True)
        selected = get_peft_model_state_dict(peft_model, state_dict=live, adapter_name=self.adapter_name,
                                             save_embedding_layers=False)
        by_id = {id(p): f"{prefix}{n}" for n, p in peft_model.named_parameters() if p.requires_grad}
        return peft_model, {k: (by_id.get(id(v)), v) for k, v in selected.items()}

    # -- container protocol ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        i = self._index(i)
        if self.directory is None:
            return self._memory[i]
        return self._read_folder(Path(self._paths[i]))

    def _index(self, i: int) -> int:
        n = len(self)
        if not isinstance(i, int) or not -n <= i < n:
            raise IndexError(f"sample index {i!r} out of range for a bank of {n} samples")
        return i % n

    def __repr__(self) -> str:
        where = f"directory={str(self.directory)!r}" if self.directory is not None else f"device={self.device}"
        return f"SampleBank({len(self)}/{self.num_samples} samples, {where})"

    @property
    def is_full(self) -> bool:
        return len(self) >= self.num_samples

    # -- adding ------------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, root: nn.Module, step: int, *, write: bool = True) -> None:
        """Keep a copy of ``root``'s trainable tensors as the sample of optimizer step ``step``.

        With a ``directory``, the sample is written as a PEFT adapter folder; ``write=False``
        records it without writing (data-parallel ranks other than 0 share rank 0's folder).
        """
        if self.num_samples == 0:
            return
        if self._root_ref is not root:
            self.bind(root, self.adapter_name)
        params = _trainable(root)
        if self.directory is None:
            self._memory.append({n: p.detach().to(self.device, copy=True) for n, p in params.items()})
        else:
            path = self.directory / f"{SAMPLE_PREFIX}{step:08d}"
            if write:
                self._write_folder(path, {n: p.detach() for n, p in params.items()})
            self._paths.append(str(path))
        self.steps.append(int(step))
        while len(self) > self.num_samples:
            self._drop_oldest(write)

    def _drop_oldest(self, write: bool) -> None:
        self.steps.pop(0)
        if self.directory is None:
            self._memory.pop(0)
        else:
            path = Path(self._paths.pop(0))
            if write and path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def clear(self) -> None:
        """Forget every sample (folders on disk are left alone)."""
        self._memory.clear()
        self._paths.clear()
        self.steps.clear()

    # -- disk --------------------------------------------------------------------------------------
    def _write_folder(self, target: Path, sample: Mapping[str, Tensor]) -> None:
        from safetensors.torch import save_file

        peft_model, keys = self._peft_state()
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            used = set()
            tensors = {}
            for key, (name, live) in keys.items():
                value = sample[name] if name is not None and name in sample else live.detach()
                used.add(name)
                tensors[key] = value.detach().to("cpu").contiguous().clone()
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            extra = {n: t.detach().to("cpu").contiguous().clone() for n, t in sample.items() if n not in used}
            if extra:  # trainable tensors outside the PEFT adapter (e.g. a head of the LightningModule)
                save_file(extra, str(tmp / EXTRA_FILE), metadata={"format": "pt"})
            config = copy.deepcopy(peft_model.peft_config[self.adapter_name])
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = getattr(peft_model.get_base_model(), "name_or_path", None) or None
            config.inference_mode = True
            config.save_pretrained(str(tmp))
            _atomic_publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _read_folder(self, folder: Path) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        _, keys = self._peft_state()
        loaded = load_file(str(folder / "adapter_model.safetensors"))
        out = {name: loaded[key] for key, (name, _) in keys.items() if name is not None and key in loaded}
        if (folder / EXTRA_FILE).exists():
            out.update(load_file(str(folder / EXTRA_FILE)))
        missing = [n for n in self._names or [] if n not in out]
        if missing:
            raise ValueError(f"sample folder {folder} lacks {len(missing)} tensors of the model, e.g. {missing[0]!r}")
        return out

    def save_peft(self, i: int, path: str | os.PathLike) -> Path:
        """Write sample ``i`` as a PEFT adapter folder at ``path`` (atomically: written under a
        temporary name, then renamed). Load it with ``PeftModel.from_pretrained(base, path)``."""
        self._require_root()
        sample = self[i]
        self._write_folder(Path(path), sample)
        return Path(path)

    # -- loading into a model ------------------------------------------------------------------------
    @torch.no_grad()
    def load_into(self, model: nn.Module, i: int) -> None:
        """Copy sample ``i`` into ``model``'s parameters in place (``Tensor.copy_``: the parameter
        objects, and so the optimizer's references to them, are unchanged)."""
        sample = self[i]
        params = dict(model.named_parameters())
        for name, value in sample.items():
            p = params.get(name)
            if p is None:
                raise KeyError(f"SampleBank.load_into: {type(model).__name__} has no parameter {name!r}; "
                               "pass the module the samples were taken from")
            p.copy_(value)

    def snapshot(self, model: nn.Module) -> dict[str, Tensor]:
        """Copies of ``model``'s tensors that a sample would overwrite (to restore them later)."""
        names = self._names or list(_trainable(model))
        params = dict(model.named_parameters())
        return {n: params[n].detach().clone() for n in names}

    @contextlib.contextmanager
    def averaging(self, model: nn.Module) -> Iterator["_Averager"]:
        """Context manager for BMA inside a Lightning ``test_step`` / ``predict_step`` or a loop.

        Puts the model in eval mode under ``torch.no_grad()``, yields an object whose
        ``predict_proba(batch, forward_fn=None)`` returns the sample-averaged probabilities of
        one batch, and restores the model's own tensors and training mode on exit.

        Example (inside a LightningModule)::

            def predict_step(self, batch, batch_idx):
                with self.langevin.sample_bank.averaging(self) as bma:
                    return bma.predict_proba(batch, forward_fn=lambda m, b: m(b[0]))
        """
        if len(self) == 0:
            raise ValueError("SampleBank is empty: nothing to average (did sampling start? is num_samples > 0?)")
        saved = self.snapshot(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield _Averager(self, model)
        finally:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for n, v in saved.items():
                    params[n].copy_(v)
            model.train(was_training)

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Samples (in memory) or folder paths (on disk), steps and settings; tensors and builtins only."""
        return {"num_samples": self.num_samples, "directory": None if self.directory is None else str(self.directory),
                "steps": list(self.steps), "paths": list(self._paths), "names": self._names,
                "adapter_name": self.adapter_name,
                "memory": [{n: t.clone() for n, t in s.items()} for s in self._memory]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"SampleBank.load_state_dict: checkpoint has num_samples={state['num_samples']}, "
                             f"this bank {self.num_samples}")
        directory = state["directory"]
        if (directory is None) != (self.directory is None):
            raise ValueError("SampleBank.load_state_dict: checkpoint and bank disagree on disk vs memory storage "
                             f"(checkpoint directory={directory!r}, bank directory={self.directory})")
        self.steps = list(state["steps"])
        self._paths = list(state["paths"])
        self._names = state["names"]
        self.adapter_name = state["adapter_name"]
        self._memory = [{n: t.to(self.device) for n, t in s.items()} for s in state["memory"]]


class _Averager:
    def __init__(self, bank: SampleBank, model: nn.Module) -> None:
        self.bank, self.model = bank, model

    def predict_proba(self, batch: Any, forward_fn: Callable[[nn.Module, Any], Tensor] | None = None) -> Tensor:
        """Average over the bank of ``softmax(forward_fn(model, batch))`` for one batch."""
        forward = forward_fn or default_forward
        total = None
        for i in range(len(self.bank)):
            self.bank.load_into(self.model, i)
            p = torch.softmax(forward(self.model, batch).float(), dim=-1)
            total = p if total is None else total.add_(p)
        return total.div_(len(self.bank))


def default_forward(model: nn.Module, batch: Any) -> Tensor:
    """Logits of a batch: ``model(**inputs)`` for a dict (``labels``/``label`` removed),
    ``model(batch[0])`` for a tuple/list ``(x, y)``, else ``model(batch)``; ``.logits`` is taken
    from model outputs that have it (Hugging Face models)."""
    if isinstance(batch, Mapping):
        out = model(**{k: v for k, v in batch.items() if k not in ("labels", "label")})
    elif isinstance(batch, (tuple, list)):
        out = model(batch[0])
    else:
        out = model(batch)
    return out.logits if hasattr(out, "logits") else out


def bma_predict_proba(model: nn.Module, bank: SampleBank, dataloader_or_batches: Iterable[Any],
                      forward_fn: Callable[[nn.Module, Any], Tensor] | None = None) -> Tensor:
    r"""Bayesian-model-averaged class probabilities, one row per example.

    .. math::
        \bar p(y \mid x_n) = \frac1S \sum_{s=1}^S \operatorname{softmax}\big(f_{\theta_s}(x_n)\big)_y

    Args:
        model: the module the samples were taken from (LightningModule or PEFT model); each sample
            is copied into it in place, and its own tensors and train/eval mode are restored after.
        bank: a non-empty :class:`SampleBank`.
        dataloader_or_batches: a DataLoader without shuffling, a list of batches, or any iterable
            of batches (a one-shot iterator is read once into a list).
        forward_fn: ``forward_fn(model, batch) -> logits`` of shape ``(batch, n_classes)``;
            default :func:`default_forward`.

    Returns:
        ``(n_examples, n_classes)`` float32 tensor of averaged probabilities, in data order.
    """
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(dataloader_or_batches, DataLoader) and isinstance(dataloader_or_batches.sampler, RandomSampler):
        raise ValueError("bma_predict_proba: the DataLoader shuffles (RandomSampler); each sample makes one pass, "
                         "so the example order must be fixed: use shuffle=False")
    batches = dataloader_or_batches
    if iter(batches) is batches:  # one-shot iterator: read it once
        batches = list(batches)
    forward = forward_fn or default_forward
    total: Tensor | None = None
    with bank.averaging(model):
        for i in range(len(bank)):
            bank.load_into(model, i)
            probs = torch.cat([torch.softmax(forward(model, b).float(), dim=-1) for b in batches])
            if total is not None and total.shape != probs.shape:
                raise ValueError(f"bma_predict_proba: pass {i} gave {tuple(probs.shape)} probabilities, the first "
                                 f"{tuple(total.shape)}; the batches must be the same on every pass")
            total = probs if total is None else total.add_(probs)
    assert total is not None
    return total.div_(len(bank))

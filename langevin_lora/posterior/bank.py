r"""Posterior sample bank: at most ``num_samples`` copies of a model's trainable (adapter) tensors.

A *sample* is a copy of the trainable tensors of a model at one Langevin step: the LoRA factors
:math:`(A, B)` of every adapted module plus the other trainable tensors (classification heads,
PEFT ``modules_to_save``). The frozen base model is never copied, so a sample of MiniLM with LoRA
r=8 is about 1 MB instead of 90 MB. Averaging predictions over the samples (Bayesian model
averaging) lives in :mod:`langevin_lora.posterior.averaging`; the bank only stores.

Storage: CPU memory by default, or one PEFT adapter folder per sample under ``directory``
(``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained(base_model, folder)``). Folders are written under a temporary name
and renamed into place, so a crash never leaves a half-written sample.

Checkpoints and eviction: a checkpoint stores the bank's :meth:`SampleBank.state_dict`, i.e. the
*paths* of the folders. An evicted folder is deleted only once neither of the path lists returned
by the last two ``state_dict()`` calls refers to it (the newest checkpoint may not have finished
writing), so resuming from the latest checkpoint (or the one before it) always finds every sample
it lists. Disk use stays below about ``3 * num_samples`` folders. The checkpoint a run was
resumed from counts as saved. Folders the bank did not write itself are never deleted.

(Over 400 lines on purpose: one class whose storage, eviction and checkpoint state must stay
together, since the deletion rule reads the saved states; folder I/O is in
:mod:`langevin_lora.posterior.adapter_folders`, averaging in :mod:`langevin_lora.posterior.averaging`.)
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from langevin_lora._validation import check_directory, check_int
from langevin_lora.core.sharding import copy_full_, full_tensor
from langevin_lora.posterior.adapter_folders import read_adapter_folder, write_adapter_folder
from langevin_lora.posterior.averaging import Averager

__all__ = ["SAMPLE_PREFIX", "SampleBank"]

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


def _check_device(device: Any) -> torch.device:
    """``device`` as a :class:`torch.device` that exists on this machine, or ``ValueError``."""
    expected = "expected a torch.device or a device string such as 'cpu' or 'cuda:0'"
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"Invalid device: {device!r} ({expected})")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"Invalid device: {device!r} ({expected}; torch says: {exc})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ValueError(f"Invalid device: {device!r} (this machine has {count} CUDA devices)")
    elif dev.type == "meta":
        raise ValueError(f"Invalid device: {device!r} (a meta tensor holds no values; {expected})")
    return dev


def _dot_prefixes(name: str) -> list[str]:
    """``""`` and every prefix of ``name`` that ends with a dot, shortest first."""
    return [""] + [name[:i + 1] for i, c in enumerate(name) if c == "."]


def _rename_by_prefix(names: list[str], model: nn.Module) -> dict[str, nn.Parameter] | None:
    """Map banked names to ``model``'s parameters by replacing a leading prefix: the samples of a
    LightningModule (``model.base_model.…``) into its PEFT model (``base_model.…``), or back."""
    params = dict(model.named_parameters())
    found = _find_peft_model(model)
    targets = [""] + ([found[0]] if found is not None and found[0] else [])
    for src in _dot_prefixes(names[0]):
        if not all(n.startswith(src) for n in names):
            continue
        for dst in targets:
            mapped = {n: params.get(dst + n[len(src):]) for n in names}
            if src != dst and all(p is not None for p in mapped.values()):
                return mapped
    return None


class SampleBank:
    r"""At most ``num_samples`` posterior samples of a model's trainable (adapter) tensors.

    When full, adding a sample drops the oldest one (the bank keeps the **most recent**
    ``num_samples``, the best-mixed part of the chain).

    Args:
        num_samples: capacity, an integer >= 0 (0: the bank keeps nothing).
        directory: ``None`` keeps samples in CPU memory; a folder (``str`` or ``os.PathLike``,
            writable) writes each sample as a PEFT adapter folder ``directory/sample-<step>``
            (atomically) and keeps only the index. Evicted folders are deleted once no saved
            checkpoint state may refer to them (see the module docstring).
        device: where in-memory samples live (default ``"cpu"``): a ``torch.device`` or a device
            string of a device this machine has.

    The bank is bound to a root module (the LightningModule or the PEFT model) on the first
    :meth:`add` or by :meth:`bind`; sample keys are that module's parameter names. Every sample
    must hold the same tensors with the same shapes: :meth:`add` and :meth:`bind` refuse a model
    whose trainable tensors differ; :meth:`clear` forgets the samples *and* the binding, so the
    bank can then sample another model. Indexing returns ``{name: tensor}`` dicts;
    ``bank.steps[i]`` is the optimizer step of sample ``i``.

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
        self.directory = check_directory("directory", directory, must_write=True)
        self.device = _check_device(device)
        self.adapter_name: str | None = None
        self._memory: list[dict[str, Tensor]] = []
        self._paths: list[str] = []
        self.steps: list[int] = []
        self._names: list[str] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._root_ref: nn.Module | None = None
        self._saved: deque[list[str]] = deque(maxlen=2)  # path lists of the last two state_dict() calls
        self._evicted: list[str] = []  # evicted folders waiting until no saved list refers to them

    # -- binding -----------------------------------------------------------------------------------
    def bind(self, root: nn.Module, adapter_name: str | None = None) -> None:
        """Fix the set of tensors a sample holds (the trainable parameters of ``root``) and, for
        PEFT models, the mapping to PEFT adapter-file keys used by :meth:`save_peft`. A bank that
        already holds samples (or was bound) refuses a ``root`` with other tensor names or shapes."""
        params = _trainable(root)
        if not params:
            raise ValueError(f"SampleBank.bind: {type(root).__name__} has no trainable parameters to sample")
        self._check_layout(params, "SampleBank.bind")
        found = _find_peft_model(root)
        if self.directory is not None and found is None:
            raise ValueError("SampleBank: directory (sample_dir) needs a peft.PeftModel inside the module to write "
                             f"PEFT adapter folders; none found in {type(root).__name__}")
        self._root_ref = root
        self._names = list(params)
        self._shapes = {n: tuple(p.shape) for n, p in params.items()}
        if found is not None:
            self.adapter_name = adapter_name or getattr(found[1], "active_adapter", "default")

    def _check_layout(self, params: Mapping[str, Tensor], where: str) -> None:
        """Same tensor names and shapes as the banked samples, or ``ValueError`` saying what differs."""
        if self._names is None:
            return
        remedy = ("; the bank holds samples of another model: call bank.clear() before sampling a different model "
                  "(a second, non-resumed Trainer.fit does that)")
        if set(params) != set(self._names):
            missing = [n for n in self._names if n not in params]
            new = [n for n in params if n not in set(self._names)]
            detail = ", ".join(x for x in (f"missing {missing[0]!r}" if missing else "",
                                           f"new {new[0]!r}" if new else "") if x)
            raise ValueError(f"{where}: the model's trainable tensors differ from those of the banked samples "
                             f"({len(params)} vs {len(self._names)} tensors; {detail}){remedy}")
        for n, p in params.items():
            want = (self._shapes or {}).get(n)
            if want is not None and tuple(p.shape) != want:
                raise ValueError(f"{where}: tensor {n!r} has shape {tuple(p.shape)} but the banked samples hold "
                                 f"shape {want}{remedy}")

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
        Raises ``ValueError`` when the tensors' names or shapes differ from the banked samples'.
        """
        if self.num_samples == 0:
            return
        if self._root_ref is not root:
            self.bind(root, self.adapter_name)
        params = _trainable(root)
        self._check_layout(params, "SampleBank.add")
        # a sharded (FSDP2) parameter is gathered: every rank calls add, rank 0 writes the full tensors
        self._store(step, {n: full_tensor(p.detach()) for n, p in params.items()}, write)
        self._delete_unreferenced()

    def _store(self, step: int, sample: Mapping[str, Tensor], write: bool) -> None:
        """Keep a copy of ``sample`` (in memory, or as a PEFT folder when ``write``) and evict the oldest."""
        if self.directory is None:
            self._memory.append({n: t.to(self.device, copy=True) for n, t in sample.items()})
        else:
            path = self.directory / f"{SAMPLE_PREFIX}{step:08d}"
            if write:
                self._write_folder(path, sample)
            self._paths.append(str(path))
            self._evicted = [e for e in self._evicted if e != str(path)]
        self.steps.append(int(step))
        while len(self) > self.num_samples:
            self._drop_oldest(write)

    def adopt(self, other: "SampleBank", *, write: bool = True) -> None:
        """Add every sample of ``other`` (an in-memory bank of the same model), oldest first, as
        :meth:`add` would have (written as PEFT folders when this bank has a ``directory``)."""
        if other._root_ref is not None and self._root_ref is not other._root_ref:
            self.bind(other._root_ref, other.adapter_name or self.adapter_name)
        if self.num_samples == 0:
            return
        for step, sample in zip(other.steps, other._memory):
            self._check_layout(sample, "SampleBank.adopt")
            self._store(step, sample, write)
        self._delete_unreferenced()

    def thin(self) -> None:
        """Keep every other sample (the 2nd, 4th, ...: the spacing doubles); in-memory banks only."""
        if self.directory is not None:
            raise ValueError("SampleBank.thin: only an in-memory bank can be thinned (this one writes to "
                             f"{str(self.directory)!r})")
        self._memory, self.steps = self._memory[1::2], self.steps[1::2]

    def _drop_oldest(self, write: bool) -> None:
        self.steps.pop(0)
        if self.directory is None:
            self._memory.pop(0)
        else:
            path = self._paths.pop(0)
            if write:
                self._evicted.append(path)

    def _delete_unreferenced(self) -> None:
        """Delete the evicted folders that neither the bank nor a saved state refers to any more."""
        if not self._evicted:
            return
        referenced = set(self._paths).union(*self._saved)
        waiting = []
        for path in self._evicted:
            if path in referenced:
                waiting.append(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
        self._evicted = waiting

    def clear(self) -> None:
        """Forget every sample and the binding (tensor names, shapes, root module, adapter name), so
        the bank can sample another model. Folders on disk are left alone (a checkpoint of the
        earlier run may still list them)."""
        self._memory.clear()
        self._paths.clear()
        self.steps.clear()
        self._saved.clear()
        self._evicted.clear()
        self._names = self._shapes = self._root_ref = None
        self.adapter_name = None

    # -- disk --------------------------------------------------------------------------------------
    def _write_folder(self, target: Path, sample: Mapping[str, Tensor]) -> None:
        peft_model, keys = self._peft_state()
        write_adapter_folder(target, sample, peft_model, keys, self.adapter_name)

    def _read_folder(self, folder: Path) -> dict[str, Tensor]:
        _, keys = self._peft_state()
        return read_adapter_folder(folder, keys, self._names or [])

    def save_peft(self, i: int, path: str | os.PathLike) -> Path:
        """Write sample ``i`` as a PEFT adapter folder at ``path`` (atomically: written under a
        temporary name, then renamed). Load it with ``PeftModel.from_pretrained(base, path)``."""
        self._require_root()
        sample = self[i]
        self._write_folder(Path(path), sample)
        return Path(path)

    # -- loading into a model ------------------------------------------------------------------------
    def _targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameter of ``model`` that receives each banked tensor, keyed by the bank's names, after
        checking that every shape agrees (``ValueError`` naming the parameter and both shapes)."""
        targets = self._match_targets(model)
        for name, p in targets.items():
            want = (self._shapes or {}).get(name)
            if want is None and self._memory:
                want = tuple(self._memory[0][name].shape)
            if want is not None and tuple(p.shape) != tuple(want):
                raise ValueError(
                    f"SampleBank: the banked tensor {name!r} has shape {tuple(want)} but {type(model).__name__}'s "
                    f"parameter for it has shape {tuple(p.shape)}: the samples come from a model with other LoRA "
                    "ranks or layer sizes; load them into a model built like the one they were taken from.")
        return targets

    def _match_targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameter of ``model`` that receives each banked tensor, keyed by the bank's names.

        Matched by name; else by identity with the bound root's parameters (``model`` is the root
        or a module inside it); else by replacing the PEFT prefix (the samples of a LightningModule
        into the PEFT model inside it, or the reverse)."""
        names = self._names or (list(self._memory[0]) if self._memory else [])
        if not names:
            raise ValueError("SampleBank is not bound to a model yet: call bank.bind(model) or bank.add(model, step)")
        params = dict(model.named_parameters())
        if all(n in params for n in names):
            return {n: params[n] for n in names}
        root = self._root_ref
        if root is not None and root is not model:
            own = {id(p) for p in model.parameters()}
            by_name = dict(root.named_parameters())
            if all(n in by_name and id(by_name[n]) in own for n in names):
                return {n: by_name[n] for n in names}
        mapped = _rename_by_prefix(names, model)
        if mapped is not None:
            return mapped
        missing = next(n for n in names if n not in params)
        source = f"{type(root).__name__}" if root is not None else "the module they were taken from"
        raise ValueError(
            f"SampleBank: {type(model).__name__} has no parameter for the banked tensor {missing!r}, not even after "
            f"removing or adding the PEFT model's prefix. The samples hold the trainable tensors of {source} "
            f"({len(names)} tensors, e.g. {names[0]!r}): pass that module, or the PEFT model inside it when every "
            "sampled tensor belongs to the PEFT model (a trainable head outside it needs the outer module).")

    @torch.no_grad()
    def load_into(self, model: nn.Module, i: int) -> None:
        """Copy sample ``i`` into ``model``'s parameters in place (``Tensor.copy_``: the parameter
        objects, and so the optimizer's references to them, are unchanged). ``model`` is the module
        the samples were taken from or the PEFT model inside it (see :meth:`_targets`)."""
        targets = self._targets(model)
        sample = self[i]
        for name, p in targets.items():
            copy_full_(p, sample[name])   # a sharded parameter receives its slice

    def snapshot(self, model: nn.Module) -> dict[str, Tensor]:
        """Copies of ``model``'s tensors that a sample would overwrite (to restore them later),
        keyed by the bank's names."""
        if self._names is None and not self._memory:
            return {n: p.detach().clone() for n, p in _trainable(model).items()}
        return {n: p.detach().clone() for n, p in self._targets(model).items()}

    @contextlib.contextmanager
    def averaging(self, model: nn.Module) -> Iterator[Averager]:
        """Context manager for BMA inside a Lightning ``test_step`` / ``predict_step`` or a loop.

        Puts the model in eval mode under ``torch.no_grad()``, yields an object whose
        ``predict_proba(batch, forward_fn=None)`` returns the sample-averaged probabilities of
        one batch (``FloatingPointError`` naming the sample if one gives non-finite values) and
        ``load(i)`` copies sample ``i`` in, and restores the model's own tensors and training
        mode on exit.

        Example (inside a LightningModule)::

            def predict_step(self, batch, batch_idx):
                with self.langevin.sample_bank.averaging(self) as bma:
                    return bma.predict_proba(batch, forward_fn=lambda m, b: m(b[0]))
        """
        if len(self) == 0:
            raise ValueError("SampleBank is empty: nothing to average (did sampling start? is num_samples > 0?)")
        targets = self._targets(model)
        saved = {n: p.detach().clone() for n, p in targets.items()}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield Averager(self, model, targets)
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    targets[n].copy_(v)
            model.train(was_training)

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Samples (in memory) or folder paths (on disk), steps, tensor names and shapes, settings;
        tensors and builtins only. A checkpoint stores this: the path list is remembered, and the
        folders it lists are kept on disk until two later ``state_dict()`` calls no longer list them."""
        if self.directory is not None:
            if not self._saved or self._saved[-1] != self._paths:
                self._saved.append(list(self._paths))
            self._delete_unreferenced()
        return {"num_samples": self.num_samples, "directory": None if self.directory is None else str(self.directory),
                "steps": list(self.steps), "paths": list(self._paths), "names": self._names,
                "shapes": None if self._shapes is None else {n: list(s) for n, s in self._shapes.items()},
                "adapter_name": self.adapter_name,
                "memory": [{n: t.clone() for n, t in s.items()} for s in self._memory]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. The restored path list counts as saved: its folders are kept
        while the next two checkpoints are written."""
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
        shapes = state.get("shapes")
        if shapes is not None:
            self._shapes = {n: tuple(s) for n, s in shapes.items()}
        else:  # checkpoints written before shapes were stored
            self._shapes = {n: tuple(t.shape) for n, t in self._memory[0].items()} if self._memory else None
        self._saved.clear()
        self._evicted = []
        if self.directory is not None:
            self._saved.append(list(self._paths))

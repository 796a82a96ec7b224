"""PEFT adapter folders for posterior samples: written atomically, read back by parameter name.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (loadable with
``PeftModel.from_pretrained(base_model, folder)``) plus, when the sampled module has trainable
tensors outside the PEFT adapter (a LightningModule's own head), ``langevin_extra.safetensors``.
A folder is written under a temporary name, every file and the folder are fsynced, and it is then
renamed into place; an existing folder is replaced only once the new one is complete, so a reader
(or a crash) sees the old or the new sample, never a mix.

``keys`` maps PEFT file keys to ``(name, live tensor)``: ``name`` is the sampled module's
parameter name of a trainable tensor, ``None`` for a frozen tensor that PEFT also saves.
"""
from __future__ import annotations

import copy
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import Tensor, nn

__all__ = ["EXTRA_FILE", "atomic_publish", "read_adapter_folder", "write_adapter_folder"]

EXTRA_FILE = "langevin_extra.safetensors"
WEIGHTS_FILE = "adapter_model.safetensors"
Keys = Mapping[str, "tuple[str | None, Tensor]"]


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


def atomic_publish(tmp: Path, target: Path) -> None:
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


def write_adapter_folder(target: Path, sample: Mapping[str, Tensor], peft_model: nn.Module, keys: Keys,
                         adapter_name: str) -> None:
    """Write ``sample`` (``{name: tensor}``) as the PEFT adapter folder ``target``, atomically."""
    from safetensors.torch import save_file

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
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        extra = {n: t.detach().to("cpu").contiguous().clone() for n, t in sample.items() if n not in used}
        if extra:  # trainable tensors outside the PEFT adapter (e.g. a head of the LightningModule)
            save_file(extra, str(tmp / EXTRA_FILE), metadata={"format": "pt"})
        config = copy.deepcopy(peft_model.peft_config[adapter_name])
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(peft_model.get_base_model(), "name_or_path", None) or None
        config.inference_mode = True
        config.save_pretrained(str(tmp))
        atomic_publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_adapter_folder(folder: Path, keys: Keys, names: Iterable[str]) -> dict[str, Tensor]:
    """``{name: tensor}`` of a folder written by :func:`write_adapter_folder`; every one of
    ``names`` must be present."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"sample folder {str(folder)!r} (or its {WEIGHTS_FILE}) is missing: it was deleted "
                                "or never written")
    loaded = load_file(str(folder / WEIGHTS_FILE))
    out = {name: loaded[key] for key, (name, _) in keys.items() if name is not None and key in loaded}
    if (folder / EXTRA_FILE).exists():
        out.update(load_file(str(folder / EXTRA_FILE)))
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"sample folder {folder} lacks {len(missing)} tensors of the model, e.g. {missing[0]!r}")
    return out

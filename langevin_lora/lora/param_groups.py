r"""Find the PEFT LoRA adapter tensors of a model and build named parameter groups.

Adapters are found by type (:class:`peft.tuners.lora.LoraLayer`) and adapter name, never by
substring matching: ``lora_A`` / ``lora_embedding_A`` (the :math:`r \times \text{in}` factor
:math:`A`), ``lora_B`` / ``lora_embedding_B`` (the :math:`\text{out} \times r` factor :math:`B`)
and DoRA's ``lora_magnitude_vector``. The effective update is :math:`\Delta W = s\,BA` with
:math:`s` = ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator

from torch import nn

from langevin_lora._validation import check_non_negative

__all__ = ["LoraFactors", "lora_adapter_names", "lora_modules", "lora_param_groups", "lora_parameters", "LORA_ROLES"]

LORA_ROLES = ("lora_A", "lora_B", "lora_magnitude")
NO_LORA_MESSAGE = (
    "found no LoRA adapter tensors in {model}: searched for peft.tuners.lora.LoraLayer modules "
    "with trainable lora_A/lora_B/lora_embedding_A/lora_embedding_B/lora_magnitude_vector "
    "entries{adapter}. Wrap the model with peft.get_peft_model(model, LoraConfig(...)) first."
)


@dataclass
class LoraFactors:
    """The two factors of one LoRA module: :math:`\\Delta W = s\\,B A`.

    ``A`` has shape ``(r, fan_in)`` and ``B`` ``(fan_out, r)`` for linear layers; embedding
    adapters store ``A`` as ``(r, num_embeddings)`` and ``B`` as ``(embedding_dim, r)`` the same way.
    """

    name: str
    adapter: str
    A: nn.Parameter
    B: nn.Parameter
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def fan_in(self) -> int:
        return self.A[0].numel()

    @property
    def fan_out(self) -> int:
        return self.B.shape[0]


def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:  # pragma: no cover - peft is a core dependency
        raise ImportError("langevin_lora needs peft to find LoRA adapters: pip install peft") from exc
    return LoraLayer


def _iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    LoraLayer = _lora_layer_type()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _layer_adapters(layer: Any) -> set[str]:
    """Every adapter a LoRA layer holds, active or not."""
    return (set(layer.lora_A) | set(getattr(layer, "lora_embedding_A", {})) |
            set(getattr(layer, "lora_magnitude_vector", {})))


def lora_adapter_names(model: nn.Module) -> list[str]:
    """The names of every LoRA adapter the model's LoRA layers hold (active or not), sorted."""
    return sorted(set().union(*(_layer_adapters(layer) for _, layer in _iter_lora_layers(model))))


def _adapter_names(layer: Any, adapter_name: str | None) -> list[str]:
    if adapter_name is not None:
        return [adapter_name]
    active = layer.active_adapters if hasattr(layer, "active_adapters") else layer.active_adapter
    return [active] if isinstance(active, str) else list(active)


def lora_modules(model: nn.Module, adapter_name: str | None = None) -> list[LoraFactors]:
    """The :class:`LoraFactors` of every LoRA module (linear, conv, embedding) for the adapter
    (default: the active ones), in ``named_modules`` order. Raises ``ValueError`` if none."""
    out = []
    for name, layer in _iter_lora_layers(model):
        for adapter in _adapter_names(layer, adapter_name):
            if adapter in layer.lora_A:
                A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            elif adapter in getattr(layer, "lora_embedding_A", {}):
                # PEFT stores embedding factors transposed: A (r, num_embeddings), B (dim, r).
                A, B = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
            else:
                continue
            out.append(LoraFactors(name=name, adapter=adapter, A=A, B=B, scaling=float(layer.scaling[adapter])))
    if not out:
        raise ValueError(NO_LORA_MESSAGE.format(model=type(model).__name__, adapter=_adapter_note(adapter_name)))
    return out


def _adapter_note(adapter_name: str | None) -> str:
    return f" for adapter {adapter_name!r}" if adapter_name is not None else " for the active adapters"


def _collect(model: nn.Module, adapter_name: str | None,
             every_adapter: bool = False) -> list[tuple[str, str, str, nn.Parameter]]:
    """``(role, adapter, parameter name, parameter)`` for every trainable adapter tensor of the
    selected adapter (``every_adapter``: of all adapters, active or not)."""
    names = {id(p): n for n, p in model.named_parameters()}
    found, seen = [], set()
    for _, layer in _iter_lora_layers(model):
        adapters = _layer_adapters(layer) if every_adapter else _adapter_names(layer, adapter_name)
        for adapter in adapters:
            candidates = []
            if adapter in layer.lora_A:
                candidates += [("lora_A", layer.lora_A[adapter].weight), ("lora_B", layer.lora_B[adapter].weight)]
            if adapter in getattr(layer, "lora_embedding_A", {}):
                candidates += [("lora_A", layer.lora_embedding_A[adapter]), ("lora_B", layer.lora_embedding_B[adapter])]
            if adapter in getattr(layer, "lora_magnitude_vector", {}):
                candidates += [("lora_magnitude", p) for p in layer.lora_magnitude_vector[adapter].parameters()]
            for role, p in candidates:
                if p.requires_grad and id(p) not in seen and id(p) in names:
                    seen.add(id(p))
                    found.append((role, adapter, names[id(p)], p))
    if not found:
        raise ValueError(NO_LORA_MESSAGE.format(model=type(model).__name__, adapter=_adapter_note(adapter_name)))
    return found


def lora_parameters(model: nn.Module, adapter_name: str | None = None) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable adapter tensors by role: ``{"lora_A": [(name, p)], "lora_B": [...], "lora_magnitude": [...]}``.

    Raises ``ValueError`` (saying what was searched for) when the model holds none.
    """
    roles: dict[str, list[tuple[str, nn.Parameter]]] = {role: [] for role in LORA_ROLES}
    for role, _, name, p in _collect(model, adapter_name):
        roles[role].append((name, p))
    return roles


def lora_param_groups(model: nn.Module, adapter_name: str | None = None, *, head_temperature: float = 0.0,
                      lora_temperature: float = 1.0, head_weight_decay: float | None = None,
                      split_factors: bool = True) -> list[dict[str, Any]]:
    """Named parameter groups for a PEFT LoRA model, ready for any ``torch.optim`` optimizer.

    Groups (empty ones are dropped), each with ``"name"``, ``"params"``, ``"param_names"`` and
    ``"temperature"``:

    - ``lora_A/<adapter>``, ``lora_B/<adapter>``, ``lora_magnitude/<adapter>`` (or one
      ``lora/<adapter>`` group with ``split_factors=False``), at ``lora_temperature``;
    - ``head``: every other trainable tensor (classifier heads, ``modules_to_save``) except the
      LoRA tensors of other adapters, which are left out of every group, at
      ``head_temperature`` (0, i.e. noise-free, by default) and, if given, ``head_weight_decay``.

    Langevin optimizers read ``temperature`` per group; torch optimizers ignore the extra keys.

    Example:
        >>> groups = lora_param_groups(peft_model)                     # doctest: +SKIP
        >>> opt = LangevinSGD(groups, lr=1e-4, num_data=len(train_set)) # doctest: +SKIP
    """
    check_non_negative("head_temperature", head_temperature)
    check_non_negative("lora_temperature", lora_temperature)
    if head_weight_decay is not None:
        check_non_negative("head_weight_decay", head_weight_decay)
    groups: dict[str, dict[str, Any]] = {}
    lora_ids: set[int] = set()
    for role, adapter, name, p in _collect(model, adapter_name):
        lora_ids.add(id(p))
        key = f"{role if split_factors else 'lora'}/{adapter}"
        g = groups.setdefault(key, {"name": key, "params": [], "param_names": [], "temperature": lora_temperature})
        g["params"].append(p)
        g["param_names"].append(name)
    # Trainable tensors of *other* adapters are neither sampled nor a head: leave them out.
    lora_ids |= {id(p) for _, _, _, p in _collect(model, None, every_adapter=True)}
    head = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]
    out = list(groups.values())
    if head:
        g = {"name": "head", "params": [p for _, p in head], "param_names": [n for n, _ in head],
             "temperature": head_temperature}
        if head_weight_decay is not None:
            g["weight_decay"] = head_weight_decay
        out.append(g)
    else:
        _warn_frozen_head(model)
    _warn_lora_dropout(model)
    return out


def _warn_lora_dropout(model: nn.Module) -> None:
    """LoRA dropout > 0 in train mode makes every gradient a random function of the dropout mask: the chain
    then samples a different (dropout-averaged) target than the documented Gibbs measure. Say so once."""
    rates = {float(d.p) for m in model.modules() for d in getattr(getattr(m, "lora_dropout", None), "values",
                                                                    lambda: [])() if isinstance(d, nn.Dropout)}
    rates.discard(0.0)
    if rates:
        warnings.warn(f"lora_param_groups: LoRA dropout p={max(rates):g} is on in train mode: while sampling, each "
                      "gradient then depends on a random mask and the chain samples a dropout-averaged target, not "
                      "the Gibbs measure of your loss. Set LoraConfig(lora_dropout=0.0), or call model.eval() once "
                      "sampling starts (LangevinAdam.sampling).", UserWarning, stacklevel=3)


#: Module names of the task heads Hugging Face models initialise at random (sequence classification).
TASK_HEADS = ("classifier", "score")


def _warn_frozen_head(model: nn.Module) -> None:
    """No trainable tensor besides LoRA: warn when a task head that is usually freshly initialised is
    frozen (a ``LoraConfig`` without ``modules_to_save`` or ``task_type``), since it then stays at its
    random initialisation and no "head" group is built."""
    frozen = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TASK_HEADS
              and any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]
    if frozen:
        warnings.warn(f"lora_param_groups: no 'head' group: {frozen[0]!r} is frozen (the LoraConfig has no "
                      "modules_to_save), so it stays at its initialisation, random for a new classification "
                      "head. Pass LoraConfig(..., modules_to_save=['classifier']) (or task_type='SEQ_CLS') to "
                      "train it.", UserWarning, stacklevel=3)

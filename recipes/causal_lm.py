r"""Causal-LM classification in the Laplace-LoRA / BLoB protocol.

Each example becomes a prompt that lists the choices under letters and ends with ``Answer:``;
the model's next-token logits restricted to the answer tokens (`` A``, `` B``, ...) are the class
logits, :math:`z_k = \text{logit}(\text{token}_k \mid \text{prompt})`, trained with the mean
cross-entropy; LoRA sits on ``q_proj``/``v_proj``. Examples with fewer choices than the letter
set (ARC has 3 to 5) have the missing letters masked to :math:`-\infty`.

Offline default: the packaged SmolLM2-135M-Instruct (4-bit GGUF, dequantised once into a local
safetensors cache by :func:`smollm2_path`) on a packaged set phrased as a question. Online: any
causal LM on ``winogrande`` (config e.g. ``winogrande_s``), ``arc_easy``, ``arc_challenge``
(``allenai/ai2_arc``), ``openbookqa`` (``allenai/openbookqa``, config ``main``), ``boolq``.
"""
from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from torch.utils.data import DataLoader

from recipes import assets
from recipes.data import PACKAGED_LABELS, LazySplits, _check_count, _subsample, load_text_frame, stratified_split
from recipes.models import AdapterCheckpoints

__all__ = ["ChoiceData", "LoRAChoiceLM", "smollm2_path", "forward_choice_logits", "CHOICE_DATASETS"]

LETTERS = string.ascii_uppercase
INSTRUCTION = "Select one of the choices that answers the following question:"

# packaged sets as questions: (question template, choice texts)
PACKAGED_QUESTIONS = {
    "sms_spam": ("Is this SMS message spam? Message: {text}", ["no, legitimate (ham)", "yes, spam"]),
    "twitter_sentiment": ("What is the sentiment of this tweet? Tweet: {text}", ["negative", "neutral", "positive"]),
    "bbc_news": ("What is the topic of this news article? Article: {text}",
                 ["business", "entertainment", "politics", "sports", "tech"]),
}
# hub sets: (load_dataset name, config, number of answer letters)
HUB_CHOICE = {
    "winogrande": ("allenai/winogrande", "winogrande_m", 2),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", 5),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", 5),
    "openbookqa": ("allenai/openbookqa", "main", 4),
    "boolq": ("google/boolq", None, 2),
}
CHOICE_DATASETS = tuple(PACKAGED_QUESTIONS) + tuple(HUB_CHOICE)


def cache_dir() -> Path:
    """``$LANGEVIN_LORA_CACHE`` or ``~/.cache/langevin_lora``."""
    return Path(os.environ.get("LANGEVIN_LORA_CACHE", Path.home() / ".cache" / "langevin_lora"))


def smollm2_path(cache: str | Path | None = None) -> Path:
    """A float32 safetensors copy of the packaged SmolLM2-135M-Instruct, made once (~20 s, ~1.2 GB
    RAM) from the 4-bit GGUF: load the dequantised weights, drop the quantisation config, save."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(cache) if cache is not None else cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    src, gguf = assets.smollm2_dir(), assets.SMOLLM2_GGUF
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict(), strict=False)
    if getattr(clean.config, "tie_word_embeddings", False):
        clean.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    clean.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(tmp)
    tmp.rename(out)
    return out


def resolve_lm_path(name: str) -> str:
    return str(smollm2_path()) if name == "smollm2" else name


def format_choice_prompt(question: str, choices: Sequence[str]) -> str:
    """``INSTRUCTION question Choices: A. c1. B. c2. ... Answer:`` (the BLoB/Laplace-LoRA form)."""
    listed = " ".join(f"{LETTERS[i]}. {c.strip().rstrip('.')}." for i, c in enumerate(choices))
    return f"{INSTRUCTION} {question.strip()} Choices: {listed} Answer:"


def _hub_rows(name: str, config: str | None) -> dict[str, list[dict[str, Any]]]:
    """``split -> [{"prompt", "label", "n_choices"}]`` for a hub multiple-choice set."""
    import datasets

    path, default_cfg, _ = HUB_CHOICE[name]
    try:
        dd = datasets.load_dataset(path, config or default_cfg)
    except Exception as exc:  # noqa: BLE001 - offline or unknown: one clear message
        raise ValueError(f"Invalid dataset: could not load {path!r} ({config or default_cfg}) for {name!r}: "
                         f"{type(exc).__name__}: {exc}. Offline sets: {', '.join(PACKAGED_QUESTIONS)}") from exc
    out = {}
    for split in dd:
        rows = []
        for ex in dd[split]:
            if name == "winogrande":
                if ex["answer"] not in ("1", "2"):
                    continue  # the test split is unlabelled
                q, ch, y = ex["sentence"], [ex["option1"], ex["option2"]], int(ex["answer"]) - 1
            elif name in ("arc_easy", "arc_challenge", "openbookqa"):
                q = ex["question"] if name != "openbookqa" else ex["question_stem"]
                ch, labels = ex["choices"]["text"], ex["choices"]["label"]
                if ex["answerKey"] not in labels:
                    continue
                y = labels.index(ex["answerKey"])
            else:  # boolq
                q = f"{ex['question']}? Context: {ex['passage']}"
                ch, y = ["False", "True"], int(bool(ex["answer"]))
            rows.append({"prompt": format_choice_prompt(q, ch), "label": y, "n_choices": len(ch)})
        out[split] = rows
    return out


class ChoiceData(LazySplits, LightningDataModule):
    """Prompts and answer letters for causal-LM classification.

    Args:
        dataset: a packaged set (``sms_spam``, ``twitter_sentiment``, ``bbc_news``) phrased as a
            question, or a hub set (``winogrande``, ``arc_easy``, ``arc_challenge``,
            ``openbookqa``, ``boolq``; needs internet).
        dataset_config: hub config override (e.g. ``winogrande_xl``).
        tokenizer: ``smollm2`` (packaged) or any causal-LM name/path.
        max_length: prompts are truncated from the left (the ``Answer:`` end is kept).
        batch_size, eval_batch_size, num_train, num_val, num_test, val_fraction, test_fraction,
            split_seed, num_workers: as in :class:`~recipes.data.TextClassificationData`.
    """

    def __init__(self, dataset: str = "sms_spam", dataset_config: str | None = None, tokenizer: str = "smollm2",
                 max_length: int = 96, batch_size: int = 8, eval_batch_size: int = 32, num_train: int | None = 512,
                 num_val: int | None = 128, num_test: int | None = 512, val_fraction: float = 0.15,
                 test_fraction: float = 0.25, split_seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if dataset not in CHOICE_DATASETS:
            raise ValueError(f"Invalid dataset: {dataset!r} (expected one of {', '.join(CHOICE_DATASETS)})")
        for name, v in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                        ("max_length", max_length), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            _check_count(name, v)
        self.save_hyperparameters()
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self.num_labels: int | None = None
        self.label_names: list[str] = []
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            name = self.hparams.tokenizer
            try:
                tok = AutoTokenizer.from_pretrained(resolve_lm_path(name))
            except (OSError, ValueError) as exc:
                raise ValueError(f"Invalid tokenizer: could not load {name!r}: {exc}") from exc
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            tok.padding_side = "left"
            tok.truncation_side = "left"
            self._tokenizer = tok
        return self._tokenizer

    @property
    def choice_token_ids(self) -> list[int]:
        """Token id of `` A``, `` B``, ... (each must be a single token)."""
        self._ensure_loaded()
        ids = []
        for letter in LETTERS[: self.num_labels]:
            toks = self.tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                raise ValueError(f"Invalid tokenizer: answer ' {letter}' is {len(toks)} tokens, need 1")
            ids.append(toks[0])
        return ids

    def _load(self) -> None:
        hp = self.hparams
        if hp.dataset in PACKAGED_QUESTIONS:
            template, choices = PACKAGED_QUESTIONS[hp.dataset]
            df = load_text_frame(hp.dataset)
            names = PACKAGED_LABELS[hp.dataset]
            y = df["label"].map({n: i for i, n in enumerate(names)}).to_numpy()
            parts = stratified_split(y, [1 - hp.val_fraction - hp.test_fraction, hp.val_fraction, hp.test_fraction],
                                     hp.split_seed)
            raw = {}
            for split, idx in zip(("train", "validation", "test"), parts):
                raw[split] = [{"prompt": format_choice_prompt(template.format(text=df["text"].iloc[i]), choices),
                               "label": int(y[i]), "n_choices": len(choices)} for i in idx]
            k, self.label_names = len(choices), list(names)
        else:
            raw = _hub_rows(hp.dataset, hp.dataset_config)
            if "train" not in raw:
                raise ValueError(f"Invalid dataset: {hp.dataset!r} has no train split")
            rng = np.random.default_rng(hp.split_seed)
            if "validation" not in raw:
                idx = rng.permutation(len(raw["train"]))
                cut = int(len(idx) * hp.val_fraction)
                raw["validation"] = [raw["train"][i] for i in idx[:cut]]
                raw["train"] = [raw["train"][i] for i in idx[cut:]]
            if "test" not in raw or not raw["test"]:
                raw["test"] = raw.pop("validation")  # hub test labels are hidden: evaluate on validation
                idx = rng.permutation(len(raw["train"]))
                cut = int(len(idx) * hp.val_fraction)
                raw["validation"] = [raw["train"][i] for i in idx[:cut]]
                raw["train"] = [raw["train"][i] for i in idx[cut:]]
            k = HUB_CHOICE[hp.dataset][2]
            self.label_names = list(LETTERS[:k])
        self.num_labels = k
        counts = {"train": hp.num_train, "validation": hp.num_val, "test": hp.num_test}
        for split, rows in raw.items():
            keep = _subsample(np.array([r["label"] for r in rows]), counts.get(split), hp.split_seed + 1)
            raw[split] = [rows[i] for i in keep]
        self.splits = {s: raw[s] for s in ("train", "validation", "test")}

    def setup(self, stage: str | None = None) -> None:
        self._ensure_loaded()

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        enc = self.tokenizer([r["prompt"] for r in rows], padding=True, truncation=True,
                             max_length=self.hparams.max_length, return_tensors="pt")
        mask = torch.zeros(len(rows), self.num_labels, dtype=torch.bool)
        for i, r in enumerate(rows):
            mask[i, : r["n_choices"]] = True
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "choice_mask": mask, "labels": torch.tensor([r["label"] for r in rows])}

    def _loader(self, split: str, shuffle: bool, bs: int) -> DataLoader:
        self._ensure_loaded()
        gen = torch.Generator().manual_seed(int(torch.initial_seed()) % 2 ** 31) if shuffle else None
        return DataLoader(self.splits[split], batch_size=bs, shuffle=shuffle, generator=gen,
                          collate_fn=self._collate, num_workers=self.hparams.num_workers)

    def train_dataloader(self):
        return self._loader("train", True, self.hparams.batch_size)

    def val_dataloader(self):
        return self._loader("validation", False, self.hparams.eval_batch_size)

    def test_dataloader(self):
        return self._loader("test", False, self.hparams.eval_batch_size)


class LoRAChoiceLM(AdapterCheckpoints, LightningModule):
    r"""Causal LM with LoRA on ``q_proj``/``v_proj``; class logits are the next-token logits of the
    answer letters after the prompt (left-padded, so the last position is the prompt's end).

    Args:
        model_name: ``smollm2`` (packaged, cached as safetensors) or any causal-LM name/path.
        num_labels: number of answer letters :math:`K`; must match the data.
        choice_token_ids: token ids of the letters (default: read from the data module in ``setup``).
        lora_r, lora_alpha, lora_dropout, target_modules, lr, weight_decay, betas, eps: as in
            :class:`~recipes.models.LoRAClassifier` (LoRA r=8, alpha=16 on q_proj/v_proj, as BLoB).
        dtype: weight dtype of the frozen base (``bfloat16`` on GPUs for 7B models).
        gradient_checkpointing: trade compute for memory on large models.

    Checkpoints hold the LoRA tensors only (:class:`~recipes.models.AdapterCheckpoints`).
    """

    def __init__(self, model_name: str = "smollm2", num_labels: int = 2, choice_token_ids: list[int] | None = None,
                 lora_r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                 target_modules: Sequence[str] = ("q_proj", "v_proj"), lr: float = 1e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 dtype: str = "float32", gradient_checkpointing: bool = False, optimizer: str = "adamw",
                 temperature: float = 1.0, burn_in_steps: int = 0, prior_weight_decay: float = 0.0,
                 sampler_seed: int = 0, lr_drop_step: int | None = None, lr_drop_factor: float = 1.0) -> None:
        super().__init__()
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"Invalid num_labels: {num_labels!r} (expected an integer >= 2)")
        self.save_hyperparameters()
        self.model = self._build()
        self.register_buffer("choice_ids", torch.tensor(choice_token_ids or [], dtype=torch.long), persistent=False)
        self.num_data: int | None = None

    def _build(self):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        hp = self.hparams
        try:
            base = AutoModelForCausalLM.from_pretrained(resolve_lm_path(hp.model_name), dtype=getattr(torch, hp.dtype))
        except (OSError, ValueError) as exc:
            raise ValueError(f"Invalid model_name: could not load {hp.model_name!r} ({exc}); use 'smollm2' "
                             "(packaged) or a causal-LM name (needs internet)") from exc
        names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
        missing = [m for m in hp.target_modules if m not in names]
        if missing:
            raise ValueError(f"Invalid target_modules: {missing} not found in {hp.model_name!r}")
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        model = get_peft_model(base, LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                                                target_modules=list(hp.target_modules), task_type="CAUSAL_LM"))
        model.train()
        return model

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (FSDP2): ``fully_shard`` every decoder layer, then the
        whole model, over the data-parallel mesh (``recipes/configs/causal_lm_fsdp_7b.yaml``); a no-op
        under any other strategy. The LoRA tensors are sharded with their layers; LangevinLoRA draws the
        noise independently of the sharding (:mod:`langevin_lora.core.sharding`)."""
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        for module in self.model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module, mesh=dp)
        fully_shard(self.model, mesh=dp)
        self._sharded = True

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "choice_token_ids"):
            if dm.num_labels != self.hparams.num_labels:
                raise ValueError(f"Invalid num_labels: the model has {self.hparams.num_labels} answer letters but "
                                 f"dataset {dm.hparams.dataset!r} has {dm.num_labels}")
            if self.choice_ids.numel() == 0:
                self.choice_ids = torch.tensor(dm.choice_token_ids, dtype=torch.long, device=self.device)
            self.num_data = dm.num_train_examples

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        if self.choice_ids.numel() != self.hparams.num_labels:
            raise ValueError("Invalid choice_token_ids: set them or train with a ChoiceData module")
        mask = batch["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos, logits_to_keep=1)
        logits = out.logits[:, -1, :].float().index_select(-1, self.choice_ids.to(out.logits.device))
        return logits.masked_fill(~batch["choice_mask"].to(logits.device), float("-inf"))

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch)
        self.log_dict({"val/loss": torch.nn.functional.cross_entropy(logits, batch["labels"]),
                       "val/acc": (logits.argmax(-1) == batch["labels"]).float().mean()},
                      prog_bar=True, batch_size=len(logits))

    def configure_optimizers(self):
        from recipes.models import configure_lora_optimizer
        return configure_lora_optimizer(self)


def forward_choice_logits(module: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    device = next(module.parameters()).device
    return module({k: v.to(device) for k, v in batch.items()})


def main(args: list[str] | None = None, run: bool = True):
    """LightningCLI entry point: ``python -m recipes.causal_lm fit --config recipes/configs/causal_lm_smollm2.yaml``."""
    from recipes.cli import RecipeCLI

    return RecipeCLI(LoRAChoiceLM, ChoiceData, args=args, run=run, save_config_kwargs={"overwrite": True},
                     prog="python -m recipes.causal_lm")


if __name__ == "__main__":
    main()

"""Recipe 1: sequence classification with an encoder + LoRA, AdamW or Langevin (LightningCLI).

    python -m recipes.seq_cls fit --config recipes/configs/seq_cls_sms_spam.yaml
    python -m recipes.seq_cls fit --config recipes/configs/seq_cls_sms_spam.yaml \\
        --trainer.precision bf16-mixed --trainer.devices 4 --trainer.strategy ddp   # on GPUs

The Langevin sampler and its diagnostics are Trainer callbacks in the config
(:class:`~langevin_lora.LangevinLoRA`, :class:`~langevin_lora.diagnostics.GibbsDiagnostics`);
remove them to get the plain AdamW LoRA baseline. ``python -m recipes.compare`` runs both and
reports the metrics side by side.
"""
from __future__ import annotations

from recipes.data import TextClassificationData
from recipes.models import LoRAClassifier


def main(args: list[str] | None = None, run: bool = True):
    from recipes.cli import RecipeCLI

    return RecipeCLI(LoRAClassifier, TextClassificationData, args=args, run=run, save_config_kwargs={"overwrite": True},
                     prog="python -m recipes.seq_cls")


if __name__ == "__main__":
    main()

"""The README's ```python code blocks run exactly as printed (issue 19: a doc example that drifts fails CI).

Each block is extracted from README.md and executed verbatim in a namespace that defines only what the
README leaves to the reader, documented in :func:`reader_namespace`: ``base_model`` (a tiny random BERT
sequence classifier, built offline), ``train_set`` / ``train_loader`` (dict batches with ``labels``),
``num_epochs``, and for the Lightning blocks ``L``, ``module`` (it logs ``val_loss``), ``val_loader`` and
``test_loader``. Nothing in a block's
text is substituted. A block that reads ``langevin.`` without building it (the ArviZ export) runs after the
one-line quick start, whose fitted callback it reads. A block that needs a name this namespace lacks fails
with ``NameError``: add the name here (documented) rather than editing the test's copy of the block.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced ```python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text[:m.start()].count("\n") + 1, m.group(1)))
    return out


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def tiny_base_model(seed: int = 0):
    """What the README calls ``base_model``: a Hugging Face sequence classifier (BERT layout, so LoRA's
    ``target_modules=["query", "value"]`` and ``modules_to_save=["classifier"]`` apply), random, tiny."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2))


def token_examples(n: int, seq: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, seq), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": (ids[i, 0] < 32).long()} for i in range(n)]


def reader_namespace(tmp_path: Path) -> dict:
    """The names the README leaves to its reader (module docstring). ``num_epochs`` is chosen so that the
    optimizer quick start (``burn_in_steps=200``) takes 40 sampling steps; the Lightning blocks' own
    ``max_epochs``/``max_steps`` run as printed."""
    import lightning as L
    from torch.utils.data import DataLoader

    from langevin_lora import lora_param_groups  # noqa: F401  (the blocks import what they use themselves)

    train_set = token_examples(64)
    test_set = token_examples(16, seed=2)
    train_loader = DataLoader(train_set, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    val_loader = DataLoader(token_examples(32, seed=3), batch_size=16, shuffle=False)
    test_loader = DataLoader(test_set, batch_size=8, shuffle=False)

    class Module(L.LightningModule):
        """``module`` of the Lightning block: a PEFT LoRA classifier, AdamW (the README: "your module,
        your AdamW, unchanged")."""

        def __init__(self):
            super().__init__()
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(tiny_base_model(1), LoraConfig(r=4, target_modules=["query", "value"],
                                                                       modules_to_save=["classifier"]))

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.model(**batch).loss)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    return dict(base_model=tiny_base_model(), train_set=train_set, train_loader=train_loader, num_epochs=30,
                L=L, module=Module(), val_loader=val_loader, test_loader=test_loader, __name__="readme")


def test_readme_has_the_quick_starts():
    assert len(BLOCKS) >= 2, [line for line, _ in BLOCKS]
    assert any("LangevinAdam(" in code and "opt.step(closure)" in code for _, code in BLOCKS)
    assert any("LangevinLoRA()" in code and "bma_predict_proba" in code for _, code in BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs_as_printed(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # Lightning's default logger and checkpoints write into the working folder
    ns = reader_namespace(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        if re.search(r"\blangevin\.", code) and "LangevinLoRA(" not in code:   # a block that reads the quick
            line0, first = next((n, c) for n, c in BLOCKS if "LangevinLoRA()" in c)  # start's fitted callback
            exec(compile(first, f"README.md:{line0}", "exec"), ns)   # noqa: S102
        exec(compile(code, f"README.md:{line}", "exec"), ns)   # noqa: S102  (the README's own text)
    # what each quick start promises, checked on what it left behind
    if "opt" in ns and hasattr(ns["opt"], "auto_step"):
        opt = ns["opt"]
        assert opt.sampling and opt.auto_step.measurements >= 1 and opt.guard.cuts == 0
        assert all(torch.isfinite(p).all() for g in opt.param_groups for p in g["params"])
    if "langevin" in ns and ns["langevin"].chain.auto:   # the drop-in went through its phases
        assert ns["langevin"].chain.phase == "done" and len(ns["langevin"].sample_bank) > 0
    if "probs" in ns:
        probs = ns["probs"]
        assert probs.shape == (16, 2) and torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(16))

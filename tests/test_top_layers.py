"""LoRA on the top k layers with the frozen lower layers cached (recipes.top_layers): the same logits
and gradients as the full PEFT model, adapters only where asked, each example's lower layers run once."""
from __future__ import annotations

import pytest
import torch

TEXTS = ["free entry in 2 a wkly comp to win fa cup final tkts", "ok lar", "i am gonna be home soon",
         "had a great time at the game tonight, thanks all!", "worst service ever #fail", "meh"]


def _classifier(k: int, **kwargs):
    from recipes.models import LoRAClassifier

    torch.manual_seed(0)
    module = LoRAClassifier(num_labels=3, adapt_top_layers=k, **kwargs)
    with torch.no_grad():  # B starts at 0 and the head near 0: give every trainable tensor a visible effect
        for n, p in module.model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05 if "lora_" in n else 0.5)
    return module


def _batch(texts=TEXTS):
    from recipes.models import load_tokenizer

    enc = load_tokenizer("minilm")(list(texts), padding=True, return_tensors="pt")
    return dict(enc) | {"labels": torch.tensor([i % 3 for i in range(len(texts))])}


def _lora_layers(module) -> set[int]:
    return {int(n.split(".layer.")[1].split(".")[0]) for n, _ in module.model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("k", [1, 2])
def test_cached_top_layers_match_the_full_peft_model(k):
    module = _classifier(k).eval()
    assert _lora_layers(module) == set(range(6 - k, 6))          # adapters on the top k layers only
    batch = _batch()
    inputs = {n: v for n, v in batch.items() if n != "labels"}
    params = [p for p in module.parameters() if p.requires_grad]
    full = module.model(**inputs).logits
    g_full = torch.autograd.grad(torch.nn.functional.cross_entropy(full, batch["labels"]), params)
    cached = module(batch)
    g_cached = torch.autograd.grad(torch.nn.functional.cross_entropy(cached, batch["labels"]), params)
    with module.model.disable_adapter():   # the adapters move the logits, so the comparison means something
        assert (module.model(**inputs).logits - full).abs().max() > 0.05
    # float32 rounding: eager vs fused attention, per-example vs padded lower layers
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=5e-6)   # measured: 6e-7 on logits of ~1.2
    for a, b in zip(g_cached, g_full):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_lower_layers_run_once_per_example_and_padding_does_not_matter():
    module = _classifier(1).eval()
    cache = module.top.cache
    module.fill_lower_cache([_batch(TEXTS[:2])])
    assert cache.computed == 2
    with torch.no_grad():
        first = module(_batch())
        assert cache.computed == len(TEXTS)
        again = module(_batch(TEXTS[::-1]))       # other order, same examples: nothing recomputed
        assert cache.computed == len(TEXTS)
        short = module(_batch(TEXTS[1:2]))        # no padding at all
    torch.testing.assert_close(again, first.flip(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(short, first[1:2], rtol=1e-5, atol=1e-6)
    # a module of another seed shares the cache (the lower layers do not depend on the LoRA init)
    other = _classifier(1)
    other.share_lower_cache(module)
    assert other.top.cache is cache


def test_top_layers_options_and_errors():
    from recipes.models import LoRAClassifier

    plain = _classifier(2, cache_lower_layers=False)      # top-k adapters, the whole model at every step
    assert plain.top is None and _lora_layers(plain) == {4, 5}
    with pytest.raises(ValueError, match=r"Invalid adapt_top_layers: 7 \(expected an integer in \[1, 6\]"):
        LoRAClassifier(num_labels=2, adapt_top_layers=7)
    with pytest.raises(ValueError, match="Invalid adapt_top_layers: 0"):
        LoRAClassifier(num_labels=2, adapt_top_layers=0)
    module = _classifier(1).eval()
    batch = _batch()
    left = {"input_ids": batch["input_ids"].flip(1), "attention_mask": batch["attention_mask"].flip(1)}
    with pytest.raises(ValueError, match="right-padded"):
        module(left)


def test_adapter_only_checkpoint_round_trip(tmp_path):
    """Checkpoints hold the trainable tensors only; loading restores them and refuses a checkpoint
    that lacks one."""
    import lightning.pytorch as pl

    from recipes.models import LoRAClassifier

    module = _classifier(1)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable and ckpt["adapter_only"]
    path = tmp_path / "a.ckpt"
    torch.save(ckpt | {"hyper_parameters": dict(module.hparams), "pytorch-lightning_version": pl.__version__}, path)
    loaded = LoRAClassifier.load_from_checkpoint(path)
    for n, p in loaded.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, module.state_dict()[n])
    ckpt["state_dict"].pop(next(iter(trainable)))
    with pytest.raises(ValueError, match="Invalid checkpoint: 1 trainable tensors"):
        loaded.on_load_checkpoint(ckpt)

"""LoRA parameter discovery and named groups on the packaged MiniLM (PEFT LoRA), and the
"only adapters move" contract of a Langevin step on a real tokenised SMS mini-batch."""
from __future__ import annotations

import math

import pytest
import torch

from langevin_lora import LangevinSGD, lora_modules, lora_param_groups, lora_parameters

N_LAYERS = 6
HIDDEN = 384


def _base_model(num_labels=2):
    from transformers import AutoModelForSequenceClassification

    from recipes.assets import minilm_dir

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels)


def _by_name(model):
    return dict(model.named_parameters())


def test_groups_of_query_value_lora(minilm_lora_factory):
    model, _ = minilm_lora_factory()
    groups = lora_param_groups(model)
    assert [g["name"] for g in groups] == ["lora_A/default", "lora_B/default", "head"]
    assert [g["temperature"] for g in groups] == [1.0, 1.0, 0.0]
    named = _by_name(model)
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for n, p in zip(g["param_names"], g["params"]):
            assert named[n] is p  # names are the model's own parameter names
    expected = {
        role: [f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.{role}.default.weight"
               for i in range(N_LAYERS) for m in ("query", "value")]
        for role in ("lora_A", "lora_B")
    }
    assert groups[0]["param_names"] == expected["lora_A"]
    assert groups[1]["param_names"] == expected["lora_B"]
    assert groups[2]["param_names"] == ["base_model.model.classifier.modules_to_save.default.weight",
                                        "base_model.model.classifier.modules_to_save.default.bias"]
    # every trainable tensor is in exactly one group; no frozen tensor is
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    # shapes: A is r x in, B is out x r
    assert all(p.shape == (8, HIDDEN) for p in groups[0]["params"])
    assert all(p.shape == (HIDDEN, 8) for p in groups[1]["params"])
    # lora_parameters agrees
    roles = lora_parameters(model)
    assert [n for n, _ in roles["lora_A"]] == expected["lora_A"]
    assert roles["lora_magnitude"] == []
    # options: one LoRA group, head decay and temperatures
    merged = lora_param_groups(model, split_factors=False, head_temperature=0.5, lora_temperature=2.0,
                               head_weight_decay=0.0)
    assert [g["name"] for g in merged] == ["lora/default", "head"]
    assert len(merged[0]["params"]) == 24
    assert merged[0]["temperature"] == 2.0 and merged[1]["temperature"] == 0.5
    assert merged[1]["weight_decay"] == 0.0 and "weight_decay" not in merged[0]


@pytest.mark.parametrize("kw, match", [
    (dict(head_temperature=-1.0), r"Invalid head_temperature: -1\.0 \(allowed range \[0, inf\)\)"),
    (dict(lora_temperature=float("nan")), r"Invalid lora_temperature: nan"),
    (dict(head_weight_decay=-0.1), r"Invalid head_weight_decay: -0\.1"),
])
def test_lora_param_groups_invalid_arguments(minilm_lora_factory, kw, match):
    model, _ = minilm_lora_factory()
    with pytest.raises(ValueError, match=match):
        lora_param_groups(model, **kw)


def test_dora_magnitude_group(minilm_lora_factory):
    model, _ = minilm_lora_factory(use_dora=True)
    groups = {g["name"]: g for g in lora_param_groups(model)}
    assert list(groups) == ["lora_A/default", "lora_B/default", "lora_magnitude/default", "head"]
    mag = groups["lora_magnitude/default"]
    assert len(mag["params"]) == 2 * N_LAYERS
    assert all("lora_magnitude_vector.default" in n for n in mag["param_names"])
    assert all(p.shape == (HIDDEN,) for p in mag["params"])


def test_embedding_and_wide_lora_factors():
    """An Embedding adapter (A: r x num_embeddings, B: dim x r) lands in lora_A/lora_B, and
    LoraFactors report fan_in/fan_out/rank/scaling, here with rsLoRA (alpha / sqrt(r))."""
    from peft import LoraConfig, get_peft_model

    base = _base_model()
    vocab = base.config.vocab_size
    r, alpha = 4, 12
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, lora_dropout=0.0,
                                            target_modules=["word_embeddings", "intermediate.dense"]))
    groups = {g["name"]: g for g in lora_param_groups(model)}
    assert list(groups) == ["lora_A/default", "lora_B/default"]  # no head: classifier frozen here
    emb_A = "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A.default"
    emb_B = "base_model.model.bert.embeddings.word_embeddings.lora_embedding_B.default"
    assert groups["lora_A/default"]["param_names"][0] == emb_A
    assert groups["lora_B/default"]["param_names"][0] == emb_B
    assert len(groups["lora_A/default"]["params"]) == 1 + N_LAYERS
    factors = lora_modules(model)
    assert len(factors) == 1 + N_LAYERS
    emb, ffn = factors[0], factors[1]
    assert emb.name.endswith("word_embeddings") and emb.adapter == "default"
    assert (emb.rank, emb.fan_in, emb.fan_out) == (r, vocab, HIDDEN)
    assert ffn.name.endswith("layer.0.intermediate.dense")
    assert (ffn.rank, ffn.fan_in, ffn.fan_out) == (r, HIDDEN, 4 * HIDDEN)
    assert ffn.A.shape == (r, HIDDEN) and ffn.B.shape == (4 * HIDDEN, r)
    for f in factors:
        assert f.scaling == pytest.approx(alpha / math.sqrt(r), rel=1e-12)


def test_lora_modules_plain_scaling(minilm_lora_factory):
    model, _ = minilm_lora_factory(r=8)  # lora_alpha = 2 r
    factors = lora_modules(model)
    assert [f.name.rsplit(".", 1)[-1] for f in factors] == ["query", "value"] * N_LAYERS
    named = _by_name(model)
    for f in factors:
        assert (f.rank, f.fan_in, f.fan_out) == (8, HIDDEN, HIDDEN)
        assert f.scaling == 16 / 8
        assert named[f"{f.name}.lora_A.default.weight"] is f.A
        assert named[f"{f.name}.lora_B.default.weight"] is f.B


def test_adapter_name_selects_one_adapter(minilm_lora_factory):
    from peft import LoraConfig

    model, _ = minilm_lora_factory()
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=["query"], lora_dropout=0.0))
    for n, p in model.named_parameters():  # train both adapters
        if ".lora_" in n:
            p.requires_grad_(True)
    second = {g["name"]: g for g in lora_param_groups(model, adapter_name="second")}
    assert "lora_A/second" in second and "lora_B/second" in second
    assert not any(k.endswith("/default") for k in second)
    assert len(second["lora_A/second"]["params"]) == N_LAYERS
    assert all(".lora_A.second." in n for n in second["lora_A/second"]["param_names"])
    default = {g["name"]: g for g in lora_param_groups(model, adapter_name="default")}
    assert len(default["lora_A/default"]["params"]) == 2 * N_LAYERS
    assert all(".second." not in n for n in default["lora_A/default"]["param_names"])
    # the other adapter's trainable LoRA tensors are in no group (neither sampled nor a noise-free head)
    for groups, other in ((second, ".default."), (default, ".second.")):
        assert all(other not in n or ".lora_" not in n for n in groups["head"]["param_names"])
        assert all("classifier" in n for n in groups["head"]["param_names"])
    factors = lora_modules(model, adapter_name="second")
    assert len(factors) == N_LAYERS and all(f.adapter == "second" and f.rank == 4 for f in factors)
    assert all(f.scaling == 1.0 for f in factors)
    with pytest.raises(ValueError, match=r"LoraLayer.*for adapter 'missing'"):
        lora_param_groups(model, adapter_name="missing")


def test_plain_model_without_lora_raises():
    base = _base_model()
    for fn in (lora_param_groups, lora_modules, lora_parameters):
        with pytest.raises(ValueError, match=r"searched for peft\.tuners\.lora\.LoraLayer"):
            fn(base)


def test_langevin_steps_move_only_adapters_and_head_is_noise_free(minilm_lora_factory):
    from recipes.assets import read_sms_spam

    torch.manual_seed(0)
    model, tokenizer = minilm_lora_factory()
    df = read_sms_spam().iloc[:8]
    batch = tokenizer(list(df["text"]), padding="max_length", truncation=True, max_length=32,
                      return_tensors="pt")
    labels = torch.tensor((df["label"] == "spam").astype(int).to_numpy())
    groups = lora_param_groups(model)
    lr, wd = 1e-3, 0.01
    opt = LangevinSGD(groups, lr=lr, num_data=1000, weight_decay=wd, seed=0)
    head = groups[-1]
    assert head["name"] == "head" and head["temperature"] == 0.0
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.eval()  # no dropout: the check is about the optimizer, not the forward pass
    for _ in range(3):
        opt.zero_grad()
        out = model(**batch, labels=labels)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        before = [p.detach().clone() for p in head["params"]]
        grads = [p.grad.clone() for p in head["params"]]
        opt.step()
        for p, p0, g in zip(head["params"], before, grads):
            expected = p0.add(torch.add(g, p0, alpha=wd), alpha=-lr)  # -lr (g + wd p), no noise
            assert torch.equal(p.detach(), expected)
            assert not torch.equal(p.detach(), p0)
    lora_ids = {id(p) for g in groups[:-1] for p in g["params"]}
    head_ids = {id(p) for p in head["params"]}
    for n, p in model.named_parameters():
        if id(p) in lora_ids:
            assert not torch.equal(p.detach(), start[n]), n  # adapters move (B from 0 by noise + grad)
        elif id(p) not in head_ids:
            assert not p.requires_grad
            assert torch.equal(p.detach(), start[n]), n  # frozen base weights bitwise unchanged
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n

"""Recipes: configs parse, metrics agree with hand computations, the comparison writes its files,
bad names/columns/labels give clear errors, and each recipe runs a few steps on packaged assets."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


# -- metrics against a hand computation -------------------------------------------------------------
PROBS = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_metrics_match_hand_computation():
    from recipes.metrics import classification_metrics

    m = classification_metrics(PROBS, LABELS)
    # predictions 0,0,1,0 -> 3 of 4 correct
    assert m["accuracy"] == pytest.approx(0.75)
    # NLL: -(ln .9 + ln .4 + ln .7 + ln .8)/4
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4, rel=1e-6)
    # Brier: sum over classes of squared error, averaged: (.02 + .72 + .18 + .08)/4
    assert m["brier"] == pytest.approx((0.02 + 0.72 + 0.18 + 0.08) / 4, rel=1e-6)
    # ECE, 15 bins of width 1/15: confidences .9, .6, .7, .8 fall in bins 13, 9, 10, 12, each holding
    # one example: |acc - conf| = .1 (right), .6 (wrong), .3 (right), .2 (right) -> mean .3
    assert m["ece"] == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4, rel=1e-5)


def test_ece_pools_examples_in_a_bin():
    from recipes.metrics import classification_metrics

    # two examples share bin 12 (conf .81 and .85): |1/2 - .83| = .33 weighted 2/3; one in bin 14 (.95, right)
    probs = torch.tensor([[0.81, 0.19], [0.15, 0.85], [0.95, 0.05]])
    m = classification_metrics(probs, torch.tensor([0, 0, 0]))
    assert m["ece"] == pytest.approx(2 / 3 * abs(0.5 - 0.83) + 1 / 3 * 0.05, rel=1e-5)


def test_metrics_reject_bad_input():
    from recipes.metrics import classification_metrics

    with pytest.raises(ValueError, match="Invalid target"):
        classification_metrics(PROBS, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="Invalid probs"):
        classification_metrics(PROBS[:, 0], LABELS)


# -- configs parse ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["compare_sms_spam.yaml", "compare_twitter.yaml", "compare_smollm2.yaml"])
def test_compare_configs_parse(name):
    from recipes.compare import LangevinSettings, load_config
    from recipes.data import TextClassificationData
    from recipes.models import LoRAClassifier
    import inspect

    cfg = load_config(CONFIGS / name)
    settings = LangevinSettings(**cfg["langevin"])
    plan = settings.plan(total_steps=100, num_data=1000, best_step=40)   # best_step: for burn_in 'best'
    if settings.burn_in == "auto":   # the drop-in plans itself (issue 18)
        assert plan["burn_in_mode"] == "auto" and plan["burn_in_steps"] is None and plan["beta"] == 1000
    else:
        burn = 40 if settings.burn_in == "best" else round(settings.burn_in * 100)
        # the sampling steps: the rest of the AdamW budget, or the config's sampling_steps (two-pass: 2400)
        assert plan["sampling_steps"] == (settings.sampling_steps or 100 - burn)
        assert plan["burn_in_steps"] == burn and plan["sample_every"] * plan["num_samples"] <= plan["sampling_steps"]
        assert plan["weight_decay"] == pytest.approx(1 / (1000 * settings.prior_std ** 2))
    for section, cls in (("data", TextClassificationData), ("model", LoRAClassifier)):
        params = inspect.signature(cls).parameters
        unknown = set(cfg[section]) - set(params)
        assert not unknown, f"{name}: unknown {section} keys {unknown}"
    import lightning.pytorch as pl
    assert not set(cfg["trainer"]) - set(inspect.signature(pl.Trainer).parameters)


def test_load_config_overrides_and_errors(tmp_path):
    from recipes.compare import LangevinSettings, load_config

    cfg = load_config(CONFIGS / "compare_sms_spam.yaml", ["trainer.precision=bf16-mixed", "langevin.temperature=0.5"])
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["langevin"]["temperature"] == 0.5
    with pytest.raises(ValueError, match="Invalid config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataa: {}\n")
    with pytest.raises(ValueError, match="unknown key 'dataa' .* closest first: data, "):   # was "unknown sections"
        load_config(bad)
    with pytest.raises(ValueError, match="Invalid langevin.burn_in"):
        LangevinSettings(burn_in=10).plan(total_steps=10, num_data=10)
    with pytest.raises(ValueError, match="Invalid langevin.temperature"):
        LangevinSettings(temperature=-1.0)


@pytest.mark.parametrize("name,module", [("seq_cls_sms_spam.yaml", "recipes.seq_cls"),
                                         ("seq_cls_twitter.yaml", "recipes.seq_cls"),
                                         ("gibbs_attention.yaml", "recipes.gibbs"),
                                         ("gibbs_digits.yaml", "recipes.gibbs")])
def test_cli_configs_parse(name, module, tmp_path):
    import importlib

    cli = importlib.import_module(module).main(
        ["--config", str(CONFIGS / name), "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model is not None and cli.datamodule is not None
    assert isinstance(cli.config["seed_everything"], int)


def test_causal_lm_config_parses():
    """Checked against the signatures without building the 135M model (the smoke test builds it)."""
    import inspect

    import yaml

    from recipes.causal_lm import ChoiceData, LoRAChoiceLM

    cfg = yaml.safe_load((CONFIGS / "causal_lm_smollm2.yaml").read_text())
    assert not set(cfg["data"]) - set(inspect.signature(ChoiceData).parameters)
    assert not set(cfg["model"]) - set(inspect.signature(LoRAChoiceLM).parameters)
    assert [c["class_path"] for c in cfg["trainer"]["callbacks"]] == [
        "langevin_lora.LangevinLoRA", "langevin_lora.diagnostics.GibbsDiagnostics"]


# -- clear errors -----------------------------------------------------------------------------------
def test_unknown_dataset_and_model_names():
    from recipes.data import TextClassificationData, load_text_frame
    from recipes.models import LoRAClassifier

    with pytest.raises(ValueError, match="Invalid dataset"):
        load_text_frame("no_such_set")
    with pytest.raises(ValueError, match="Invalid dataset: could not load"):
        TextClassificationData(dataset="no-such-user/no-such-dataset-xyz").setup()
    with pytest.raises(ValueError, match="Invalid model_name"):
        LoRAClassifier(model_name="/nonexistent/model-dir")
    with pytest.raises(ValueError, match="Invalid target_modules"):
        LoRAClassifier(target_modules=["q_proj"])
    with pytest.raises(ValueError, match="Invalid val_fraction"):
        TextClassificationData(val_fraction=1.5)


def test_missing_columns_and_label_mismatch(tmp_path):
    import lightning.pytorch as pl
    from recipes.data import TextClassificationData
    from recipes.models import LoRAClassifier

    csv = tmp_path / "toy.csv"
    csv.write_text("sentence,target\n" + "".join(f"text number {i},{'abc'[i % 3]}\n" for i in range(30)))
    with pytest.raises(ValueError, match="Invalid column: \\['text', 'label'\\] not in dataset 'csv'"):
        TextClassificationData(dataset="csv", data_files=str(csv)).setup()
    dm = TextClassificationData(dataset="csv", data_files=str(csv), text_column="sentence", label_column="target",
                                max_length=16, batch_size=8)
    assert dm.num_labels == 3 and dm.label_names == ["a", "b", "c"]
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="Invalid num_labels: the model has 2 labels but dataset 'csv' has 3"):
        trainer.fit(LoRAClassifier(num_labels=2), datamodule=dm)


def test_packaged_datasets_are_split_stratified_and_fixed():
    from recipes.data import TextClassificationData

    a = TextClassificationData(dataset="sms_spam", num_train=200, num_test=100)
    a.setup()
    b = TextClassificationData(dataset="sms_spam", num_train=200, num_test=100)
    b.setup()
    assert a.label_names == ["ham", "spam"]
    assert a.splits["test"]["input_ids"] == b.splits["test"]["input_ids"]
    ys = torch.tensor(a.splits["train"]["labels"])
    assert len(ys) == 200 and abs(float(ys.float().mean()) - 642 / 4862) < 0.03  # class balance kept


# -- end to end, a few steps ------------------------------------------------------------------------
TINY = ["--data.num_train", "48", "--data.num_val", "16", "--data.num_test", "16", "--data.max_length", "32",
        "--data.batch_size", "16", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false"]


def _with_langevin(name: str, tmp_path: Path, **init_args) -> str:
    """A copy of a recipe config whose LangevinLoRA callback takes ``init_args`` overrides."""
    import yaml

    cfg = yaml.safe_load((CONFIGS / name).read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("LangevinLoRA"):
            cb["init_args"].update(init_args)
        if cb["class_path"].endswith("GibbsDiagnostics"):  # no Hessian-vector products in a 3-step test
            cb["init_args"].update(hvp_every_n_steps=0, lambda_max_every_n_steps=0)
    out = tmp_path / name
    out.write_text(yaml.safe_dump(cfg))
    return str(out)


def test_seq_cls_recipe_runs_with_langevin_callback(tmp_path):
    from recipes.seq_cls import main

    cfg = _with_langevin("seq_cls_sms_spam.yaml", tmp_path, burn_in_steps=1, sample_every=1)
    cli = main(["fit", "--config", cfg, *TINY, "--trainer.default_root_dir", str(tmp_path)])
    lcb = next(c for c in cli.trainer.callbacks if type(c).__name__ == "LangevinLoRA")
    assert cli.trainer.global_step == 3 and lcb.sampling and len(lcb.sample_bank) == 2
    assert list(tmp_path.rglob("*.ckpt")), "a checkpoint is written"


def test_compare_writes_report_with_documented_columns(tmp_path):
    from recipes.compare import load_config, run_comparison
    from recipes.metrics import classification_metrics
    from recipes.report import REPORT_COLUMNS

    cfg = load_config(CONFIGS / "compare_sms_spam.yaml",
                      ["data.num_train=48", "data.num_test=40", "data.max_length=32", "data.batch_size=16",
                       "data.num_val=16", "methods=[adamw, langevin]",
                       "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "langevin.num_samples=2",
                       "langevin.burn_in=1",
                       "langevin.diagnostics={hvp_every_n_steps: 0, lambda_max_every_n_steps: 0}"])
    out = run_comparison(cfg, output_dir=str(tmp_path), quiet=True)
    for f in ("report.md", "results.json", "reliability.png", "diagnostics.png"):
        assert (tmp_path / f).is_file(), f
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["columns"] == list(REPORT_COLUMNS)
    assert [r["method"] for r in res["runs"]] == ["adamw", "langevin"]
    for r in res["runs"]:
        assert set(REPORT_COLUMNS) <= set(r)
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["nll"] > 0 and 0 <= r["brier"] <= 2
    lang = res["runs"][1]
    assert lang["num_samples"] == 2 and lang["plan_burn_in_steps"] == 1 and lang["optimizer_steps"] == 3
    table = (tmp_path / "report.md").read_text()
    assert "| adamw |" in table and "| langevin |" in table and "ECE (15 bins)" in table
    # the langevin probabilities are a proper average: recompute its metrics from the returned rows
    assert out["summary"][0]["accuracy_mean"] == pytest.approx(res["runs"][0]["accuracy"])
    assert classification_metrics(PROBS, LABELS)["accuracy"] == 0.75


def test_gibbs_recipes_run(tmp_path):
    from recipes.gibbs import main

    cli = main(["fit", "--config", str(CONFIGS / "gibbs_attention.yaml"), "--trainer.max_steps", "200",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "a"),
                "--model.num_chains", "8"])
    s = json.loads((tmp_path / "a" / "gibbs_summary.json").read_text())
    assert s["num_chains"] == 8 and s["steps"] == 200 and math.isfinite(s["beta_virial"])
    assert (tmp_path / "a" / "gibbs_relaxation.png").is_file()
    assert cli.model.summary["verdict"] in ("pass", "fail")
    main(["fit", "--config", str(CONFIGS / "gibbs_digits.yaml"), "--trainer.max_steps", "40",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "d"),
          "--model.num_chains", "4", "--model.pretrain_steps", "20"])
    s = json.loads((tmp_path / "d" / "gibbs_summary.json").read_text())
    assert 0 <= s["test_accuracy_bma"] <= 1


@pytest.mark.slow
def test_causal_lm_recipe_smoke(tmp_path):
    """SmolLM2 (dequantised once into the cache), 2 optimizer steps at batch 2, length 32."""
    from recipes.causal_lm import main

    cfg = _with_langevin("causal_lm_smollm2.yaml", tmp_path, burn_in_steps=1, sample_every=1)
    cli = main(["fit", "--config", cfg, "--data.num_train", "4",
                "--data.num_val", "2", "--data.num_test", "2", "--data.max_length", "32", "--data.batch_size", "2",
                "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
                "false", "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 2
    lcb = next(c for c in cli.trainer.callbacks if type(c).__name__ == "LangevinLoRA")
    assert len(lcb.sample_bank) == 1
    batch = next(iter(cli.datamodule.test_dataloader()))
    with torch.no_grad():
        logits = cli.model(batch)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


# -- configuration mistakes: one line, exit status 2, no traceback (issue 11 item 11) ---------------
def _one_error_line(capsys, prog):
    import re

    err = capsys.readouterr().err
    # Lightning's log handler may hold a stream an earlier test's capture closed: its report is not ours
    err = re.sub(r"--- Logging error ---.*?\nArguments:[^\n]*\n", "", err, flags=re.S)
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.mark.parametrize("override, key, first", [
    ("langevin.num_sampls=3", "'langevin.num_sampls'", "num_samples"),
    ("model.lora_rnak=3", "'model.lora_rnak'", "lora_r"),
    ("trainer.max_step=3", "'trainer.max_step'", "max_steps"),
    ("langevin.diagnostics={lambda_max_every_n_step: 0}", "'langevin.diagnostics.lambda_max_every_n_step'",
     "lambda_max_every_n_steps"),
])
def test_compare_misspelled_key_is_one_line_listing_valid_keys(capsys, override, key, first):
    from recipes.compare import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIGS / "compare_sms_spam.yaml"), "--set", override])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys, "python -m recipes.compare")
    assert f"unknown key {key}" in line and f"closest first: {first}, " in line


# The messages name the key, the value and what is allowed; the reason is jsonargparse's (issue 22).
# Re-worded from the hand-rolled checker: "(expected an integer)" -> jsonargparse's "Expected a <class 'int'>",
# "unknown section 'dataa'; valid sections" -> "unknown key 'dataa' ... valid keys of the config",
# "langevin.temperature is 1.0, not a section with keys" -> "Invalid langevin.temperature: {'x': 1}".
@pytest.mark.parametrize("override, match", [
    ("trainer.max_steps=3=4", ("Invalid trainer.max_steps: '3=4' (", "Expected a <class 'int'>")),
    ("data.batch_size=abc", ("Invalid data.batch_size: 'abc' (", "Expected a <class 'int'>")),
    ("langevin.precond_clamp=[1, 2, 3]", ("Invalid langevin.precond_clamp: [1, 2, 3] (",
                                          "Expected a tuple with 2 elements")),
    ("trainer.callbacks=[]", ("Invalid key trainer.callbacks: the comparison sets the Trainer's callbacks itself",)),
    ("langevin.temperature.x=1", ("Invalid langevin.temperature: {'x': 1} (",)),
    ("dataa.x=1", ("unknown key 'dataa'", "closest first: data, ")),
    ("langevin.burn_in=[1", ("is not valid YAML",)),
])
def test_compare_bad_values_are_one_line(capsys, override, match):
    from recipes.compare import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIGS / "compare_sms_spam.yaml"), "--set", override])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys, "python -m recipes.compare")
    assert all(m in line for m in match), line


def test_compare_misspelled_key_in_config_file_and_demo(capsys, tmp_path):
    import yaml

    from recipes import demo
    from recipes.compare import main

    cfg = yaml.safe_load((CONFIGS / "compare_sms_spam.yaml").read_text())
    cfg["model"]["lora_rnak"] = cfg["model"].pop("lora_r")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(bad)])
    assert exit_info.value.code == 2
    assert "unknown key 'model.lora_rnak'" in _one_error_line(capsys, "python -m recipes.compare")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--set", "langevin.num_sampls=3", "--output_dir", str(tmp_path / "demo")])
    assert exit_info.value.code == 2
    assert "closest first: num_samples," in _one_error_line(capsys, "python -m recipes.demo")


def test_compare_cli_subprocess_exit_code_and_no_traceback():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "recipes.compare", "--config", str(CONFIGS / "compare_sms_spam.yaml"),
                          "--set", "trainer.max_steps=3=4"], capture_output=True, text=True, timeout=300,
                         cwd=CONFIGS.parents[1])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("python -m recipes.compare: error: Invalid trainer.max_steps")


def _misspelled_callback_config(tmp_path):
    import yaml

    cfg = yaml.safe_load((CONFIGS / "seq_cls_sms_spam.yaml").read_text())
    init = cfg["trainer"]["callbacks"][0]["init_args"]
    init["num_sampls"] = init.pop("num_samples")
    path = tmp_path / "bad_callback.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("module, extra, match", [
    ("recipes.gibbs", ["--trainer.max_step", "3"], "unknown key 'trainer.max_step' (option --trainer.max_step); "
                                                   "valid keys of trainer, closest first: max_steps, "),
    ("recipes.gibbs", ["--model.lora_rnak=3"], "unknown key 'model.lora_rnak'"),
    ("recipes.gibbs", ["--trainer.max_steps", "3=4"], 'trainer.max_steps'),
    ("recipes.gibbs", ["--model.num_chains", "1"], "Invalid num_chains: 1 (expected an integer >= 2)"),
    ("recipes.seq_cls", "callback", "unknown key 'trainer.callbacks[0].init_args.num_sampls' (in "),
])
def test_lightning_cli_recipes_one_line_errors(capsys, tmp_path, module, extra, match):
    import importlib

    mod = importlib.import_module(module)
    if extra == "callback":
        args = ["fit", "--config", _misspelled_callback_config(tmp_path)]
    else:
        args = ["fit", "--config", str(CONFIGS / "gibbs_attention.yaml"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        mod.main([*args, "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys, f"python -m {module}")
    assert match in line
    if extra == "callback":
        assert "valid keys of LangevinLoRA, closest first: num_samples, " in line


def test_misspelled_key_in_lightning_cli_config_file(capsys, tmp_path):
    from recipes.seq_cls import main

    text = (CONFIGS / "seq_cls_sms_spam.yaml").read_text().replace("  lora_r: 8", "  lora_rnak: 8")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code == 2
    assert "unknown key 'model.lora_rnak'" in _one_error_line(capsys, "python -m recipes.seq_cls")


def test_gibbs_recipe_survives_a_run_too_short_to_judge(tmp_path):
    from recipes.gibbs import main

    cli = main(["fit", "--config", str(CONFIGS / "gibbs_attention.yaml"), "--trainer.max_steps", "3",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                "--model.num_chains", "4"])
    s = cli.model.summary
    assert s["steps"] == 3 and math.isnan(s["split_rhat_U"]) and s["verdict"] == "fail" and "too few" in s["note"]

"""The comparison's one config door (issue 22): ``python -m recipes.compare`` is a jsonargparse
parser of the config. Dotted options and ``--set`` mean the same, ``--print_config`` prints a config
that loads back to the same thing, and an unknown key or a wrong type is one line naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
SMS = str(CONFIGS / "compare_sms_spam.yaml")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("python -m recipes.compare: error: "), err
    return lines[0]


def test_dotted_options_and_set_overrides_give_the_same_config():
    from recipes.compare_config import load_config, parse_args

    dotted = parse_args(["--config", SMS, "--langevin.prior_std", "0.04", "--trainer.max_epochs=2",
                         "--langevin.diagnostics.hvp_every_n_steps", "7", "--data.num_train", "null",
                         "--seeds", "0", "1", "2", "--methods", "adamw", "langevin"])
    via_set = load_config(SMS, ["langevin.prior_std=0.04", "trainer.max_epochs=2",
                                "langevin.diagnostics={hvp_every_n_steps: 7, lambda_max_every_n_steps: 0}",
                                "data.num_train=null", "seeds=[0, 1, 2]", "methods=[adamw, langevin]"])
    assert dotted == via_set
    file = yaml.safe_load(Path(SMS).read_text())
    assert dotted["langevin"]["prior_std"] == 0.04 and file["langevin"]["prior_std"] != 0.04
    assert dotted["trainer"]["max_epochs"] == 2 and dotted["data"]["num_train"] is None
    assert dotted["seeds"] == [0, 1, 2] and dotted["methods"] == ["adamw", "langevin"]
    # a nested key keeps the file's other keys of its section
    assert dotted["langevin"]["diagnostics"] == {**file["langevin"]["diagnostics"], "hvp_every_n_steps": 7}
    assert dotted["model"] == {**file["model"], "lora_alpha": float(file["model"]["lora_alpha"])}
    # only the keys given: no defaults filled in (model.num_labels stays the data's)
    assert "num_labels" not in dotted["model"] and set(dotted["trainer"]) == set(file["trainer"])


def test_set_values_are_yaml_as_in_the_file():
    """``--set`` values are parsed as YAML, as a file's are: ``0.001`` is a number even where the
    annotation lists ``str`` first (LangevinLoRA's ``step_size: str | float``)."""
    from recipes.compare_config import ConfigError, load_config

    cfg = load_config(SMS, ["langevin.step_size=0.001", "trainer.max_steps=7", "data.tokenizer=minilm"])
    assert cfg["langevin"]["step_size"] == 0.001 and cfg["trainer"]["max_steps"] == 7
    with pytest.raises(ConfigError, match=r"Invalid override: 'langevin.burn_in=\[1' \(the value '\[1' is not valid YAML"):
        load_config(SMS, ["langevin.burn_in=[1"])
    with pytest.raises(ConfigError, match=r"Invalid override: 'langevin' \(expected section.key=value\)"):
        load_config(SMS, ["langevin"])


def test_print_config_prints_a_config_that_loads_back(capsys, tmp_path):
    from recipes.compare import main
    from recipes.compare_config import load_config

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", SMS, "--langevin.prior_std", "0.04", "--seeds", "3", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["langevin"]["prior_std"] == 0.04 and printed["seeds"] == [3]
    assert printed["langevin"]["burn_in"] == "best" and printed["data"]["dataset"] == "sms_spam"
    again = tmp_path / "printed.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert load_config(again) == load_config(SMS, ["langevin.prior_std=0.04", "seeds=[3]"])


@pytest.mark.parametrize("args, expected", [
    (["--langevin.num_sampls", "3"], ("unknown key 'langevin.num_sampls' (option --langevin.num_sampls); valid keys "
                                      "of langevin, closest first: num_samples, ",)),
    (["--trainer.max_step=3"], ("unknown key 'trainer.max_step'", "closest first: max_steps, ")),
    (["--langevin.diagnostics.lambda_max_every_n_step", "0"],
     ("unknown key 'langevin.diagnostics.lambda_max_every_n_step'", "closest first: lambda_max_every_n_steps, ")),
    (["--sedes", "1"], ("unknown key 'sedes'", "closest first: seeds, ")),
    (["--langevin.temperature.x", "1"], ("unknown key 'langevin.temperature.x'", "langevin.temperature takes a value, "
                                                                               "not keys")),
])
def test_unknown_key_is_one_line_naming_it(capsys, args, expected):
    from recipes.compare import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", SMS, *args])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys)
    assert all(e in line for e in expected), line


@pytest.mark.parametrize("args, expected", [
    (["--data.num_train", "many"], "Invalid data.num_train: 'many' ("),
    (["--langevin.num_samples", "2.5"], "Invalid langevin.num_samples: 2.5 ("),
    (["--seeds", "0", "x"], "Invalid seeds: [0, 'x'] ("),
    (["--methods", "sgd"], "Invalid methods: ['sgd'] ("),
    (["--selection.every_n_steps", "0"], "Invalid selection.every_n_steps: 0 (expected an integer >= 1 or null)"),
    (["--langevin.temperature", "-1"], "Invalid langevin.temperature: -1.0 ("),   # refused by LangevinLoRA itself
])
def test_wrong_type_or_value_is_one_line_naming_the_key(capsys, args, expected):
    from recipes.compare import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", SMS, *args])
    assert exit_info.value.code == 2
    assert expected in _one_error_line(capsys)


def test_wrong_type_in_a_config_file_and_in_a_config_mapping(tmp_path):
    from recipes.compare_config import ConfigError, load_config, validate_config

    cfg = yaml.safe_load(Path(SMS).read_text())
    cfg["trainer"]["max_epochs"] = "forty"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"^Invalid trainer.max_epochs: 'forty' \("):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"^Invalid trainer.max_epochs: 'forty' \("):
        validate_config(cfg)
    cfg["trainer"]["max_epochs"] = 40
    cfg["model"]["lora_rnak"] = 8
    with pytest.raises(ConfigError, match=r"^unknown key 'model.lora_rnak' \(in the config\); .* closest first: "
                                          r"lora_r, "):
        validate_config(cfg)


def test_a_float_step_size_on_the_command_line_is_a_number():
    """LangevinLoRA/optimizers annotate step_size ``float | str``, so jsonargparse reads ``0.001`` as a number
    (as ``str | float`` it stayed the string '0.001', which LangevinLoRA refuses) and ``auto`` as the string."""
    import typing

    from jsonargparse import ArgumentParser

    from langevin_lora import LangevinAdam, LangevinLoRA, LangevinSGD

    for cls in (LangevinLoRA, LangevinSGD, LangevinAdam):
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--step_size", type=typing.get_type_hints(cls.__init__)["step_size"])
        assert parser.parse_args(["--step_size", "0.001"]).step_size == 0.001, cls
        assert parser.parse_args(["--step_size", "auto"]).step_size == "auto", cls

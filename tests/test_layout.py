"""The package's layout (issue 22): layers import only downwards, nobody imports another module's private
names, release 0.1's module paths are deprecated aliases of the same objects, and saved states carry a
version that is read on load."""
from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import langevin_lora
from langevin_lora._moved import MOVED

ROOT = Path(langevin_lora.__file__).parent
#: Layers, lowest first: a module may import from its own layer and the ones before it.
LAYERS = ("_validation", "_docs", "core", "lora", "posterior", "optim", "diagnostics", "lightning")


def _modules() -> dict[str, Path]:
    return {".".join(("langevin_lora", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` of every ``langevin_lora`` import, at any depth (lazy imports count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("langevin_lora"):
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("langevin_lora")]
    return out


def test_the_listing_shows_the_layers():
    top = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith("__"))
    assert top == ["_docs.py", "_moved.py", "_validation.py", "core", "diagnostics", "lightning", "lora", "optim",
                   "posterior"] or top == ["_docs.py", "_moved.py", "_validation.py", "core", "diagnostics",
                                           "lightning", "lora", "optim", "posterior", "testing.py"]


def test_layers_import_only_downwards_and_no_private_names():
    wrong = []
    for module, path in _modules().items():
        mine = _layer(module)
        for target, names, line in _imports(path):
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module}:{line} imports {target} (layer {LAYERS[theirs]} is above {LAYERS[mine]})")
            if target.split(".")[-1].startswith("_") and target.rsplit(".", 1)[0] != module.rsplit(".", 1)[0] \
                    and target not in ("langevin_lora._validation", "langevin_lora._docs", "langevin_lora._moved"):
                wrong.append(f"{module}:{line} imports the private module {target}")
            private = [n for n in names if n.startswith("_") and n != "__version__"
                       and not (module == "langevin_lora" and target == "langevin_lora")]   # its own modules
            if private:
                wrong.append(f"{module}:{line} imports private names {private} of {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_moved_path():
    """Inside the package every import uses the new homes (the aliases are for users' code)."""
    stale = [f"{m}:{line} imports {t}" for m, p in _modules().items() for t, _, line in _imports(p) if t in MOVED]
    assert not stale, "\n".join(stale)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_are_deprecated_aliases(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to .* removed in 0\.3"):
        alias = importlib.import_module(old)
    homes = MOVED[old] if isinstance(MOVED[old], tuple) else (MOVED[old],)
    new = importlib.import_module(homes[0])
    public = getattr(new, "__all__", [n for n in vars(new) if not n.startswith("_")])
    for name in public:   # the same objects, so isinstance and monkeypatching agree
        assert getattr(alias, name) is getattr(new, name), name


def test_the_split_samples_module_still_offers_the_averaging():
    sys.modules.pop("langevin_lora.samples", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from langevin_lora import SampleBank, bma_predict_proba
    assert SampleBank is langevin_lora.SampleBank and bma_predict_proba is langevin_lora.bma_predict_proba
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        samples = importlib.import_module("langevin_lora.samples")
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        samples.nothing


def test_the_yaml_class_path_of_release_01_still_resolves():
    """``class_path: langevin_lora.LangevinLoRA`` in a LightningCLI YAML, as jsonargparse resolves it."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback

    sys.modules.pop("langevin_lora.callback", None)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=Callback)
    with pytest.warns(DeprecationWarning, match="langevin_lora.callback moved to langevin_lora.lightning.callback"):
        cfg = parser.parse_object({"callback": {"class_path": "langevin_lora.callback.LangevinLoRA",
                                                "init_args": {"num_data": 10, "burn_in_steps": 5}}})
    cb = parser.instantiate_classes(cfg).callback
    assert type(cb) is langevin_lora.LangevinLoRA and cb.num_data == 10


def test_checkpoint_versions_are_read_on_load():
    from langevin_lora.diagnostics import GibbsDiagnostics, GibbsRecorder
    from langevin_lora.lightning.callback import CHECKPOINT_VERSION

    cb = langevin_lora.LangevinLoRA(num_data=10, burn_in_steps=0)
    state = cb.state_dict()
    assert state["version"] == CHECKPOINT_VERSION
    for bad in (CHECKPOINT_VERSION + 1, 0, "4", None):
        with pytest.raises(ValueError, match=rf"Invalid LangevinLoRA checkpoint version: {bad!r} \(this release "
                                             rf"reads versions 1 to {CHECKPOINT_VERSION}"):
            langevin_lora.LangevinLoRA(num_data=10, burn_in_steps=0).load_state_dict(dict(state, version=bad))
    langevin_lora.LangevinLoRA(num_data=10, burn_in_steps=0).load_state_dict(state)   # the current one loads

    diag = GibbsDiagnostics()
    saved = diag.state_dict()
    with pytest.raises(ValueError, match=r"Invalid GibbsDiagnostics checkpoint version: 3 \(this release reads "
                                         r"versions 1 to 2"):
        GibbsDiagnostics().load_state_dict(dict(saved, version=3))
    with pytest.raises(ValueError, match=r"Invalid GibbsRecorder checkpoint version: 7"):
        GibbsRecorder().load_state_dict(dict(saved["recorder"], version=7))


def test_the_readme_layout_table_is_the_tree():
    """Every module of the package is named in the README's repository table, in its folder's row."""
    readme = (ROOT.parent / "README.md").read_text()
    table = readme[readme.index("## Repository"):]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines() if line.startswith("| `")}
    missing = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(ROOT.parent).as_posix()
        folder = rel.rsplit("/", 1)[0] + "/"
        if any(f"`{rel}`" in line for line in rows.values()):
            continue
        if folder not in rows or f"`{path.name}`" not in rows[folder]:
            missing.append(rel)
    assert not missing, f"not in the README's repository table: {missing}"


def test_every_dotted_name_in_the_docs_resolves():
    """``langevin_lora.x.y`` named in the READMEs and in the docstrings and imports of the package, recipes and
    benchmarks is a module or an attribute of one (docs follow the moves)."""
    import re

    bad = []
    repo = ROOT.parent
    docs = [repo / d for d in ("README.md", "recipes/README.md", "benchmarks/README.md")]
    docs += sorted(p for d in ("langevin_lora", "recipes", "benchmarks") for p in (repo / d).rglob("*.py"))
    for path in docs:
        doc, text = path.relative_to(repo).as_posix(), path.read_text()
        for name in sorted(set(re.findall(r"\blangevin_lora(?:\.\w+)+(?![\w*])", text))):   # not globs (X_*)
            parts = name.split(".")
            obj = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)   # the _moved row names old paths on purpose
                for k in range(len(parts), 0, -1):
                    try:
                        obj = importlib.import_module(".".join(parts[:k]))
                    except ImportError:
                        continue
                    for attr in parts[k:]:
                        obj = getattr(obj, attr, None)
                    break
            if obj is None:
                bad.append(f"{doc}: {name}")
    assert not bad, "\n".join(bad)

"""The package's import directions (docs/architecture.md). Parsed with ast, so a violation is
found without importing anything, and each rule names the file that broke it. Also: only
hermes/bundle.py names the files of a saved-model folder."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hermes"
STAGES = ("training", "inference", "evaluation", "adaptation", "cli")
# install_check runs before the dependencies are installed (`make` bootstraps with it), so it
# stands alone with its own argparse and imports nothing else of hermes.
STANDALONE = {"hermes.install_check"}
# The saved-model folder has one reader and writer (hermes/bundle.py, ModelBundle): no other
# module names its spec or weights file, so none can read or write them behind its back.
BUNDLE = "hermes.bundle"
MODEL_FOLDER_FILES = ("spec.json", "weights.safetensors")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of everything ``source`` imports (relative imports resolved)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level] if node.level else []
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def violations(module: str, imports: set[str]) -> list[str]:
    """The rules of docs/architecture.md, for one module."""
    layer = module.split(".")[1] if module.count(".") >= 1 else ""
    found = []

    def imports_layer(name: str) -> bool:
        return any(i == f"hermes.{name}" or i.startswith(f"hermes.{name}.") for i in imports)

    if layer in ("runtime", "config", "errors", "fileio", "bundle"):  # the base: no stage at all
        found += [f"{module} imports hermes.{s}" for s in ("synthetic", "data", "models", *STAGES) if imports_layer(s)]
    if layer in ("models", "data", "synthetic"):
        found += [f"{module} imports hermes.{s}" for s in STAGES if imports_layer(s)]
    if layer == "inference" and imports_layer("training"):
        found.append(f"{module} imports hermes.training (inference must run without the trainer)")
    if layer in ("evaluation", "training", "adaptation", "inference") and imports_layer("cli"):
        found.append(f"{module} imports hermes.cli (only the command line may)")
    if "argparse" in imports and layer != "cli" and module not in STANDALONE:
        found.append(f"{module} imports argparse (argument parsing lives in hermes/cli/)")
    if module in STANDALONE and any(i.startswith("hermes") for i in imports):
        found.append(f"{module} imports hermes (it must run before the dependencies are installed)")
    return found


def model_folder_violations(module: str, source: str) -> list[str]:
    """Any module but the bundle that names a file of the model folder (code, string or comment)."""
    if module == BUNDLE:
        return []
    return [f"{module} names {name} (only {BUNDLE} reads and writes a model folder)" for name in MODEL_FOLDER_FILES
            if name in source]


def test_the_package_keeps_its_import_directions() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        found += violations(module, imported_modules(path.read_text(), module))
    assert not found, "\n".join(found)


def test_only_the_bundle_reads_and_writes_model_folders() -> None:
    assert (PACKAGE / "bundle.py").is_file()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += model_folder_violations(module_name(path), path.read_text())
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        'spec = json.loads((model_dir / "spec.json").read_text())',
        'atomic_write_json(directory / "spec.json", spec)',
        'load_file(str(Path(model_dir) / "weights.safetensors"))',
    ],
)
def test_a_model_folder_read_outside_the_bundle_is_caught(source: str) -> None:
    found = model_folder_violations("hermes.inference.predictor", source)
    assert found and "only hermes.bundle reads and writes" in found[0]
    assert not model_folder_violations(BUNDLE, source)


@pytest.mark.parametrize(
    ("module", "source", "message"),
    [
        ("hermes.models.heads", "from hermes.training.loss import HermesLoss", "imports hermes.training"),
        ("hermes.data.loader", "import hermes.inference.predictor", "imports hermes.inference"),
        ("hermes.config", "from hermes.data.catalog import Catalog", "imports hermes.data"),
        ("hermes.bundle", "from hermes.models.registry import build_model", "imports hermes.models"),
        ("hermes.inference.predictor", "from hermes.training import trainer", "without the trainer"),
        ("hermes.inference.predictor", "from ..training.trainer import train", "without the trainer"),
        ("hermes.evaluation.evaluate", "import argparse", "argparse"),
        ("hermes.training.trainer", "from hermes.cli.args import POSITIVE_INT", "only the command line"),
        ("hermes.install_check", "from hermes.config import TrainConfig", "before the dependencies"),
    ],
)
def test_a_wrong_import_is_caught(module: str, source: str, message: str) -> None:
    found = violations(module, imported_modules(source, module))
    assert found and message in found[0]


def test_allowed_imports_pass() -> None:
    assert not violations("hermes.cli.train", imported_modules("import argparse\nfrom hermes.training import trainer", "hermes.cli.train"))
    assert not violations("hermes.inference.predictor", imported_modules("from hermes.runtime import choose_device", "hermes.inference.predictor"))
    for module in ("hermes.models.registry", "hermes.data.cache", "hermes.inference.predictor", "hermes.training.plan"):
        assert not violations(module, imported_modules("from hermes.bundle import ModelBundle", module))

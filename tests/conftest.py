"""Shared fixtures. Each stage's tests live in their own files; only cross-stage fixtures here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REALMINI = Path(os.environ.get("HERMES_REALMINI", REPO_ROOT.parent / "shared" / "data" / "realmini"))


@pytest.fixture(scope="session")
def realmini_root() -> Path:
    """The real mini datasets (read-only, outside the repo); tests using it skip without it."""
    if not (REALMINI / "README.md").is_file():
        pytest.skip(f"realmini data not found at {REALMINI}")
    return REALMINI


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic cohort (all datasets, few cases, small volumes), generated once per run."""
    from hermes.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, seed=0, scale=0.5, cases=3)
    return out


@pytest.fixture(scope="session")
def small_cache(small_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``small_cohort`` with a default catalog (every dataset), prepared once: (catalog.yaml, cache dir)."""
    import yaml

    from hermes.data.cache import prepare_cache
    from hermes.data.catalog import default_catalog_spec, load_catalog

    root = tmp_path_factory.mktemp("small_cache")
    folders = sorted(p for p in small_cohort.iterdir() if p.is_dir() and p.name.startswith("Dataset"))
    catalog_path = root / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump(default_catalog_spec(folders)))
    prepare_cache(load_catalog(catalog_path), root / "cache", progress=False)
    return catalog_path, root / "cache"

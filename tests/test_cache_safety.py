"""Cache safety: the prepare/train lock, catalog mismatch (--add/--replace), array checksums."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from hermes.config import TrainConfig
from hermes.data.cache import load_cached_case, open_cache, prepare_cache
from hermes.data.cache_lock import read_lock, write_lock
from hermes.data.catalog import load_catalog
from hermes.data.imageio import save_image
from hermes.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def toy_dataset(root: Path, name: str, cases: int = 3, seed: int = 0) -> Path:
    """A tiny nnU-Net folder ``root/Dataset9xx_<name>`` of labelled MR-like cases."""
    folder = root / f"Dataset9{len(name):02d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "organ": 1},
        "file_ending": ".nii.gz", "numTraining": cases,
    }))
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 22, 18)], indexing="ij")
    for i in range(cases):
        r2 = sum((g - 0.1 * i) ** 2 for g in grids)
        label = (r2 < 0.3).astype(np.uint8)
        image = np.where(r2 < 0.9, 100.0 + 30.0 * label, 0.0) + rng.normal(0, 2, label.shape) * (r2 < 0.9)
        save_image(folder / "imagesTr" / f"case{i}_0000.nii.gz", image.astype(np.float32), np.eye(4))
        save_image(folder / "labelsTr" / f"case{i}.nii.gz", label, np.eye(4))
    return folder


def catalog_yaml(path: Path, *folders: Path, **extra: object) -> Path:
    path.write_text(yaml.safe_dump({"datasets": [{"path": str(f)} for f in folders], **extra}))
    return path


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256): 'identical' means same files, same bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class PrepareRun:
    """``hermes prepare`` in its own process; stderr goes to a file that can be read meanwhile."""

    def __init__(self, log: Path, *args: str) -> None:
        command = [sys.executable, "-m", "hermes.cli", "prepare", *args, "--workers", "1", "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.log = log
        with open(log, "w") as err:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Until ``text`` is in stderr (the process keeps running)."""
        deadline = time.time() + timeout
        while time.time() < deadline and text not in self.log.read_text() and self.process.poll() is None:
            time.sleep(0.05)
        assert text in self.log.read_text(), f"{text!r} not printed; stderr: {self.log.read_text()}"

    def finish(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr)."""
        out, _ = self.process.communicate(timeout=300)
        return self.process.returncode, out, self.log.read_text()


@pytest.fixture
def toy(tmp_path: Path) -> tuple[Path, Path]:
    """(catalog of one toy dataset, catalog of another one)."""
    a = toy_dataset(tmp_path / "data", "Toy")
    b = toy_dataset(tmp_path / "data", "Other", cases=2, seed=1)
    return catalog_yaml(tmp_path / "a.yaml", a), catalog_yaml(tmp_path / "b.yaml", b)


# --------------------------------------------------------------------------------------------
# Lock
# --------------------------------------------------------------------------------------------
def test_two_concurrent_prepares_wait_and_equal_one_clean_run(toy, tmp_path: Path) -> None:
    catalog, _ = toy
    cache = tmp_path / "cache"
    cache.mkdir()
    # Both start while the lock is held here, so the two runs certainly contend for it.
    with write_lock(cache):
        runs = [PrepareRun(tmp_path / f"{i}.log", str(catalog), "--out", str(cache)) for i in range(2)]
        for run in runs:
            run.wait_for(f"waiting for the lock held by pid {os.getpid()} since")
    for run in runs:
        rc, _, err = run.finish()
        assert rc == 0 and "Traceback" not in err, err
    assert (cache / ".lock").read_bytes() == b""  # the holder's pid is gone once it is done
    clean = tmp_path / "clean"
    prepare_cache(load_catalog(catalog), clean, workers=1, progress=False)
    assert tree(cache) == tree(clean)


def test_two_catalogs_at_once_one_wins_the_other_is_refused(toy, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with write_lock(cache):
        runs = [PrepareRun(tmp_path / f"{i}.log", str(catalog), "--out", str(cache)) for i, catalog in enumerate(toy)]
        for run in runs:
            run.wait_for("waiting for the lock")
    results = [run.finish()[::2] for run in runs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    winner = toy[[rc for rc, _ in results].index(0)]
    loser_err = next(err for rc, err in results if rc)
    assert "holds a cache of another catalog" in loser_err and "--add" in loser_err and "Traceback" not in loser_err
    clean = tmp_path / "clean"
    prepare_cache(load_catalog(winner), clean, workers=1, progress=False)
    assert tree(cache) == tree(clean)  # the refused run changed nothing


def test_unwritable_lock_is_a_clear_error(toy, tmp_path: Path) -> None:
    catalog, _ = toy
    cache = tmp_path / "cache"
    (cache / ".lock").mkdir(parents=True)  # as good as a read-only folder, even for root
    with pytest.raises(DataError, match=r"cache: cannot write the cache \(Is a directory\)"):
        prepare_cache(load_catalog(catalog), cache, workers=1, progress=False)


def test_no_wait_exits_with_a_clear_message(toy, tmp_path: Path) -> None:
    catalog, _ = toy
    cache = tmp_path / "cache"
    cache.mkdir()
    with write_lock(cache):
        rc, _, err = PrepareRun(tmp_path / "log", str(catalog), "--out", str(cache), "--no-wait").finish()
    assert rc == 2
    assert f"the cache is in use (lock {cache / '.lock'} held by pid {os.getpid()} since" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in cache.iterdir()) == [".lock"]  # nothing else written


def test_train_refuses_a_cache_being_written_and_prepare_waits_for_training(toy, tmp_path: Path, monkeypatch) -> None:
    import hermes.training.trainer as trainer_module
    from hermes.training.trainer import train

    catalog, _ = toy
    cache = tmp_path / "cache"
    prepare_cache(load_catalog(catalog), cache, workers=1, progress=False)
    config = TrainConfig.model_validate(
        {"catalog": str(catalog), "cache": str(cache), "output": str(tmp_path / "run"), "steps": 1}
    )
    with write_lock(cache):
        with pytest.raises(DataError, match=r"`hermes prepare` is writing this cache \(lock .* held by pid \d+ since"):
            train(config, progress=False)
        with pytest.raises(DataError, match="is writing this cache"):
            open_cache(cache)
    assert not (tmp_path / "run").exists()
    # While a training run reads the cache (shared lock), a prepare waits; --no-wait refuses.
    with read_lock(cache), read_lock(cache):  # readers share
        with pytest.raises(DataError, match=r"the cache is in use .* held by a reader"):
            prepare_cache(load_catalog(catalog), cache, workers=1, progress=False, wait=False)
        assert open_cache(cache).cases["Toy"]["train"]
    assert prepare_cache(load_catalog(catalog), cache, workers=1, progress=False, wait=False).reused == 3

    # `train` itself holds the shared lock for its whole run.
    def training_body(*args, **kwargs):
        with pytest.raises(DataError, match="the cache is in use"):
            prepare_cache(load_catalog(catalog), cache, workers=1, progress=False, wait=False)
        return "trained"

    monkeypatch.setattr(trainer_module, "_train", training_body)
    assert train(config, progress=False) == "trained"


# --------------------------------------------------------------------------------------------
# Another catalog into an existing cache
# --------------------------------------------------------------------------------------------
def test_another_catalog_needs_add_or_replace(toy, tmp_path: Path) -> None:
    a, b = toy
    cache = tmp_path / "cache"
    prepare_cache(load_catalog(a), cache, workers=1, progress=False)
    before = tree(cache)
    with pytest.raises(DataError, match=(
        r"holds a cache of another catalog \(new dataset\(s\) Other; cached dataset\(s\) not in this catalog: Toy\); "
        r"use --add .* --replace .* or another --out"
    )):
        prepare_cache(load_catalog(b), cache, workers=1, progress=False)
    assert tree(cache) == before
    # The same catalog again resumes; only a changed task mapping is still the same cache.
    assert prepare_cache(load_catalog(a), cache, workers=1, progress=False).reused == 3
    renamed = catalog_yaml(tmp_path / "a2.yaml", load_catalog(a).datasets[0].path)
    spec = yaml.safe_load(renamed.read_text())
    spec["datasets"][0]["tasks"] = {"organ": "kidney"}
    renamed.write_text(yaml.safe_dump(spec))
    assert prepare_cache(load_catalog(renamed), cache, workers=1, progress=False).reused == 3
    # Changed settings are another cache.
    slow = catalog_yaml(tmp_path / "a3.yaml", load_catalog(a).datasets[0].path, preprocessing={"target_spacing": [2.0, 2.0, 2.0]})
    with pytest.raises(DataError, match=(
        r"another catalog \(preprocessing differs \(target_spacing: cached None, now \[2.0, 2.0, 2.0\]\)\); "
        r"use --replace to start it over, or another --out"
    )):
        prepare_cache(load_catalog(slow), cache, workers=1, progress=False)

    # --add keeps the cached dataset's cases and adds the new one.
    report = prepare_cache(load_catalog(b), cache, workers=1, progress=False, mode="add")
    assert (report.reused, report.processed) == (3, 2)
    index = open_cache(cache)
    assert {e.name for e in index.catalog.datasets} == {"Toy", "Other"}
    assert len(index.cases["Toy"]["train"]) == 3 and len(index.cases["Other"]["train"]) == 2
    assert all(before[key] == digest for key, digest in tree(cache).items() if key.startswith("Toy/"))
    both = catalog_yaml(tmp_path / "ab.yaml", load_catalog(a).datasets[0].path, load_catalog(b).datasets[0].path)
    assert prepare_cache(load_catalog(both), cache, workers=1, progress=False).reused == 5  # that is the cache now

    # A same-named dataset from another source is still an error with --add.
    impostor = toy_dataset(tmp_path / "elsewhere", "Toy", seed=5)
    other_toy = catalog_yaml(tmp_path / "c.yaml", impostor)
    with pytest.raises(DataError, match=r"--add: dataset 'Toy' differs \(path: cached '.*Dataset903_Toy', now '.*elsewhere.*'\)"):
        prepare_cache(load_catalog(other_toy), cache, workers=1, progress=False, mode="add")
    # --replace starts over: the result is a clean run of the new catalog.
    prepare_cache(load_catalog(other_toy), cache, workers=1, progress=False, mode="replace")
    clean = tmp_path / "clean"
    prepare_cache(load_catalog(other_toy), clean, workers=1, progress=False)
    assert tree(cache) == tree(clean)


def test_add_keeps_the_cached_ct_normalisation(small_cohort: Path, tmp_path: Path) -> None:
    """A CT dataset added later is normalised like the cached CT cases (one CT scheme per cache)."""
    folders = {p.name.split("_", 1)[1]: p for p in small_cohort.glob("Dataset*")}
    first = catalog_yaml(tmp_path / "first.yaml", folders["KidneyCT"])
    second = catalog_yaml(tmp_path / "second.yaml", folders["LiverCT"])
    cache = tmp_path / "cache"
    prepare_cache(load_catalog(first), cache, workers=1, progress=False)
    kidney = open_cache(cache).plans["KidneyCT"].channels[0]
    report = prepare_cache(load_catalog(second), cache, workers=1, progress=False, mode="add")
    kidney_cases = open_cache(cache).cases["KidneyCT"]
    assert report.reused == len(kidney_cases["train"]) + len(kidney_cases["test"]) > 0  # cached cases kept
    liver = open_cache(cache).plans["LiverCT"].channels[0]
    assert (liver.ct_mean, liver.ct_std) == (kidney.ct_mean, kidney.ct_std)
    alone = tmp_path / "alone"
    prepare_cache(load_catalog(second), alone, workers=1, progress=False)
    assert open_cache(alone).plans["LiverCT"].channels[0].ct_mean != kidney.ct_mean  # pinning mattered


# --------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------
def test_truncated_array_is_named_and_repaired(toy, tmp_path: Path, capsys) -> None:
    from hermes.config import DataConfig
    from hermes.data.sampling import PatchSampler

    catalog_path, _ = toy
    catalog = load_catalog(catalog_path)
    cache = tmp_path / "cache"
    prepare_cache(catalog, cache, workers=1, progress=False)
    clean = tree(cache)
    meta = json.loads((cache / "Toy" / "case1" / "meta.json").read_text())
    assert set(meta["files"]) == {"image.npy", "label.npy", "fg.npy"}
    image = cache / "Toy" / "case1" / "image.npy"
    assert meta["files"]["image.npy"]["size"] == image.stat().st_size
    with open(image, "r+b") as handle:
        handle.truncate(image.stat().st_size - 100)

    message = rf"{image}: cached array has \d+ bytes, \d+ were written \(truncated or overwritten\); run `hermes prepare CATALOG --out .* --verify`"
    with pytest.raises(DataError, match=message):
        load_cached_case(cache, "Toy", "case1")
    sampler = PatchSampler(catalog, str(cache), DataConfig(patch_size=[16, 16, 16], batch_size=8, num_workers=0),
                           {"Toy": ["case0", "case1", "case2"]}, seed=0)
    with pytest.raises(DataError, match=message):  # what training would hit
        for index in range(4):
            sampler.batch(index)
    # `hermes train` names it before the first step (not inside a DataLoader worker).
    from hermes.cli import main

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "catalog": str(catalog_path), "cache": str(cache), "output": str(tmp_path / "run"), "steps": 1,
        "data": {"patch_size": [32, 32, 32], "num_workers": 2}, "model": {"preset": "tiny"},
    }))
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(f"hermes train: error: {message}", err) and "Traceback" not in err and "worker" not in err, err
    # An old cache (no size record): the npy header still tells the size.
    old_meta = {k: v for k, v in meta.items() if k != "files"}
    (cache / "Toy" / "case1" / "meta.json").write_text(json.dumps(old_meta, indent=2) + "\n")
    with pytest.raises(DataError, match=rf"{image}: cached array has \d+ bytes, its header \(float32 .*\) needs \d+ \(truncated\)"):
        load_cached_case(cache, "Toy", "case1")

    # A plain re-run no longer calls it reused: it is redone, and the cache is whole again.
    report = prepare_cache(catalog, cache, workers=1, progress=False)
    assert (report.processed, report.reused, list(report.repaired)) == (1, 2, ["Toy/case1"])
    assert "truncated" in report.repaired["Toy/case1"] and "corrupt case(s) redone" in report.summary()
    assert tree(cache) == clean

    # Same size, flipped bytes: only --verify's checksum sees it.
    label = cache / "Toy" / "case2" / "label.npy"
    data = bytearray(label.read_bytes())
    data[-10] ^= 0xFF
    label.write_bytes(bytes(data))
    assert prepare_cache(catalog, cache, workers=1, progress=False).reused == 3
    report = prepare_cache(catalog, cache, workers=1, progress=False, verify=True)
    assert list(report.repaired) == ["Toy/case2"] and "checksum mismatch" in report.repaired["Toy/case2"]
    assert tree(cache) == clean
    assert prepare_cache(catalog, cache, workers=1, progress=False, verify=True).reused == 3


def test_verify_cli_reports_and_repairs(toy, tmp_path: Path) -> None:
    catalog, _ = toy
    cache = tmp_path / "cache"
    prepare_cache(load_catalog(catalog), cache, workers=1, progress=False)
    fg = cache / "Toy" / "case0" / "fg.npy"
    fg.write_bytes(fg.read_bytes()[:40])  # inside the header
    rc, out, err = PrepareRun(tmp_path / "log", str(catalog), "--out", str(cache), "--verify").finish()
    assert rc == 0, err
    assert "1 case(s) preprocessed, 2 reused, 1 corrupt case(s) redone" in out
    assert f"redone (corrupt) Toy/case0: {fg}:" in out
    load_cached_case(cache, "Toy", "case0").foreground()

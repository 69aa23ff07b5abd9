"""Preprocessing: exact inverse, normalisation, bad inputs, resumable/atomic `hermes prepare`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from hermes.data.cache import load_cached_case, open_cache, prepare_cache
from hermes.data.catalog import load_catalog
from hermes.data.imageio import Image, load_image, save_image
from hermes.data.normalization import ChannelNorm
from hermes.data.preprocess import PreprocessPlan, preprocess_image, restore_to_original, to_cache_space
from hermes.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def phantom(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A body (value 100) on an air background (0) holding two nested ellipsoid labels."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum(g**2 for g in grids)
    label = np.zeros(shape, np.uint8)
    label[sum(((g - 0.1) / 0.45) ** 2 for g in grids) < 1] = 1
    label[sum(((g + 0.1) / 0.25) ** 2 for g in grids) < 1] = 2
    image = np.where(r2 < 0.9, 100.0 + 20.0 * label, 0.0) + rng.normal(0, 3, shape) * (r2 < 0.9)
    return image.astype(np.float32), label


def mr_plan(spacing: tuple[float, float, float], family: str = "mr") -> PreprocessPlan:
    return PreprocessPlan("toy", "T1", spacing, (ChannelNorm(family),))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def lps_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [40.0, -12.0, 7.5]
    return affine


@pytest.mark.parametrize(
    ("spacing", "target", "exact"),
    [
        ((0.8, 0.8, 3.0), (0.8, 0.8, 3.0), True),  # anisotropic kept: reorient + crop only
        ((0.8, 0.8, 3.0), (0.5, 0.5, 1.5), True),  # upsampled: nearest restores exactly
        ((1.0, 1.0, 1.0), (1.3, 1.1, 0.9), False),  # mixed down/up sampling
    ],
)
def test_label_round_trip_non_ras(spacing, target, exact) -> None:
    image, label = phantom((64, 56, 24) if spacing[2] > 1 else (64, 56, 60))
    affine = lps_affine(spacing)
    array, meta = preprocess_image(Image(image, affine), mr_plan(target))
    assert meta["original_axis_codes"] == "LPS" and array.shape[1:] == tuple(meta["cache_shape"])
    cached = to_cache_space(label, meta, order=0)
    assert set(np.unique(cached)) <= {0, 1, 2}
    restored = restore_to_original(cached, meta, order=0)
    assert restored.shape == label.shape and restored.dtype == label.dtype
    np.testing.assert_allclose(meta["original_affine"], affine)
    # Nearest-neighbour label maps come back exactly unless the cache grid is coarser; then
    # sub-voxel detail is lost (probabilities, the predictor's path below, keep it).
    for value in (1, 2):
        assert dice(restored == value, label == value) > (0.999999 if exact else 0.97)
    # The cache grid's affine places each structure where it is in the world.
    for value in (1, 2):
        world_original = (affine @ np.r_[np.argwhere(label == value).mean(0), 1])[:3]
        world_cache = (np.asarray(meta["cache_affine"]) @ np.r_[np.argwhere(cached == value).mean(0), 1])[:3]
        assert np.abs(world_original - world_cache).max() < max(target)
    # Probabilities restored with order 1 and thresholded agree too (the predictor's path).
    for value in (1, 2):
        prob = to_cache_space((label == value).astype(np.float32), meta, order=1)
        assert dice(restore_to_original(prob, meta, order=1) > 0.5, label == value) > 0.99


def test_unlabelled_image_from_file_restores_on_its_grid(tmp_path: Path) -> None:
    image, _ = phantom((40, 40, 30))
    image[:6] = 0  # empty slab: outside the body, cropped away
    path = save_image(tmp_path / "img.nii.gz", image, lps_affine((1.0, 1.0, 2.0)))
    array, meta = preprocess_image(path, mr_plan((1.0, 1.0, 2.0)))
    box = meta["crop_box"][0]
    assert box[1] - box[0] < 40 and array.shape[1] == box[1] - box[0]
    back = restore_to_original(array[0], meta, order=1, fill=-7.0)
    assert back.shape == image.shape and np.all(back[:6] == -7.0)
    assert (back != -7.0).sum() == np.prod([hi - lo for lo, hi in meta["crop_box"]])


def test_normalisation_per_family() -> None:
    rng = np.random.default_rng(0)
    body = np.zeros((30, 30, 30), bool)
    body[5:25, 5:25, 5:25] = True
    ct = np.where(body, rng.normal(40, 30, body.shape), -1024.0)
    ct_plan = PreprocessPlan("ct", "CT", (1.0, 1.0, 1.0), (ChannelNorm("ct", ct_window=(-1000, 1000), ct_mean=40, ct_std=200),))
    out, meta = preprocess_image(Image(ct.astype(np.float32), np.eye(4)), ct_plan)
    assert out.shape[1:] == (20, 20, 20)  # cropped to the body (air below -500 HU)
    assert abs(float(out.mean())) < 0.05 and 0.1 < float(out.std()) < 0.2  # (x - 40) / 200
    mr = np.where(body, rng.gamma(2.0, 300.0, body.shape), 0.0).astype(np.float32)
    out, meta = preprocess_image(Image(mr, np.eye(4)), mr_plan((1.0, 1.0, 1.0)))
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1) < 1e-3  # per-volume z-score
    pet = np.where(body, rng.gamma(1.0, 2.0, body.shape), 0.0).astype(np.float32)
    out, meta = preprocess_image(Image(pet, np.eye(4)), mr_plan((1.0, 1.0, 1.0), "pet"))
    assert float(out.min()) >= 0.0 and meta["normalization"][0]["scale"] > 0
    assert float(np.percentile(out, 99.5)) == pytest.approx(np.log(2.0), abs=0.02)


def write_dataset(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """nnU-Net folder; cases: id -> (image, image affine, label, label affine)."""
    folder = root / "Dataset900_Toy"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    labels = {"background": 0, "outer": 1, "inner": 2}
    (folder / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "T1"}, "labels": labels, "file_ending": ".nii.gz", "numTraining": len(cases)})
    )
    for case_id, (image, img_affine, label, lab_affine) in cases.items():
        save_image(folder / "imagesTr" / f"{case_id}_0000.nii.gz", image, img_affine)
        save_image(folder / "labelsTr" / f"{case_id}.nii.gz", label, lab_affine)
    return folder


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        ("label_values", r"label values \[7\] are not in dataset.json"),
        ("label_shape", r"label shape .* differs from the image shape"),
        ("label_affine", r"label affine differs"),
        ("nan", r"NaN"),
        ("constant", r"constant"),
        ("flat", r"2D image"),
    ],
)
def test_bad_cases_error_or_skip(tmp_path: Path, corrupt: str, message: str) -> None:
    image, label = phantom((20, 20, 16))
    affine = np.eye(4)
    bad_image, bad_label, label_affine = image.copy(), label.copy(), affine.copy()
    if corrupt == "label_values":
        bad_label[0, 0, 0] = 7
    elif corrupt == "label_shape":
        bad_label = bad_label[:-1]
    elif corrupt == "label_affine":
        label_affine[0, 3] = 5.0
    elif corrupt == "nan":
        bad_image[3, 3, 3] = np.nan
    elif corrupt == "constant":
        bad_image[:] = 5.0
    elif corrupt == "flat":
        bad_image, bad_label = bad_image[:, :, :1], bad_label[:, :, :1]
    folder = write_dataset(
        tmp_path, {"good": (image, affine, label, affine), "bad": (bad_image, affine, bad_label, label_affine)}
    )
    spec = {"datasets": [{"path": str(folder)}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DataError, match=message):
        prepare_cache(load_catalog(tmp_path / "c.yaml"), tmp_path / "cache", workers=1, progress=False)
    spec["preprocessing"] = {"on_bad_case": "skip"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    report = prepare_cache(load_catalog(tmp_path / "c.yaml"), tmp_path / "cache", workers=1, progress=False)
    assert list(report.skipped) == ["Toy/bad"] and report.processed + report.reused == 1
    index = open_cache(tmp_path / "cache")
    assert index.cases["Toy"]["train"] == ["good"] and "Toy/bad" in index.skipped
    assert not (tmp_path / "cache" / "Toy" / "bad").exists()


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        preprocess_image(tmp_path / "nope.nii.gz", mr_plan((1.0, 1.0, 1.0)))


def catalog_file(tmp_path: Path, cohort: Path, names: list[str] | None = None) -> Path:
    folders = sorted(p for p in cohort.glob("Dataset*") if names is None or any(n in p.name for n in names))
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"datasets": [{"path": str(p)} for p in folders]}))
    return path


def test_cache_contract_and_fast_resume(small_cohort: Path, tmp_path: Path) -> None:
    catalog = load_catalog(catalog_file(tmp_path, small_cohort, ["AbdomenCT", "BrainT1", "LesionPET"]))
    start = time.perf_counter()
    first = prepare_cache(catalog, tmp_path / "cache", workers=2, progress=False)
    first_time = time.perf_counter() - start
    start = time.perf_counter()
    second = prepare_cache(catalog, tmp_path / "cache", workers=2, progress=False)
    second_time = time.perf_counter() - start
    assert first.processed > 0 and second.processed == 0 and second.reused == first.processed
    assert second_time < 0.1 * first_time, (first_time, second_time)

    index = open_cache(tmp_path / "cache")
    assert set(index.plans) == {"AbdomenCT", "BrainT1", "LesionPET"}
    ct_norm = index.plans["AbdomenCT"].channels[0]
    assert ct_norm.family == "ct" and ct_norm.ct_std > 1  # pooled HU statistics
    case_id = index.cases["AbdomenCT"]["train"][0]
    case = load_cached_case(tmp_path / "cache", "AbdomenCT", case_id)
    assert isinstance(case.image, np.memmap) and case.image.dtype == np.float32 and case.image.ndim == 4
    assert case.label is not None and case.label.dtype == np.uint8 and case.label.shape == case.image.shape[1:]
    entry = catalog.dataset("AbdomenCT")
    assert set(np.unique(case.label)) <= set(entry.labels.values())  # original label values
    for key in ("original_shape", "original_affine", "orientation", "crop_box", "spacing_cache", "sources", "split"):
        assert key in case.meta
    # Restoring the cached label reproduces the source label on its own grid.
    source = load_image(Path(case.meta["label_source"]["path"]))
    restored = restore_to_original(np.asarray(case.label), case.meta, order=0)
    assert restored.shape == source.array.shape
    for value in case.meta["labels_present"]:
        assert dice(restored == int(value), source.array == int(value)) > 0.99
    # A changed source is redone, nothing else.
    image_path = Path(case.meta["sources"][0]["path"])
    os.utime(image_path, ns=(time.time_ns(), time.time_ns()))
    third = prepare_cache(catalog, tmp_path / "cache", workers=1, progress=False)
    assert third.processed == 1


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sigkill_then_resume_equals_clean_run(small_cohort: Path, tmp_path: Path) -> None:
    catalog = catalog_file(tmp_path, small_cohort, ["KidneyCT", "AbdomenT1"])
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "hermes.cli", "prepare", str(catalog), "--out", str(killed), "--workers", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    written = 0
    while time.time() < deadline and process.poll() is None:
        written = len(list(killed.glob("*/*/meta.json")))
        if written >= 3:
            break
        time.sleep(0.01)
    assert process.poll() is None, f"prepare ended before it could be killed: {process.stderr.read().decode()}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert written >= 3 and not (killed / "cache.json").exists()

    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    clean = tmp_path / "clean"
    prepare_cache(load_catalog(catalog), clean, workers=1, progress=False)
    assert tree_hashes(killed) == tree_hashes(clean)


def realmini_subset(root: Path, tmp_path: Path, folder: str, train: int, test: int) -> Path:
    """A view of a realmini dataset with its first few cases (symlinks, nothing copied)."""
    source = root / folder
    target = tmp_path / folder
    meta = json.loads((source / "dataset.json").read_text())
    for split, count in (("Tr", train), ("Ts", test)):
        images = sorted((source / f"images{split}").glob("*_0000.nii.gz"))[:count]
        if not images:
            continue
        (target / f"images{split}").mkdir(parents=True, exist_ok=True)
        (target / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for image in images:
            case_id = image.name[: -len("_0000.nii.gz")]
            (target / f"images{split}" / image.name).symlink_to(image)
            (target / f"labels{split}" / f"{case_id}.nii.gz").symlink_to(source / f"labels{split}" / f"{case_id}.nii.gz")
    meta["numTraining"] = train
    (target / "dataset.json").write_text(json.dumps(meta))
    return target


@pytest.mark.realmini
def test_realmini_lps_tiny_and_test_only(realmini_root: Path, tmp_path: Path) -> None:
    datasets = [
        {"path": str(realmini_subset(realmini_root, tmp_path, "Dataset502_HippocampusMR", 3, 1))},
        {"path": str(realmini_subset(realmini_root, tmp_path, "Dataset504_BrainTumourMR", 1, 0))},
        {"path": str(realmini_subset(realmini_root, tmp_path, "Dataset505_TotalSegCT", 0, 1)), "test_only": True},
    ]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"datasets": datasets}))
    catalog = load_catalog(tmp_path / "c.yaml")
    prepare_cache(catalog, tmp_path / "cache", workers=1, progress=False)
    index = open_cache(tmp_path / "cache")
    assert len(index.cases["HippocampusMR"]["train"]) == 3 and index.cases["TotalSegCT"]["test"]
    assert index.plans["BrainTumourMR"].target_spacing == (1.0, 1.0, 1.0)
    # BraTS is stored LPS; its label comes back exactly, on its own grid.
    case = index.load("BrainTumourMR", index.cases["BrainTumourMR"]["train"][0])
    assert case.meta["original_axis_codes"] == "LPS" and case.meta["crop_box"] != [[0, 240], [0, 240], [0, 155]]
    source = load_image(case.meta["label_source"]["path"])
    np.testing.assert_array_equal(restore_to_original(np.asarray(case.label), case.meta, 0), source.array)
    # Tiny hippocampus volumes stay tiny (1 mm isotropic, nothing resampled).
    hippo = index.load("HippocampusMR", index.cases["HippocampusMR"]["train"][0])
    assert max(hippo.image.shape[1:]) < 64


@pytest.mark.slow
@pytest.mark.realmini
def test_full_catalog_prepares_end_to_end(realmini_root: Path, small_cohort: Path, tmp_path: Path) -> None:
    datasets = [{"path": str(p)} for p in sorted(small_cohort.glob("Dataset*"))]
    datasets += [{"path": str(p)} for p in sorted(realmini_root.glob("Dataset50[1-4]*"))]
    datasets.append({"path": str(realmini_root / "Dataset505_TotalSegCT"), "test_only": True})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"datasets": datasets}))
    catalog = load_catalog(tmp_path / "c.yaml")
    report = prepare_cache(catalog, tmp_path / "cache", workers=2, progress=False)
    index = open_cache(tmp_path / "cache")
    expected = sum(entry.num_train + entry.num_test for entry in catalog.datasets)
    assert report.processed == expected and not report.skipped
    assert sum(len(ids) for splits in index.cases.values() for ids in splits.values()) == expected


def test_file_removed_after_cataloguing_names_the_file(tmp_path: Path) -> None:
    image, label = phantom((20, 20, 16))
    folder = write_dataset(tmp_path, {"a": (image, np.eye(4), label, np.eye(4)), "b": (image, np.eye(4), label, np.eye(4))})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"datasets": [{"path": str(folder)}]}))
    catalog = load_catalog(tmp_path / "c.yaml")
    (folder / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(DataError, match=r"b_0000.nii.gz: training image without a label"):
        prepare_cache(catalog, tmp_path / "cache", workers=1, progress=False)

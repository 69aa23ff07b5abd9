"""The synthetic cohort: determinism, anatomy, protocols, modality contrast, nnU-Net validity, CLI."""

from __future__ import annotations

import argparse
import json
import types
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from hermes.data.imageio import axis_codes, load_image
from hermes.errors import ConfigError, DataError
from hermes.synthetic import generate_cohort, list_synthetic_datasets, make_case
from hermes.synthetic.datasets import select_datasets
from hermes.synthetic.phantoms import Tissue
from hermes.synthetic.render import render

SPECS = {d.short_name: d for d in list_synthetic_datasets()}


def _centroids(label_path: Path, names: dict[str, int]) -> dict[str, np.ndarray]:
    """World (RAS mm) centroid of each label, computed from the stored file and its affine."""
    image = load_image(label_path)
    out = {}
    for name, value in names.items():
        index = np.argwhere(image.array == value)
        assert len(index), f"{label_path.name}: label {name} is empty"
        out[name] = (image.affine @ np.append(index.mean(axis=0), 1.0))[:3]
    return out


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"scale": 0.5, "datasets": ["LiverCT"], "cases": 2, "test_cases": 1, "progress": False}
    (a,) = generate_cohort(tmp_path / "a", seed=3, **kwargs)
    (b,) = generate_cohort(tmp_path / "b", seed=3, **kwargs)
    (c,) = generate_cohort(tmp_path / "c", seed=4, **kwargs)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert len(files) == 6
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    label = Path("labelsTr/liverct_000.nii.gz")
    assert not np.array_equal(load_image(a / label).array, load_image(c / label).array)


def test_datasets_table_mimics_a_partially_labelled_collection() -> None:
    specs = list_synthetic_datasets()
    assert len(specs) >= 6
    assert {s.modality for s in specs} >= {"CT", "T1", "T2", "PET"}
    assert any(s.orientation != "RAS" for s in specs) and any(s.orientation == "RAS" for s in specs)
    assert any(max(s.spacing) / min(s.spacing) >= 2 for s in specs)  # anisotropic
    assert min(s.n_train for s in specs) <= 4
    assert SPECS["AbdomenCT"].label_names == ("liver", "spleen", "kidney_left", "kidney_right", "aorta")
    assert SPECS["LiverCT"].label_names == ("liver", "liver_tumour")
    assert SPECS["KidneyCT"].label_names == ("kidney", "kidney_tumour")
    assert SPECS["AbdomenT2"].label_names == ("liver", "kidney_right", "kidney_left", "spleen")
    assert SPECS["BrainT1"].label_names == ("grey_matter", "white_matter", "csf")
    assert SPECS["LesionPET"].label_names == ("lesion",)
    # Same organ, different protocols: BCV-like liver includes tumour voxels, LiTS-like excludes them.
    bcv, lits = SPECS["AbdomenCT"].label_lut(), SPECS["LiverCT"].label_lut()
    assert bcv[Tissue.LIVER_LESION] == 1 and lits[Tissue.LIVER_LESION] == 2 and lits[Tissue.LIVER] == 1
    assert SPECS["KidneyCT"].label_lut()[Tissue.KIDNEY_L] == SPECS["KidneyCT"].label_lut()[Tissue.KIDNEY_R] == 1
    with pytest.raises(ConfigError, match="unknown synthetic dataset"):
        select_datasets(["NoSuchSet"])


def test_small_cohort_files_labels_and_geometry(small_cohort: Path) -> None:
    for spec in list_synthetic_datasets():
        folder = small_cohort / spec.name
        meta = json.loads((folder / "dataset.json").read_text())
        assert meta["labels"] == {"background": 0, **{n: i + 1 for i, n in enumerate(spec.label_names)}}
        assert meta["channel_names"] == {"0": spec.modality}
        label = load_image(folder / "labelsTr" / f"{spec.short_name.lower()}_000.nii.gz")
        image = load_image(folder / "imagesTr" / f"{spec.short_name.lower()}_000_0000.nii.gz")
        assert axis_codes(label.affine) == spec.orientation
        np.testing.assert_allclose(image.affine, label.affine)
        assert image.array.shape == label.array.shape
        assert label.spacing == pytest.approx(spec.spacing_for(0.5))
        assert set(np.unique(label.array)) <= set(range(len(spec.label_names) + 1))
        assert image.array.dtype == (np.int16 if spec.modality == "CT" else np.float32)


@pytest.mark.parametrize("short", ["AbdomenCT", "AbdomenT2", "AbdomenT1"])  # stored LPS, LPS, ASL
def test_anatomical_relations_in_world_space(small_cohort: Path, short: str) -> None:
    spec = SPECS[short]
    names = {n: i + 1 for i, n in enumerate(spec.label_names)}
    for label_path in sorted((small_cohort / spec.name / "labelsTr").glob("*.nii.gz")):
        c = _centroids(label_path, names)
        # RAS+: +x = patient's right, +y = anterior, +z = superior.
        assert c["liver"][0] > 0 > c["spleen"][0], label_path.name
        assert c["kidney_right"][0] > 0 > c["kidney_left"][0], label_path.name
        assert c["spleen"][1] < c["liver"][1], label_path.name  # spleen posterior to the liver
        for kidney in ("kidney_right", "kidney_left"):
            assert c[kidney][1] < c["liver"][1] and c[kidney][2] < c["liver"][2], label_path.name
        if "aorta" in c:
            assert c["aorta"][0] < 0, label_path.name  # left of the midline
            assert c["aorta"][1] > max(c["kidney_right"][1], c["kidney_left"][1]), label_path.name


def test_organs_keep_their_shape_and_lesions_sit_inside_organs() -> None:
    for index in range(3):
        case = make_case(SPECS["AbdomenCT"], "train", index, seed=1, scale=0.5)
        counts = np.bincount(case.label.ravel(), minlength=6)
        for value, name in enumerate(SPECS["AbdomenCT"].label_names, start=1):
            # Priority painting resolves contacts; an organ must keep most of its own shape.
            assert counts[value] >= 0.7 * case.phantom.intended[name], (index, name)
    for spec, organ, lesion in ((SPECS["LiverCT"], 1, 2), (SPECS["KidneyCT"], 1, 2)):
        for index in range(3):
            label = make_case(spec, "train", index, seed=2, scale=0.5).label
            components, n = ndimage.label(label == lesion)
            assert n >= 1
            for k in range(1, n + 1):
                shell = ndimage.binary_dilation(components == k) & (components != k)
                assert (label[shell] == organ).mean() > 0.3, (spec.name, index, k)


def test_modalities_render_the_same_anatomy_differently() -> None:
    case = make_case(SPECS["LiverCT"], "train", 0, seed=0, scale=1.0)
    tissue, grid = case.phantom.tissue, case.phantom.grid
    # Organ interiors only: partial volume mixes the boundary voxels with the neighbours.
    inner = {t: ndimage.binary_erosion(tissue == t) for t in (Tissue.LIVER, Tissue.SPLEEN, Tissue.FAT, Tissue.LIVER_LESION)}
    means = {}
    for modality in ("CT", "T1", "T2", "PET"):
        image = render(tissue, grid, modality, np.random.default_rng(5))
        means[modality] = {t: float(np.median(image[mask])) for t, mask in inner.items()}
    ct = means["CT"]
    assert -130 < ct[Tissue.FAT] < -60
    assert 5 < ct[Tissue.SPLEEN] - ct[Tissue.LIVER] < 30  # close: needs shape/context, not a threshold
    assert ct[Tissue.LIVER_LESION] < ct[Tissue.LIVER] - 20
    assert means["T1"][Tissue.LIVER] > means["T1"][Tissue.SPLEEN]  # contrast orderings differ
    assert means["T2"][Tissue.LIVER] < means["T2"][Tissue.SPLEEN]
    assert means["T2"][Tissue.LIVER_LESION] > means["T2"][Tissue.LIVER]
    assert means["PET"][Tissue.LIVER_LESION] > 2 * means["PET"][Tissue.LIVER] > 2 * means["PET"][Tissue.FAT]
    brain = make_case(SPECS["BrainT1"], "train", 0, seed=0, scale=0.5)
    gm, wm, csf = (float(np.median(brain.image[brain.label == v])) for v in (1, 2, 3))
    assert wm > gm > csf
    scales = [float(np.percentile(make_case(SPECS["AbdomenT2"], "train", i, 0, 0.5).image, 99)) for i in range(4)]
    assert max(scales) / min(scales) > 1.5  # arbitrary MR intensity scale per case


def test_anatomy_size_is_physical_whatever_the_scale() -> None:
    spec = SPECS["AbdomenCT"]
    volumes = []
    for scale in (0.5, 1.0):
        case = make_case(spec, "train", 0, seed=0, scale=scale)
        voxel = float(np.prod(spec.spacing)) / scale**3
        volumes.append((case.label == 1).sum() * voxel)
    assert volumes[0] == pytest.approx(volumes[1], rel=0.1)
    assert 0.8e6 < volumes[1] < 3e6  # liver ~1-2 litres


def test_interrupted_generation_leaves_no_dataset_and_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hermes.synthetic.cohort as cohort

    real = cohort.make_case
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cohort, "make_case", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_cohort(tmp_path, scale=0.5, datasets=["106"], cases=2, test_cases=0, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temp folder
    monkeypatch.setattr(cohort, "make_case", real)
    (folder,) = generate_cohort(tmp_path, scale=0.5, datasets=["106"], cases=2, test_cases=0, progress=False)
    stamp = (folder / "dataset.json").stat().st_mtime_ns
    generate_cohort(tmp_path, scale=0.5, datasets=["106"], cases=2, test_cases=0, progress=False)
    assert (folder / "dataset.json").stat().st_mtime_ns == stamp  # same parameters: reused
    (folder / "dataset.json").write_text(json.dumps({"name": "mine"}))
    with pytest.raises(DataError, match="not a Hermes synthetic dataset"):
        generate_cohort(tmp_path, scale=0.5, datasets=["106"], cases=2, test_cases=0, progress=False)


def test_passes_nnunet_verify_dataset_integrity(small_cohort: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    # nnU-Net's own checks, run in threads: its spawn pool re-imports torch per call (~8 s each).
    monkeypatch.setattr(verify, "multiprocessing", types.SimpleNamespace(get_context=lambda _: types.SimpleNamespace(Pool=ThreadPool)))
    for spec in list_synthetic_datasets():
        verify.verify_dataset_integrity(str(small_cohort / spec.name), 2)


def test_cohort_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hermes.cli import cohort as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--scale", "0.5", "--datasets", "106", "LiverCT",
                              "--cases", "2", "--test-cases", "1", "--preview", "--quiet"])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "Dataset106_LesionPET" in out and "Dataset102_LiverCT" in out and "liver_tumour" in out
    assert "8x8x8" in out  # spacing column (PET 4 mm at scale 0.5)
    for name in ("Dataset106_LesionPET", "Dataset102_LiverCT"):
        assert (tmp_path / "previews" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.run(parser.parse_args(["--list"])) == 0
    assert "Dataset105_BrainT1" in capsys.readouterr().out
    with pytest.raises(ConfigError):
        cli.run(parser.parse_args(["--out", str(tmp_path), "--datasets", "nope"]))


def test_multi_sequence_brain_mr_is_four_channels_of_one_phantom(tmp_path: Path) -> None:
    """The optional BraTS-like dataset: FLAIR/T1/T1c/T2 of the same head on one grid, named as
    MSD's dataset.json names them; the tumour enhances on T1c, the oedema is brightest on FLAIR;
    only generated when named."""
    spec = select_datasets(["BrainTumourMR"])[0]
    assert spec not in list_synthetic_datasets() and spec in list_synthetic_datasets(include_optional=True)
    assert spec not in select_datasets(None)
    (folder,) = generate_cohort(tmp_path, scale=0.5, datasets=["108"], cases=2, test_cases=1, progress=False)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"] == {"background": 0, "edema": 1, "tumour": 2}
    images = [load_image(folder / "imagesTr" / f"braintumourmr_000_{c:04d}.nii.gz") for c in range(4)]
    label = load_image(folder / "labelsTr" / "braintumourmr_000.nii.gz")
    for image in images:
        assert image.array.shape == label.array.shape
        np.testing.assert_allclose(image.affine, label.affine)
    assert (label.array == 1).sum() > 0 and (label.array == 2).sum() > 0
    flair, t1, t1c, _t2 = (np.asarray(i.array, dtype=np.float64) for i in images)

    def median(image: np.ndarray, value: int) -> float:
        return float(np.median(image[label.array == value]))

    # (each sequence has its own scale: compare tissues within one image)
    assert median(t1c, 2) > 1.5 * median(t1c, 1) and median(t1, 2) < median(t1, 1)  # enhancing tumour
    case = make_case(spec, "train", 0, seed=0, scale=0.5)
    wm = case.phantom.tissue == Tissue.WHITE_MATTER
    assert median(flair, 1) > 1.5 * float(np.median(case.channels[0][wm]))

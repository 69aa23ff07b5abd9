"""Dataset readers (nnU-Net v2 raw, MSD) and the modality vocabulary."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from hermes.data.imageio import save_image
from hermes.data.modalities import ModalityVocabulary, canonical_modality
from hermes.data.readers import open_dataset
from hermes.errors import ConfigError, DataError

SPACING = np.diag([1.5, 1.5, 3.0, 1.0])


def _nnunet(root: Path, cases=("a", "b"), channels=("T2", "ADC"), test=("c",)) -> Path:
    folder = root / "Dataset900_Tiny"
    meta = {
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(meta))
    volume = np.zeros((6, 5, 4), np.float32)
    for split, ids in (("Tr", cases), ("Ts", test)):
        for case in ids:
            for c in range(len(channels)):
                save_image(folder / f"images{split}" / f"{case}_{c:04d}.nii.gz", volume, SPACING)
            save_image(folder / f"labels{split}" / f"{case}.nii.gz", volume.astype(np.uint8), SPACING)
    return folder


def test_nnunet_layout(tmp_path: Path) -> None:
    info = open_dataset(_nnunet(tmp_path))
    assert info.name == "Dataset900_Tiny" and info.layout == "nnunet"
    assert info.channel_names == ("T2", "ADC")
    assert info.labels == {"background": 0, "organ": 1, "lesion": 2}
    assert [c.case_id for c in info.train_cases()] == ["a", "b"]
    assert [c.case_id for c in info.test_cases()] == ["c"]
    case = info.case("a")
    assert [p.name for p in case.image_paths] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert case.label_path is not None and case.label_path.name == "a.nii.gz"
    assert info.spacing("a") == pytest.approx((1.5, 1.5, 3.0))
    # Test labels are optional.
    (info.path / "labelsTs" / "c.nii.gz").unlink()
    assert open_dataset(info.path).case("c").label_path is None


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda f: (f / "dataset.json").unlink(), "dataset.json not found"),
        (lambda f: (f / "dataset.json").write_text("{bad json"), "not valid JSON"),
        (lambda f: (f / "imagesTr" / "a_0001.nii.gz").unlink(), "a_0001.nii.gz: missing channel"),
        (lambda f: (f / "imagesTr" / "b_0000.nii.gz").rename(f / "imagesTr" / "b_0003.nii.gz"), "b_000"),
        (lambda f: (f / "labelsTr" / "a.nii.gz").unlink(), "a_0000.nii.gz: training image without a label"),
        (lambda f: (f / "labelsTr" / "a.nii.gz").rename(f / "labelsTr" / "z.nii.gz"), "z.nii.gz: label without an image"),
        (lambda f: (f / "labelsTs" / "c.nii.gz").rename(f / "labelsTs" / "q.nii.gz"), "q.nii.gz: label without an image"),
        (lambda f: (f / "imagesTr" / "a_0000.nii.gz").rename(f / "imagesTr" / "a.nii.gz"), "a.nii.gz: image file name"),
    ],
)
def test_nnunet_errors_name_the_file(tmp_path: Path, damage, match: str) -> None:
    folder = _nnunet(tmp_path)
    damage(folder)
    with pytest.raises(DataError, match=re.escape(match)):
        open_dataset(folder)


def test_bad_dataset_json_fields(tmp_path: Path) -> None:
    folder = _nnunet(tmp_path)
    meta = json.loads((folder / "dataset.json").read_text())
    for key, value, match in [
        ("labels", {"organ": 1}, "background"),
        ("labels", {"background": 0, "a": 1, "b": 1}, "repeated"),
        ("labels", {"background": 0, "whole": [1, 2]}, "region"),
        ("file_ending", ".png", "file_ending"),
        ("channel_names", {"1": "CT"}, "channel"),
    ]:
        (folder / "dataset.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(DataError, match=match):
            open_dataset(folder)
    (folder / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(DataError, match="neither"):
        open_dataset(folder)


def _msd(root: Path) -> Path:
    folder = root / "Task09_Spleen"
    folder.mkdir(parents=True)
    volume = np.zeros((6, 5, 4), np.float32)
    for name in ("spleen_2", "spleen_3"):
        save_image(folder / "imagesTr" / f"{name}.nii.gz", volume, SPACING)
        save_image(folder / "labelsTr" / f"{name}.nii.gz", volume.astype(np.uint8), SPACING)
    save_image(folder / "imagesTs" / "spleen_1.nii.gz", volume, SPACING)
    meta = {
        "name": "Spleen",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": 2,
        "training": [
            {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in ("spleen_2", "spleen_3")
        ],
        "test": ["./imagesTs/spleen_1.nii.gz"],
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def test_msd_layout_and_errors(tmp_path: Path) -> None:
    folder = _msd(tmp_path)
    info = open_dataset(folder)
    assert info.layout == "msd" and info.channel_names == ("CT",)
    assert info.labels == {"background": 0, "spleen": 1}
    assert [c.case_id for c in info.train_cases()] == ["spleen_2", "spleen_3"]
    assert info.test_cases()[0].label_path is None
    assert info.spacing(info.cases[0]) == pytest.approx((1.5, 1.5, 3.0))
    (folder / "labelsTr" / "spleen_3.nii.gz").unlink()
    with pytest.raises(DataError, match=re.escape("spleen_3.nii.gz: listed in")):
        open_dataset(folder)


def test_modality_names() -> None:
    assert canonical_modality("CT") == canonical_modality("ct") == "CT"
    assert canonical_modality("SUV") == canonical_modality("pet") == "PET"
    assert canonical_modality("T1w") == "T1" and canonical_modality("t2-w") == "T2"
    assert canonical_modality("flair") == "FLAIR" and canonical_modality("Cine") == "cine"
    # multi-sequence MR channels: BraTS's "t1gd"/"T1ce", prostate's "ADC", diffusion
    assert canonical_modality("t1gd") == canonical_modality("T1ce") == canonical_modality("T1-Gd") == "T1c"
    assert canonical_modality("ADC") == "ADC" and canonical_modality("dwi") == "DWI"
    for vague in ("MRI", "MR", "noNorm", "zscore", "whatever"):
        assert canonical_modality(vague) == "unknown"
    vocab = ModalityVocabulary.builtin()
    # the original seven keep their ids; the multi-channel sequences follow
    assert vocab.names == ["CT", "PET", "T1", "T2", "FLAIR", "LGE", "cine", "T1c", "ADC", "DWI"]
    assert vocab.id("ct") == 0 and vocab.id("MRI") == vocab.unknown_id == 10
    assert vocab.family("SUV") == "pet" and vocab.family("T2w") == "mr" and vocab.family("t1gd") == "mr"
    assert vocab.add("SWI", "mr") == 10 and vocab.unknown_id == 11 and vocab.id("swi") == 10
    with pytest.raises(ConfigError):
        vocab.add("SWI", "ct")
    # a vocabulary saved before T1c existed (an older model's) keeps calling it unknown
    old = ModalityVocabulary.from_names(["CT", "PET", "T1", "T2", "FLAIR", "LGE", "cine"])
    assert old.lookup("t1gd") == "unknown" and old.id("ADC") == old.unknown_id == 7
    with pytest.raises(ConfigError):
        vocab.add("X", "xray")
    assert ModalityVocabulary.from_dict(vocab.to_dict()).names == vocab.names


@pytest.mark.realmini
def test_realmini_datasets(realmini_root: Path) -> None:
    manifest = list(csv.DictReader((realmini_root / "MANIFEST.tsv").open(), delimiter="\t"))
    folders = sorted(realmini_root.glob("Dataset*"))
    assert len(folders) == 5
    for folder in folders:
        info = open_dataset(folder)
        meta = json.loads((folder / "dataset.json").read_text())
        assert len(info.train_cases()) == meta["numTraining"]
        assert len(info.test_cases()) == meta["numTest"]
        assert all(c.label_path is not None for c in info.cases)
        rows = {r["case"]: r for r in manifest if r["dataset"] == folder.name}
        assert set(rows) == {c.case_id for c in info.cases}
        case = info.cases[0]
        expected = [float(v) for v in rows[case.case_id]["spacing"].split("x")]
        assert info.spacing(case) == pytest.approx(expected, abs=2e-3)


def test_synthetic_cohort_is_readable(small_cohort: Path) -> None:
    from hermes.synthetic import list_synthetic_datasets

    described = {d.name: d for d in list_synthetic_datasets()}
    folders = sorted(small_cohort.glob("Dataset*"))
    assert {f.name for f in folders} == set(described)
    for folder in folders:
        info = open_dataset(folder)
        spec = described[info.name]
        assert info.channel_names == (spec.modality,)
        assert list(info.labels) == ["background", *spec.label_names]
        assert len(info.train_cases()) == 3  # the fixture overrides every training count
        assert all(c.label_path is not None for c in info.cases)
        assert info.spacing(info.cases[0]) == pytest.approx(spec.spacing_for(0.5), rel=1e-5)

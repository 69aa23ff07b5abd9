"""Case-level partial labels: sources (sidecar, table, rule), catalog show, cache, loss, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from hermes.cli import main
from hermes.data.annotation import annotated_of_label, label_presence, task_annotation
from hermes.data.catalog import Catalog, load_catalog
from hermes.data.imageio import save_image
from hermes.errors import ConfigError, DataError

SHAPE = (12, 12, 12)


def _label(case: int) -> np.ndarray:
    """organ (1) everywhere but case 1, lesion (2) only in cases 0 and 3."""
    label = np.zeros(SHAPE, np.uint8)
    if case != 1:
        label[2:6, 2:6, 2:6] = 1
    if case in (0, 3):
        label[7:10, 7:10, 7:10] = 2
    return label


def make_dataset(root: Path, n_train: int = 4, n_test: int = 0) -> Path:
    """A tiny CT dataset with an organ and a lesion; the organ is missing from case 1."""
    folder = root / "Dataset910_Partial"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "organ": 1, "lesion": 2},
                "file_ending": ".nii.gz",
                "numTraining": n_train,
            }
        )
    )
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for split, count in (("Tr", n_train), ("Ts", n_test)):
        for i in range(count):
            label = _label(i)
            image = (rng.normal(0, 20, SHAPE) + 200.0 * (label == 1) + 400.0 * (label == 2)).astype(np.int16)
            save_image(folder / f"images{split}" / f"case{i}_0000.nii.gz", image, affine)
            save_image(folder / f"labels{split}" / f"case{i}.nii.gz", label, affine)
    return folder


def write_catalog(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def present(folder: Path, case: str, split: str = "Tr") -> set[int]:
    from hermes.data.imageio import load_image

    return {int(v) for v in np.unique(load_image(folder / f"labels{split}" / f"{case}.nii.gz").array)}


# --------------------------------------------------------------------------------------------
# 1. sources and catalog
# --------------------------------------------------------------------------------------------
def test_default_rule_is_background(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path)
    entry = load_catalog(write_catalog(tmp_path / "c.yaml", {"datasets": [{"path": str(folder)}]})).datasets[0]
    for i in range(4):
        annotated = annotated_of_label(entry, f"case{i}", folder / "labelsTr" / f"case{i}.nii.gz", present(folder, f"case{i}"))
        assert annotated == [1, 2]  # absent means background: every label annotated, as before


def test_rule_sidecar_and_table_precedence(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path)
    # Rule: an absent organ is unannotated; a lesion stays "none here".
    (tmp_path / "cases.tsv").write_text("dataset\tcase\tannotated\nPartial\tcase1\torgan, lesion\nOther\tcase2\t\n")
    (folder / "labelsTr" / "case3.json").write_text(json.dumps({"annotated": ["organ"]}))
    (folder / "labelsTr" / "case1.json").write_text(json.dumps(["lesion"]))  # beats the table row
    spec = {"datasets": [{"path": str(folder), "absent_means": {"organ": "unannotated"}, "annotations": "cases.tsv"}]}
    catalog = load_catalog(write_catalog(tmp_path / "c.yaml", spec))
    entry = catalog.datasets[0]
    assert entry.absent_unannotated == (1,)
    assert entry.annotations == {"case1": (1, 2)}  # the "Other" dataset's row is ignored

    def annotated(i: int) -> list[int]:
        return annotated_of_label(entry, f"case{i}", folder / "labelsTr" / f"case{i}.nii.gz", present(folder, f"case{i}"))

    assert annotated(0) == [1, 2]  # both present
    assert annotated(1) == [2]  # sidecar: only the lesion, though the table row says both
    assert annotated(2) == [1, 2]  # rule: organ present, absent lesion = background
    assert annotated(3) == [1]  # sidecar is the whole truth: the present lesion is unannotated
    (folder / "labelsTr" / "case1.json").unlink()
    assert annotated(1) == [1, 2]  # the table row: organ annotated although absent
    (tmp_path / "cases.tsv").write_text("case\tannotated\n")
    entry = load_catalog(tmp_path / "c.yaml").datasets[0]
    assert annotated(1) == [2]  # the rule: absent organ = unannotated
    # Tasks: a nested task is annotated only if all its labels are.
    spec["datasets"][0]["nested_tasks"] = {"both": ["organ", "lesion"]}
    entry = load_catalog(write_catalog(tmp_path / "c.yaml", spec)).datasets[0]
    assert task_annotation(entry, annotated(3)) == [True, False, False]
    assert task_annotation(entry, None) == [True, True, True]
    # Everything survives serialisation (caches and models carry the catalog).
    again = Catalog.from_dict(json.loads(json.dumps(catalog.to_dict()))).datasets[0]
    assert again.absent_unannotated == (1,) and again.annotations == {"case1": (1, 2)}
    old = catalog.to_dict()
    for key in ("absent_unannotated", "annotations", "annotations_path"):
        del old["datasets"][0][key]
    legacy = Catalog.from_dict(old).datasets[0]  # a catalog saved before this feature
    assert legacy.absent_unannotated == () and legacy.annotations is None


def test_scalar_rule_applies_to_every_label(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path)
    spec = {"datasets": [{"path": str(folder), "absent_means": "unannotated"}]}
    entry = load_catalog(write_catalog(tmp_path / "c.yaml", spec)).datasets[0]
    assert entry.absent_unannotated == (1, 2)
    assert annotated_of_label(entry, "case2", folder / "labelsTr" / "case2.nii.gz", present(folder, "case2")) == [1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d, t: d.update(absent_means={"organz": "unannotated"}), r"datasets\[0\]\.absent_means\.organz.*not a foreground label"),
        (lambda d, t: d.update(absent_means={"organ": "maybe"}), r"datasets\.0\.absent_means.*'background' or 'unannotated'"),
        (lambda d, t: d.update(annotations="missing.tsv"), r"datasets\[0\]\.annotations: annotation table not found"),
        (
            lambda d, t: (t.write_text("case\tlabels\ncase1\torgan\n"), d.update(annotations=t.name)),
            r"datasets\[0\]\.annotations: .*cases.tsv: the header needs a 'case' and an 'annotated' column",
        ),
        (
            lambda d, t: (t.write_text("case\tannotated\ncase1\torgan\ncase2\ttumour\n"), d.update(annotations=t.name)),
            r"datasets\[0\]\.annotations: .*cases.tsv: line 3: annotated: 'tumour' is not a label",
        ),
        (
            lambda d, t: (t.write_text("case\tannotated\ncase9\torgan\n"), d.update(annotations=t.name)),
            r"cases.tsv: case\(s\) not in the dataset: case9",
        ),
    ],
)
def test_annotation_errors_name_file_and_key(tmp_path: Path, edit, message: str) -> None:
    folder = make_dataset(tmp_path)
    dataset = {"path": str(folder)}
    edit(dataset, tmp_path / "cases.tsv")
    with pytest.raises(ConfigError, match=message) as info:
        load_catalog(write_catalog(tmp_path / "bad.yaml", {"datasets": [dataset]}))
    assert "bad.yaml" in str(info.value)


def test_bad_sidecar_names_the_file(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path)
    entry = load_catalog(write_catalog(tmp_path / "c.yaml", {"datasets": [{"path": str(folder)}]})).datasets[0]
    sidecar = folder / "labelsTr" / "case0.json"
    for text, message in [("{oops", "not valid JSON"), ('{"labels": []}', "unknown keys"), ('["kidney"]', "'kidney' is not a label")]:
        sidecar.write_text(text)
        with pytest.raises(DataError, match=message) as info:
            annotated_of_label(entry, "case0", folder / "labelsTr" / "case0.nii.gz", {0, 1, 2})
        assert str(sidecar) in str(info.value)


def test_catalog_show_counts_absent_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_dataset(tmp_path)
    path = write_catalog(tmp_path / "c.yaml", {"datasets": [{"path": str(folder)}]})
    rows = {row.local: row for row in label_presence(load_catalog(path))}
    assert (rows["organ"].absent, rows["organ"].cases, rows["organ"].unannotated) == (1, 4, 0)
    assert (rows["lesion"].absent, rows["lesion"].unannotated) == (2, 0)
    assert main(["catalog", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "Partial/organ   1/4     0/4          background" in shown
    assert "Partial/organ: absent in 1/4 cases: consider `absent_means: {organ: unannotated}`" in shown
    write_catalog(path, {"datasets": [{"path": str(folder), "absent_means": {"organ": "unannotated"}}]})
    assert main(["catalog", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "Partial/organ   1/4     1/4          unannotated" in shown and "consider `absent_means: {organ" not in shown
    assert main(["catalog", "show", "--no-label-scan", str(path)]) == 0
    assert "Label presence" not in capsys.readouterr().out


@pytest.mark.realmini
def test_catalog_show_realmini_headneck(realmini_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_catalog(tmp_path / "c.yaml", {"datasets": [{"path": str(realmini_root / "Dataset501_HeadNeckCT")}]})
    assert main(["catalog", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    counts = {
        line.split()[0]: line.split()[1]
        for line in shown.split("Label presence", 1)[1].splitlines()
        if line.startswith("HeadNeckCT/") and len(line.split()) == 4
    }
    # The MANIFEST's labels_present column: oesophagus missing in 18, brainstem and larynx in 8.
    assert counts["HeadNeckCT/Esophagus"] == "18/40"
    assert counts["HeadNeckCT/Brainstem"] == "8/40" and counts["HeadNeckCT/Larynx"] == "8/40"
    assert counts["HeadNeckCT/RightParotid"] == "0/40"
    assert "HeadNeckCT/Esophagus: absent in 18/40 cases: consider `absent_means: {Esophagus: unannotated}`" in shown

"""Catalog: default/shared/nested tasks, short names, validation errors, CLI show/init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from hermes.cli import main
from hermes.data.catalog import Catalog, load_catalog, short_name
from hermes.data.imageio import save_image
from hermes.errors import ConfigError


def write_catalog(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cohort_spec(cohort: Path, names: list[str] | None = None) -> dict:
    folders = sorted(p for p in cohort.iterdir() if p.name.startswith("Dataset"))
    if names:
        folders = [p for p in folders if short_name(p.name) in names]
    return {"datasets": [{"path": str(p)} for p in folders]}


def make_test_only_dataset(root: Path) -> Path:
    """A tiny nnU-Net folder with test images only (like realmini's Dataset505)."""
    folder = root / "Dataset909_OnlyTest"
    (folder / "imagesTs").mkdir(parents=True)
    (folder / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"})
    )
    save_image(folder / "imagesTs" / "case_0000.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))
    return folder


def test_default_tasks_names_and_roundtrip(small_cohort: Path, tmp_path: Path) -> None:
    catalog = load_catalog(write_catalog(tmp_path / "c.yaml", cohort_spec(small_cohort)))
    names = [entry.name for entry in catalog.datasets]
    assert "AbdomenCT" in names and "LiverCT" in names  # DatasetNNN_ prefix dropped
    abdomen = catalog.dataset("AbdomenCT")
    assert abdomen.modality == "CT" and abdomen.modality_id == catalog.modalities.index("CT")
    assert [catalog.tasks[t].name for t in abdomen.task_ids][:2] == ["AbdomenCT/liver", "AbdomenCT/spleen"]
    assert abdomen.label_values[0] == (abdomen.labels["liver"],)
    # Ids are 0..T-1 in order of appearance; the null task is T; unknown modality is M.
    assert [t.index for t in catalog.tasks] == list(range(catalog.num_tasks))
    assert catalog.null_task_id == catalog.num_tasks
    assert catalog.unknown_modality_id == len(catalog.modalities)
    # Short names: unique ones resolve, ambiguous ones list the candidates.
    assert catalog.task_index("liver_tumour") == catalog.task_index("LiverCT/liver_tumour")
    with pytest.raises(ConfigError, match=r"ambiguous.*AbdomenCT/liver.*LiverCT/liver"):
        catalog.task_index("liver")
    with pytest.raises(ConfigError, match="valid tasks"):
        catalog.task_index("pancreas")
    again = Catalog.from_dict(json.loads(json.dumps(catalog.to_dict())))
    assert again.to_dict() == catalog.to_dict()
    assert load_catalog(write_catalog(tmp_path / "again.yaml", yaml.safe_load(catalog.to_yaml()))).task_names == catalog.task_names


def test_shared_nested_renamed_and_subset(small_cohort: Path, tmp_path: Path) -> None:
    spec = cohort_spec(small_cohort, ["AbdomenCT", "LiverCT", "KidneyCT"])
    spec["datasets"][0]["labels"] = ["liver", 4]  # by name and by value (kidney_right)
    spec["datasets"][2]["nested_tasks"] = {"kidney_all": ["kidney", "kidney_tumour"]}
    spec["datasets"][2]["tasks"] = {"kidney_tumour": "tumour_kidney"}
    spec["shared_tasks"] = {"liver_ct": ["AbdomenCT/liver", "LiverCT/liver"]}
    spec["modalities"] = {"SPECT": "pet"}
    catalog = load_catalog(write_catalog(tmp_path / "c.yaml", spec))
    assert catalog.task_names == [
        "liver_ct",
        "AbdomenCT/kidney_right",
        "LiverCT/liver_tumour",
        "KidneyCT/kidney",
        "tumour_kidney",
        "KidneyCT/kidney_all",
    ]
    liver = catalog.task("liver_ct")
    assert liver.members == (("AbdomenCT", "liver"), ("LiverCT", "liver"))
    assert catalog.dataset("AbdomenCT").task_ids == [0, 1] and catalog.dataset("LiverCT").task_ids == [0, 2]
    kidney = catalog.dataset("KidneyCT")
    assert kidney.label_values[-1] == (1, 2)  # nested: union of label values
    assert kidney.label_to_tasks()[2] == [4, 5]
    assert "SPECT" in catalog.modalities


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(colour="blue"), r"colour: unknown key"),
        (lambda s: s["datasets"][0].update(modalty="CT"), r"datasets.0.modalty: unknown key"),
        (lambda s: s["datasets"][0].update(modality="Ultrasound"), r"datasets\[0\].modality: unknown modality"),
        (lambda s: s["datasets"][0].update(labels=["pancreas"]), r"datasets\[0\].labels: label 'pancreas'"),
        (lambda s: s["datasets"][0].update(labels=[9]), r"label value 9"),
        (lambda s: s["datasets"][0].update(path="nowhere"), r"datasets\[0\].path: dataset folder not found"),
        (lambda s: s["datasets"][1].update(name="AbdomenCT"), r"name 'AbdomenCT' is already used"),
        (lambda s: s.update(shared_tasks={"x": ["AbdomenCT/pancreas"]}), r"shared_tasks.x: 'AbdomenCT/pancreas'"),
        (
            lambda s: s["datasets"][1].update(tasks={"liver_tumour": "AbdomenCT/liver"}),
            r"duplicate task name 'AbdomenCT/liver'",
        ),
        (lambda s: s["datasets"][0].update(tasks={"liver": "x", "spleen": "x"}), r"duplicate task name 'x'"),
        (lambda s: s.update(modalities={"SPECT": "nuclear"}), r"modalities.SPECT"),
    ],
)
def test_catalog_errors_name_key_and_file(small_cohort: Path, tmp_path: Path, edit, message: str) -> None:
    spec = cohort_spec(small_cohort, ["AbdomenCT", "LiverCT"])
    edit(spec)
    path = write_catalog(tmp_path / "bad.yaml", spec)
    with pytest.raises(ConfigError, match=message) as info:
        load_catalog(path)
    assert "bad.yaml" in str(info.value)


def test_test_only_datasets(small_cohort: Path, tmp_path: Path) -> None:
    folder = make_test_only_dataset(tmp_path)
    spec = cohort_spec(small_cohort, ["LiverCT"])
    spec["datasets"].append({"path": str(folder)})
    with pytest.raises(ConfigError, match=r"datasets\[1\].*no training cases.*test_only: true"):
        load_catalog(write_catalog(tmp_path / "c.yaml", spec))
    spec["datasets"][1]["test_only"] = True
    spec["shared_tasks"] = {"liver": ["LiverCT/liver", "OnlyTest/liver"]}
    catalog = load_catalog(write_catalog(tmp_path / "c.yaml", spec))
    assert [e.name for e in catalog.train_datasets()] == ["LiverCT"]
    assert catalog.task_index("liver") == 0


def test_cli_show_and_init(small_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folders = [str(p) for p in sorted(small_cohort.glob("Dataset*"))]
    assert main(["catalog", "init", *folders, "--relative-to", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    assert len(yaml.safe_load(text)["datasets"]) == len(folders)
    assert main(["catalog", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "AbdomenCT/liver" in shown and "LiverCT/liver_tumour" in shown
    # Suggests sharing CT livers, never across families (T1/T2 livers are an mr group).
    suggestions = yaml.safe_load(shown.split("add to the catalog:\n", 1)[1])["shared_tasks"]
    assert suggestions["liver_ct"] == ["AbdomenCT/liver", "LiverCT/liver"]
    assert all("T1" not in n and "T2" not in n for n in suggestions["liver_ct"])
    assert main(["catalog", "show", str(tmp_path / "missing.yaml")]) == 2


def test_snomed_codes_parsed_validated_and_serialised(small_cohort: Path, tmp_path: Path) -> None:
    spec = cohort_spec(small_cohort, ["AbdomenCT"])
    spec["datasets"][0]["snomed"] = {"liver": "10200004"}
    catalog = load_catalog(write_catalog(tmp_path / "c.yaml", spec))
    (entry,) = catalog.datasets
    assert entry.snomed == {"liver": "10200004"}
    assert Catalog.from_dict(json.loads(json.dumps(catalog.to_dict()))).datasets[0].snomed == entry.snomed
    for codes, message in (({"pancreas": "15776009"}, r"snomed.pancreas: not a selected label"),
                           ({"liver": "liver"}, r"snomed.liver: 'liver' is not a SNOMED CT concept id")):
        spec["datasets"][0]["snomed"] = codes
        with pytest.raises(ConfigError, match=message):
            load_catalog(write_catalog(tmp_path / "bad.yaml", spec))

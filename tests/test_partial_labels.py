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


# --------------------------------------------------------------------------------------------
# 2. cache, sampler, loss, validation
# --------------------------------------------------------------------------------------------
def prepared(tmp_path: Path, dataset: dict | None = None, n_test: int = 0) -> tuple[Path, Path, Path]:
    """(dataset folder, catalog.yaml, cache) of the tiny dataset, prepared."""
    from hermes.data.cache import prepare_cache

    folder = make_dataset(tmp_path, n_test=n_test)
    spec = {"datasets": [{"path": str(folder), **(dataset or {})}], "preprocessing": {"workers": 1}}
    path = write_catalog(tmp_path / "c.yaml", spec)
    prepare_cache(load_catalog(path), tmp_path / "cache", progress=False)
    return folder, path, tmp_path / "cache"


def meta(cache: Path, case: str) -> dict:
    return json.loads((cache / "Partial" / case / "meta.json").read_text())


def sampler_of(cache: Path, cases: list[str], foreground_fraction: float = 0.5):
    from hermes.config import DataConfig
    from hermes.data.cache import open_cache
    from hermes.data.sampling import PatchSampler

    config = DataConfig(
        patch_size=[8, 8, 8], batch_size=len(cases), foreground_fraction=foreground_fraction, num_workers=0,
        augment={"enabled": False},
    )
    return PatchSampler(open_cache(cache).catalog, str(cache), config, {"Partial": cases}, seed=0)


def test_cache_records_annotation_and_refreshes_it(tmp_path: Path) -> None:
    from hermes.data.cache import prepare_cache

    folder, path, cache = prepared(tmp_path, {"absent_means": {"organ": "unannotated"}})
    assert meta(cache, "case1")["annotated_labels"] == [2]
    assert meta(cache, "case1")["annotated_tasks"] == ["Partial/lesion"]
    assert meta(cache, "case1")["annotation_source"] == "rule"
    assert meta(cache, "case2")["annotated_labels"] == [1, 2]  # absent lesion: background
    # A changed rule or a new sidecar rewrites meta.json only: nothing is preprocessed again.
    (folder / "labelsTr" / "case0.json").write_text('["lesion"]')
    write_catalog(path, {"datasets": [{"path": str(folder)}], "preprocessing": {"workers": 1}})
    image_before = (cache / "Partial" / "case0" / "image.npy").stat().st_mtime_ns
    report = prepare_cache(load_catalog(path), cache, progress=False)
    assert report.processed == 0 and report.reused == 4
    assert meta(cache, "case1")["annotated_labels"] == [1, 2]
    assert meta(cache, "case0")["annotated_labels"] == [2]
    assert meta(cache, "case0")["annotation_source"].startswith("sidecar ")
    assert (cache / "Partial" / "case0" / "image.npy").stat().st_mtime_ns == image_before
    # A broken sidecar is a bad case naming the file.
    (folder / "labelsTr" / "case0.json").write_text('["kidney"]')
    with pytest.raises(DataError, match=r"case0\.json: annotated: 'kidney'"):
        prepare_cache(load_catalog(path), cache, progress=False)


def test_sampler_masks_unannotated_tasks_and_old_caches_load(tmp_path: Path) -> None:
    _, _, cache = prepared(tmp_path, {"absent_means": {"organ": "unannotated"}})
    sampler = sampler_of(cache, ["case0", "case1"])
    batch = sampler.batch(0)
    expected = {"case0": [True, True], "case1": [False, True]}
    for b, case in enumerate(batch["case_id"]):
        assert batch["task_mask"][b].tolist() == [True, True]  # the prompt keeps every task
        assert batch["loss_mask"][b].tolist() == expected[case]
    # An old cache (meta.json without the field) means "all annotated", as it did.
    for case in ("case0", "case1"):
        path = cache / "Partial" / case / "meta.json"
        old = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("annot")}
        path.write_text(json.dumps(old))
    batch = sampler_of(cache, ["case0", "case1"]).batch(0)
    assert batch["loss_mask"].all()


def test_foreground_sampling_never_picks_unannotated_voxels(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path)
    (folder / "labelsTr" / "case0.json").write_text('["lesion"]')  # the organ is drawn but not trusted
    _, _, cache = prepared(tmp_path)
    sampler = sampler_of(cache, ["case0"], foreground_fraction=1.0)
    case = sampler.case("Partial", "case0")
    entry = sampler.entries["Partial"]
    rng = np.random.default_rng(0)

    def values(annotated: list[bool] | None) -> set[int]:
        centres = [sampler.choose_center(rng, case, entry, annotated).astype(int) for _ in range(60)]
        return {int(case.label[tuple(c)]) for c in centres}

    assert values([False, True]) == {2}
    assert values(None) == {1, 2}
    assert sampler.sample(rng)["annotated"].tolist() == [False, True]


def test_unannotated_pairs_add_no_loss_and_no_gradient(tmp_path: Path) -> None:
    import torch

    from hermes.config import LossConfig
    from hermes.training.loss import HermesLoss

    _, _, cache = prepared(tmp_path, {"absent_means": {"organ": "unannotated"}})
    sampler = sampler_of(cache, ["case0", "case1", "case2"])
    batch = next(b for b in map(sampler.batch, range(50)) if "case1" in b["case_id"] and "case0" in b["case_id"])
    assert not bool(batch["loss_mask"].all())
    loss = HermesLoss(LossConfig(modality_weight=0.0))
    torch.manual_seed(0)
    logits = torch.randn(batch["target"].shape, requires_grad=True)

    from types import SimpleNamespace

    Out = SimpleNamespace(logits=logits, modality_logits=None, deep_supervision=[])
    total = loss(Out, batch)["total"]
    total.backward()
    assert logits.grad is not None
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            norm = float(logits.grad[b, t].abs().sum())
            if batch["loss_mask"][b, t]:
                assert norm > 0
            else:
                assert norm == 0.0  # exactly zero: an unannotated pair is selected out
    # The loss equals the loss of the same batch without the unannotated pairs (whatever
    # their logits), i.e. they add nothing.
    changed = logits.detach().clone()
    changed[~batch["loss_mask"]] = 50.0
    Out.logits = changed
    assert float(loss(Out, batch)["total"]) == pytest.approx(float(total.detach()), abs=1e-6)
    # Without loss_mask (task_mask only) the same pairs would be trained as background.
    Out.logits = changed
    plain = {k: v for k, v in batch.items() if k != "loss_mask"}
    assert float(loss(Out, plain)["total"]) > float(total.detach()) + 1.0


def test_validation_skips_unannotated_tasks(tmp_path: Path) -> None:
    import torch

    from hermes.config import ValidationConfig
    from hermes.data.cache import load_cached_case, open_cache
    from hermes.evaluation.metrics import dice
    from hermes.training.validation import Validator

    _, _, cache = prepared(tmp_path, {"absent_means": {"lesion": "unannotated"}})
    catalog = open_cache(cache).catalog

    class Everywhere(torch.nn.Module):  # predicts every task everywhere
        def forward(self, image, task_ids, modality_id, task_mask):
            class Out:
                logits = torch.ones((image.shape[0], task_ids.shape[1], *image.shape[2:]))

            return Out

    validator = Validator(
        catalog, lambda d, c: load_cached_case(cache, d, c), {"Partial": ["case2"]},
        ValidationConfig(mode="full"), [8, 8, 8], torch.device("cpu"),
    )
    label = np.asarray(load_cached_case(cache, "Partial", "case2").label)
    organ = dice(np.ones(label.shape, bool), label == 1)
    assert 0 < organ < 1
    # The unannotated lesion (whose all-foreground prediction would score 0) is not averaged in.
    assert validator(Everywhere())["Partial"] == pytest.approx(organ)


def test_train_step_with_medcontext_gives_unannotated_tasks_no_gradient(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import torch

    from hermes.config import LossConfig, MedContextConfig
    from hermes.runtime import AmpSettings
    from hermes.training.loss import HermesLoss
    from hermes.training.medcontext import MedContext
    from hermes.training.step import train_step

    _, _, cache = prepared(tmp_path, {"absent_means": {"organ": "unannotated"}})
    batch = sampler_of(cache, ["case1"]).batch(0)  # organ unannotated, lesion annotated
    assert batch["loss_mask"].tolist() == [[False, True]] and batch["task_mask"].all()

    class PerTask(torch.nn.Module):
        """Logits = one learnable value per task id: its gradient is that task's loss gradient."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.0]))

        def forward(self, image, task_ids, modality_id, task_mask):
            logits = self.w[task_ids][..., None, None, None] + 0.0 * image[:, :1]
            return SimpleNamespace(logits=logits, modality_logits=None, deep_supervision=[])

    model = PerTask()
    mc = MedContext(MedContextConfig(enabled=True, mask_patch=[4, 4, 4]), model, ["Partial/organ", "Partial/lesion"])
    with torch.no_grad():
        mc.teacher.w.add_(1.0)  # a teacher that disagrees: the consistency term has a gradient
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    amp = AmpSettings(dtype=None, use_scaler=False, channels_last=False, device_type="cpu")
    terms = train_step(
        model, batch, HermesLoss(LossConfig(modality_weight=0.0)), optimizer, amp, None, None,
        medcontext=mc, generator=torch.Generator().manual_seed(0), step=5,
    )
    assert terms["consistency"] > 0 and terms["masked_supervised"] > 0
    grad = model.w.grad
    assert grad is not None and float(grad[0]) == 0.0 and float(grad[1]) != 0.0


# --------------------------------------------------------------------------------------------
# 3. evaluation
# --------------------------------------------------------------------------------------------
def organ_everywhere_predictions(folder: Path, out: Path) -> Path:
    """Each test case's reference, with the organ also predicted where case 1 lacks it."""
    from hermes.data.imageio import load_image

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted((folder / "labelsTs").glob("*.nii.gz")):
        ref = load_image(path)
        pred = np.asarray(ref.array).copy()
        pred[2:6, 2:6, 2:6] = 1
        save_image(out / path.name, pred, ref.affine)
    return out


def summary_task(result, task: str) -> dict:
    return result.summary["datasets"]["Dataset910_Partial"]["tasks"][task]


def test_evaluation_scores_only_annotated_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hermes.config import EvaluationConfig
    from hermes.evaluation.evaluate import evaluate_folders

    folder = make_dataset(tmp_path, n_train=0, n_test=4)
    pred = organ_everywhere_predictions(folder, tmp_path / "pred")
    config = EvaluationConfig(workers=1, bootstrap_samples=10)
    ref = folder / "labelsTs"
    # Default (absent = background): the organ drawn on case 1 is a false positive, Dice 0.
    plain = evaluate_folders(pred, ref, config=config, progress=False)
    assert summary_task(plain, "organ")["n_cases"] == 4 and summary_task(plain, "organ")["dice"]["mean"] == 0.75
    # Rule: case 1 does not annotate the organ, so it is not scored (but still predicted).
    ruled = evaluate_folders(pred, ref, config=config, progress=False, absent_means={"organ": "unannotated"})
    organ = summary_task(ruled, "organ")
    assert (organ["n_cases"], organ["n_unannotated"], organ["dice"]["n"], organ["dice"]["mean"]) == (3, 1, 3, 1.0)
    row = next(r for r in ruled.rows if r["case"] == "case1" and r["task"] == "organ")
    assert row["annotated"] is False and np.isnan(row["dice"]) and row["pred_voxels"] > 0
    assert "not scored where the reference does not annotate the task: organ 1" in ruled.table()
    # A sidecar next to the reference beats the rule (case 0: only the organ is annotated).
    (ref / "case0.json").write_text('["organ"]')
    sided = evaluate_folders(pred, ref, config=config, progress=False, absent_means="unannotated")
    assert summary_task(sided, "lesion")["n_unannotated"] == 3  # case 0 (sidecar), cases 1 and 2 (rule)
    assert summary_task(sided, "lesion")["dice"]["n"] == 1
    (ref / "case0.json").unlink()
    # The CLI: a case table, and per-label rules; n columns in the table, summary and CSV.
    (tmp_path / "cases.tsv").write_text("case\tannotated\ncase1\tlesion\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--annotations", str(tmp_path / "cases.tsv"),
                 "--bootstrap", "10", "--workers", "1", "--quiet", "-o", str(out), "--report"]) == 0
    summary = json.loads((out / "summary.json").read_text())["datasets"]["Dataset910_Partial"]["tasks"]
    assert summary["organ"]["n_cases"] == 3 and summary["organ"]["n_unannotated"] == 1
    assert "case1,organ,,,,0,64,True,False,False" in (out / "metrics.csv").read_text()
    assert "not annotated (not scored)" in (out / "report.html").read_text()
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--absent-means", "organ=unannotated",
                 "--bootstrap", "10", "--workers", "1", "--quiet", "-o", str(out), "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["datasets"]["Dataset910_Partial"]["tasks"]["organ"]["n_cases"] == 3
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--absent-means", "kidney=unannotated",
                 "--quiet", "-o", str(out), "--overwrite"]) == 2
    assert "absent_means.kidney: 'kidney' is not a label" in capsys.readouterr().err


@pytest.mark.slow  # predicts with a (random) model: ~10 s
def test_model_evaluation_uses_the_catalog_rule(tmp_path: Path) -> None:
    from inference_helpers import make_model_dir

    from hermes.config import EvaluationConfig, InferenceConfig
    from hermes.evaluation.evaluate import evaluate_model

    folder = make_dataset(tmp_path, n_train=1, n_test=2)
    catalog = write_catalog(tmp_path / "c.yaml", {"datasets": [{"path": str(folder), "absent_means": {"organ": "unannotated"}}]})
    model = make_model_dir(tmp_path / "model", datasets=(("Partial", "CT", ("organ", "lesion"), folder),))
    result = evaluate_model(
        model, catalog, split="test", inference=InferenceConfig(overlap=0.0),
        config=EvaluationConfig(bootstrap_samples=10), device="cpu", progress=False,
    )
    flags = {(r["case"], r["task"]): r["annotated"] for r in result.rows}
    # Every task is predicted and listed; case 1's absent organ is not scored.
    assert flags == {("case0", "Partial/organ"): True, ("case0", "Partial/lesion"): True,
                     ("case1", "Partial/organ"): False, ("case1", "Partial/lesion"): True}
    assert result.summary["datasets"]["Partial"]["tasks"]["Partial/organ"]["n_cases"] == 1

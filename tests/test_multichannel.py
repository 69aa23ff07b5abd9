"""Multi-channel datasets in one universal model (model.channel_fusion: mean): catalog channel
modalities, batches mixing channel counts, channel dropout, padding invariance of the fusing
stem, backward compatibility of the plain first convolution, prediction with a channel missing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from inference_helpers import make_model_dir

from hermes.bundle import SPEC_FILE
from hermes.config import DataConfig, ModelConfig, TrainConfig, validate
from hermes.data.catalog import Catalog, DatasetEntry, load_catalog
from hermes.data.imageio import Image, save_image
from hermes.data.sampling import collate_batch, drop_channels, model_data_config
from hermes.errors import ConfigError, DataError
from hermes.inference.channels import MissingChannelWarning, PartialImage
from hermes.models.channel_stem import channel_inputs
from hermes.models.registry import build_model, load_model, save_model

BRATS_NAMES = ("FLAIR", "T1w", "t1gd", "T2w")  # MSD Task01's dataset.json channel names
PATCH = (32, 32, 32)


def _nnunet_dataset(root: Path, name: str, channels: tuple[str, ...], cases: int = 2) -> Path:
    folder = root / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    meta = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": {"background": 0, "lesion": 1},
            "file_ending": ".nii.gz", "numTraining": cases}
    (folder / "dataset.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for case in range(cases):
        for channel in range(len(channels)):
            save_image(folder / "imagesTr" / f"c{case}_{channel:04d}.nii.gz", rng.random((6, 6, 6)).astype(np.float32), np.eye(4))
        save_image(folder / "labelsTr" / f"c{case}.nii.gz", np.zeros((6, 6, 6), np.uint8), np.eye(4))
    return folder


def _catalog(tmp_path: Path, extra: dict | None = None) -> Catalog:
    brats = _nnunet_dataset(tmp_path, "Dataset001_BrainTumour", BRATS_NAMES)
    ct = _nnunet_dataset(tmp_path, "Dataset002_LiverCT", ("CT",))
    spec = {"datasets": [{"path": str(brats), **(extra or {})}, {"path": str(ct)}]}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_catalog(path)


# ---------------------------------------------------------------------------------------------
# Catalog
# ---------------------------------------------------------------------------------------------
def test_catalog_reads_each_channels_modality(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    brats, ct = catalog.dataset("BrainTumour"), catalog.dataset("LiverCT")
    assert brats.channel_names == BRATS_NAMES
    assert brats.channel_modalities == ("FLAIR", "T1", "T1c", "T2")  # dataset.json names -> vocabulary
    assert brats.modality == "FLAIR"  # the dataset's prompt: its first channel's modality
    assert catalog.channel_modality_ids(brats) == [catalog.modalities.index(m) for m in ("FLAIR", "T1", "T1c", "T2")]
    assert ct.channel_modalities == ("CT",) and catalog.channel_modality_ids(ct) == [ct.modality_id]
    again = Catalog.from_dict(json.loads(json.dumps(catalog.to_dict())))
    assert again.dataset("BrainTumour").channel_modalities == brats.channel_modalities
    # an entry serialised before channel modalities existed: every channel has the dataset's
    old = {k: v for k, v in brats.to_dict().items() if k != "channel_modalities"}
    assert DatasetEntry.from_dict(old).channel_modalities == ("FLAIR",) * 4


def test_catalog_channel_modalities_override_and_errors(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path, {"channel_modalities": ["FLAIR", "T1", "T1c", "unknown"]})
    assert catalog.dataset("BrainTumour").channel_modalities == ("FLAIR", "T1", "T1c", "unknown")
    assert catalog.channel_modality_ids(catalog.dataset("BrainTumour"))[3] == catalog.unknown_modality_id
    with pytest.raises(ConfigError, match=r"channel_modalities: 2 names for the dataset's 4 channel"):
        _catalog(tmp_path / "a", {"channel_modalities": ["FLAIR", "T1"]})
    with pytest.raises(ConfigError, match=r"channel_modalities\[1\]: unknown modality 'T7'"):
        _catalog(tmp_path / "b", {"channel_modalities": ["FLAIR", "T7", "T1c", "T2"]})


def test_channel_fusion_config_rules() -> None:
    assert ModelConfig().channel_fusion == "none"  # the backward-compatible default
    ModelConfig(architecture="resunet", channel_fusion="mean")
    with pytest.raises(ValueError, match="channel_fusion: mean is implemented for hermes_resunet, resunet"):
        ModelConfig(architecture="hermes_medformer", channel_fusion="mean")
    with pytest.raises(ValueError, match="leave in_channels at 1"):
        ModelConfig(channel_fusion="mean", in_channels=4)
    with pytest.raises(ConfigError, match="channel_dropout"):
        validate(DataConfig, {"channel_dropout": 1.5})
    data = DataConfig(channel_dropout=0.3)
    assert model_data_config(data, ModelConfig(channel_fusion="mean")).channel_dropout == 0.3
    assert model_data_config(data, ModelConfig()).channel_dropout == 0.0  # a plain conv needs every channel


def test_plan_refuses_mixed_channel_counts_without_fusion(tmp_path: Path) -> None:
    from hermes.training.plan import check_channels

    catalog = _catalog(tmp_path)
    data = SimpleNamespace(catalog=catalog, train_cases={"BrainTumour": ["c0"], "LiverCT": ["c0"]})
    base = {"catalog": "c.yaml", "cache": "cache", "output": "out"}
    with pytest.raises(ConfigError, match=r"different channel counts \(BrainTumour: 4 .*set model.channel_fusion: mean"):
        check_channels(TrainConfig.model_validate(base), data)  # type: ignore[arg-type]
    check_channels(TrainConfig.model_validate({**base, "model": {"channel_fusion": "mean"}}), data)  # type: ignore[arg-type]
    only_brats = SimpleNamespace(catalog=catalog, train_cases={"BrainTumour": ["c0"]})
    with pytest.raises(ConfigError, match=r"model\.in_channels is 1"):
        check_channels(TrainConfig.model_validate(base), only_brats)  # type: ignore[arg-type]
    check_channels(TrainConfig.model_validate({**base, "model": {"in_channels": 4}}), only_brats)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
def _sample(channels: int, modality: int, channel_ids: list[int] | None, fill: float) -> dict:
    sample = {
        "image": torch.full((channels, 4, 4, 4), fill),
        "target": torch.zeros((1, 4, 4, 4)),
        "task_ids": torch.tensor([0]),
        "modality_id": modality,
        "dataset_id": 0,
        "case_id": f"c{channels}",
    }
    if channel_ids is not None:
        sample["channel_ids"] = torch.tensor(channel_ids)
    return sample


def test_collation_pads_mixed_channel_counts_with_masked_channels() -> None:
    batch = collate_batch([_sample(1, 0, [0], 1.0), _sample(4, 4, [4, 2, 7, 3], 2.0), _sample(1, 2, None, 3.0)], 9)
    assert batch["image"].shape == (3, 4, 4, 4, 4)
    assert batch["channel_mask"].tolist() == [[True, False, False, False], [True] * 4, [True, False, False, False]]
    assert batch["channel_ids"][1].tolist() == [4, 2, 7, 3]
    assert batch["channel_ids"][2].tolist() == [2, 2, 2, 2]  # default: the sample's modality (padding repeats it)
    assert float(batch["image"][0, 1:].abs().sum()) == 0.0 and float(batch["image"][0, 0].mean()) == 1.0
    assert float(batch["image"][1].mean()) == 2.0
    same = collate_batch([_sample(1, 0, [0], 1.0)] * 2, 9)  # one channel count: no padding
    assert same["image"].shape[1] == 1 and bool(same["channel_mask"].all())


def test_channel_dropout_rate_and_never_all_channels() -> None:
    rng = np.random.default_rng(0)
    n, rate = 4000, 0.4
    mask = torch.ones((n, 4), dtype=torch.bool)
    mask[: n // 2, 1:] = False  # half the samples have one channel (padded to 4)
    dropped = drop_channels(rng, mask, rate)
    assert bool(dropped[: n // 2].eq(mask[: n // 2]).all())  # single-channel samples untouched
    assert bool(dropped.any(dim=1).all())  # never every channel of a sample
    assert not bool((dropped & ~mask).any())  # a padded channel never becomes present
    # per channel: p, minus the all-drawn samples that keep one channel back: p - p^C / C
    observed = 1.0 - float(dropped[n // 2 :].float().mean())
    assert observed == pytest.approx(rate - rate**4 / 4, abs=0.02)
    # rate 0 draws nothing: the batch's random stream is what it was without channel dropout
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert drop_channels(a, mask, 0.0) is mask
    assert a.random() == b.random()


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _model(arch: str, fusion: str = "mean", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    own = [0, 1, 2] if arch == "resunet" else None
    return build_model(ModelConfig(architecture=arch, channel_fusion=fusion), num_tasks=4, num_modalities=10,
                       task_ids_of_model=own).eval()


@pytest.mark.parametrize("arch", ["hermes_resunet", "resunet"])
def test_masked_channels_change_nothing(arch: str) -> None:
    """Padding invariance: what a masked channel holds never reaches the output, and a padded
    single-channel sample gives its unpadded result."""
    model = _model(arch)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 4, *PATCH, generator=g)
    ids = torch.tensor([[4, 2, 7, 3], [0, 0, 0, 0]])
    mask = torch.tensor([[True, False, True, True], [True, False, False, False]])
    tasks, modality = torch.tensor([[0, 1], [2, 4]]), torch.tensor([4, 0])
    task_mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        out = model(image, tasks, modality, task_mask, channel_ids=ids, channel_mask=mask).logits
        garbage = image.clone()
        garbage[~mask] = 1e4
        other_ids = torch.where(mask, ids, torch.full_like(ids, 9))
        assert torch.equal(out, model(garbage, tasks, modality, task_mask, channel_ids=other_ids, channel_mask=mask).logits)
        alone = model(image[1:, :1], tasks[1:], modality[1:], task_mask[1:]).logits  # no channel arguments
        torch.testing.assert_close(out[1:], alone, atol=1e-4, rtol=1e-4)
        # the channels present matter: dropping one changes the first sample only
        fewer = mask.clone()
        fewer[0, 2] = False
        changed = model(image, tasks, modality, task_mask, channel_ids=ids, channel_mask=fewer).logits
    assert not torch.allclose(changed[0], out[0]) and torch.equal(changed[1], out[1])


def test_fusing_model_trains_on_a_mixed_batch_and_refuses_bad_channel_inputs() -> None:
    model = _model("hermes_resunet").train()
    batch = collate_batch([_sample(4, 4, [4, 2, 7, 3], 0.0), _sample(1, 0, [0], 0.0)], 4)
    batch["image"] = torch.randn(2, 4, *PATCH)
    batch["target"] = torch.zeros(2, 1, *PATCH)
    batch["channel_mask"][0, 1] = False
    out = model(batch["image"], batch["task_ids"], batch["modality_id"], **channel_inputs(model, batch))
    out.logits.sum().backward()
    embedding = model.backbone.stem.channel.film.channel_embedding.weight
    assert embedding.grad is not None and bool(embedding.grad[[4, 7, 3, 0]].abs().sum(1).gt(0).all())
    assert float(embedding.grad[2].abs().sum()) == 0.0  # T1's channel was masked: no gradient
    with torch.no_grad():
        with pytest.raises(ValueError, match="needs channel_ids"):
            model(batch["image"], batch["task_ids"], batch["modality_id"])  # 4 channels, modalities unknown
        with pytest.raises(ValueError, match="at least one present channel"):
            model(batch["image"], batch["task_ids"], batch["modality_id"], channel_ids=batch["channel_ids"],
                  channel_mask=torch.zeros(2, 4, dtype=torch.bool))
    plain = _model("hermes_resunet", "none")
    assert channel_inputs(plain, batch) == {}  # a plain-conv model is called as before
    with pytest.raises(ValueError, match="needs every input channel"), torch.no_grad():
        plain(batch["image"][:, :1], batch["task_ids"], batch["modality_id"], channel_mask=torch.tensor([[True], [False]]))


@pytest.mark.parametrize("arch", ["hermes_resunet", "resunet"])
def test_single_channel_model_without_the_option_is_unchanged(tmp_path: Path, arch: str) -> None:
    """A model built with channel_fusion none keeps the plain first conv (the weight names of
    models saved before the option) and loads from a spec without the key (as old spec.json
    files are) with bit-identical logits; channel arguments, all present, change nothing."""
    model = _model(arch, "none", seed=3)
    stem = [k for k in model.state_dict() if ".stem." in k]
    prefix = "backbone" if arch == "hermes_resunet" else "network.backbone"
    assert f"{prefix}.stem.0.weight" in stem and f"{prefix}.stem.1.conv1.conv.weight" in stem
    save_model(tmp_path, model)
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    del spec["network"]["config"]["channel_fusion"]  # a spec.json written before the option
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    loaded, _ = load_model(tmp_path)
    image = torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(1))
    tasks, modality = torch.tensor([[0, 2]]), torch.tensor([3])
    with torch.no_grad():
        before = model(image, tasks, modality).logits
        assert torch.equal(before, loaded(image, tasks, modality).logits)
        all_present = {"channel_ids": torch.tensor([[3]]), "channel_mask": torch.tensor([[True]])}
        assert torch.equal(before, loaded(image, tasks, modality, **all_present).logits)


def test_warm_start_grows_the_channel_modality_table() -> None:
    from hermes.adaptation.warm_start import plan_warm_start, warm_start_state
    from hermes.config import WarmStartConfig

    old = _model("hermes_resunet")
    torch.manual_seed(1)
    new = build_model(ModelConfig(channel_fusion="mean"), num_tasks=4, num_modalities=11)
    names = [f"m{i}" for i in range(10)]
    plan = plan_warm_start([f"t{i}" for i in range(4)], [f"t{i}" for i in range(4)], names, [*names, "SWI"],
                           WarmStartConfig())
    state, _ = warm_start_state(old.state_dict(), new.state_dict(), plan)
    key = "backbone.stem.channel.film.channel_embedding.weight"
    old_table = old.state_dict()[key]
    assert state[key].shape == (12, old_table.shape[1])
    assert torch.equal(state[key][:10], old_table[:10]) and torch.equal(state[key][11], old_table[10])  # unknown last


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------
BRATS_MODEL = (("BrainMR", ("FLAIR", "T1", "T1c", "T2"), ("edema", "tumour"), None), ("CTSet", "CT", ("liver",), None))


def _brats_images(seed: int = 0) -> list[Image]:
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return [Image(rng.random((20, 18, 16)).astype(np.float32) * 100 + 10, affine) for _ in range(4)]


def test_predict_with_a_channel_missing_warns_and_uses_the_others(tmp_path: Path) -> None:
    from hermes.config import InferenceConfig
    from hermes.inference.predictor import Predictor

    model_dir = make_model_dir(tmp_path / "m", BRATS_MODEL, channel_fusion="mean")
    predictor = Predictor(model_dir, device="cpu", config=InferenceConfig(overlap=0.25))
    images = _brats_images()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingChannelWarning)
        full = predictor.predict(images, dataset="BrainMR", progress=False)
    assert full.tasks == ["BrainMR/edema", "BrainMR/tumour"] and "missing_channels" not in full.extra
    with pytest.warns(MissingChannelWarning, match=r"missing channel 2 \(T1c: T1c\) of dataset 'BrainMR'; .* 3 channel"):
        partial = predictor.predict([images[0], images[1], None, images[3]], dataset="BrainMR", progress=False)
    assert partial.metadata()["missing_channels"] == {"BrainMR": "channel 2 (T1c: T1c)"}
    assert partial.labels is not None and partial.labels.shape == (20, 18, 16)
    with pytest.warns(MissingChannelWarning, match=r"channel 1 \(T1: T1\), channel 2 .*, channel 3"):
        predictor.predict(images[0], dataset="BrainMR", progress=False)  # the FLAIR alone: trailing channels
    with pytest.raises(DataError, match="input has channel 4"):
        predictor.predict([*images, images[0]], dataset="BrainMR", progress=False)
    # a single-channel dataset of the same model predicts as before, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingChannelWarning)
        ct = predictor.predict(Image(images[0].array * 3 - 100, np.eye(4)), modality="CT", progress=False)
    assert ct.tasks == ["CTSet/liver"]


def test_plain_conv_model_refuses_a_missing_channel(tmp_path: Path) -> None:
    from hermes.config import InferenceConfig
    from hermes.inference.predictor import Predictor

    model_dir = make_model_dir(tmp_path / "m", BRATS_MODEL[:1], in_channels=4)
    predictor = Predictor(model_dir, device="cpu", config=InferenceConfig(overlap=0.25))
    images = _brats_images()
    assert predictor.predict(images, dataset="BrainMR", progress=False).labels is not None
    with pytest.raises(DataError, match=r"channel 2 \(T1c: T1c\) of dataset 'BrainMR' missing; .*needs every channel"):
        predictor.predict([images[0], images[1], None, images[3]], dataset="BrainMR", progress=False)


def test_folder_input_with_a_channel_number_gap(tmp_path: Path) -> None:
    from hermes.inference.api import discover_inputs
    from hermes.inference.predictor import Predictor

    folder = tmp_path / "imagesTs"
    for number in (0, 1, 3):
        save_image(folder / f"case_{number:04d}.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    (case,), is_folder = discover_inputs(folder)
    assert is_folder and case.paths[2] is None and case.paths[3] is not None and case.source == case.paths[0]
    image = Predictor.load_case(SimpleNamespace(config=SimpleNamespace(allow_irregular_dicom=False)), list(case.paths))  # type: ignore[arg-type]
    assert isinstance(image, PartialImage) and image.channels == (0, 1, 3) and image.array.shape == (4, 4, 4, 3)


# ---------------------------------------------------------------------------------------------
# Evaluation with a channel dropped
# ---------------------------------------------------------------------------------------------
def _brats_dataset(root: Path) -> Path:
    """A 4-channel nnU-Net dataset with one training and two test cases (edema 1, tumour 2)."""
    folder = root / "Dataset909_BrainMR"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    meta = {"channel_names": {str(i): c for i, c in enumerate(BRATS_NAMES)}, "file_ending": ".nii.gz",
            "labels": {"background": 0, "edema": 1, "tumour": 2}, "numTraining": 1}
    (folder / "dataset.json").write_text(json.dumps(meta))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for split, cases in (("Tr", ["tr0"]), ("Ts", ["ts0", "ts1"])):
        for number, case in enumerate(cases):
            label = np.zeros((20, 18, 16), np.uint8)
            label[6:12, 5:11, 4:10] = 1
            label[8:10, 7:9, 6:8] = 2
            for channel, image in enumerate(_brats_images(number)):
                save_image(folder / f"images{split}" / f"{case}_{channel:04d}.nii.gz", image.array, affine)
            save_image(folder / f"labels{split}" / f"{case}.nii.gz", label, affine)
    return folder


def test_evaluate_with_a_channel_dropped(tmp_path: Path, capsys) -> None:
    """``evaluate --drop-channel``: every case predicted without the channel (one warning per
    dataset), recorded in summary.json; an error for a plain-conv model or a channel the
    dataset lacks."""
    from hermes.cli import main
    from hermes.config import EvaluationConfig, InferenceConfig
    from hermes.evaluation.evaluate import evaluate_model

    folder = _brats_dataset(tmp_path)
    brain = (("BrainMR", ("FLAIR", "T1", "T1c", "T2"), ("edema", "tumour"), folder),)
    model = make_model_dir(tmp_path / "m", brain, spacing=(4.0, 4.0, 4.0), layout="adaptation", channel_fusion="mean")
    fast = {"inference": InferenceConfig(overlap=0.0), "config": EvaluationConfig(bootstrap_samples=5, workers=1),
            "device": "cpu", "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingChannelWarning)
        full = evaluate_model(model, **fast)
    assert "dropped_channel" not in full.summary
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dropped = evaluate_model(model, drop_channel="t1c", **fast)  # by modality, any case
    missing = [w for w in caught if issubclass(w.category, MissingChannelWarning)]
    assert len(missing) == 1 and "BrainMR: evaluating without channel 2 (T1c: T1c)" in str(missing[0].message)
    assert dropped.summary["dropped_channel"] == {
        "requested": "t1c", "datasets": {"BrainMR": {"channel": 2, "name": "T1c", "modality": "T1c"}}}
    assert len(dropped.rows) == len(full.rows) == 4  # 2 cases x 2 tasks
    assert "predicted without one channel: BrainMR: channel 2 (T1c: T1c)" in dropped.table()
    with pytest.warns(MissingChannelWarning):
        by_number = evaluate_model(model, drop_channel=2, **fast)
    assert [r["dice"] for r in by_number.rows] == [r["dice"] for r in dropped.rows]

    # the CLI: --drop-channel by channel number, summary.json in its own default folder
    args = ["evaluate", "-m", str(model), "--device", "cpu", "--overlap", "0", "--bootstrap", "5", "--workers", "1",
            "--quiet"]
    with pytest.warns(MissingChannelWarning, match="without channel 0"):
        assert main([*args, "--drop-channel", "0"]) == 0
    summary = json.loads((model / "evaluation_test_without_0" / "summary.json").read_text())
    assert summary["dropped_channel"]["datasets"]["BrainMR"] == {"channel": 0, "name": "FLAIR", "modality": "FLAIR"}
    assert "predicted without one channel: BrainMR: channel 0 (FLAIR: FLAIR)" in capsys.readouterr().out
    assert main([*args, "--drop-channel", "DWI"]) == 2
    assert "dataset 'BrainMR' has no channel 'DWI'; its channels: 0 FLAIR (FLAIR), 1 T1 (T1)" in capsys.readouterr().err
    assert main([*args, "--drop-channel", "4"]) == 2
    assert "channel 4 (counting from 0): dataset 'BrainMR' has 4 channel(s)" in capsys.readouterr().err

    plain = make_model_dir(tmp_path / "plain", brain, spacing=(4.0, 4.0, 4.0), layout="adaptation", in_channels=4)
    assert evaluate_model(plain, **fast).rows  # all channels: fine
    with pytest.raises(ConfigError, match=r"drop channel 'T1c': this model's first convolution reads every channel "
                                          r"\(model.channel_fusion: none\)"):
        evaluate_model(plain, drop_channel="T1c", **fast)


def test_dropping_the_only_channel_of_a_dataset_is_an_error(tmp_path: Path) -> None:
    from hermes.evaluation.evaluate import evaluate_model
    from hermes.inference.channels import without_channel

    folder = _brats_dataset(tmp_path)
    datasets = (("BrainMR", ("FLAIR", "T1", "T1c", "T2"), ("edema", "tumour"), folder),
                ("CTSet", "CT", ("liver",), folder))
    model = make_model_dir(tmp_path / "m", datasets, layout="adaptation", channel_fusion="mean")
    with pytest.raises(DataError, match="dataset 'CTSet' has one channel, which would leave nothing; select the "
                                        r"multi-channel datasets \(--datasets\)"):
        evaluate_model(model, drop_channel="T2", device="cpu", progress=False)
    image = without_channel(Image(np.zeros((4, 4, 4, 4), np.float32), np.eye(4)), 1)
    assert isinstance(image, PartialImage) and image.channels == (0, 2, 3) and image.array.shape == (4, 4, 4, 3)
    alone = without_channel(without_channel(image, 0), 3)
    assert alone.channels == (2,) and alone.array.shape == (4, 4, 4)
    with pytest.raises(DataError, match="channel 2 is its only channel"):
        without_channel(alone, 2)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_universal_model_with_a_four_channel_dataset_end_to_end(tmp_path: Path) -> None:
    """A tiny universal Hermes-R on single-channel CT and T1 datasets plus the 4-sequence brain
    MR of the synthetic cohort, a few dozen steps; then the brain MR predicted with all its
    channels and with one missing (a warning, the same label set and grid)."""
    from hermes.data.cache import prepare_cache
    from hermes.data.catalog import default_catalog_spec
    from hermes.data.readers import open_dataset
    from hermes.inference.predictor import Predictor
    from hermes.synthetic import generate_cohort
    from hermes.training.trainer import train

    folders = generate_cohort(tmp_path / "cohort", scale=0.5, datasets=["102", "105", "108"], cases=3, test_cases=1,
                              progress=False)
    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump(default_catalog_spec(folders)))
    prepare_cache(load_catalog(catalog_path), tmp_path / "cache", progress=False)
    config = TrainConfig.model_validate({
        "catalog": str(catalog_path), "cache": str(tmp_path / "cache"), "output": str(tmp_path / "run"),
        "steps": 30, "log_every": 10, "checkpoint_every": 30, "precision": "fp32",
        "model": {"preset": "tiny", "channel_fusion": "mean"},
        "data": {"patch_size": list(PATCH), "batch_size": 2, "num_workers": 0, "channel_dropout": 0.25,
                 "val_fraction": 0.0},
        "optim": {"warmup_steps": 5},
    })
    result = train(config, progress=False)
    assert all(np.isfinite(result.losses)) and np.mean(result.losses[-10:]) < np.mean(result.losses[:10])
    spec = json.loads((result.model_dir / SPEC_FILE).read_text())
    assert spec["network"]["config"]["channel_fusion"] == "mean"
    brain = next(d for d in spec["datasets"] if d["name"] == "BrainTumourMR")
    assert brain["channel_modalities"] == ["FLAIR", "T1", "T1c", "T2"]

    predictor = Predictor(result.model_dir, device="cpu")
    case = open_dataset(tmp_path / "cohort" / "Dataset108_BrainTumourMR").test_cases()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingChannelWarning)
        full = predictor.predict(list(case.image_paths), dataset="BrainTumourMR", progress=False)
    paths: list[Path | None] = list(case.image_paths)
    paths[2] = None  # no contrast T1
    with pytest.warns(MissingChannelWarning, match=r"channel 2 \(t1gd: T1c\)"):
        partial = predictor.predict(paths, dataset="BrainTumourMR", progress=False)
    assert full.tasks == partial.tasks == ["BrainTumourMR/edema", "BrainTumourMR/tumour"]
    assert full.shape == partial.shape and np.allclose(full.affine, partial.affine)
    assert partial.extra["missing_channels"] == {"BrainTumourMR": "channel 2 (t1gd: T1c)"}

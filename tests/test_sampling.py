"""Sampler/loader: batch contract, reproducibility (seed, rank, resume, workers), splits, weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hermes.config import AugmentConfig, DataConfig
from hermes.data.cache import open_cache, prepare_cache
from hermes.data.catalog import Catalog, load_catalog
from hermes.data.imageio import save_image
from hermes.data.loader import load_cached_case, make_train_loader
from hermes.data.sampling import PatchSampler, dataset_probabilities, split_cases, training_cases
from hermes.errors import ConfigError


@pytest.fixture(scope="module")
def prepared(small_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, Path]:
    root = tmp_path_factory.mktemp("sampling")
    folders = [small_cohort / n for n in ("Dataset101_AbdomenCT", "Dataset102_LiverCT", "Dataset105_BrainT1")]
    spec = {
        "datasets": [{"path": str(p)} for p in folders],
        "shared_tasks": {"liver": ["AbdomenCT/liver", "LiverCT/liver"]},
    }
    (root / "catalog.yaml").write_text(yaml.safe_dump(spec))
    catalog = load_catalog(root / "catalog.yaml")
    prepare_cache(catalog, root / "cache", workers=1, progress=False)
    return catalog, root / "cache"


def config(**kwargs) -> DataConfig:
    base = {"patch_size": [24, 24, 24], "batch_size": 4, "num_workers": 0}
    base.update(kwargs)
    return DataConfig(**base)


def sampler(catalog: Catalog, cache: Path, cfg: DataConfig, seed: int = 0, rank: int = 0) -> PatchSampler:
    train, _ = training_cases(open_cache(cache), cfg, seed)
    return PatchSampler(catalog, str(cache), cfg, train, seed=seed, rank=rank)


def test_batch_contract(prepared) -> None:
    catalog, cache = prepared
    cfg = config(batch_size=6, augment=AugmentConfig(enabled=False))
    batch = sampler(catalog, cache, cfg).batch(0)
    B = 6
    assert batch["image"].shape == (B, 1, 24, 24, 24) and batch["image"].dtype == torch.float32
    T = batch["target"].shape[1]
    assert batch["target"].shape == (B, T, 24, 24, 24) and batch["task_ids"].shape == (B, T)
    assert batch["task_ids"].dtype == torch.int64 and batch["task_mask"].dtype == torch.bool
    assert set(torch.unique(batch["target"]).tolist()) <= {0.0, 1.0}
    assert len(batch["case_id"]) == B and batch["modality_id"].shape == (B,) and batch["dataset_id"].shape == (B,)
    for b in range(B):
        entry = catalog.datasets[int(batch["dataset_id"][b])]
        k = len(entry.task_ids)
        # Own tasks only, then the null task on masked-out slots with empty targets.
        assert batch["task_ids"][b, :k].tolist() == entry.task_ids
        assert batch["task_mask"][b].tolist() == [True] * k + [False] * (T - k)
        assert torch.all(batch["task_ids"][b, k:] == catalog.null_task_id)
        assert batch["target"][b, k:].sum() == 0
        assert int(batch["modality_id"][b]) == entry.modality_id
        assert batch["case_id"][b] in open_cache(cache).cases[entry.name]["train"]
    # The shared liver task has one id in both datasets.
    liver = catalog.task_index("liver")
    assert catalog.dataset("AbdomenCT").task_ids[0] == liver == catalog.dataset("LiverCT").task_ids[0]


def test_targets_follow_label_mapping(prepared) -> None:
    catalog, cache = prepared
    cfg = config(batch_size=1, foreground_fraction=1.0, augment=AugmentConfig(enabled=False))
    smp = sampler(catalog, cache, cfg)
    entry = catalog.dataset("LiverCT")
    case_id = open_cache(cache).cases["LiverCT"]["train"][0]
    case = load_cached_case(cache, "LiverCT", case_id)
    rng = np.random.default_rng(0)
    center = smp.choose_center(rng, case, entry)
    from hermes.data.augment import extract_patch
    from hermes.data.sampling import task_targets

    _, label = extract_patch(case.image, case.label, center, cfg.patch_size)
    target = task_targets(label, entry)
    for channel, values in enumerate(entry.label_values):
        expected = np.isin(label.numpy(), values)
        assert np.array_equal(target[channel].numpy() == 1, expected)
    assert target.sum() > 0  # centred on a labelled voxel


def test_reproducible_by_seed_rank_and_step(prepared) -> None:
    catalog, cache = prepared
    cfg = config()
    a, b = sampler(catalog, cache, cfg, seed=3), sampler(catalog, cache, cfg, seed=3)
    for index in (0, 5):
        x, y = a.batch(index), b.batch(index)
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
        assert x["case_id"] == y["case_id"]
    other_rank = sampler(catalog, cache, cfg, seed=3, rank=1).batch(0)
    other_seed = sampler(catalog, cache, cfg, seed=4).batch(0)
    first = a.batch(0)
    assert not torch.equal(other_rank["image"], first["image"])
    assert not torch.equal(other_seed["image"], first["image"])
    # Resuming at step 2 gives the batches an uninterrupted run gives at steps 2, 3.
    full = list(make_train_loader(catalog, cache, cfg, seed=3, num_batches=4))
    resumed = list(make_train_loader(catalog, cache, cfg, seed=3, start_step=2, num_batches=2))
    for x, y in zip(full[2:], resumed):
        assert torch.equal(x["image"], y["image"]) and x["case_id"] == y["case_id"]


def test_loader_workers_give_the_same_stream(prepared) -> None:
    catalog, cache = prepared
    serial = list(make_train_loader(catalog, cache, config(), seed=1, num_batches=4))
    parallel = list(make_train_loader(catalog, cache, config(num_workers=2), seed=1, num_batches=4))
    assert [b["case_id"] for b in serial] == [b["case_id"] for b in parallel]
    for x, y in zip(serial, parallel):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
    with pytest.raises(ConfigError, match="rank 2 is outside world size 2"):
        make_train_loader(catalog, cache, config(), seed=1, rank=2, world_size=2)


def test_split_cases_deterministic() -> None:
    cases = {"A": [f"a{i}" for i in range(20)], "B": ["b0", "b1"], "C": ["c0"]}
    train, val = split_cases(cases, 0.1, 1, seed=0)
    assert len(val["A"]) == 2 and len(val["B"]) == 1 and val["C"] == []
    assert set(train["A"]) | set(val["A"]) == set(cases["A"]) and not set(train["A"]) & set(val["A"])
    assert split_cases(dict(reversed(list(cases.items()))), 0.1, 1, seed=0)[1] == val
    assert split_cases(cases, 0.1, 1, seed=1)[1]["A"] != val["A"]
    assert split_cases(cases, 0.0, 1, seed=0)[1]["A"] == []


def test_dataset_probabilities() -> None:
    cases = {"big": ["x"] * 100, "small": ["y"] * 4, "empty": []}
    assert dataset_probabilities(cases, 0.0) == {"big": 0.5, "small": 0.5}
    p = dataset_probabilities(cases, 1.0)
    assert p["big"] == pytest.approx(100 / 104)
    p = dataset_probabilities(cases, 0.5, {"small": 30.0})
    assert p["small"] == pytest.approx(30 / 40)
    assert "big" not in dataset_probabilities(cases, 0.5, {"big": 0.0})
    with pytest.raises(ConfigError, match="unknown dataset 'typo'"):
        dataset_probabilities(cases, 0.5, {"typo": 1.0})


def binomial_tolerance(p: float, n: int, z: float = 4.5) -> float:
    """Half-width of a z-sigma band for a frequency estimated from n draws (false alarm ~1e-5)."""
    return z * math.sqrt(max(p * (1 - p), 1e-4) / n)


@pytest.fixture(scope="module")
def speck(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, Path]:
    """Cases whose only structure is a 3x3x3 speck in a 36^3 body: a random patch centre lands
    on it with probability ~1e-3, so the share of centres on it measures the oversampling."""
    root = tmp_path_factory.mktemp("speck")
    folder = root / "Dataset960_Speck"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "speck": 1}, "file_ending": ".nii.gz", "numTraining": 3,
    }))
    rng = np.random.default_rng(0)
    for i, corner in enumerate([(5, 5, 5), (20, 8, 14), (10, 25, 27)]):
        label = np.zeros((36, 36, 36), np.uint8)
        label[tuple(slice(c, c + 3) for c in corner)] = 1
        image = 100.0 + 50.0 * label + rng.normal(0, 1, label.shape)
        save_image(folder / "imagesTr" / f"s{i}_0000.nii.gz", image.astype(np.float32), np.eye(4))
        save_image(folder / "labelsTr" / f"s{i}.nii.gz", label, np.eye(4))
    (root / "catalog.yaml").write_text(yaml.safe_dump({"datasets": [{"path": str(folder)}]}))
    catalog = load_catalog(root / "catalog.yaml")
    prepare_cache(catalog, root / "cache", workers=1, progress=False)
    return catalog, root / "cache"


def test_foreground_share_follows_foreground_fraction(speck) -> None:
    """Over many batches, the share of patches centred on foreground is the configured
    ``foreground_fraction`` (plus the ~1e-3 chance of a random centre hitting the speck),
    within a binomial bound, whatever the seed."""
    catalog, cache = speck
    patch, batches = 9, 150
    ids = {"Speck": open_cache(cache).cases["Speck"]["train"]}
    for seed, fraction in [(0, 0.0), (1, 0.2), (2, 0.5), (3, 0.85), (4, 1.0)]:
        cfg = config(patch_size=[patch] * 3, batch_size=8, foreground_fraction=fraction, augment=AugmentConfig(enabled=False))
        smp = PatchSampler(catalog, str(cache), cfg, ids, seed=seed)
        centre = patch // 2  # an odd patch: its centre voxel is the sampled centre
        hits = [float(v) for b in map(smp.batch, range(batches)) for v in b["target"][:, 0, centre, centre, centre]]
        n = len(hits)
        assert abs(np.mean(hits) - fraction) <= binomial_tolerance(fraction, n) + 0.005, (seed, fraction, np.mean(hits))


def test_dataset_frequencies_follow_dataset_probabilities(prepared) -> None:
    """Each dataset's share of many samples is its ``dataset_probabilities`` value within a
    binomial bound: case-count weighting (power 1 over 3/1/2 cases) and explicit weights."""
    catalog, cache = prepared
    cases = open_cache(cache).cases
    train = {"AbdomenCT": cases["AbdomenCT"]["train"][:3], "LiverCT": cases["LiverCT"]["train"][:1],
             "BrainT1": cases["BrainT1"]["train"][:2]}
    assert [len(v) for v in train.values()] == [3, 1, 2]
    settings = [
        ({"sampling_power": 1.0}, {"AbdomenCT": 3 / 6, "LiverCT": 1 / 6, "BrainT1": 2 / 6}),
        ({"sampling_power": 0.0}, {"AbdomenCT": 1 / 3, "LiverCT": 1 / 3, "BrainT1": 1 / 3}),
        ({"dataset_weights": {"LiverCT": 6.0, "BrainT1": 0.0}}, {"AbdomenCT": 3**0.5 / (6 + 3**0.5), "LiverCT": 6 / (6 + 3**0.5)}),
    ]
    for seed, (extra, expected) in enumerate(settings):
        cfg = config(patch_size=[8, 8, 8], batch_size=16, augment=AugmentConfig(enabled=False), **extra)
        assert dataset_probabilities(train, cfg.sampling_power, cfg.dataset_weights) == pytest.approx(expected)
        smp = PatchSampler(catalog, str(cache), cfg, train, seed=seed)
        names = [catalog.datasets[i].name for b in map(smp.batch, range(100)) for i in b["dataset_id"].tolist()]
        for name in train:
            share = names.count(name) / len(names)
            p = expected.get(name, 0.0)
            assert abs(share - p) <= binomial_tolerance(p, len(names)), (extra, name, share, p)


def test_foreground_fraction_one_and_zero_weights(prepared) -> None:
    catalog, cache = prepared
    no_aug = AugmentConfig(enabled=False)
    fg = sampler(catalog, cache, config(batch_size=8, foreground_fraction=1.0, augment=no_aug))
    # A sample centred on a class always contains that class, so with fraction 1 every
    # sample has at least one positive task channel.
    for b in map(fg.batch, range(4)):
        assert torch.all(b["target"].flatten(2).amax(2).amax(1) == 1)
    only = sampler(catalog, cache, config(dataset_weights={"LiverCT": 0.0, "BrainT1": 0.0}))
    assert all(catalog.datasets[i].name == "AbdomenCT" for i in only.batch(0)["dataset_id"].tolist())


def test_patch_larger_than_volume_is_padded(prepared) -> None:
    catalog, cache = prepared
    cfg = config(patch_size=[96, 96, 96], batch_size=1, augment=AugmentConfig(enabled=False))
    batch = sampler(catalog, cache, cfg).batch(0)
    case = load_cached_case(cache, catalog.datasets[int(batch["dataset_id"][0])].name, batch["case_id"][0])
    assert max(case.image.shape[1:]) < 96
    image = batch["image"][0, 0]
    assert image.shape == (96, 96, 96)
    assert torch.all(image[0] == float(case.meta["pad_value"][0]))  # the border is padding
    assert batch["target"][0, :, 0].sum() == 0

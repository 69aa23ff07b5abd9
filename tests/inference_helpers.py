"""Build small saved model directories (random weights) for the inference/evaluation tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from hermes.bundle import ModelBundle, Preprocessing, TrainingRecord, catalog_path
from hermes.config import ModelConfig
from hermes.data.catalog import Catalog, DatasetEntry, TaskSpec
from hermes.data.modalities import ModalityVocabulary
from hermes.data.normalization import ChannelNorm
from hermes.data.preprocess import PreprocessPlan
from hermes.models.registry import build_model, save_model

# (dataset name, modality, label names, dataset folder or None); a tuple of modalities is a
# multi-channel dataset (one channel each, the first is the dataset's modality)
DatasetDef = tuple[str, str | tuple[str, ...], Sequence[str], Path | None]


def make_catalog(datasets: Sequence[DatasetDef]) -> Catalog:
    vocabulary = ModalityVocabulary.builtin()
    tasks: list[TaskSpec] = []
    entries: list[DatasetEntry] = []
    for name, modalities, labels, folder in datasets:
        channels = (modalities,) if isinstance(modalities, str) else tuple(modalities)
        modality = channels[0]
        ids = []
        for label in labels:
            ids.append(len(tasks))
            tasks.append(TaskSpec(f"{name}/{label}", len(tasks), ((name, label),)))
        entries.append(
            DatasetEntry(
                name=name,
                path=folder or Path(f"/nonexistent/{name}"),
                folder=folder.name if folder else f"Dataset900_{name}",
                modality=modality,
                modality_id=vocabulary.id(modality),
                family=vocabulary.family(modality),
                channel_names=channels,
                channel_modalities=tuple(vocabulary.lookup(c) for c in channels),
                labels={"background": 0, **{label: i for i, label in enumerate(labels, start=1)}},
                task_ids=ids,
                label_values=[(i,) for i in range(1, len(labels) + 1)],
                local_names=list(labels),
                num_train=2,
                num_test=1,
            )
        )
    return Catalog(tasks=tasks, vocabulary=vocabulary, datasets=entries)


def make_model_dir(
    directory: Path,
    datasets: Sequence[DatasetDef] = (("CTSet", "CT", ("liver", "kidney"), None), ("MRSet", "T1", ("hippo",), None)),
    spacing: Sequence[float] = (2.0, 2.0, 2.0),
    patch_size: Sequence[int] = (32, 32, 32),
    architecture: str = "hermes_resunet",
    preset: str = "tiny",
    seed: int = 0,
    layout: str = "trainer",
    **model_overrides: object,
) -> Path:
    """A saved model directory as the trainer writes it (random weights)."""
    torch.manual_seed(seed)
    catalog = make_catalog(datasets)
    config = ModelConfig(architecture=architecture, preset=preset, **model_overrides)  # type: ignore[arg-type]
    own = None if architecture.startswith("hermes_") else catalog.datasets[0].task_ids
    model = build_model(config, catalog.num_tasks, catalog.num_modalities, own, patch_size)
    plans = {}
    for entry in catalog.datasets:
        norms = tuple(
            ChannelNorm("ct", ct_mean=40.0, ct_std=300.0) if family == "ct" else ChannelNorm(family)
            for family in (catalog.vocabulary.family(m) for m in entry.channel_modalities)
        )
        plans[entry.name] = PreprocessPlan(entry.name, entry.modality, tuple(spacing), norms).to_dict()  # type: ignore[arg-type]
    if layout == "trainer":  # what hermes.training.plan.model_bundle writes
        by_modality: dict[str, dict] = {}
        for entry in catalog.datasets:
            by_modality.setdefault(entry.modality, plans[entry.name])
        datasets_info = [{k: v for k, v in e.to_dict().items() if k != "path"} for e in catalog.datasets]
        bundle = ModelBundle(
            task_names=catalog.task_names,
            modalities=catalog.modalities,
            datasets=datasets_info,
            preprocessing=Preprocessing(datasets=plans, modalities=by_modality),
            training=TrainingRecord(steps=0, note="random weights for tests"),
            network=model.build_spec,
        )
    else:  # adaptation output: serialised catalog, no catalog summary
        bundle = ModelBundle(catalog=catalog.to_dict(), preprocessing=Preprocessing(datasets=plans), network=model.build_spec)
    save_model(directory, model, bundle)
    if all(folder is not None for *_, folder in datasets):
        catalog_yaml = {"datasets": [{"path": str(folder), "name": name, "modality": modality}
                                     for name, modality, _, folder in datasets if isinstance(modality, str)]}
        catalog_path(directory).write_text(yaml.safe_dump(catalog_yaml))
    return directory

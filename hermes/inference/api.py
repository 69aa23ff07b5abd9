"""Python API of ``hermes predict``: the same inputs, outputs and rules as the command.

    from hermes.inference import predict
    result = predict("runs/model", "ct.nii.gz", tasks=["liver"])       # arrays + metadata
    result.labels, result.affine, result.label_map(), result.modality

    from hermes.inference.api import predict_files
    predict_files("runs/model", "imagesTs/", "predictions/")           # what the CLI does

Inputs: a NIfTI/NRRD/MHA file, a DICOM series folder, or a folder of image files (nnU-Net's
``CASE_0000.nii.gz`` channel naming is grouped into cases; a gap in a case's channel numbers is
a missing channel, which a ``channel_fusion: mean`` model predicts without, with a warning).
Outputs: one multi-label image + a JSON sidecar of label names per case, or one folder of binary
masks per case.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from hermes.config import InferenceConfig
from hermes.data.imageio import Image, image_suffix, save_image
from hermes.errors import ConfigError, DataError
from hermes.fileio import atomic_directory, atomic_write_json
from hermes.inference.channels import image_source
from hermes.inference.predictor import (
    Prediction,
    Predictor,
    check_output,
    describe,
    safe_name,
    sidecar_path,
)

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _config(
    config: InferenceConfig | None, tta: bool | None, output: str | None, **overrides: object
) -> InferenceConfig:
    config = (config or InferenceConfig()).model_copy()
    updates = {k: v for k, v in overrides.items() if v is not None}
    if tta is not None:
        updates["mirror_tta"] = tta
    if output is not None:
        updates["output"] = output
    return InferenceConfig.model_validate({**config.model_dump(), **updates})


def predict(
    model_dir: str | Path,
    image: str | Path | Image | Sequence[str | Path | Image],
    tasks: Sequence[str] | None = None,
    modality: str | None = None,
    output: Literal["multilabel", "binary"] | None = None,
    device: str | None = None,
    tta: bool | None = None,
    config: InferenceConfig | None = None,
    progress: bool = True,
    dataset: str | None = None,
) -> Prediction:
    """Segment one image (file, DICOM folder, :class:`Image` or one file per channel).

    Returns a :class:`Prediction` on the input's exact grid: ``labels`` (multi-label) or
    ``masks`` (binary), ``affine``, ``tasks``, ``label_map()``, ``modality`` and its probability.
    Without ``modality`` the model's modality head decides; without ``tasks``, every task
    trained for that modality. For many images build one :class:`Predictor` and reuse it.
    """
    predictor = Predictor(model_dir, device=device, config=_config(config, tta, output))
    return predictor.predict(image, tasks=tasks, modality=modality, progress=progress, dataset=dataset)


@dataclass(frozen=True)
class CaseInput:
    case_id: str
    paths: tuple[Path | None, ...]  # one per channel (a DICOM folder counts as one); None: missing

    @property
    def source(self) -> Path:
        """The first given file: the case's name and grid."""
        return image_source(self.paths)


def discover_inputs(path: str | Path) -> tuple[list[CaseInput], bool]:
    """``(cases, is_folder_of_cases)`` for a file, a DICOM series folder or a folder of files."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input not found: {path}")
    if path.is_file():
        if not image_suffix(path):
            raise DataError(f"{path}: unsupported input (a .nii/.nii.gz/.nrrd/.mha file or a DICOM folder)")
        return [CaseInput(_strip_channel(_stem(path)), (path,))], False
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".") and image_suffix(p)]
    if not files:
        return [CaseInput(path.name, (path,))], False  # a DICOM series folder
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    for file in files:
        stem = _stem(file)
        match = _CHANNEL.match(stem)
        if match:
            groups[match["case"]][int(match["channel"])] = file
        else:
            groups[stem][0] = file
    cases = []
    for case_id, channels in sorted(groups.items()):
        # a gap (CASE_0002 absent) is a missing channel: the predictor names it, or refuses it
        # for a model that needs every channel
        cases.append(CaseInput(case_id, tuple(channels.get(c) for c in range(max(channels) + 1))))
    return cases, True


def _stem(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def _strip_channel(stem: str) -> str:
    match = _CHANNEL.match(stem)
    return match["case"] if match and match["channel"] == "0000" else stem


def output_paths(
    cases: Sequence[CaseInput], output: Path, folder_input: bool, mode: str
) -> dict[str, Path]:
    """Where each case goes: multi-label ``OUTPUT`` (a file) or ``OUTPUT/<case>.nii.gz``;
    binary ``OUTPUT`` or ``OUTPUT/<case>/`` (folders of masks)."""
    if mode == "binary":
        if image_suffix(output):
            raise DataError(f"{output}: binary output writes one file per task; give a folder, not a file name")
        if folder_input:
            return {c.case_id: output / c.case_id for c in cases}
        return {cases[0].case_id: output}
    if not folder_input and image_suffix(output):
        return {cases[0].case_id: output}
    if folder_input and image_suffix(output):
        raise DataError(f"{output}: the input is a folder of cases, so the output must be a folder")
    return {c.case_id: output / f"{c.case_id}.nii.gz" for c in cases}


def _predict_case(
    predictor: Predictor,
    case: CaseInput,
    target: Path,
    tasks: Sequence[str] | None,
    modality: str | None,
    overwrite: bool,
    progress: bool,
    verbose: bool,
    dataset: str | None = None,
    check: Callable[[Prediction], None] | None = None,
) -> Prediction:
    """Predict one case and write it; ``check(prediction)`` runs before anything is written."""
    check_output(target, overwrite)
    image_input: Path | list[Path | None] = case.source if len(case.paths) == 1 else list(case.paths)
    if predictor.config.output == "binary":
        with atomic_directory(target, overwrite=True) as tmp:
            holder: dict[str, np.ndarray] = {}

            def write_mask(task: str, mask: np.ndarray) -> None:
                save_image(tmp / f"{safe_name(task)}.nii.gz", mask.astype(np.uint8), holder["affine"])

            image = predictor.load_case(image_input)
            holder["affine"] = image.affine
            prediction = predictor.predict(
                image, tasks=tasks, modality=modality, progress=progress, on_mask=write_mask, verbose=verbose,
                dataset=dataset,
            )
            if check is not None:
                check(prediction)
            files = {task: f"{safe_name(task)}.nii.gz" for task in prediction.tasks}
            atomic_write_json(tmp / "labels.json", {**prediction.metadata(), "files": files})
        return prediction
    prediction = predictor.predict(
        image_input, tasks=tasks, modality=modality, progress=progress, verbose=verbose, dataset=dataset
    )
    if check is not None:
        check(prediction)
    prediction.save(target, overwrite=True)
    return prediction


def predict_files(
    model_dir: str | Path,
    input: str | Path,
    output: str | Path,
    tasks: Sequence[str] | None = None,
    modality: str | None = None,
    output_mode: Literal["multilabel", "binary"] | None = None,
    overwrite: bool = False,
    device: str | None = None,
    tta: bool | None = None,
    config: InferenceConfig | None = None,
    progress: bool = True,
    verbose: bool = True,
    dataset: str | None = None,
    resume: bool = False,
    output_format: str = "nifti",
    reference_series: str | Path | None = None,
    engine: str = "torch",
) -> dict[str, Path]:
    """What ``hermes predict`` does; returns ``case_id -> written path``.

    Every target (and its ``CASE.json`` label map) is checked before any work: an existing
    output stops the run (naming it) unless ``overwrite``. A folder of multi-label outputs also
    gets an nnU-Net-style ``dataset.json`` when every case has the same label map; one that
    exists already is never rewritten without ``overwrite``: the run stops, before writing a
    case, if the case's label map differs from it (each case's own map is its ``CASE.json``).
    ``resume`` (``--continue``): cases whose outputs are complete are skipped
    (hermes/inference/resume.py), the others are predicted, replacing an incomplete leftover of
    the interrupted run. ``output_format`` "dicom-seg"/"rtstruct": see
    :mod:`hermes.inference.dicom_out`; ``engine`` "onnxruntime": see :mod:`hermes.inference.onnx_engine`.
    """
    from hermes.inference.resume import completed_label_map, completed_metadata

    if resume and overwrite:
        raise ConfigError("--continue keeps finished outputs and --overwrite replaces them; pass one of the two")
    config = _config(config, tta, output_mode)
    if output_format != "nifti":
        from hermes.inference.dicom_out import predict_dicom_files

        return predict_dicom_files(
            Predictor(model_dir, device=device, config=config, engine=engine), input, output, output_format,
            reference_series, tasks, modality, dataset, overwrite, progress, verbose,
        )
    if reference_series is not None:
        raise DataError("--reference-series is only used with --format dicom-seg or rtstruct")
    cases, folder_input = discover_inputs(input)
    targets = output_paths(cases, Path(output), folder_input, config.output)
    done = {c for c, p in targets.items() if resume and completed_metadata(p, config.output) is not None}
    if not overwrite and not resume:
        planned = [*targets.values()]
        if config.output == "multilabel":
            planned += [sidecar_path(p) for p in targets.values()]
        existing = [str(p) for p in planned if p.exists()]
        if existing:
            shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
            raise DataError(f"output exists: {shown}; pass --overwrite to replace")
    dataset_json = Path(output) / "dataset.json"
    kept_labels = None  # the label map of a dataset.json this run must not change
    if folder_input and config.output == "multilabel" and dataset_json.exists() and not overwrite:
        kept_labels = _existing_label_map(dataset_json)
    predictor = Predictor(model_dir, device=device, config=config, engine=engine)

    def check(prediction: Prediction) -> None:
        if kept_labels is not None and prediction.label_map() != kept_labels:
            raise DataError(
                f"{dataset_json} (not written by this run) maps labels {kept_labels}, but this run predicts "
                f"{prediction.label_map()}; it is left unchanged. Predict into another folder, or pass --overwrite "
                "to replace it (each case's label map is also written to CASE.json)"
            )

    label_maps = []
    bar = tqdm(cases, desc="cases", unit="case", disable=not (progress and folder_input))
    for case in bar:
        if case.case_id in done:
            label_maps.append(completed_label_map(targets[case.case_id], config.output) or {})
            if verbose:
                tqdm.write(f"{case.case_id}: complete output kept (--continue): {targets[case.case_id]}", file=sys.stderr)
            continue
        prediction = _predict_case(
            predictor, case, targets[case.case_id], tasks, modality, overwrite or resume, progress and not folder_input,
            verbose, dataset, check,
        )
        label_maps.append(prediction.label_map())
        if verbose:
            message = f"{case.case_id}: {describe(prediction)} -> {targets[case.case_id]}"
            if folder_input:
                tqdm.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr)
    if folder_input and config.output == "multilabel" and label_maps and kept_labels is None:
        if all(m == label_maps[0] for m in label_maps):
            # nnU-Net-style dataset.json so that other tools find the label names.
            atomic_write_json(dataset_json, {"labels": label_maps[0], "file_ending": ".nii.gz"})
        elif dataset_json.exists():  # --overwrite: a folder-level map would be wrong for some cases
            dataset_json.unlink()
    return targets


def _existing_label_map(path: Path) -> dict[str, int]:
    """The ``labels`` of an existing dataset.json, which predictions must match to share it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: exists and is not valid JSON ({error}); pass --overwrite to replace it") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict):
        raise DataError(f"{path}: exists and has no 'labels' mapping; predict into another folder or pass --overwrite")
    return labels


__all__ = ["CaseInput", "discover_inputs", "output_paths", "predict", "predict_files", "sidecar_path"]

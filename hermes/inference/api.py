"""Python API of ``hermes predict``: the same inputs, outputs and rules as the command.

    from hermes.inference import predict
    result = predict("runs/model", "ct.nii.gz", tasks=["liver"])       # arrays + metadata
    result.labels, result.affine, result.label_map(), result.modality

    from hermes.inference.api import predict_files
    predict_files("runs/model", "imagesTs/", "predictions/")           # what the CLI does

Inputs: a NIfTI/NRRD/MHA file, a DICOM series folder, or a folder of image files (nnU-Net's
``CASE_0000.nii.gz`` channel naming is grouped into cases). Outputs: one multi-label image +
a JSON sidecar of label names per case, or one folder of binary masks per case.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from hermes.config import InferenceConfig
from hermes.data.imageio import Image, image_suffix, save_image
from hermes.errors import DataError
from hermes.fileio import atomic_directory, atomic_write_json
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
    paths: tuple[Path, ...]  # one per channel (a DICOM folder counts as one)


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
        if sorted(channels) != list(range(len(channels))):
            raise DataError(f"{path}: case {case_id} has channels {sorted(channels)}; expected 0..{len(channels) - 1}")
        cases.append(CaseInput(case_id, tuple(channels[c] for c in sorted(channels))))
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
) -> Prediction:
    check_output(target, overwrite)
    image_input: Path | list[Path] = case.paths[0] if len(case.paths) == 1 else list(case.paths)
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
            files = {task: f"{safe_name(task)}.nii.gz" for task in prediction.tasks}
            atomic_write_json(tmp / "labels.json", {**prediction.metadata(), "files": files})
        return prediction
    prediction = predictor.predict(
        image_input, tasks=tasks, modality=modality, progress=progress, verbose=verbose, dataset=dataset
    )
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
    output_format: str = "nifti",
    reference_series: str | Path | None = None,
    engine: str = "torch",
) -> dict[str, Path]:
    """What ``hermes predict`` does; returns ``case_id -> written path``.

    Every target is checked before any work: an existing output stops the run (naming it)
    unless ``overwrite``. ``output_format`` "dicom-seg"/"rtstruct": see
    :mod:`hermes.inference.dicom_out`; ``engine`` "onnxruntime": see :mod:`hermes.inference.onnx`.
    """
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
    if not overwrite:
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
            raise DataError(f"output exists: {shown}; pass --overwrite to replace")
    predictor = Predictor(model_dir, device=device, config=config, engine=engine)
    label_maps = []
    bar = tqdm(cases, desc="cases", unit="case", disable=not (progress and folder_input))
    for case in bar:
        prediction = _predict_case(
            predictor, case, targets[case.case_id], tasks, modality, overwrite, progress and not folder_input, verbose,
            dataset,
        )
        label_maps.append(prediction.label_map())
        if verbose:
            message = f"{case.case_id}: {describe(prediction)} -> {targets[case.case_id]}"
            if folder_input:
                tqdm.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr)
    if folder_input and config.output == "multilabel" and label_maps and all(m == label_maps[0] for m in label_maps):
        # nnU-Net-style dataset.json so `hermes evaluate --pred` finds the label names.
        atomic_write_json(Path(output) / "dataset.json", {"labels": label_maps[0], "file_ending": ".nii.gz"})
    return targets


__all__ = ["CaseInput", "discover_inputs", "output_paths", "predict", "predict_files", "sidecar_path"]

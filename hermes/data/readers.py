"""Open nnU-Net v2 raw and Medical Segmentation Decathlon dataset folders.

Both layouts become one :class:`DatasetInfo` (docs/architecture.md): the channel names, the
label map and the list of cases with their files. Opening a dataset checks that every file
the layout implies exists and pairs up (a missing channel, a label without its image, a
training image without its label), so these problems surface at once with the file named,
not as a crash hours into preprocessing. Voxels are never read here; :meth:`DatasetInfo.spacing`
reads one header.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hermes.data.imageio import SUPPORTED_SUFFIXES, load_header
from hermes.errors import DataError

Split = Literal["train", "test"]
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseRef:
    case_id: str
    image_paths: tuple[Path, ...]  # one per channel (MSD: one 4D file holding all channels)
    label_path: Path | None  # None for unlabelled test images
    split: Split


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # folder name, e.g. "Dataset101_AbdomenCT"
    path: Path
    channel_names: tuple[str, ...]  # as in dataset.json, channel order
    labels: dict[str, int]  # name -> value, background included
    cases: tuple[CaseRef, ...]
    layout: Literal["nnunet", "msd"] = "nnunet"
    file_ending: str = ".nii.gz"
    description: str = field(default="", compare=False)

    def train_cases(self) -> list[CaseRef]:
        return [case for case in self.cases if case.split == "train"]

    def test_cases(self) -> list[CaseRef]:
        return [case for case in self.cases if case.split == "test"]

    def case(self, case_id: str) -> CaseRef:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise DataError(f"{self.path}: no case {case_id!r}")

    def foreground_labels(self) -> dict[str, int]:
        return {name: value for name, value in self.labels.items() if value != 0}

    def spacing(self, case: CaseRef | str) -> tuple[float, float, float]:
        """Voxel spacing (mm, file voxel-axis order) from the image header only."""
        ref = self.case(case) if isinstance(case, str) else case
        return load_header(ref.image_paths[0]).spacing


# ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: dataset.json not found (expected an nnU-Net v2 or MSD dataset folder)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return data


def _channel_names(raw: Any, json_path: Path, key: str) -> tuple[str, ...]:
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{json_path}: '{key}' must be a non-empty mapping like {{\"0\": \"CT\"}}")
    try:
        ordered = sorted(raw.items(), key=lambda item: int(item[0]))
    except ValueError:
        raise DataError(f"{json_path}: '{key}' keys must be channel numbers \"0\", \"1\", ...") from None
    if [int(k) for k, _ in ordered] != list(range(len(ordered))):
        raise DataError(f"{json_path}: '{key}' must number channels 0..{len(ordered) - 1} without gaps")
    return tuple(str(v) for _, v in ordered)


def _check_labels(labels: dict[str, int], json_path: Path) -> dict[str, int]:
    if 0 not in labels.values():
        raise DataError(f"{json_path}: 'labels' needs a background entry with value 0")
    values = list(labels.values())
    if len(set(values)) != len(values):
        raise DataError(f"{json_path}: 'labels' has repeated values {sorted(values)}")
    if min(values) < 0:
        raise DataError(f"{json_path}: 'labels' has a negative value")
    return dict(sorted(labels.items(), key=lambda item: item[1]))


def _nnunet_labels(raw: Any, json_path: Path) -> dict[str, int]:
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{json_path}: 'labels' must be a mapping like {{\"background\": 0, \"liver\": 1}}")
    labels: dict[str, int] = {}
    for name, value in raw.items():
        if isinstance(value, list | tuple):
            raise DataError(
                f"{json_path}: label {name!r} is a region ({value}); region-based labels are not supported, "
                "list each label value under its own name (a catalog task can unite values)"
            )
        try:
            labels[str(name)] = int(value)
        except (TypeError, ValueError):
            raise DataError(f"{json_path}: label {name!r} has a non-integer value {value!r}") from None
    return _check_labels(labels, json_path)


def _msd_labels(raw: Any, json_path: Path) -> dict[str, int]:
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{json_path}: 'labels' must be a mapping like {{\"0\": \"background\", \"1\": \"liver\"}}")
    labels: dict[str, int] = {}
    for value, name in raw.items():
        try:
            labels[str(name)] = int(value)
        except (TypeError, ValueError):
            raise DataError(f"{json_path}: MSD 'labels' keys must be label values, got {value!r}") from None
    return _check_labels(labels, json_path)


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) and len(name) > len(ending) else None


def _scan_images(folder: Path, ending: str, n_channels: int) -> dict[str, tuple[Path, ...]]:
    """Group `CASE_XXXX<ending>` files by case; every case must have channels 0..n-1."""
    found: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stem = _strip_ending(path.name, ending)
        if stem is None:
            continue
        match = _CHANNEL_SUFFIX.match(stem)
        if match is None:
            raise DataError(f"{path}: image file name must end in _XXXX{ending} (the 4-digit channel number)")
        found[match["case"]][int(match["channel"])] = path
    cases: dict[str, tuple[Path, ...]] = {}
    for case_id, channels in found.items():
        missing = [c for c in range(n_channels) if c not in channels]
        if missing:
            raise DataError(f"{folder / f'{case_id}_{missing[0]:04d}{ending}'}: missing channel file of case {case_id!r}")
        extra = sorted(set(channels) - set(range(n_channels)))
        if extra:
            raise DataError(
                f"{channels[extra[0]]}: channel {extra[0]} but dataset.json declares {n_channels} channel(s)"
            )
        cases[case_id] = tuple(channels[c] for c in range(n_channels))
    return cases


def _scan_labels(folder: Path, ending: str) -> dict[str, Path]:
    labels: dict[str, Path] = {}
    if not folder.is_dir():
        return labels
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        case_id = _strip_ending(path.name, ending)
        if case_id is not None:
            labels[case_id] = path
    return labels


def _pair(
    images: dict[str, tuple[Path, ...]], labels: dict[str, Path], split: Split, image_dir: Path, need_label: bool
) -> list[CaseRef]:
    for case_id, label in labels.items():
        if case_id not in images:
            raise DataError(f"{label}: label without an image (no {case_id}_0000 file in {image_dir})")
    cases = []
    for case_id in sorted(images):
        label = labels.get(case_id)
        if label is None and need_label:
            raise DataError(f"{images[case_id][0]}: training image without a label in {image_dir.parent / 'labelsTr'}")
        cases.append(CaseRef(case_id, images[case_id], label, split))
    return cases


def _open_nnunet(folder: Path, meta: dict[str, Any], json_path: Path) -> DatasetInfo:
    channel_names = _channel_names(meta.get("channel_names"), json_path, "channel_names")
    labels = _nnunet_labels(meta.get("labels"), json_path)
    ending = meta.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DataError(f"{json_path}: 'file_ending' must be a string like \".nii.gz\"")
    if ending.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(f"{json_path}: file_ending {ending!r} is not a 3D format Hermes reads ({', '.join(SUPPORTED_SUFFIXES)})")
    cases: list[CaseRef] = []
    if isinstance(meta.get("dataset"), dict):
        # nnU-Net v2's explicit form: {"case": {"images": [...], "label": "..."}} (training only).
        for case_id, entry in meta["dataset"].items():
            try:
                images = tuple((folder / p).resolve() for p in entry["images"])
                label = (folder / entry["label"]).resolve()
            except (KeyError, TypeError):
                raise DataError(f"{json_path}: dataset entry {case_id!r} needs 'images' (list) and 'label'") from None
            for path in (*images, label):
                if not path.exists():
                    raise DataError(f"{path}: listed in {json_path} (case {case_id!r}) but not found")
            if len(images) != len(channel_names):
                raise DataError(f"{json_path}: case {case_id!r} has {len(images)} images for {len(channel_names)} channels")
            cases.append(CaseRef(str(case_id), images, label, "train"))
    else:
        images_tr = folder / "imagesTr"
        if not images_tr.is_dir() and not (folder / "imagesTs").is_dir():
            raise DataError(f"{images_tr}: folder not found (nnU-Net v2 layout needs imagesTr/ or imagesTs/)")
        # A test-only dataset (numTraining 0) may have no imagesTr at all.
        train_images = _scan_images(images_tr, ending, len(channel_names)) if images_tr.is_dir() else {}
        cases += _pair(train_images, _scan_labels(folder / "labelsTr", ending), "train", images_tr, need_label=True)
        n_training = meta.get("numTraining")
        if isinstance(n_training, int) and n_training != len(train_images):
            warnings.warn(
                f"{json_path}: numTraining is {n_training} but imagesTr holds {len(train_images)} cases",
                stacklevel=3,
            )
    images_ts = folder / "imagesTs"
    if images_ts.is_dir():
        test_images = _scan_images(images_ts, ending, len(channel_names))
        cases += _pair(test_images, _scan_labels(folder / "labelsTs", ending), "test", images_ts, need_label=False)
    return DatasetInfo(
        name=folder.name,
        path=folder,
        channel_names=channel_names,
        labels=labels,
        cases=tuple(cases),
        layout="nnunet",
        file_ending=ending,
        description=str(meta.get("description", "")),
    )


def _msd_path(folder: Path, entry: Any, json_path: Path, what: str) -> Path:
    if not isinstance(entry, str) or not entry:
        raise DataError(f"{json_path}: {what} must be a relative file path, got {entry!r}")
    path = (folder / entry).resolve()
    if not path.is_file():
        raise DataError(f"{path}: listed in {json_path} as {what} but not found")
    return path


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in SUPPORTED_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _open_msd(folder: Path, meta: dict[str, Any], json_path: Path) -> DatasetInfo:
    channel_names = _channel_names(meta.get("modality"), json_path, "modality")
    labels = _msd_labels(meta.get("labels"), json_path)
    training = meta.get("training", [])
    test = meta.get("test", [])
    if not isinstance(training, list) or not isinstance(test, list):
        raise DataError(f"{json_path}: 'training' and 'test' must be lists")
    cases: list[CaseRef] = []
    seen: set[str] = set()
    for index, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{json_path}: training[{index}] must be {{\"image\": ..., \"label\": ...}}")
        image = _msd_path(folder, entry["image"], json_path, f"training[{index}].image")
        label = _msd_path(folder, entry["label"], json_path, f"training[{index}].label")
        cases.append(CaseRef(_case_id(image), (image,), label, "train"))
    for index, entry in enumerate(test):
        # MSD lists test images as plain paths; some copies use {"image": ..., "label": ...}.
        if isinstance(entry, dict):
            image = _msd_path(folder, entry.get("image"), json_path, f"test[{index}].image")
            label = _msd_path(folder, entry["label"], json_path, f"test[{index}].label") if entry.get("label") else None
        else:
            image = _msd_path(folder, entry, json_path, f"test[{index}]")
            label = None
        cases.append(CaseRef(_case_id(image), (image,), label, "test"))
    for case in cases:
        if case.case_id in seen:
            raise DataError(f"{json_path}: case {case.case_id!r} is listed twice")
        seen.add(case.case_id)
    endings = {s for c in cases for s in SUPPORTED_SUFFIXES if c.image_paths[0].name.lower().endswith(s)}
    return DatasetInfo(
        name=folder.name,
        path=folder,
        channel_names=channel_names,
        labels=labels,
        cases=tuple(cases),
        layout="msd",
        file_ending=sorted(endings)[0] if endings else ".nii.gz",
        description=str(meta.get("description", "")),
    )


def open_dataset(folder: str | Path) -> DatasetInfo:
    """Open an nnU-Net v2 raw (``channel_names``) or MSD (``modality``) dataset folder."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder not found")
    json_path = folder / "dataset.json"
    meta = _read_json(json_path)
    if "channel_names" in meta:
        return _open_nnunet(folder, meta, json_path)
    if "modality" in meta:
        return _open_msd(folder, meta, json_path)
    raise DataError(f"{json_path}: neither 'channel_names' (nnU-Net v2) nor 'modality' (MSD) found")

"""Generate the synthetic cohort as nnU-Net v2 raw datasets.

Each case is a new subject drawn from a generator seeded by (seed, dataset, split, index), so
a case does not depend on how many other cases or datasets are generated, and the same seed
gives byte-identical files (NIfTI gzip is written with a fixed time stamp). A dataset folder
is built in a temporary sibling and renamed when complete: an interrupted run never leaves a
half dataset that looks complete. A folder generated earlier with the same parameters is
reused as is.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel import orientations as nio

from hermes.data.imageio import load_image, reorient_to_ras, save_image
from hermes.errors import DataError
from hermes.fileio import atomic_directory, atomic_write_bytes, atomic_write_json
from hermes.synthetic.datasets import SyntheticDataset, select_datasets
from hermes.synthetic.geometry import Grid
from hermes.synthetic.phantoms import Phantom, render_abdomen, render_head
from hermes.synthetic.render import render

# Bump when the generator changes what it writes for a given seed (invalidates reuse).
GENERATOR_VERSION = 1


@dataclass
class SyntheticCase:
    """One generated case in the dataset's storage orientation (plus its RAS phantom).
    ``image`` is the first channel; ``channels`` every channel (one for most datasets)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    phantom: Phantom
    channels: tuple[np.ndarray, ...] = ()


def case_ids(spec: SyntheticDataset, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    prefix = spec.short_name.lower()
    return [f"{prefix}_{i:03d}" for i in range(n_train)], [f"{prefix}_test{i:03d}" for i in range(n_test)]


def make_case(spec: SyntheticDataset, split: str, index: int, seed: int = 0, scale: float = 1.0) -> SyntheticCase:
    """Generate one case (deterministic in its arguments)."""
    rng = np.random.default_rng([int(seed), spec.number, 0 if split == "train" else 1, int(index)])
    spacing = np.asarray(spec.spacing, dtype=np.float64) / scale
    fov = np.asarray(spec.fov, dtype=np.float64)
    fov[2] *= rng.uniform(0.94, 1.06)  # scan length varies per case, so do slice counts
    centre = np.asarray(spec.fov_centre, dtype=np.float64) + rng.uniform(-8.0, 8.0, 3)
    grid = Grid.around(centre, fov, spacing)
    if spec.phantom == "abdomen":
        phantom = render_abdomen(rng, grid, spec.lesions)
    else:
        phantom = render_head(rng, grid, tumour=spec.phantom == "head_tumour")
    # every sequence of a multi-channel dataset from the same phantom, one after the other
    images = [render(phantom.tissue, grid, sequence, rng) for sequence in spec.sequences]
    label = spec.label_lut()[phantom.tissue]
    if spec.modality == "CT":
        images = [np.round(image).astype(np.int16) for image in images]  # stored as HU integers, like scanners do
    # RAS grid -> the dataset's storage orientation (flips/permutations only: exact).
    transform = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(spec.orientation))
    affine = grid.affine @ nio.inv_ornt_aff(transform, grid.shape)
    channels = tuple(np.ascontiguousarray(nio.apply_orientation(image, transform)) for image in images)
    label = np.ascontiguousarray(nio.apply_orientation(label, transform))
    prefix = spec.short_name.lower()
    case_id = f"{prefix}_{index:03d}" if split == "train" else f"{prefix}_test{index:03d}"
    return SyntheticCase(case_id, channels[0], label, affine, phantom, channels)


def _params(spec: SyntheticDataset, seed: int, scale: float, n_train: int, n_test: int) -> dict[str, object]:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "scale": float(scale),
        "n_train": n_train,
        "n_test": n_test,
    }


def _dataset_json(spec: SyntheticDataset, params: dict[str, object], scale: float) -> dict[str, object]:
    return {
        "name": spec.short_name,
        "description": f"Hermes synthetic cohort, mimics {spec.mimics}: {spec.protocol}.",
        "reference": "Hermes built-in synthetic cohort (procedural phantoms, no patient data)",
        "licence": "CC0-1.0",
        "channel_names": {str(i): name for i, name in enumerate(spec.channel_names)},
        "labels": {"background": 0, **{name: value for value, name in enumerate(spec.label_names, start=1)}},
        "numTraining": params["n_train"],
        "numTest": params["n_test"],
        "file_ending": ".nii.gz",
        "hermes_synthetic": {
            **params,
            "orientation": spec.orientation,
            "spacing": list(spec.spacing_for(scale)),
            "mimics": spec.mimics,
            "protocol": spec.protocol,
        },
    }


def _existing_params(folder: Path) -> dict[str, object] | None:
    """Parameters of a previously generated dataset folder; refuses to touch foreign folders."""
    meta_path = folder / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or "hermes_synthetic" not in meta:
        raise DataError(f"{folder}: exists and is not a Hermes synthetic dataset; not overwriting it")
    synthetic = meta["hermes_synthetic"]
    keys = ("generator_version", "seed", "scale", "n_train", "n_test")
    return {k: synthetic.get(k) for k in keys} if isinstance(synthetic, dict) else None


def generate_cohort(
    out_dir: str | Path,
    seed: int = 0,
    scale: float = 1.0,
    datasets: Sequence[str] | None = None,
    cases: int | None = None,
    test_cases: int | None = None,
    preview: bool = False,
    progress: bool = True,
    overwrite: bool = True,
) -> list[Path]:
    """Write the synthetic datasets under ``out_dir``; returns the dataset folders.

    ``scale`` multiplies the number of voxels per axis (voxel spacing / scale; the anatomy
    keeps its size in mm). ``cases`` / ``test_cases`` override every dataset's number of
    training / test cases. ``datasets`` selects by folder name, short name or number.
    ``preview`` also writes ``out_dir/previews/<dataset>.png``. A dataset folder generated
    with the same parameters is reused as it is; one generated with other parameters is
    replaced only with ``overwrite`` (else nothing is written and the run stops, naming it).
    """
    from tqdm.auto import tqdm

    if scale <= 0:
        raise ValueError("scale must be positive")
    out_dir = Path(out_dir)
    specs = select_datasets(list(datasets) if datasets else None)
    plans = []
    for spec in specs:
        n_train = spec.n_train if cases is None else int(cases)
        n_test = spec.n_test if test_cases is None else int(test_cases)
        plans.append((spec, n_train, n_test))
    if not overwrite:
        for spec, n_train, n_test in plans:
            folder = out_dir / spec.name
            old = _existing_params(folder) if folder.exists() else None
            new = _params(spec, seed, scale, n_train, n_test)
            if old is not None and old != new:
                changed = ", ".join(f"{k} {old.get(k)} -> {new[k]}" for k in new if old.get(k) != new[k])
                raise DataError(
                    f"{folder}: holds a synthetic dataset generated with other parameters ({changed}); "
                    "pass --overwrite to replace it, or choose another --out"
                )
    total = sum(n + m for _, n, m in plans)
    folders: list[Path] = []
    with tqdm(total=total, desc="synthetic cohort", unit="case", disable=not progress) as bar:
        for spec, n_train, n_test in plans:
            folder = out_dir / spec.name
            params = _params(spec, seed, scale, n_train, n_test)
            reused = folder.exists() and _existing_params(folder) == params
            if reused:
                bar.update(n_train + n_test)
            else:
                bar.set_postfix_str(spec.name)
                with atomic_directory(folder, overwrite=True) as tmp:
                    for split, count in (("train", n_train), ("test", n_test)):
                        suffix = "Tr" if split == "train" else "Ts"
                        (tmp / f"images{suffix}").mkdir()
                        (tmp / f"labels{suffix}").mkdir()
                        for index in range(count):
                            case = make_case(spec, split, index, seed, scale)
                            for channel, image in enumerate(case.channels):
                                save_image(
                                    tmp / f"images{suffix}" / f"{case.case_id}_{channel:04d}.nii.gz", image, case.affine
                                )
                            save_image(tmp / f"labels{suffix}" / f"{case.case_id}.nii.gz", case.label, case.affine)
                            bar.update(1)
                    # dataset.json last: a folder with it is a complete dataset.
                    atomic_write_json(tmp / "dataset.json", _dataset_json(spec, params, scale))
            folders.append(folder)
            preview_path = out_dir / "previews" / f"{spec.name}.png"
            if preview and (overwrite or not reused or not preview_path.exists()):
                write_preview(folder, preview_path)
    return folders


def summarize(folder: Path) -> dict[str, object]:
    """One table row describing a generated dataset (for the CLI)."""
    from hermes.data.imageio import load_header
    from hermes.data.readers import open_dataset

    info = open_dataset(folder)
    header = load_header(info.cases[0].image_paths[0])
    shapes = sorted({load_header(c.image_paths[0]).shape for c in info.cases})
    meta = json.loads((folder / "dataset.json").read_text())["hermes_synthetic"]
    return {
        "dataset": info.name,
        "modality": "+".join(info.channel_names),
        "train": len(info.train_cases()),
        "test": len(info.test_cases()),
        "shape": "x".join(map(str, shapes[0])) + (f"..{'x'.join(map(str, shapes[-1]))}" if len(shapes) > 1 else ""),
        "spacing": "x".join(f"{s:g}" for s in np.round(header.spacing, 2)),
        "orientation": meta["orientation"],
        "labels": ", ".join(f"{v} {k}" for k, v in info.labels.items() if v),
    }


# ----------------------------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------------------------
def _window(image: np.ndarray, modality: str) -> tuple[float, float]:
    if modality == "CT":
        return -250.0, 350.0
    low, high = np.percentile(image, [1.0, 99.5])
    return float(low), float(high)


def _best_slice(label: np.ndarray, axis: int) -> int:
    """The slice showing the most label classes (ties: most foreground)."""
    moved = np.moveaxis(label, axis, 0).reshape(label.shape[axis], -1)
    n_classes = np.array([len(np.unique(s[s > 0])) for s in moved])
    area = (moved > 0).sum(axis=1)
    if area.max() == 0:
        return label.shape[axis] // 2
    return int(np.lexsort((area, n_classes))[-1])


def write_preview(folder: Path, png: Path) -> Path:
    """An axial and a coronal slice of the first training case, label overlay and legend.

    Slices are shown in the radiological convention (patient's right on the left of the
    picture, anterior / superior at the top) after reorienting to RAS, so a wrongly stored
    orientation shows up as anatomy on the wrong side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from hermes.data.readers import open_dataset

    info = open_dataset(folder)
    case = info.train_cases()[0] if info.train_cases() else info.cases[0]
    image = load_image(case.image_paths[0])
    label = load_image(case.label_path) if case.label_path else None
    img, affine, _ = reorient_to_ras(image.array.astype(np.float32), image.affine)
    lab = reorient_to_ras(label.array, label.affine)[0] if label is not None else np.zeros(img.shape, np.uint8)
    sx, sy, sz = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    modality = info.channel_names[0]
    vmin, vmax = _window(img, modality)
    cmap = plt.get_cmap("tab10")
    names = {v: k for k, v in info.labels.items() if v}

    z = _best_slice(lab, 2)
    y = _best_slice(lab, 1)
    views = [
        ("axial", img[::-1, ::-1, z].T, lab[::-1, ::-1, z].T, sy / sx, f"z={z}"),
        ("coronal", img[::-1, y, ::-1].T, lab[::-1, y, ::-1].T, sz / sx, f"y={y}"),
    ]
    # Top row: the image alone (to judge the modality); bottom row: with the label overlay.
    fig, axes = plt.subplots(2, 2, figsize=(10, 9.5))
    for column, (title, im, lb, aspect, where) in enumerate(views):
        for row in range(2):
            ax = axes[row, column]
            ax.imshow(im, cmap="gray_r" if modality == "PET" else "gray", vmin=vmin, vmax=vmax, aspect=aspect)
            if row == 1:
                overlay = np.zeros((*lb.shape, 4))
                for value in names:
                    overlay[lb == value] = (*cmap((value - 1) % 10)[:3], 0.45)
                ax.imshow(overlay, aspect=aspect, interpolation="nearest")
            ax.set_title(f"{title} ({where}), patient right on the left", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(color=cmap((v - 1) % 10), label=f"{v} {n}") for v, n in sorted(names.items())]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=9, frameon=False)
    spacing = "x".join(f"{s:g}" for s in np.round(image.spacing, 2))
    fig.suptitle(f"{info.name} - {modality} - {case.case_id} - {image.array.shape} @ {spacing} mm", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(png, buffer.getvalue())


def timed_generate(**kwargs: object) -> tuple[list[Path], float]:
    start = time.perf_counter()
    folders = generate_cohort(**kwargs)  # type: ignore[arg-type]
    return folders, time.perf_counter() - start

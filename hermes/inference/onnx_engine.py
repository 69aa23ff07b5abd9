"""ONNX export of a saved model (``hermes export``) and the onnxruntime engine of ``hermes predict``.

**One graph, the prompt as input.** The graph takes the network's own inputs, so one file serves
every dataset prompt and every task subset::

    image        float32 (B, C, X, Y, Z)   preprocessed window (X, Y, Z dynamic)
    task_ids     int64   (B, T)            prompted task ids (T dynamic; the NULL id pads)
    task_mask    bool    (B, T)            False on padded slots
    modality_id  int64   (B,)              modality id (M = unknown)
 -> logits          float32 (B, T, X, Y, Z)
    modality_logits float32 (B, M)         (models with a modality head only)

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript). It translates
``scaled_dot_product_attention`` with its boolean key mask and ``InstanceNorm3d`` with dynamic
spatial sizes; the legacy TorchScript exporter fails on this model ("ONNX export of
instance_norm for unknown channel size" after the trilinear up-sampling of a dynamic size), so
it is not offered. The models' data-dependent argument checks (task id ranges, "at least one
real task") are skipped while exporting (``torch.compiler.is_exporting()``); the predictor never
sends such inputs, and the shapes are still checked by onnxruntime.

Every export is verified before it is kept: onnxruntime and PyTorch on two inputs (the training
window, and a larger window with a different task count) must agree within ``tolerance``; the
largest difference is recorded in ``hermes_onnx.json``.

**Folder** ``OUT/``: ``model.onnx`` (the preprocessing plans also in its metadata_props),
the model's bundle spec (hermes/bundle.py: catalog, plans, patch size; what the predictor reads),
``hermes_onnx.json`` (the inputs/outputs above, the plans, exporter, opset, verification).

**Engine.** ``Predictor(engine="onnxruntime")`` replaces only the network callable: the same
preprocessing, prompt groups, Gaussian sliding window, stitching and restoring run unchanged.
The runtime computes every prompted task and keeps the requested ones (PyTorch's
``output_tasks`` skips the others; the kept logits are the same).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hermes import __version__
from hermes.bundle import ModelBundle
from hermes.errors import ConfigError, DataError, ModelError
from hermes.fileio import atomic_directory, atomic_write_bytes, atomic_write_json
from hermes.models.channel_stem import reads_channels
from hermes.models.hermes import SegmentationOutput
from hermes.models.registry import load_model

ONNX_FILE = "model.onnx"
META_FILE = "hermes_onnx.json"
EXPORT_SUBFOLDER = "onnx"  # MODEL/onnx: where `predict --engine onnxruntime -m MODEL` also looks
INPUTS = ("image", "task_ids", "task_mask", "modality_id")


def _require(module: str) -> Any:
    """Import onnx / onnxruntime / onnxscript lazily with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(
            f"ONNX export/inference needs {module} ({error}); pip install 'hermes-seg[onnx]' "
            "(onnx, onnxruntime, onnxscript)"
        ) from None


class _ExportWrapper(nn.Module):
    """The model with positional tensor inputs and tensor outputs, as an exporter needs."""

    def __init__(self, model: nn.Module, with_modality: bool) -> None:
        super().__init__()
        self.model = model
        self.with_modality = with_modality

    def forward(self, image: torch.Tensor, task_ids: torch.Tensor, task_mask: torch.Tensor,
                modality_id: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image, task_ids, modality_id, task_mask=task_mask)
        if self.with_modality:
            return out.logits, out.modality_logits
        return (out.logits,)


def _example(bundle: ModelBundle, size: Sequence[int], num_tasks: int, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    entry = bundle.network
    channels = entry.config.in_channels
    own = entry.task_ids_of_model
    pool = list(own) if own is not None else list(range(entry.num_tasks))
    ids = [[pool[(b + t) % len(pool)] for t in range(min(num_tasks, len(pool)))] for b in range(batch)]
    image = torch.randn(batch, channels, *size, generator=generator)
    task_ids = torch.tensor(ids, dtype=torch.long)
    task_mask = torch.ones_like(task_ids, dtype=torch.bool)
    modality = torch.zeros(batch, dtype=torch.long)
    return image, task_ids, task_mask, modality


def _has_modality_head(model: nn.Module) -> bool:
    return getattr(model, "modality_head", None) is not None


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    opset: int | None = None,
    overwrite: bool = False,
    tolerance: float = 1e-3,
) -> Path:
    """Export ``model_dir`` to ``out_dir`` (layout in the module docstring); returns the folder."""
    _require("onnx")
    _require("onnxscript")
    ort = _require("onnxruntime")
    import onnx

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DataError(f"{out_dir} exists; pass --overwrite to replace it")
    model, bundle = load_model(model_dir, device="cpu")
    if reads_channels(model):
        # The graph's inputs (above) have no channel ids/mask; the predictor would run the
        # per-channel stem without them. Not offered yet rather than exported wrong.
        raise ModelError(
            f"{model_dir}: ONNX export of a model with model.channel_fusion: mean (per-channel stem) is not "
            "supported yet; predict it with the torch engine"
        )
    with_modality = _has_modality_head(model)
    wrapper = _ExportWrapper(model, with_modality).eval()
    summary = bundle.summary()  # patch_size, task_names, modalities, preprocessing
    patch = bundle.patch_size
    example = _example(bundle, patch, 2, 1, seed=0)
    outputs = ["logits", "modality_logits"] if with_modality else ["logits"]
    dims = {2: "X", 3: "Y", 4: "Z"}
    dynamic = {"image": {0: "B", **dims}, "task_ids": {0: "B", 1: "T"}, "task_mask": {0: "B", 1: "T"},
               "modality_id": {0: "B"}}
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, example, dynamo=True, input_names=list(INPUTS), output_names=outputs,
            dynamic_shapes=dynamic, opset_version=opset, external_data=False, verbose=False,
        )
    if program is None:
        raise ModelError("torch.onnx.export returned no program")
    proto = program.model_proto
    meta_entry = proto.metadata_props.add()
    meta_entry.key, meta_entry.value = "hermes_preprocessing", json.dumps(summary["preprocessing"], sort_keys=True)
    version_entry = proto.metadata_props.add()
    version_entry.key, version_entry.value = "hermes_version", __version__
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    seconds = time.perf_counter() - start

    # Verify before anything is kept: the training window, and a bigger window with 3 tasks, batch 2.
    session = _session(ort, data, torch.device("cpu"))
    checks = []
    bigger = [p + p // 2 for p in patch]
    for size, tasks, batch, seed in ((patch, 2, 1, 1), (bigger, 3, 2, 2)):
        inputs = _example(bundle, size, tasks, batch, seed)
        with torch.no_grad():
            expected = wrapper(*inputs)
        got = session.run(None, {name: t.numpy() for name, t in zip(INPUTS, inputs)})
        diff = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
        checks.append({"shape": list(inputs[0].shape), "tasks": int(inputs[1].shape[1]), "max_abs_diff": diff})
        if not diff <= tolerance:
            raise ModelError(f"{model_dir}: the ONNX graph differs from PyTorch by {diff:.3g} (> {tolerance}) on "
                             f"input {list(inputs[0].shape)}; not exported")
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    meta = {
        "format": "hermes-onnx",
        "hermes_version": __version__,
        "source_model": str(model_dir.resolve()),
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "opset": opset_used,
        "inputs": {
            "image": "float32 (B, C, X, Y, Z): a preprocessed window (see preprocessing)",
            "task_ids": "int64 (B, T): prompted task ids (index into task_names; num_tasks = NULL padding)",
            "task_mask": "bool (B, T): False on padded slots",
            "modality_id": "int64 (B,): index into modalities; len(modalities) = unknown",
        },
        "outputs": {"logits": "float32 (B, T, X, Y, Z): one sigmoid channel per prompted task",
                    **({"modality_logits": "float32 (B, M)"} if with_modality else {})},
        **summary,
        "export_seconds": round(seconds, 1),
        "verification": {"tolerance": tolerance, "checks": checks},
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        atomic_write_bytes(tmp / ONNX_FILE, data)
        bundle.write_spec(tmp)
        atomic_write_json(tmp / META_FILE, meta)
    return out_dir


def _session(ort: Any, model: bytes | str, device: torch.device) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())  # follow OMP_NUM_THREADS / torch
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(model, options, providers=providers)


def find_export(model_dir: Path) -> Path:
    """The export folder: ``model_dir`` itself or ``model_dir/onnx``."""
    for folder in (model_dir, model_dir / EXPORT_SUBFOLDER):
        if (folder / ONNX_FILE).is_file():
            return folder
    raise ModelError(
        f"{model_dir}: no {ONNX_FILE} here or in {EXPORT_SUBFOLDER}/; run "
        f"`hermes export -m MODEL -o {model_dir / EXPORT_SUBFOLDER}` first"
    )


class OnnxNetwork:
    """The onnxruntime graph behind the model call the predictor makes:
    ``network(image, task_ids, modality_id, output_tasks=None) -> SegmentationOutput``."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        ort = _require("onnxruntime")
        self.folder = folder
        self.device = device
        try:
            self.session = _session(ort, str(folder / ONNX_FILE), device)
        except Exception as error:  # onnxruntime raises its own exception types for bad files
            raise ModelError(f"{folder / ONNX_FILE}: cannot load the ONNX graph: {error}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        # What Predictor asks about a model: whether it has a modality head.
        self.modality_head = True if "modality_logits" in self.output_names else None

    def __call__(
        self,
        image: torch.Tensor,
        task_ids: torch.Tensor,
        modality_id: torch.Tensor,
        task_mask: torch.Tensor | None = None,
        output_tasks: Sequence[int] | None = None,
    ) -> SegmentationOutput:
        mask = torch.ones_like(task_ids, dtype=torch.bool) if task_mask is None else task_mask.bool()
        feeds = {
            "image": image.detach().float().cpu().contiguous().numpy(),
            "task_ids": task_ids.detach().cpu().long().numpy(),
            "task_mask": mask.detach().cpu().numpy(),
            "modality_id": modality_id.detach().cpu().long().numpy(),
        }
        results = dict(zip(self.output_names, self.session.run(None, feeds)))
        logits = torch.from_numpy(results["logits"])
        if output_tasks is not None:
            logits = logits[:, list(output_tasks)]
        modality = results.get("modality_logits")
        return SegmentationOutput(
            logits.to(self.device), None if modality is None else torch.from_numpy(modality).to(self.device)
        )


def load_engine(model_dir: Path, engine: str, device: torch.device) -> tuple[OnnxNetwork, ModelBundle]:
    """(network, bundle) for ``Predictor(engine=...)``."""
    if engine != "onnxruntime":
        raise ConfigError(f"unknown engine {engine!r} (torch or onnxruntime)")
    folder = find_export(model_dir)
    return OnnxNetwork(folder, device), ModelBundle.load(folder)


def describe_export(folder: Path) -> str:
    meta = json.loads((folder / META_FILE).read_text())
    worst = max(c["max_abs_diff"] for c in meta["verification"]["checks"])
    return (f"{folder / ONNX_FILE}: opset {meta['opset']}, {len(meta['task_names'])} tasks, "
            f"verified against PyTorch (max |diff| {worst:.2g})")


__all__ = ["EXPORT_SUBFOLDER", "OnnxNetwork", "describe_export", "export_onnx", "find_export", "load_engine"]

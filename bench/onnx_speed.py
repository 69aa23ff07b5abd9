"""onnxruntime vs PyTorch: CPU time per volume of the whole ``Predictor.predict`` pipeline.

A random-weight Hermes-R model (one preset per row) is exported with ``hermes export``; the
same synthetic CT is then predicted by ``Predictor(engine="torch")`` (fp32, and the default
``auto`` precision) and by ``Predictor(engine="onnxruntime")``: the same preprocessing, sliding
window and restoring, only the network call differs. Reported: the best of ``--repeats``
interleaved runs (so every engine sees the same background load), the ratio to PyTorch fp32, and
the Dice of each engine's masks against PyTorch fp32. Results: docs/bench/inference.md section 4.

    OMP_NUM_THREADS=1 .venv/bin/python bench/onnx_speed.py --presets tiny small --json onnx.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _volume(shape: tuple[int, int, int], spacing: float, seed: int = 0) -> object:
    """A body-shaped int16 CT: air outside an ellipsoid of soft tissue with brighter blobs."""
    from hermes.data.imageio import Image

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = (grid**2).sum(0) < 0.8
    array = np.where(body, rng.normal(40, 30, shape), -1000.0)
    array[((grid - 0.3) ** 2).sum(0) < 0.05] += 200
    return Image(array.astype(np.int16), np.diag([spacing, spacing, spacing, 1.0]))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def bench(args: argparse.Namespace) -> dict[str, object]:
    from inference_helpers import make_model_dir

    from hermes.config import InferenceConfig
    from hermes.inference import Predictor
    from hermes.inference.onnx_engine import export_onnx

    rows = []
    image = _volume(tuple(args.shape), args.spacing)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            labels = tuple(f"organ{i}" for i in range(args.tasks))
            model = make_model_dir(Path(tmp) / preset, datasets=(("BenchCT", "CT", labels, None),),
                                   spacing=(args.spacing,) * 3, patch_size=(args.patch,) * 3, preset=preset)
            start = time.perf_counter()
            export_onnx(model, model / "onnx")
            export_s = time.perf_counter() - start
            config = InferenceConfig(overlap=args.overlap, window_batch_size=args.window_batch_size, output="binary")
            variants = {
                "torch fp32": Predictor(model, device="cpu", config=config.model_copy(update={"precision": "fp32"})),
                "torch auto": Predictor(model, device="cpu", config=config),
                "onnxruntime": Predictor(model, device="cpu", config=config, engine="onnxruntime"),
            }
            times: dict[str, list[float]] = {name: [] for name in variants}
            masks: dict[str, dict[str, np.ndarray]] = {}
            for name, predictor in variants.items():  # warm-up (oneDNN / onnxruntime kernels)
                masks[name] = predictor.predict(image, modality="CT", progress=False).masks or {}
            for _ in range(args.repeats):
                for name, predictor in variants.items():
                    start = time.perf_counter()
                    predictor.predict(image, modality="CT", progress=False)
                    times[name].append(time.perf_counter() - start)
            reference = times["torch fp32"]
            for name in variants:
                dice = [_dice(masks[name][t], masks["torch fp32"][t]) for t in masks["torch fp32"]]
                rows.append({
                    "preset": preset, "engine": name, "best_s": round(min(times[name]), 3),
                    "ratio_to_torch_fp32": round(min(times[name]) / min(reference), 3),
                    "min_dice_vs_torch_fp32": round(min(dice), 5), "times_s": [round(t, 3) for t in times[name]],
                    "export_s": round(export_s, 1),
                })
                print(json.dumps(rows[-1]), flush=True)
    return {
        "shape": args.shape, "spacing": args.spacing, "patch": args.patch, "overlap": args.overlap,
        "tasks": args.tasks, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
        "cpu": platform.processor() or platform.machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--shape", nargs=3, type=int, default=[128, 128, 96], help="voxels of the CT")
    parser.add_argument("--spacing", type=float, default=1.5, help="mm, the CT's and the model's (no resampling)")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--window-batch-size", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = bench(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Inference benchmark: Hermes' sliding window vs MONAI's, and the full predict pipeline.

Two parts (results and discussion in docs/bench/inference.md):

``stitch``: the same random-weight Hermes-R network on the same cache-space volume, stitched by
``hermes.inference.sliding_window`` and by ``monai.inferers.sliding_window_inference``
(Gaussian, same overlap, same window batch). Reports the time ratio (minimum over interleaved
repetitions, so both see the same background load) and the maximum absolute difference of the
sigmoid probabilities. Also times the precision / memory-layout variants that "auto" chooses
between.

``memory``: the stitchers alone (a 1x1x1 convolution as the network) on a CT-sized cache-space
volume, each run in a fresh subprocess: added peak RSS (VmHWM) and time per task count.

``tasks``: the pipeline with 8, 32, 128 tasks, predicted in task chunks under a ``--max-memory``
budget and in one pass (no budget), each in a fresh subprocess: peak RSS, passes and time per
task count (the unchunked run is skipped where its estimated peak exceeds ``--unchunked-limit``
GB, and where the budget gives one pass anyway: then both are the same run).

``pipeline``: ``Predictor.predict`` on a synthetic 512x512x300 int16 CT (0.78x0.78x1.5 mm,
body-shaped so the body crop behaves as on a real scan), each run in a fresh subprocess that
reports its peak RSS (``resource.getrusage``) and timings. The MONAI rows use the identical
pipeline with only the stitcher swapped for MONAI's (float32 output, as MONAI allocates it).

    .venv/bin/python bench/inference_speed.py stitch
    .venv/bin/python bench/inference_speed.py memory --shape 226 160 300 --task-counts 8 32
    .venv/bin/python bench/inference_speed.py pipeline --presets tiny small --spacing 3.0
    .venv/bin/python bench/inference_speed.py tasks --task-counts 8 32 128 --max-memory 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _model(preset: str, tasks: int, spacing: float, patch: int, directory: Path) -> Path:
    from inference_helpers import make_model_dir

    labels = tuple(f"organ{i}" for i in range(tasks))
    return make_model_dir(
        directory, datasets=(("BenchCT", "CT", labels, None),), spacing=(spacing,) * 3,
        patch_size=(patch,) * 3, preset=preset,
    )


# ----------------------------------------------------------------------------------------------
# stitch
# ----------------------------------------------------------------------------------------------
def bench_stitch(args: argparse.Namespace) -> dict[str, object]:
    from monai.inferers import sliding_window_inference as monai_swi

    from hermes.inference.predictor import Predictor
    from hermes.inference.sliding_window import sliding_window_inference
    from hermes.runtime import cpu_has_native_bf16

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _model(args.preset, args.tasks, 1.5, args.patch, Path(tmp) / "model")
        predictor = Predictor(model_dir, device="cpu", channels_last=False)
    model = predictor.model
    task_row = torch.arange(args.tasks)[None]
    modality = torch.tensor([0])

    def network(batch: torch.Tensor) -> torch.Tensor:
        b = batch.shape[0]
        return model(batch, task_row.expand(b, -1), modality.expand(b)).logits

    torch.manual_seed(0)
    image = torch.randn(1, 1, *args.shape)
    window = (args.patch,) * 3
    common = {"overlap": args.overlap, "window_batch_size": args.batch}

    def ours(precision: str = "fp32", channels_last: bool = False) -> torch.Tensor:
        if channels_last:
            model.to(memory_format=torch.channels_last_3d)
        else:
            model.to(memory_format=torch.contiguous_format)
        return sliding_window_inference(image, network, window, precision=precision,  # type: ignore[arg-type]
                                        channels_last=channels_last, **common)

    def monai() -> torch.Tensor:
        model.to(memory_format=torch.contiguous_format)
        with torch.inference_mode():
            return monai_swi(image, window, args.batch, network, overlap=args.overlap, mode="gaussian")[0]

    variants = {
        "hermes fp32": lambda: ours("fp32", False),
        "monai fp32": monai,
        "hermes fp32 channels_last": lambda: ours("fp32", True),
        "hermes bf16": lambda: ours("bf16", False),
        "hermes bf16 channels_last": lambda: ours("bf16", True),
    }
    outputs = {name: fn() for name, fn in variants.items()}  # warm-up (oneDNN kernel creation)
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():  # interleaved: every variant sees the same load
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    ref = torch.sigmoid(outputs["monai fp32"].float())
    rows = {}
    for name in variants:
        diff = float((torch.sigmoid(outputs[name].float()) - ref).abs().max())
        rows[name] = {
            "wall_min_s": min(times[name]), "cpu_min_s": min(cpu[name]), "max_abs_prob_diff": diff,
            "mean_abs_prob_diff": float((torch.sigmoid(outputs[name].float()) - ref).abs().mean()),
        }
    for key in ("wall_min_s", "cpu_min_s"):
        base = rows["monai fp32"][key]
        for row in rows.values():
            row[key.replace("min_s", "vs_monai")] = row[key] / base
    return {
        "part": "stitch", "preset": args.preset, "tasks": args.tasks, "shape": args.shape, "patch": args.patch,
        "overlap": args.overlap, "window_batch": args.batch, "repeats": args.repeats,
        "cpu_native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(), "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# pipeline (each configuration in its own process: peak RSS is per process)
# ----------------------------------------------------------------------------------------------
def synthetic_ct(shape: tuple[int, int, int]) -> np.ndarray:
    """Air around an elliptic body of soft tissue with a denser 'spine' and low-density 'lungs'."""
    x = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :, None]
    z = np.linspace(0, 1, shape[2], dtype=np.float32)[None, None, :]
    body = (x / 0.85) ** 2 + (y / 0.6) ** 2 < 1.0
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[np.broadcast_to(body, shape)] = 40
    lungs = ((np.abs(x) - 0.4) / 0.25) ** 2 + (y / 0.35) ** 2 < 1.0
    ct[np.broadcast_to(lungs & (z > 0.6), shape)] = -850
    spine = (x / 0.08) ** 2 + ((y - 0.4) / 0.08) ** 2 < 1.0
    ct[np.broadcast_to(spine, shape)] = 700
    noise = np.random.default_rng(0).integers(-20, 21, size=shape[:2], dtype=np.int16)
    ct += noise[:, :, None]
    return ct


def _proc_mb(key: str) -> float:
    """VmRSS / VmHWM (peak) of this process from /proc, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Reset VmHWM (Linux: `5` to clear_refs) so a phase's own peak can be read."""
    Path("/proc/self/clear_refs").write_text("5")


def pipeline_child(args: argparse.Namespace) -> None:
    """Runs inside the subprocess; prints one JSON line."""
    import hermes.inference.predictor as predictor_module
    from hermes.config import InferenceConfig
    from hermes.data.imageio import Image
    from hermes.inference.sliding_window import WindowRunner

    timings: dict[str, float] = {}
    if args.stitcher == "monai":
        from monai.inferers import sliding_window_inference as monai_swi

        def stitch(image, network, window, *, overlap, window_batch_size, blend, mirror_axes, device, precision,
                   channels_last, progress):
            # Same network call as Hermes' stitcher (autocast, layout): only the stitching differs.
            runner = WindowRunner(network, torch.device("cpu"), precision, channels_last, mirror_axes)
            with torch.inference_mode():
                return monai_swi(image, tuple(window), window_batch_size, runner, overlap=overlap, mode=blend)[0]
    else:
        stitch = predictor_module.sliding_window_inference

    def timed_stitch(*a, **k):
        timings["passes"] = timings.get("passes", 0) + 1
        rss = _proc_mb("VmRSS")
        _reset_peak()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = stitch(*a, **k)
        timings["sliding_window_s"] = timings.get("sliding_window_s", 0.0) + time.perf_counter() - start
        timings["sliding_window_cpu_s"] = timings.get("sliding_window_cpu_s", 0.0) + time.process_time() - start_cpu
        timings["sliding_window_added_mb"] = max(timings.get("sliding_window_added_mb", 0.0), _proc_mb("VmHWM") - rss)
        timings["stitched_output_mb"] = out.numel() * out.element_size() / 2**20
        return out

    predictor_module.sliding_window_inference = timed_stitch
    plans = []
    original_plan = predictor_module.memory_plan

    def recorded_plan(*a, **k):
        plans.append(original_plan(*a, **k))
        return plans[-1]

    predictor_module.memory_plan = recorded_plan
    shape = tuple(args.ct_shape)
    spacing = (0.78, 0.78, 1.5)
    affine = np.diag([*spacing, 1.0])
    image = Image(synthetic_ct(shape), affine)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _model(args.preset, args.tasks, args.spacing, args.patch, Path(tmp) / "model")
        config = InferenceConfig(overlap=args.overlap, window_batch_size=args.batch, precision=args.precision,
                                 max_memory_gb=args.max_memory)
        predictor = predictor_module.Predictor(model_dir, device="cpu", config=config, channels_last=args.channels_last)
        rss_before = _proc_mb("VmRSS")
        _reset_peak()  # the synthetic CT's temporaries are not part of the prediction
        start, start_cpu = time.perf_counter(), time.process_time()
        prediction = predictor.predict(image, modality="CT", progress=False)
        total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        peak = _proc_mb("VmHWM")
    peak_process = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    budget = None if args.max_memory is None else args.max_memory * 2**30
    chunk = plans[0].chunk_size(budget, args.tasks) if plans else None
    print(json.dumps({
        "preset": args.preset, "stitcher": args.stitcher, "precision": args.precision, "tasks": args.tasks,
        "ct_shape": list(shape), "model_spacing_mm": args.spacing, "patch": args.patch, "overlap": args.overlap,
        "total_s": round(total, 2), "total_cpu_s": round(total_cpu, 2), **{k: round(v, 2) for k, v in timings.items()},
        "peak_rss_predict_mb": round(peak), "rss_before_predict_mb": round(rss_before),
        "peak_rss_process_mb": round(peak_process),
        "input_mb": round(image.array.nbytes / 2**20), "labels_shape": list(prediction.labels.shape),  # type: ignore[union-attr]
        "max_memory_gb": args.max_memory,
        "plan": None if not plans else {"baseline_mb": round(plans[0].baseline / 2**20),
                                        "window_fixed_mb": round(plans[0].window_fixed / 2**20),
                                        "window_per_task_mb": round(plans[0].window_per_task / 2**20, 2),
                                        "restore_fixed_mb": round(plans[0].restore_fixed / 2**20),
                                        "restore_per_task_mb": round(plans[0].restore_per_task / 2**20, 2),
                                        "chunk_size": chunk,
                                        "estimated_peak_mb": round(plans[0].peak(chunk) / 2**20),
                                        "unchunked_estimate_mb": round(plans[0].peak(args.tasks) / 2**20)},
    }))


def memory_child(args: argparse.Namespace) -> None:
    """Stitching alone: a 1x1x1 convolution as the network, so the stitcher's own memory and
    time dominate. Prints one JSON line."""
    from monai.inferers import sliding_window_inference as monai_swi

    from hermes.inference.sliding_window import sliding_window_inference

    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, args.tasks, 1).eval()
    image = torch.randn(1, 1, *args.shape)
    window = (args.patch,) * 3
    rss = _proc_mb("VmRSS")
    _reset_peak()
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        if args.stitcher == "monai":
            out = monai_swi(image, window, args.batch, network, overlap=args.overlap, mode="gaussian")
        else:
            out = sliding_window_inference(image, network, window, overlap=args.overlap,
                                           window_batch_size=args.batch, precision="fp32", channels_last=False)
    print(json.dumps({
        "stitcher": args.stitcher, "tasks": args.tasks, "shape": args.shape, "patch": args.patch,
        "overlap": args.overlap, "wall_s": round(time.perf_counter() - start, 2),
        "cpu_s": round(time.process_time() - start_cpu, 2), "added_peak_mb": round(_proc_mb("VmHWM") - rss),
        "output_mb": round(out.numel() * out.element_size() / 2**20),
        "input_mb": round(image.numel() * 4 / 2**20),
    }))


def bench_memory(args: argparse.Namespace) -> dict[str, object]:
    rows = []
    for tasks in args.task_counts:
        for stitcher in ("hermes", "monai"):
            cmd = [sys.executable, __file__, "memory-child", "--stitcher", stitcher, "--tasks", str(tasks),
                   "--shape", *map(str, args.shape), "--patch", str(args.patch), "--overlap", str(args.overlap),
                   "--batch", str(args.batch)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(result.stderr, file=sys.stderr)
                raise SystemExit(f"memory run failed: {' '.join(cmd)}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    return {"part": "memory", "rows": rows}


def _pipeline_run(args: argparse.Namespace, preset: str, stitcher: str, precision: str, tasks: int,
                  max_memory: float | None) -> dict[str, object]:
    cmd = [sys.executable, __file__, "pipeline-child", "--preset", preset, "--stitcher", stitcher,
           "--precision", precision, "--tasks", str(tasks), "--spacing", str(args.spacing),
           "--patch", str(args.patch), "--overlap", str(args.overlap), "--batch", str(args.batch),
           "--ct-shape", *map(str, args.ct_shape)]
    if max_memory is not None:
        cmd += ["--max-memory", str(max_memory)]
    if precision == "auto":
        cmd.append("--channels-last")
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ})
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        raise SystemExit(f"pipeline run failed: {' '.join(cmd)}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(row), file=sys.stderr)
    return row


def bench_tasks(args: argparse.Namespace) -> dict[str, object]:
    """Peak RSS and time against the number of tasks, chunked under a budget vs one pass."""
    rows = []
    for tasks in args.task_counts:
        chunked = _pipeline_run(args, args.preset, "hermes", args.precision, tasks, args.max_memory)
        rows.append({"mode": "chunked", **chunked})
        estimate = chunked["plan"]["unchunked_estimate_mb"] / 1024  # type: ignore[index]
        if chunked["passes"] == 1:
            rows.append({"mode": "unchunked", "tasks": tasks, "same_as_chunked": True})
        elif estimate > args.unchunked_limit:
            rows.append({"mode": "unchunked", "tasks": tasks, "skipped_estimate_gb": round(estimate, 1)})
        else:
            rows.append({"mode": "unchunked", **_pipeline_run(args, args.preset, "hermes", args.precision, tasks, None)})
    return {"part": "tasks", "max_memory_gb": args.max_memory, "rows": rows}


def bench_pipeline(args: argparse.Namespace) -> dict[str, object]:
    rows = []
    for preset in args.presets:
        for stitcher, precision in args.runs:
            if stitcher == "monai" and args.skip_monai:
                continue
            rows.append(_pipeline_run(args, preset, stitcher, precision, args.tasks, None))
    return {"part": "pipeline", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["stitch", "memory", "pipeline", "tasks", "pipeline-child", "memory-child"])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[112, 112, 96], help="stitch: cache-space volume")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=[512, 512, 300], help="pipeline: input CT")
    parser.add_argument("--spacing", type=float, default=3.0, help="pipeline: the model's target spacing (mm)")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--task-counts", type=int, nargs="+", default=[8, 32], help="memory, tasks: tasks per run")
    parser.add_argument("--max-memory", type=float, default=None,
                        help="tasks: the budget of the chunked runs (GB); pipeline-child: the run's budget (none: one pass)")
    parser.add_argument("--unchunked-limit", type=float, default=8.0,
                        help="tasks: skip an unchunked run whose estimated peak exceeds this (GB)")
    parser.add_argument("--stitcher", default="hermes", choices=["hermes", "monai"])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--runs", nargs="+", default=["hermes:fp32", "monai:fp32", "hermes:auto", "monai:auto"],
        help="pipeline: STITCHER:PRECISION pairs",
    )
    args = parser.parse_args()
    args.runs = [tuple(run.split(":")) for run in args.runs]
    if args.part == "pipeline-child":
        pipeline_child(args)
        return
    if args.part == "memory-child":
        memory_child(args)
        return
    if args.part == "tasks" and args.max_memory is None:
        parser.error("tasks needs --max-memory GB (the budget of the chunked runs)")
    parts = {"stitch": bench_stitch, "memory": bench_memory, "pipeline": bench_pipeline, "tasks": bench_tasks}
    result = parts[args.part](args)
    result["machine"] = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
        "load_avg_1min": os.getloadavg()[0],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

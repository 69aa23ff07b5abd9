"""How far a training step and a sliding-window pass are from this machine's convolution peak.

For each preset x architecture: FLOPs of one training step (forward + loss + backward, counted by
``torch.utils.flop_counter.FlopCounterMode``) and of one sliding-window pass, the measured times,
achieved GFLOP/s and the fraction of the peak measured in the same run (a bf16-autocast
channels-last Conv3d 64->64, k3, on 2x64x32^3, forward + backward, the best of ``--repeats``).
The step is split into forward, backward, clip + optimiser, EMA and data (one sampler batch from
the synthetic cohort is not used: batches are random tensors, and the data column times
``collate`` of random samples, which is what the loader adds per step); ``torch.profiler`` gives the
top operators by self CPU time. Writes a markdown report (``--out``) and its JSON next to it.

Time it on an idle machine (nothing else running): a neighbour on a shared core changes the
numbers several-fold (docs/benchmarks.md, machine section).

    OMP_NUM_THREADS=2 .venv/bin/python bench/roofline.py --out docs/bench/roofline.md
    .venv/bin/python bench/roofline.py --presets tiny --archs hermes_resunet --steps 2 --out /tmp/r.md  # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from hermes.config import LossConfig, ModelConfig, OptimConfig
from hermes.inference.sliding_window import sliding_window_inference
from hermes.models.registry import build_model
from hermes.runtime import AmpSettings, resolve_amp
from hermes.training.ema import ModelEMA
from hermes.training.loss import HermesLoss
from hermes.training.optim import build_optimizer, clip_gradients

PATCH = {"tiny": 48, "small": 64, "base": 96}  # the presets' usual patch sizes


def best_of(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def conv_peak(amp: AmpSettings, repeats: int) -> dict[str, float]:
    """The reference rate: one bf16 channels-last Conv3d forward + backward (what the steps are mostly made of)."""
    conv = torch.nn.Conv3d(64, 64, 3, padding=1)
    x = torch.randn(2, 64, 32, 32, 32, requires_grad=True)
    if amp.channels_last:
        conv = conv.to(memory_format=torch.channels_last_3d)
        x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()

    def step() -> None:
        with amp.autocast():
            y = conv(x)
        y.float().sum().backward()

    flops = count_flops(step)
    seconds = best_of(step, repeats, warmup=2)
    return {"gflop": flops / 1e9, "seconds": seconds, "gflops_per_s": flops / seconds / 1e9}


def random_batch(batch: int, patch: int, tasks: int, channels_last: bool) -> dict[str, torch.Tensor]:
    image = torch.randn(batch, 1, patch, patch, patch)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    return {
        "image": image,
        "target": (torch.rand(batch, tasks, patch, patch, patch) > 0.8).float(),
        "task_ids": torch.arange(tasks).repeat(batch, 1),
        "task_mask": torch.ones(batch, tasks, dtype=torch.bool),
        "modality_id": torch.zeros(batch, dtype=torch.long),
    }


def measure(preset: str, arch: str, patch: int, batch: int, tasks: int, amp: AmpSettings, steps: int,
            peak: float, top: int) -> dict[str, Any]:
    torch.manual_seed(0)
    universal = arch.startswith("hermes_")
    model = build_model(ModelConfig(preset=preset, architecture=arch), num_tasks=tasks, num_modalities=3,
                        task_ids_of_model=None if universal else list(range(tasks)), patch_size=[patch] * 3)
    if amp.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = build_optimizer(model, OptimConfig())
    ema = ModelEMA(model, 0.999)
    loss_fn = HermesLoss(LossConfig())
    data = random_batch(batch, patch, tasks, amp.channels_last)

    def forward() -> torch.Tensor:
        with amp.autocast():
            out = model(data["image"], data["task_ids"], data["modality_id"], data["task_mask"])
            return loss_fn(out, data)["total"]

    def full_step(index: int = 0) -> None:
        optimizer.zero_grad(set_to_none=True)
        forward().backward()
        clip_gradients(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model, index)

    step_flops = count_flops(lambda: forward().backward())
    forward_flops = count_flops(forward)
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimiser": [], "ema": [], "step": []}
    for index in range(steps + 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = forward()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        clip_gradients(model.parameters(), 1.0)
        optimizer.step()
        t3 = time.perf_counter()
        ema.update(model, index)
        t4 = time.perf_counter()
        if index:  # the first step creates oneDNN primitives
            for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                parts[key].append(value)
    median = {key: statistics.median(values) for key, values in parts.items()}

    from hermes.data.sampling import collate_batch

    samples = [{"image": torch.randn(1, patch, patch, patch), "target": torch.zeros(tasks, patch, patch, patch),
                "task_ids": torch.arange(tasks), "task_mask": torch.ones(tasks, dtype=torch.bool),
                "modality_id": torch.tensor(0)} for _ in range(batch)]
    try:
        median["data_collate"] = best_of(lambda: collate_batch(samples, tasks), 3)
    except (KeyError, TypeError, ValueError):
        median["data_collate"] = float("nan")  # the sampler's sample layout changed; not a step cost then

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        full_step(steps + 1)
    table = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in table) or 1.0
    top_ops = sorted(table, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    costs = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total_self}
             for e in top_ops]

    model.eval()
    volume = torch.randn(1, 1, patch * 2, patch * 2, patch * 2)
    task_ids = torch.arange(tasks)[None]

    def network(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return model(x, task_ids.repeat(n, 1), torch.zeros(n, dtype=torch.long), torch.ones(n, tasks, dtype=torch.bool)).logits

    def window_pass() -> None:
        with torch.inference_mode():
            sliding_window_inference(volume, network, (patch,) * 3, overlap=0.5, precision=amp.name,
                                     channels_last=amp.channels_last, progress=False)

    infer_flops = count_flops(window_pass)
    infer_seconds = best_of(window_pass, 2)
    step_rate = step_flops / (median["forward"] + median["backward"]) / 1e9
    return {
        "preset": preset, "architecture": arch, "patch": patch, "batch": batch, "tasks": tasks,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_gflop": step_flops / 1e9, "forward_gflop": forward_flops / 1e9, "seconds": median,
        "forward_gflops_per_s": forward_flops / median["forward"] / 1e9,
        "backward_gflops_per_s": (step_flops - forward_flops) / median["backward"] / 1e9,
        "step_gflops_per_s": step_flops / median["step"] / 1e9,
        "fwd_bwd_gflops_per_s": step_rate,
        "step_fraction_of_peak": step_flops / median["step"] / 1e9 / peak,
        "inference_gflop": infer_flops / 1e9, "inference_seconds": infer_seconds,
        "inference_gflops_per_s": infer_flops / infer_seconds / 1e9,
        "inference_fraction_of_peak": infer_flops / infer_seconds / 1e9 / peak,
        "top_costs": costs,
    }


def report(result: dict[str, Any]) -> str:
    peak = result["peak"]
    lines = [
        "# Roofline: training step and sliding window against the measured conv peak", "",
        f"torch {result['torch']}, {result['threads']} threads, precision {result['precision']}, channels_last "
        f"{result['channels_last']}; command: `{result['command']}`", "",
        f"Peak (bf16-autocast channels-last Conv3d 64->64 k3 on 2x64x32^3, forward + backward, best of "
        f"{result['repeats']}): **{peak['gflops_per_s']:.0f} GFLOP/s** ({peak['gflop']:.1f} GFLOP in "
        f"{peak['seconds'] * 1e3:.0f} ms).", "",
        "| preset | architecture | patch | step GFLOP | fwd GFLOP/s | bwd GFLOP/s | step s (fwd / bwd / optim / EMA) "
        "| step GFLOP/s | % of peak | window pass GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        s = row["seconds"]
        lines.append(
            f"| {row['preset']} | {row['architecture']} | {row['batch']}x{row['patch']}^3 | {row['step_gflop']:.1f} "
            f"| {row['forward_gflops_per_s']:.0f} | {row['backward_gflops_per_s']:.0f} | {s['step']:.3f} "
            f"({s['forward']:.3f} / {s['backward']:.3f} / {s['optimiser']:.3f} / {s['ema']:.3f}) "
            f"| {row['step_gflops_per_s']:.0f} | {100 * row['step_fraction_of_peak']:.0f} % "
            f"| {row['inference_gflops_per_s']:.0f} | {100 * row['inference_fraction_of_peak']:.0f} % |"
        )
    lines += ["", "## Top costs per preset (self CPU time in one profiled training step)", ""]
    for row in result["rows"]:
        lines.append(f"**{row['preset']} / {row['architecture']}**: " + "; ".join(
            f"`{c['op']}` {c['self_ms']:.0f} ms ({100 * c['share']:.0f} %)" for c in row["top_costs"]))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--archs", nargs="+", default=["hermes_resunet", "resunet", "hermes_medformer"])
    parser.add_argument("--patch", type=int, default=None, help="cubic patch (default: tiny 48, small 64, base 96)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--out", type=Path, required=True, help="markdown report (JSON next to it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = resolve_amp(args.precision, "auto", torch.device("cpu"))
    peak = conv_peak(amp, args.repeats)
    print(f"peak {peak['gflops_per_s']:.0f} GFLOP/s", flush=True)
    import sys

    from hermes.fileio import atomic_write_text

    rows: list[dict[str, Any]] = []
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "precision": amp.name,
              "channels_last": amp.channels_last, "repeats": args.repeats, "peak": peak, "rows": rows,
              "command": " ".join(["python bench/roofline.py", *sys.argv[1:]])}
    for preset in args.presets:
        for arch in args.archs:
            row = measure(preset, arch, args.patch or PATCH[preset], args.batch, args.tasks, amp, args.steps,
                          peak["gflops_per_s"], args.top)
            rows.append(row)
            print(f"{preset} {arch}: step {row['step_gflops_per_s']:.0f} GFLOP/s "
                  f"({100 * row['step_fraction_of_peak']:.0f} % of peak), window pass "
                  f"{row['inference_gflops_per_s']:.0f} GFLOP/s", flush=True)
            # after every row: a long run stopped early (base at 96^3 takes many minutes) keeps its rows
            atomic_write_text(args.out.with_suffix(".json"), json.dumps(result, indent=1))
            atomic_write_text(args.out, report(result) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

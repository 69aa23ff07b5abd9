"""Time one training step (forward, loss, backward, clip, LAMB) of Hermes-R per precision/layout.

Decides ``precision: auto`` / ``channels_last: auto`` for CPU training (docs/bench/training.md).
Random inputs; the first ``--warmup`` steps are discarded (oneDNN primitive creation). Reports
the median wall time and the median process CPU time per step: on a machine shared with other
jobs, CPU time with ``--threads 1`` is the stable number (with more threads, OpenMP's spin-wait
at barriers is counted as CPU time too).

    .venv/bin/python bench/training_precision.py --presets tiny small --patch 48 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hermes.config import LossConfig, ModelConfig, OptimConfig
from hermes.models.registry import build_model
from hermes.runtime import AmpSettings
from hermes.training.loss import HermesLoss
from hermes.training.optim import build_optimizer, clip_gradients


def time_steps(
    preset: str, patch: int, batch: int, tasks: int, amp: AmpSettings, steps: int, warmup: int
) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset), num_tasks=tasks, num_modalities=3)
    if amp.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    opt = build_optimizer(model, OptimConfig())
    loss_fn = HermesLoss(LossConfig())
    image = torch.randn(batch, 1, patch, patch, patch)
    if amp.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    batch_dict = {
        "target": (torch.rand(batch, tasks, patch, patch, patch) > 0.8).float(),
        "task_ids": torch.arange(tasks).repeat(batch, 1),
        "task_mask": torch.ones(batch, tasks, dtype=torch.bool),
        "modality_id": torch.zeros(batch, dtype=torch.long),
    }
    times, cpu_times = [], []
    for i in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        with amp.autocast():
            out = model(image, batch_dict["task_ids"], batch_dict["modality_id"], batch_dict["task_mask"])
            loss = loss_fn(out, batch_dict)["total"]
        loss.backward()
        clip_gradients(model.parameters(), 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, patch {args.patch}^3, batch {args.batch}")
    print("| preset | precision | channels_last | wall s/step | CPU s/step | CPU speed-up vs fp32 contiguous |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        base = None
        for dtype in (None, torch.bfloat16):
            for channels_last in (False, True):
                amp = AmpSettings(dtype, False, channels_last, "cpu")
                wall, cpu = time_steps(preset, args.patch, args.batch, args.tasks, amp, args.steps, args.warmup)
                wall_median, cpu_median = statistics.median(wall), statistics.median(cpu)
                base = base or cpu_median
                print(
                    f"| {preset} | {amp.name} | {channels_last} | {wall_median:.3f} | {cpu_median:.3f} "
                    f"| {base / cpu_median:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

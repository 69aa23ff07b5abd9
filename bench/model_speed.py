"""Parameter counts and training-step time of the Hermes model family on this machine.

One step = forward + BCE loss on the requested tasks + backward + AdamW update, batch 2, random
data, after one warm-up step; the table reports the fastest of ``--steps`` steps (the CPU is
shared: the minimum is the least disturbed measurement). Precision: fp32 or bf16 autocast;
memory format: NCDHW or channels_last_3d (model and input).

    .venv/bin/python bench/model_speed.py --out docs/bench/models.md

Keep runs short (the CPU is shared); ``--only`` selects rows by name substring.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hermes.config import ModelConfig
from hermes.fileio import atomic_write_text
from hermes.models.registry import build_model, count_parameters

NUM_TASKS, NUM_MODALITIES, REQUESTED = 72, 5, 16  # the paper's pools; 15 tasks + 1 null column


@dataclass
class Row:
    name: str
    config: ModelConfig
    patch: int
    modes: tuple[tuple[str, str], ...] = (
        ("fp32", "ncdhw"),
        ("fp32", "cl"),
        ("bf16", "ncdhw"),
        ("bf16", "cl"),
    )


BEST = (("bf16", "ncdhw"),)  # the fastest mode on this CPU (see the first rows)
ROWS = [
    Row(
        "Hermes-R width 8 (official-code comparison)",
        ModelConfig(preset="base", widths=[8, 16, 32, 64, 80]),
        64,
    ),
    Row("Hermes-R tiny", ModelConfig(preset="tiny"), 64),
    Row("Hermes-M tiny", ModelConfig(architecture="hermes_medformer", preset="tiny"), 64),
    Row("ResUNet tiny", ModelConfig(architecture="resunet", preset="tiny"), 64, BEST),
    Row("MedFormer tiny", ModelConfig(architecture="medformer", preset="tiny"), 64, BEST),
    Row("Hermes-R small", ModelConfig(preset="small"), 64, (("fp32", "cl"), ("bf16", "cl"))),
    Row("Hermes-M small", ModelConfig(architecture="hermes_medformer", preset="small"), 64, BEST),
    Row("ResUNet small", ModelConfig(architecture="resunet", preset="small"), 64, BEST),
    Row("MedFormer small", ModelConfig(architecture="medformer", preset="small"), 64, BEST),
    # 96^3, not the paper's 128^3: one bf16 step of Hermes-R base at 96^3 peaks at 7.2 GB RSS, so
    # 128^3 would need ~17 GB of this shared 23 GB machine.
    Row("Hermes-R base", ModelConfig(preset="base"), 96, BEST, steps=1),
    Row("Hermes-M base", ModelConfig(architecture="hermes_medformer", preset="base"), 96, BEST, steps=1),
    Row("ResUNet base", ModelConfig(architecture="resunet", preset="base"), 96, BEST, steps=1),
]


def step_time(row: Row, precision: str, layout: str, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(row.config, NUM_TASKS, NUM_MODALITIES, task_ids_of_model=list(range(REQUESTED - 1)))
    fmt = torch.channels_last_3d if layout == "cl" else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = torch.randn(2, 1, row.patch, row.patch, row.patch).contiguous(memory_format=fmt)
    task_ids = torch.arange(REQUESTED).repeat(2, 1)
    task_ids[:, -1] = NUM_TASKS  # one null column, as the reference's batches
    modality = torch.zeros(2, dtype=torch.long)
    target = (torch.rand(2, REQUESTED, row.patch, row.patch, row.patch) > 0.9).float()
    if not row.config.architecture.startswith("hermes_"):
        task_ids[:, -1] = 0
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(image, task_ids, modality)
        loss = F.binary_cross_entropy_with_logits(out.logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="measured steps per cell (after 1 warm-up)")
    parser.add_argument("--only", default="", help="only rows whose name contains this text")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    header = (
        "| model | params | patch | "
        + " | ".join(f"{p} {m}" for p, m in Row("", ModelConfig(), 0).modes)
        + " |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in ROWS:
        if args.only.lower() not in row.name.lower():
            continue
        params = count_parameters(
            build_model(row.config, NUM_TASKS, NUM_MODALITIES, list(range(REQUESTED - 1)))
        )
        cells = []
        for mode in Row("", ModelConfig(), 0).modes:
            cells.append(
                f"{step_time(row, *mode, row.steps or args.steps):.2f} s" if mode in row.modes else ""
            )
        line = f"| {row.name} | {params / 1e6:.2f} M | 2x{row.patch}^3 | " + " | ".join(cells) + " |"
        print(line, flush=True)
        lines.append(line)
    if args.out is not None:
        command = "python bench/model_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
        text = (
            "# Model size and training-step time\n\n"
            f"- command: `{command}`\n"
            f"- date: {datetime.date.today().isoformat()}, commit {commit()}\n"
            f"- machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"load average at the end {os.getloadavg()[0]:.1f}\n"
            f"- step: forward + BCE on {REQUESTED} requested tasks + backward + AdamW, batch 2, fastest of "
            f"{args.steps} steps after 1 warm-up; {NUM_TASKS} tasks and {NUM_MODALITIES} modalities in the pools\n\n"
            + "\n".join(lines)
            + "\n"
        )
        # Hand-written analysis below a "## Notes" heading survives re-runs.
        previous = args.out.read_text() if args.out.is_file() else ""
        if "\n## Notes" in previous:
            text += previous[previous.index("\n## Notes") :]
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

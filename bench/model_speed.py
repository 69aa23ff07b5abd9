"""Parameter counts and training-step time of the Hermes model family on this machine.

One step = forward + BCE loss on the requested tasks + backward + AdamW update, batch 2, random
data, after one warm-up step; the table reports the fastest of ``--steps`` steps (the CPU is
shared: the minimum is the least disturbed measurement). Precision: fp32 or bf16 autocast;
memory format: NCDHW or channels_last_3d (model and input).

    .venv/bin/python bench/model_speed.py --out docs/bench/models.md              # wall clock
    .venv/bin/python bench/model_speed.py --threads 1 --clock cpu --out docs/bench/models.md

The second form measures CPU seconds on one thread: on a machine shared with other jobs it is
the stable number (wall clock then depends on the others' load). Each form writes its own
section of the markdown file. Keep runs short; ``--only`` selects rows by name substring.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
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
    steps: int | None = None  # None: --steps


BF16 = (("bf16", "ncdhw"), ("bf16", "cl"))  # fp32 is 2-3x slower on this CPU (first rows)
ROWS = [
    Row(
        "Hermes-R width 8 (official-code comparison)",
        ModelConfig(preset="base", widths=[8, 16, 32, 64, 80]),
        64,
    ),
    Row("Hermes-R tiny", ModelConfig(preset="tiny"), 64),
    Row("Hermes-M tiny", ModelConfig(architecture="hermes_medformer", preset="tiny"), 64),
    Row("ResUNet tiny", ModelConfig(architecture="resunet", preset="tiny"), 64, BF16),
    Row("MedFormer tiny", ModelConfig(architecture="medformer", preset="tiny"), 64, BF16),
    Row("Hermes-R small", ModelConfig(preset="small"), 64, BF16),
    Row("Hermes-M small", ModelConfig(architecture="hermes_medformer", preset="small"), 64, BF16),
    Row("ResUNet small", ModelConfig(architecture="resunet", preset="small"), 64, BF16),
    Row("MedFormer small", ModelConfig(architecture="medformer", preset="small"), 64, BF16),
    # 96^3, not the paper's 128^3: one bf16 step of Hermes-R base at 96^3 peaks at 7.2 GB RSS, so
    # 128^3 would need ~17 GB of this shared 23 GB machine.
    Row("Hermes-R base", ModelConfig(preset="base"), 96, (("bf16", "cl"),), steps=1),
    Row(
        "Hermes-M base",
        ModelConfig(architecture="hermes_medformer", preset="base"),
        96,
        (("bf16", "cl"),),
        steps=1,
    ),
    Row("ResUNet base", ModelConfig(architecture="resunet", preset="base"), 96, (("bf16", "cl"),), steps=1),
]


ROW_ORDER = {row.name: i for i, row in enumerate(ROWS)}


def step_time(row: Row, precision: str, layout: str, steps: int, clock: str) -> float:
    torch.manual_seed(0)
    model = build_model(row.config, NUM_TASKS, NUM_MODALITIES, task_ids_of_model=list(range(REQUESTED - 1)))
    fmt = torch.channels_last_3d if layout == "cl" else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = torch.randn(2, 1, row.patch, row.patch, row.patch).contiguous(memory_format=fmt)
    task_ids = torch.arange(REQUESTED).repeat(2, 1)
    # One null column as the reference's batches (baselines own tasks 0..14: ask task 0 twice).
    task_ids[:, -1] = NUM_TASKS if row.config.architecture.startswith("hermes_") else 0
    modality = torch.zeros(2, dtype=torch.long)
    target = (torch.rand(2, REQUESTED, row.patch, row.patch, row.patch) > 0.9).float()
    now = time.process_time if clock == "cpu" else time.perf_counter
    times = []
    for i in range(steps + 1):
        start = now()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(image, task_ids, modality)
        loss = F.binary_cross_entropy_with_logits(out.logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            times.append(now() - start)
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


def write_section(path: Path, title: str, header: list[str], rows: list[str], command: str) -> None:
    """Merge the rows into section ``## title`` of the markdown file (a re-measured model replaces
    its row; the section lists every command that contributed), keeping the other sections and
    the hand-written ``## Notes`` last."""
    text = path.read_text() if path.is_file() else f"# Model size and training-step time\n\n{INTRO}\n"
    head, *sections = text.split("\n## ")
    named = {section.split("\n", 1)[0]: section for section in sections}
    old = named.get(title, "")
    commands = [line for line in old.splitlines() if line.startswith("- command:")]
    table = {line.split("|")[1].strip(): line for line in old.splitlines() if line.startswith("| ")}
    table.pop("model", None)
    commands = [c for c in commands if c != f"- command: `{command}`"] + [f"- command: `{command}`"]
    table.update({line.split("|")[1].strip(): line for line in rows})
    named[title] = "\n".join(
        [
            title,
            "",
            *commands,
            f"- last run: {datetime.date.today().isoformat()}, commit {commit()}, torch {torch.__version__}, "
            f"{cpu_name()}, load average (1 min) at the end {os.getloadavg()[0]:.1f}",
            "",
            *header,
            *[table[name] for name in sorted(table, key=ROW_ORDER.get)],
            "",
        ]
    )
    notes = named.pop("Notes", None)
    ordered = [*named.values(), *([notes] if notes else [])]
    atomic_write_text(path, "\n## ".join([head.rstrip("\n") + "\n", *ordered]).rstrip("\n") + "\n")


INTRO = (
    f"One step: forward + BCE on {REQUESTED} requested tasks (15 + one null column) + backward + "
    f"AdamW, batch 2, random data, {NUM_TASKS} tasks and {NUM_MODALITIES} modalities in the pools; "
    "each cell is the fastest of the measured steps after one warm-up step."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="measured steps per cell (after 1 warm-up)")
    parser.add_argument("--only", default="", help="only rows whose name contains one of these (a,b,...)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: process CPU time (with --threads 1: insensitive to other load)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the table into this markdown file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = Row("", ModelConfig(), 0).modes
    header = "| model | params | patch | " + " | ".join(f"{p} {m}" for p, m in modes) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    wanted = [part.strip().lower() for part in args.only.split(",")]
    for row in ROWS:
        if not any(part in row.name.lower() for part in wanted):
            continue
        params = count_parameters(
            build_model(row.config, NUM_TASKS, NUM_MODALITIES, list(range(REQUESTED - 1)))
        )
        steps = row.steps or args.steps
        cells = [
            f"{step_time(row, *mode, steps, args.clock):.2f} s" if mode in row.modes else "" for mode in modes
        ]
        line = f"| {row.name} | {params / 1e6:.2f} M | 2x{row.patch}^3 | " + " | ".join(cells) + " |"
        print(line, flush=True)
        lines.append(line)
    if args.out is not None:
        command = shlex.join(["python", "bench/model_speed.py", *(sys.argv[1:] if argv is None else argv)])
        threads = torch.get_num_threads()
        title = (
            f"{'Wall clock' if args.clock == 'wall' else 'CPU time'}, {threads} thread{'s' * (threads > 1)}"
        )
        write_section(args.out, title, lines[:2], lines[2:], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())

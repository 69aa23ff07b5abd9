"""Is ``compile: true`` (torch.compile, inductor) worth it for a training step on this machine?

Builds the same network twice (same seed), one eager and one ``torch.compile``d, times the first
two compiled steps (compilation included) and then alternates rounds of timed steps between the
two, so that a neighbour on a shared core slows both alike. Steps are the trainer's: bf16 autocast
where the machine has it, channels-last, forward + loss + backward + optimiser, on random batches
(bench/roofline.py's). Writes a JSON with the medians per round and the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/compile_speed.py --out docs/bench/compile_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from roofline import random_batch

from hermes.config import LossConfig, ModelConfig, OptimConfig
from hermes.fileio import atomic_write_text
from hermes.models.registry import build_model
from hermes.runtime import resolve_amp
from hermes.training.loss import HermesLoss
from hermes.training.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--arch", default="hermes_resunet")
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and variant")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = resolve_amp("auto", "auto", torch.device("cpu"))
    loss_fn = HermesLoss(LossConfig())
    data = random_batch(args.batch, args.patch, args.tasks, amp.channels_last)
    universal = args.arch.startswith("hermes_")

    def make(compiled: bool) -> tuple[Any, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = build_model(ModelConfig(preset=args.preset, architecture=args.arch), num_tasks=args.tasks,
                            num_modalities=3, task_ids_of_model=None if universal else list(range(args.tasks)),
                            patch_size=[args.patch] * 3)
        if amp.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        return (torch.compile(model) if compiled else model), build_optimizer(model, OptimConfig())

    def step(net: Any, optimizer: torch.optim.Optimizer) -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with amp.autocast():
            out = net(data["image"], data["task_ids"], data["modality_id"], data["task_mask"])
            loss = loss_fn(out, data)["total"]
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    variants: dict[str, tuple[Any, torch.optim.Optimizer]] = {}
    first: dict[str, float] = {}
    for name in ("eager", "compiled"):
        variants[name] = make(name == "compiled")
        first[name] = step(*variants[name]) + step(*variants[name])
        print(f"{name}: first two steps {first[name]:.1f} s", flush=True)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(args.rounds):
        for name, pair in variants.items():
            rounds[name].append(statistics.median(step(*pair) for _ in range(args.steps)))
            print(f"round {index}: {name} {rounds[name][-1]:.3f} s/step", flush=True)
    eager, compiled = statistics.median(rounds["eager"]), statistics.median(rounds["compiled"])
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "precision": amp.name,
              "channels_last": amp.channels_last, "preset": args.preset, "arch": args.arch,
              "patch": args.patch, "batch": args.batch, "tasks": args.tasks,
              "first_two_steps_s": first, "median_step_s_per_round": rounds,
              "eager_step_s": eager, "compiled_step_s": compiled, "speedup": eager / compiled,
              "command": " ".join(["python bench/compile_speed.py", *sys.argv[1:]])}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"eager {eager:.3f} s, compiled {compiled:.3f} s: {eager / compiled:.2f}x; wrote {args.out}")


if __name__ == "__main__":
    main()

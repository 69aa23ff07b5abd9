"""Training speed when another CPU-bound process shares the machine (issue 19, item 4).

Times the demo's training step (cpu-demo preset: tiny Hermes-R, batch 2, 48^3 patches; random
tensors, so no data set is needed) in a fresh process per setting, first on an idle machine and
then with one neighbour: a single-threaded Python busy loop started by this script. Settings:
torch intra-op threads (1 or all cores) x OpenMP wait policy (the default spin-wait, or
``OMP_WAIT_POLICY=PASSIVE`` / ``KMP_BLOCKTIME=0``, which let a thread sleep at a barrier instead
of spinning on a core that the neighbour needs), plus ``hermes train``'s default,
``cpu_threads: auto`` (``hermes.runtime.ThreadTuner``: all cores, dropping one thread while
that measures faster). Each setting runs in its own interpreter because
OpenMP reads the policy once, when it starts. The neighbour is pinned to no core (the scheduler
decides, as it would for any other job).

Run it on an otherwise idle machine; it starts and stops the neighbour itself:

    .venv/bin/python bench/busy_core.py --out docs/bench/busy_core.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, statistics, sys, time
import torch
threads = int(sys.argv[1]); steps = int(sys.argv[2]); auto = sys.argv[3] == "auto"
torch.set_num_threads(threads)
from hermes.runtime import ThreadTuner
tuner = ThreadTuner(threads) if auto else None  # what `hermes train` does with cpu_threads: auto
from hermes.config import LossConfig, ModelConfig, OptimConfig, load_preset
from hermes.models.registry import build_model
from hermes.runtime import resolve_amp
from hermes.training.loss import HermesLoss
from hermes.training.optim import build_optimizer, clip_gradients
preset = load_preset("cpu-demo")
patch = preset["data"]["patch_size"]; batch = preset["data"]["batch_size"]; tasks = 4
torch.manual_seed(0)
amp = resolve_amp("auto", "auto", torch.device("cpu"))
model = build_model(ModelConfig(**preset.get("model", {})), num_tasks=tasks, num_modalities=3)
if amp.channels_last:
    model = model.to(memory_format=torch.channels_last_3d)
opt = build_optimizer(model, OptimConfig()); loss_fn = HermesLoss(LossConfig())
image = torch.randn(batch, 1, *patch)
if amp.channels_last:
    image = image.contiguous(memory_format=torch.channels_last_3d)
data = {"target": (torch.rand(batch, tasks, *patch) > 0.8).float(), "task_ids": torch.arange(tasks).repeat(batch, 1),
        "task_mask": torch.ones(batch, tasks, dtype=torch.bool), "modality_id": torch.zeros(batch, dtype=torch.long)}
times = []
for i in range(steps + 2):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with amp.autocast():
        loss = loss_fn(model(image, data["task_ids"], data["modality_id"], data["task_mask"]), data)["total"]
    loss.backward(); clip_gradients(model.parameters(), 1.0); opt.step()
    seconds = time.perf_counter() - t
    if tuner is not None:
        tuner.step_done(i, seconds)
    if i >= 2:
        times.append(seconds)
print(json.dumps({"steps_per_s": len(times) / sum(times), "threads": torch.get_num_threads()}))
"""


def neighbour() -> None:
    """A CPU-bound single-threaded job (what another user's preprocessing looks like to us)."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2147483648


def run_setting(threads: int, passive: bool, steps: int, auto: bool = False) -> float:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if passive:
        env.update({"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"})
    else:
        env.pop("OMP_WAIT_POLICY", None)
        env.pop("KMP_BLOCKTIME", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps), "auto" if auto else "fixed"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["steps_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    parser.add_argument("--out", type=Path, required=True, help="markdown report (JSON next to it)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    settings = [(threads, passive, False) for threads in sorted({1, cores}) for passive in (False, True)]
    settings.append((cores, False, True))  # hermes train's default: cpu_threads auto (ThreadTuner)
    rows = []
    for threads, passive, auto in settings:
        idle = run_setting(threads, passive, args.steps, auto)
        busy_proc = multiprocessing.Process(target=neighbour, daemon=True)
        busy_proc.start()
        try:
            time.sleep(1.0)
            busy = run_setting(threads, passive, args.steps, auto)
        finally:
            busy_proc.terminate()
            busy_proc.join()
        rows.append({"threads": f"auto (<= {threads})" if auto else threads,
                     "wait_policy": "passive" if passive else "default",
                     "idle_steps_per_s": idle, "busy_steps_per_s": busy, "ratio": busy / idle})
        print(rows[-1], flush=True)
    lines = ["# Training speed with one busy core", "",
             f"{cores} cores; demo step (cpu-demo preset, random batch); command: "
             f"`python bench/busy_core.py {' '.join(sys.argv[1:])}`", "",
             "Steps/s = timed steps / their total time (tuner probes included), after 2 warm-up steps.", "",
             "| threads | OpenMP wait policy | idle steps/s | with one busy neighbour | busy / idle | busy / best idle |",
             "|---|---|---|---|---|---|"]
    best_idle = max(r["idle_steps_per_s"] for r in rows)
    lines += [f"| {r['threads']} | {r['wait_policy']} | {r['idle_steps_per_s']:.2f} | {r['busy_steps_per_s']:.2f} "
              f"| {r['ratio']:.2f}x | {r['busy_steps_per_s'] / best_idle:.2f}x |" for r in rows]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hermes.fileio import atomic_write_text

    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"cores": cores, "rows": rows}, indent=1))
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Speed and memory of every architecture and preset on this machine (docs/benchmarks.md).

Per (architecture, preset, patch), in a fresh subprocess (so the peak RSS is the cell's own):

* parameters (16 tasks, 8 modalities; the traditional models own 5 tasks);
* training step: forward + partial-label loss (BCE + Dice) + backward + AdamW on batch 2, with
  the precision and memory layout ``precision: auto`` picks on this machine (as ``hermes train``);
  the minimum over ``--steps`` steps after one warm-up (the CPU is shared: the minimum is the
  least disturbed measurement);
* inference: ``hermes.inference.sliding_window.sliding_window_inference`` (Gaussian, overlap 0.5,
  window batch 2, ``precision: auto``) over one ``--volume``-sized volume (default 96x72x56,
  the size of a synthetic AbdomenCT case in its cache) requesting 5 tasks; minimum of
  ``--repeats``;
* peak RSS of the training phase and of the inference phase (VmHWM, reset between phases).

    .venv/bin/python bench/speed_table.py --threads 1 --json runs/bench_paradigm/speed.json

The ratio of Hermes' sliding window to MONAI's is measured by bench/inference_speed.py
(docs/bench/inference.md), not here.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ARCHITECTURES = ["hermes_resunet", "hermes_medformer", "resunet", "medformer", "dynunet", "swinunetr"]
NUM_TASKS, NUM_MODALITIES, OWN_TASKS = 16, 8, 5


def _proc_mb(key: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) so each phase has its own."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One cell, inside the child process."""
    import torch

    from hermes.config import LossConfig, ModelConfig
    from hermes.inference.sliding_window import sliding_window_inference
    from hermes.models.registry import build_model, count_parameters
    from hermes.runtime import resolve_amp
    from hermes.training.loss import HermesLoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hermes = args.arch.startswith("hermes_")
    config = ModelConfig(architecture=args.arch, preset=args.preset)
    own = None if hermes else list(range(OWN_TASKS))
    model = build_model(config, NUM_TASKS, NUM_MODALITIES, task_ids_of_model=own, patch_size=[args.patch] * 3)
    result: dict[str, Any] = {
        "architecture": args.arch, "preset": args.preset, "patch": args.patch, "threads": args.threads,
        "parameters": count_parameters(model),
    }  # fmt: skip
    amp = resolve_amp("auto", "auto", torch.device("cpu"))
    result["precision"] = amp.name + (" + channels_last" if amp.channels_last else "")
    fmt = torch.channels_last_3d if amp.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    p = args.patch
    batch = {
        "image": torch.randn(2, 1, p, p, p).contiguous(memory_format=fmt),
        "target": (torch.rand(2, OWN_TASKS, p, p, p) > 0.9).float(),
        "task_ids": torch.arange(OWN_TASKS).repeat(2, 1),
        "task_mask": torch.ones(2, OWN_TASKS, dtype=torch.bool),
        "modality_id": torch.zeros(2, dtype=torch.long),
    }
    loss_fn = HermesLoss(LossConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    _reset_peak()
    times = []
    try:
        for i in range(args.steps + 1):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with amp.autocast():
                out = model(batch["image"], batch["task_ids"], batch["modality_id"], batch["task_mask"])
                loss = loss_fn(out, batch)["total"]
            loss.backward()
            optimizer.step()
            if i:
                times.append(time.perf_counter() - start)
        result["train_step_s"] = min(times)
        result["train_peak_mb"] = _proc_mb("VmHWM")
    except Exception as error:  # a model that cannot train at this patch size is a result too
        result["train_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    del optimizer
    model.eval()
    tasks = torch.arange(OWN_TASKS).unsqueeze(0)
    modality = torch.zeros(1, dtype=torch.long)

    def network(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return model(x, tasks.expand(n, -1), modality.expand(n)).logits

    volume = torch.randn(1, 1, *args.volume)
    _reset_peak()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(args.repeats):
                start = time.perf_counter()
                sliding_window_inference(
                    volume, network, [p] * 3, overlap=0.5, window_batch_size=2, device="cpu"
                )
                times.append(time.perf_counter() - start)
        result["inference_s"] = min(times)
        result["inference_peak_mb"] = _proc_mb("VmHWM")
        result["volume"] = list(args.volume)
    except Exception as error:
        result["inference_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]], volume: list[int]) -> str:
    lines = [
        f"| architecture | preset | patch | parameters | precision | train step (s, batch 2) | train peak RSS (MB) "
        f"| inference {'x'.join(map(str, volume))} (s) | inference peak RSS (MB) | RSS before (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        train = (
            _fmt(r.get("train_step_s"), ".2f")
            if "train_error" not in r
            else "fails: " + r["train_error"][:70]
        )
        infer = _fmt(r.get("inference_s"), ".1f") if "inference_error" not in r else "fails"
        lines.append(
            f"| {r['architecture']} | {r['preset']} | {r['patch']}^3 | {_fmt(r['parameters'] and r['parameters'] / 1e6, '.2f')} M | "
            f"{r.get('precision', '-')} | {train} | {_fmt(r.get('train_peak_mb'), '.0f')} | {infer} | "
            f"{_fmt(r.get('inference_peak_mb'), '.0f')} | {_fmt(r.get('baseline_rss_mb'), '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=ARCHITECTURES, choices=ARCHITECTURES)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--patches", type=int, nargs="+", default=[32])
    parser.add_argument("--volume", type=int, nargs=3, default=[96, 72, 56])
    parser.add_argument("--steps", type=int, default=2, help="measured training steps (after 1 warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="timed inference passes (after none: "
                        "the first window batch is the warm-up cost a user pays too)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="append/replace the cells in this JSON file")
    parser.add_argument("--md", type=Path, help="write the Markdown table here")
    parser.add_argument("--child", nargs=3, metavar=("_", "PRESET", "PATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        # One child per (preset, patch) measures every architecture: a fresh interpreter per cell
        # cost ~80 s of imports on the loaded machine. Peaks are reset per phase (VmHWM) and
        # the RSS before each cell is reported, so a cell's own increase is peak - baseline.
        import torch  # noqa: F401 - imported before the first baseline, as every later cell sees it

        import hermes.models.registry  # noqa: F401

        for arch in args.archs:
            args.arch, args.preset, args.patch = arch, args.child[1], int(args.child[2])
            gc.collect()
            baseline = _proc_mb("VmRSS")
            try:
                row = measure(args)
            except Exception as error:  # e.g. a model that cannot be built for this patch
                row = {"architecture": arch, "preset": args.preset, "patch": args.patch, "parameters": None,
                       "train_error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}  # fmt: skip
            row["baseline_rss_mb"] = baseline
            print(json.dumps(row), flush=True)
        return 0
    from hermes.fileio import atomic_write_json, atomic_write_text

    existing: list[dict[str, Any]] = (
        json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    )
    for patch in args.patches:
        for preset in args.presets:
            cmd = [sys.executable, __file__, "--child", "all", preset, str(patch), "--archs", *args.archs,
                   "--steps", str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads),
                   "--volume", *map(str, args.volume)]  # fmt: skip
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                if not line.startswith("{"):
                    continue
                row = json.loads(line)
                print(f"{row['architecture']} {preset} patch {patch}: {line.strip()} "
                      f"({time.perf_counter() - start:.0f} s since start)", flush=True)  # fmt: skip
                key = (row["architecture"], preset, patch)
                existing = [r for r in existing if (r["architecture"], r["preset"], r["patch"]) != key] + [
                    row
                ]
                if args.json:
                    atomic_write_json(args.json, existing)
            if proc.wait() != 0:
                print(f"{preset} {patch}: child exited with {proc.returncode}", file=sys.stderr)
    table = markdown(existing, args.volume)
    if args.md:
        atomic_write_text(args.md, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``hermes train CONFIG``: train a universal (or per-dataset) model from a YAML config.

Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m hermes.cli train CONFIG`` runs the
same command with DDP (one process per device; only rank 0 writes).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hermes.cli.args import POSITIVE_INT
from hermes.config import load_train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="training YAML (see hermes/config.py; `preset: cpu-demo|paper` allowed)")
    parser.add_argument("--paradigm", choices=["universal", "traditional"], help="override `paradigm`")
    parser.add_argument("--dataset", help="traditional paradigm: the one dataset to train on (catalog name)")
    parser.add_argument(
        "--steps", type=POSITIVE_INT, help=f"override `steps` (the planned number of optimiser steps), {POSITIVE_INT}"
    )
    parser.add_argument("--output", type=Path, help="override `output` (run folder)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder from its checkpoint")
    parser.add_argument(
        "--extend-steps",
        type=POSITIVE_INT,
        metavar="N",
        help=f"resume and train N steps past the checkpoint's planned schedule (re-plans the LR decay), N {POSITIVE_INT}",
    )
    parser.add_argument(
        "--device", default="auto",
        help="cpu, cuda, cuda:N or auto (default: CUDA when available); an error if CUDA is requested but absent",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.paradigm:
        overrides["paradigm"] = args.paradigm
    if args.dataset:
        overrides["dataset"] = args.dataset
        overrides.setdefault("paradigm", "traditional")
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.output is not None:
        overrides["output"] = str(args.output.resolve())
    return overrides


def run(args: argparse.Namespace) -> int:
    from hermes.errors import ConfigError
    from hermes.training.trainer import train

    if args.extend_steps is not None and args.extend_steps < 1:
        raise ConfigError("--extend-steps needs a positive number of steps")
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps needs a positive number of steps")
    if args.steps is not None and (args.resume or args.extend_steps is not None):
        raise ConfigError("--steps sets the plan of a new run; to train a resumed run longer use --extend-steps N")
    config = load_train_config(args.config, overrides_from_args(args))
    result = train(
        config, resume=args.resume, extend_steps=args.extend_steps, progress=not args.no_progress, device=args.device
    )
    print(f"trained {result.steps} steps; model: {result.model_dir}")
    return 0

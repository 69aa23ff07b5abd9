"""``hermes extend -m MODEL --catalog NEW.yaml --cache NEW_CACHE [--old-cache OLD_CACHE] [options]``.

Add the new catalog's tasks to a universal model while keeping the old ones (rehearsal,
distillation) and replace the model only if no old task lost more than the tolerance. Exit
status 3 when the forgetting gate rejects the new model (it is then written as
``<output>.rejected``). See docs/adaptation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hermes.cli.adaptation_args import add_common_arguments, build_config, setup_logging
from hermes.cli.args import FINITE_FLOAT, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_INT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, output_required=False)
    parser.add_argument("--old-cache", dest="old_cache", type=Path, help="cache of the model's own datasets (rehearsal)")
    parser.add_argument(
        "--rehearsal-cases", type=NON_NEGATIVE_INT,
        help=f"old training cases kept per old dataset, {NON_NEGATIVE_INT} (default 4)",
    )
    parser.add_argument(
        "--rehearsal-batch", type=NON_NEGATIVE_INT,
        help=f"old samples appended to every batch, {NON_NEGATIVE_INT} (default 1)",
    )
    parser.add_argument(
        "--distill-weight", type=NON_NEGATIVE_FLOAT,
        help=f"weight of the distillation term, {NON_NEGATIVE_FLOAT} (default 1; 0: off)",
    )
    parser.add_argument("--distill-loss", choices=["mse", "bce"], help="distillation loss (default mse)")
    parser.add_argument(
        "--tolerance", type=FINITE_FLOAT,
        help=f"max allowed drop of any old task's mean Dice, in points, {FINITE_FLOAT} (negative: demand a gain; "
        "default 2)",
    )
    parser.add_argument(
        "--gate-max-cases", type=POSITIVE_INT, help=f"test cases per old dataset scored by the gate, {POSITIVE_INT}"
    )
    parser.add_argument("--gate-datasets", nargs="+", help="old datasets scored by the gate (default: all with test cases)")
    parser.add_argument("--no-gate", action="store_true", help="skip the before/after evaluation (no protection)")
    parser.add_argument("--force", action="store_true", help="write the model even if the gate fails")
    parser.add_argument("--report", type=Path, help="also write the before/after report JSON here")


def run(args: argparse.Namespace) -> int:
    from hermes.adaptation.extend import GATE_FAILED_EXIT, run_extend
    from hermes.adaptation.gate import format_table
    from hermes.config import ExtendConfig
    from hermes.fileio import atomic_write_json

    setup_logging(args.quiet)
    extra: dict[str, Any] = {}
    for key, flag in (
        ("old_cache", "old_cache"), ("rehearsal_cases", "rehearsal_cases"), ("rehearsal_batch", "rehearsal_batch"),
        ("distill_weight", "distill_weight"), ("distill_loss", "distill_loss"),
        ("forgetting_tolerance", "tolerance"), ("gate_max_cases", "gate_max_cases"),
        ("gate_datasets", "gate_datasets"),
    ):
        value = getattr(args, flag)
        if value is not None:
            extra[key] = str(value) if isinstance(value, Path) else value
    config = build_config(args, ExtendConfig, extra)
    outcome = run_extend(config, device=args.device, gate=not args.no_gate, force=args.force, progress=not args.quiet)
    if outcome.gate is not None:
        print(format_table(outcome.gate))
    if args.report is not None:
        atomic_write_json(args.report, outcome.report)
    if not outcome.accepted:
        print(
            f"hermes extend: the forgetting gate REJECTED the new model; {config.output or config.base_model} is "
            f"unchanged; the new model is in {outcome.written_to} (report: {outcome.written_to / 'extend_report.json'})",
            file=sys.stderr,
        )
        return GATE_FAILED_EXIT
    print(f"extended model: {outcome.written_to}")
    if outcome.report.get("forced"):
        print("warning: written despite a failed gate (--force)", file=sys.stderr)
    return 0

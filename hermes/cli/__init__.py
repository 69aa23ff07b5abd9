"""The ``hermes`` command: one subcommand per pipeline stage.

Each subcommand is one module of this package (``hermes/cli/<command>.py``) that exposes
``add_arguments(parser)`` and ``run(args) -> int``; the stage packages (data, models, training,
inference, evaluation, adaptation, synthetic) import no argparse (tests/test_layering.py). This
file only maps names to modules so that ``hermes --help`` stays fast (modules import lazily).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from hermes import __version__

# name -> (module, one-line help), in pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hermes.cli.demo", "Generate the synthetic cohort, train one universal model, evaluate it."),
    "cohort": ("hermes.cli.cohort", "Generate the built-in synthetic multi-dataset cohort."),
    "catalog": ("hermes.cli.catalog", "Show/validate a catalog: the task x dataset table."),
    "prepare": ("hermes.cli.prepare", "Preprocess the datasets of a catalog into a cache."),
    "train": ("hermes.cli.train", "Train a universal (or per-dataset) model from a YAML config."),
    "predict": ("hermes.cli.predict", "Segment images with a trained model."),
    "export": ("hermes.cli.export", "Export a trained model to ONNX (predict --engine onnxruntime)."),
    "evaluate": ("hermes.cli.evaluate", "Score predictions (Dice, HD95, NSD) and write reports."),
    "benchmark": ("hermes.cli.benchmark", "Universal vs per-dataset models on the same cases, paired CIs."),
    "finetune": ("hermes.cli.finetune", "Transfer a trained universal model to a new dataset."),
    "extend": ("hermes.cli.extend", "Add tasks to a model without forgetting the old ones."),
    "priors": ("hermes.cli.priors", "Plot the similarity of the learned context priors."),
}


def _available(module: str) -> bool:
    """Whether a stage module exists, without importing its package (which may import torch)."""
    relative = Path(*module.split(".")[1:])
    root = Path(__file__).resolve().parent.parent  # the hermes package
    return (root / relative).with_suffix(".py").is_file() or (root / relative / "__init__.py").is_file()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (the others stay help-text only).

    Stage modules import torch, MONAI and friends; importing all of them would make every
    ``hermes`` call pay seconds of start-up for modules it never uses.
    """
    parser = argparse.ArgumentParser(
        prog="hermes",
        description="Universal 3D medical image segmentation with context priors (Hermes).",
    )
    parser.add_argument("--version", action="version", version=f"hermes {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if not _available(module_name):
            continue
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    return parser


def _requested_command(argv: list[str]) -> str | None:
    for token in argv:
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_requested_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    from hermes.errors import HermesError

    try:
        return int(args._run(args) or 0)
    except HermesError as error:
        print(f"hermes {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hermes {args.command}: interrupted", file=sys.stderr)
        return 130


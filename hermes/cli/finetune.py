"""``hermes finetune -m MODEL --catalog NEW.yaml --cache NEW_CACHE -o OUT [options]``.

Transfer a trained model to new datasets (new tasks and/or a new modality). See
docs/adaptation.md for the options and what is warm-started.
"""

from __future__ import annotations

import argparse

from hermes.cli.adaptation_args import add_common_arguments, build_config, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, output_required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from hermes.adaptation.finetune import run_finetune
    from hermes.config import FinetuneConfig
    from hermes.errors import ConfigError

    setup_logging(args.quiet)
    config = build_config(args, FinetuneConfig) if args.output or args.config else None
    if config is None:
        raise ConfigError("missing -o/--out (the fine-tuned model's directory)")
    output = run_finetune(config, device=args.device, overwrite=args.overwrite, progress=not args.quiet)
    print(f"fine-tuned model: {output}")
    print(f"evaluate it: hermes evaluate -m {output}")
    return 0

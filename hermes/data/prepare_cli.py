"""``hermes prepare CATALOG --out CACHE [--workers N]``: preprocess a catalog into a cache."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from hermes.cli_args import POSITIVE_INT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("catalog", type=Path, help="catalog YAML listing the datasets")
    parser.add_argument("--out", type=Path, required=True, help="cache folder (created; re-runs resume)")
    parser.add_argument(
        "--workers", type=POSITIVE_INT, default=None,
        help=f"parallel processes, {POSITIVE_INT} (default: preprocessing.workers of the catalog)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from hermes.data.cache import prepare_cache
    from hermes.data.catalog import load_catalog

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    catalog = load_catalog(args.catalog)
    start = time.perf_counter()
    report = prepare_cache(catalog, args.out, workers=args.workers, progress=not args.quiet)
    print(f"{report.summary()} in {time.perf_counter() - start:.1f} s -> {args.out}")
    for key, reason in report.skipped.items():
        print(f"  skipped {key}: {reason}")
    return 0

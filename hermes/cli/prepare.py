"""``hermes prepare CATALOG --out CACHE [--workers N] [--add|--replace] [--verify] [--no-wait]``:
preprocess a catalog into a cache (safety: docs/safety.md, "Cache")."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from hermes.cli.args import POSITIVE_INT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("catalog", type=Path, help="catalog YAML listing the datasets")
    parser.add_argument("--out", type=Path, required=True, help="cache folder (created; re-runs resume)")
    parser.add_argument(
        "--workers", type=POSITIVE_INT, default=None,
        help=f"parallel processes, {POSITIVE_INT} (default: preprocessing.workers of the catalog)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--add", action="store_true",
        help="add this catalog's datasets to a cache of another catalog (cached datasets are kept; "
        "one in both must have the same source and settings)",
    )
    mode.add_argument(
        "--replace", action="store_true", help="remove what earlier runs wrote into the cache, then start over"
    )
    parser.add_argument(
        "--verify", action="store_true",
        help="check the checksum of every cached array (not only its size) and redo corrupt cases",
    )
    parser.add_argument(
        "--no-wait", action="store_true",
        help="if another `hermes prepare` (or a training run) is using the cache, exit instead of waiting",
    )


def run(args: argparse.Namespace) -> int:
    from hermes.data.cache import prepare_cache
    from hermes.data.catalog import load_catalog

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    catalog = load_catalog(args.catalog)
    start = time.perf_counter()
    mode = "add" if args.add else "replace" if args.replace else "resume"
    report = prepare_cache(
        catalog, args.out, workers=args.workers, progress=not args.quiet, mode=mode, wait=not args.no_wait,
        verify=args.verify,
    )
    print(f"{report.summary()} in {time.perf_counter() - start:.1f} s -> {args.out}")
    for key, reason in report.repaired.items():
        print(f"  redone (corrupt) {key}: {reason}")
    for key, reason in report.skipped.items():
        print(f"  skipped {key}: {reason}")
    return 0

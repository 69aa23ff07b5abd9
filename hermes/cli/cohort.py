"""``hermes cohort``: generate the built-in synthetic cohort and print what was written."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hermes.cli.args import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT
from hermes.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="output folder (one nnU-Net v2 raw dataset per subfolder)")
    parser.add_argument(
        "--seed", type=NON_NEGATIVE_INT, default=0,
        help=f"random seed, {NON_NEGATIVE_INT}; same seed -> identical files (default 0)",
    )
    parser.add_argument(
        "--scale", type=POSITIVE_FLOAT, default=1.0,
        help=f"voxels per axis relative to the default (~64-96^3), {POSITIVE_FLOAT}; 0.5 for quick tests, 2 for "
        "large volumes",
    )
    parser.add_argument(
        "--datasets", nargs="+", metavar="NAME",
        help="subset by name, short name or number (e.g. 101 LiverCT); also selects datasets outside the default "
        "cohort (108 BrainTumourMR, 4-channel brain MR)",
    )
    parser.add_argument(
        "--cases", type=POSITIVE_INT,
        help=f"training cases per dataset, {POSITIVE_INT} (default: each dataset's own number)",
    )
    parser.add_argument(
        "--test-cases", type=NON_NEGATIVE_INT,
        help=f"test cases per dataset, {NON_NEGATIVE_INT} (default: each dataset's own number)",
    )
    parser.add_argument("--preview", action="store_true", help="also write OUT/previews/<dataset>.png (slices + labels)")
    parser.add_argument(
        "--list", action="store_true",
        help="describe the datasets without generating anything (every dataset, the default column says which "
        "are generated without --datasets)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace dataset folders under --out generated with other parameters (default: refuse; folders "
        "generated with the same parameters are reused)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def text_table(rows: list[dict[str, object]]) -> str:
    """Plain aligned columns (also used by ``hermes demo``)."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def describe_cohort(folders: list[Path]) -> str:
    """What was generated: one row per dataset (modality, cases, grid, orientation, label set)
    and a total line; printed by ``hermes cohort`` and ``hermes demo``."""
    from hermes.synthetic.cohort import summarize

    rows = [summarize(Path(folder)) for folder in folders]
    cases = sum(int(str(r["train"])) + int(str(r["test"])) for r in rows)
    modalities = sorted({str(r["modality"]) for r in rows})
    return f"{text_table(rows)}\n\n{len(rows)} datasets, {cases} cases, modalities {', '.join(modalities)}"


def run(args: argparse.Namespace) -> int:
    from hermes.synthetic.cohort import generate_cohort
    from hermes.synthetic.datasets import list_synthetic_datasets, select_datasets

    specs = select_datasets(args.datasets)
    if args.list:
        listed = specs if args.datasets else list_synthetic_datasets(include_optional=True)
        rows = [
            {
                "dataset": s.name,
                "default": "yes" if s.default else "no",
                "mimics": s.mimics,
                "modality": "+".join(s.sequences),
                "train": s.n_train,
                "test": s.n_test,
                "shape": "x".join(map(str, s.shape_for(args.scale))),
                "spacing": "x".join(f"{v:g}" for v in s.spacing_for(args.scale)),
                "orientation": s.orientation,
                "labels": ", ".join(s.label_names),
            }
            for s in listed
        ]
        print(text_table(rows))
        return 0
    if args.out is None:
        raise ConfigError("hermes cohort needs --out DIR (or --list)")
    start = time.perf_counter()
    folders = generate_cohort(
        args.out,
        seed=args.seed,
        scale=args.scale,
        datasets=[s.name for s in specs],
        cases=args.cases,
        test_cases=args.test_cases,
        preview=args.preview,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    elapsed = time.perf_counter() - start
    print(describe_cohort(folders))
    print(f"written to {args.out} ({elapsed:.1f} s, seed {args.seed}, scale {args.scale:g})")
    if args.preview:
        print(f"previews: {args.out / 'previews'}")
    return 0

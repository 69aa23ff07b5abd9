"""``hermes priors MODEL [--out DIR] [--cache CACHE] [--order cluster]``.

Cosine-similarity heatmaps (PNG) and matrices (CSV) of a model's learned task and modality
priors per fusion stage, and of its prototypes; ``summary.json`` lists every task's nearest
neighbours and how often the nearest one is the same structure of another dataset. See
docs/adaptation.md ("What the priors learned").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hermes.cli.args import POSITIVE_INT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="saved model directory")
    parser.add_argument("--out", type=Path, help="output folder (default: MODEL/priors)")
    parser.add_argument(
        "--cache", type=Path,
        help="a prepared cache of the model's datasets: adds the posterior prototypes (mean over cached cases)",
    )
    parser.add_argument(
        "--cases", type=POSITIVE_INT, default=3, help=f"cached cases per dataset for the posteriors, {POSITIVE_INT} (default 3)"
    )
    parser.add_argument(
        "--order", choices=["catalog", "cluster"], default="catalog",
        help="heatmap row order: catalog order, or similar items together (hierarchical clustering)",
    )
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from hermes.adaptation.engine import model_catalog
    from hermes.errors import ConfigError
    from hermes.evaluation.priors_analysis import posterior_prototypes, similarity_matrices, write_analysis
    from hermes.models.registry import load_model

    if args.cases < 1:
        raise ConfigError("--cases must be at least 1")
    model, bundle = load_model(args.model, device=args.device)
    catalog = model_catalog(Path(args.model), bundle)
    posterior = counts = None
    if args.cache is not None:
        patch = bundle.patch_size
        found = posterior_prototypes(model, catalog, args.cache, patch, args.cases, args.device)
        if found is None:
            print(f"note: no cached case of the model's datasets in {args.cache}; posterior prototypes skipped")
        else:
            posterior, counts = found
    used = [entry.modality_id for entry in catalog.datasets]
    matrices = similarity_matrices(model, catalog.task_names, catalog.modalities, posterior, counts, used)
    out = args.out or Path(args.model) / "priors"
    summary = write_analysis(matrices, out, args.order)
    print(f"{len(matrices)} similarity matrices (PNG + CSV) -> {out}")
    for name, entry in summary["matrices"].items():
        if "same_structure_nearest_rate" in entry and entry["same_structure_nearest_rate"] is not None:
            print(
                f"  {name:<28} nearest task is the same structure in {100 * entry['same_structure_nearest_rate']:.0f}% "
                f"of {entry['tasks_with_a_same_structure_partner']} tasks (chance {100 * entry['same_structure_chance_rate']:.0f}%)"
            )
    overall = summary["matrices"].get("task_prior_all")
    if overall:
        print("nearest neighbours (task priors, all stages):")
        for label, neighbours in overall["nearest"].items():
            shown = ", ".join(f"{n} {v:+.2f}" for n, v in neighbours[:2])
            print(f"  {label}: {shown}")
    return 0

"""``hermes catalog show CATALOG`` and ``hermes catalog init DIR... -o catalog.yaml``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from hermes.data.annotation import TaskPresence, label_presence, presence_suggestions
from hermes.data.catalog import Catalog, default_catalog_spec, load_catalog, share_candidates
from hermes.errors import DataError
from hermes.fileio import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="catalog_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="validate a catalog and print its task x dataset table")
    show.add_argument("catalog", type=Path)
    show.add_argument(
        "--no-label-scan",
        action="store_true",
        help="do not read the training label maps (skips the per-task absent counts)",
    )
    init = sub.add_parser("init", help="write (-o) or print a default catalog for dataset folders")
    init.add_argument("folders", type=Path, nargs="+", help="nnU-Net v2 raw or MSD dataset folders")
    init.add_argument(
        "-o", "--output", type=Path,
        help="catalog file to write; dataset paths are then relative to its folder (default: print to stdout, "
        "paths relative to the current folder: redirect it to a file in the current folder, or use --relative-to)",
    )
    init.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    init.add_argument(
        "--relative-to",
        type=Path,
        default=None,
        help="write dataset paths relative to this folder, where the catalog will live (default: the -o file's "
        "folder, else .), with .. where needed",
    )


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def render_presence(rows: list[TaskPresence]) -> list[str]:
    """Per task: training cases without its label, cases left out of its loss, and the rule."""
    if not rows:
        return []
    lines = ["", "Label presence in the training cases (absent: no voxel of the task in the label map):"]
    table = [["task", "absent", "unannotated", "absent_means"]]
    for row in rows:
        table.append([row.task, f"{row.absent}/{row.cases}", f"{row.unannotated}/{row.cases}", row.rule])
    lines.append(_table(table))
    suggestions = presence_suggestions(rows)
    if suggestions:
        lines.append("")
        lines.append("Absent labels are trained as background unless annotated otherwise (docs/data.md, partial labels):")
        lines.extend("  " + line for line in suggestions)
    return lines


def render(catalog: Catalog, presence: list[TaskPresence] | None = None) -> str:
    """Human-readable summary: datasets, the task x dataset table, label presence, share suggestions."""
    lines = []
    where = f" {catalog.source}" if catalog.source else ""
    lines.append(
        f"Catalog{where}: {len(catalog.datasets)} dataset(s), {catalog.num_tasks} task(s) (null task id "
        f"{catalog.null_task_id}), modality vocabulary {', '.join(catalog.modalities)} + unknown "
        f"(id {catalog.unknown_modality_id})"
    )
    lines.append("")
    rows = [["dataset", "folder", "modality", "id", "channels", "train", "test", "tasks"]]
    for entry in catalog.datasets:
        rows.append(
            [
                entry.name,
                entry.folder,
                entry.modality,
                str(entry.modality_id),
                # each channel's modality (the per-channel stem's conditioning), when several
                "+".join(entry.channel_modalities) if entry.num_channels > 1 else "1",
                "test only" if entry.test_only else str(entry.num_train),
                str(entry.num_test),
                str(len(entry.task_ids)),
            ]
        )
    lines.append(_table(rows))
    lines.append("")
    lines.append("Tasks (cell: the dataset label value(s) feeding the task):")
    header = ["id", "task", *[entry.name for entry in catalog.datasets]]
    rows = [header]
    for task in catalog.tasks:
        row = [str(task.index), task.name]
        for entry in catalog.datasets:
            if task.index in entry.task_ids:
                values = entry.label_values[entry.task_ids.index(task.index)]
                row.append("+".join(str(v) for v in values))
            else:
                row.append(".")
        rows.append(row)
    lines.append(_table(rows))
    untrained = [
        task.name
        for task in catalog.tasks
        if all(entry.test_only or entry.num_train == 0 for entry in catalog.datasets_of_task(task.index))
    ]
    if untrained:
        lines.append("")
        lines.append(f"Warning: no training data for {', '.join(untrained)} (only test-only datasets label them).")
    lines.extend(render_presence(presence or []))
    suggestions = share_candidates(catalog)
    if suggestions:
        lines.append("")
        lines.append(
            "Share candidates (same label name, same modality family). Share only if the annotation "
            "protocols agree (e.g. both include or both exclude the tumour); add to the catalog:"
        )
        snippet = yaml.safe_dump({"shared_tasks": {label: names for label, names in suggestions}}, sort_keys=False)
        lines.extend("  " + line for line in snippet.rstrip().splitlines())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.catalog_command == "show":
        catalog = load_catalog(args.catalog)
        presence = None if args.no_label_scan else label_presence(catalog, progress=sys.stderr.isatty())
        print(render(catalog, presence))
        return 0
    output: Path | None = args.output
    if output is not None and output.exists() and not args.overwrite:
        raise DataError(f"{output}: exists; pass --overwrite to replace it")
    relative_to = args.relative_to or (output.parent if output is not None else Path.cwd())
    spec = default_catalog_spec(list(args.folders), relative_to=relative_to)
    text = (
        "# Hermes catalog (docs/data.md). Paths are relative to this file's folder.\n"
        "# Optional per dataset: name, modality, labels, nested_tasks, tasks, test_only, absent_means, annotations.\n"
        "# Run `hermes catalog show` on this file for share candidates (shared_tasks).\n"
        + yaml.safe_dump(spec, sort_keys=False)
    )
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(output, text)
        print(f"wrote {output} ({len(spec['datasets'])} dataset(s))")
    return 0

"""A self-contained HTML evaluation report: tables, Dice box plots, GT-vs-prediction overlays.

Everything is inlined (CSS, PNGs as base64 data URIs), so the file opens offline, can be mailed
or attached to a paper's supplement, and does not break when moved. The overlay figures are also
written as PNG files next to it (``overlays/<dataset>__<kind>__<case>.png``, each linked from its
figure) to open or share one picture on its own. Figures are rendered with matplotlib's
non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hermes.fileio import atomic_directory, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from hermes.evaluation.evaluate import EvaluationResult, OverlaySlice

OVERLAY_DIR = "overlays"

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222;
     padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:36px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{margin-top:20px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f2f2f2}
td.name,th.name{text-align:left} tr.mean td{font-weight:bold;background:#fafafa}
.note{color:#555;font-size:0.9em} img{max-width:100%;height:auto;border:1px solid #eee}
.fig{margin:8px 0 20px}
"""


def _png_bytes(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(fig: Any) -> str:
    return _uri(_png_bytes(fig))


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _ci(ci: Sequence[float] | None) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "–"


def _short(task: str, dataset: str) -> str:
    """Drop the dataset prefix of ``Dataset/label`` task names inside that dataset's section."""
    prefix = dataset + "/"
    return task[len(prefix) :] if task.startswith(prefix) else task


def overview_table(summary: dict[str, Any]) -> str:
    rows = []
    for dataset, entry in summary["datasets"].items():
        mean = entry["mean"]
        rows.append(
            f"<tr><td class=name>{html.escape(dataset)}</td><td>{entry['n_cases']}</td>"
            f"<td>{len(entry['tasks'])}</td><td>{_fmt(mean['dice']['mean'])}</td><td>{_ci(mean['dice']['ci95'])}</td>"
            f"<td>{_fmt(mean['nsd']['mean'])}</td><td>{_fmt(mean['hd95']['mean'], 2)}</td></tr>"
        )
    overall = summary["overall"]
    for label, key in (("mean over datasets", "mean_over_datasets"), ("mean over tasks", "mean_over_tasks")):
        o = overall[key]
        rows.append(
            f"<tr class=mean><td class=name>{label}</td><td></td><td></td><td>{_fmt(o['dice'])}</td><td></td>"
            f"<td>{_fmt(o['nsd'])}</td><td>{_fmt(o['hd95'], 2)}</td></tr>"
        )
    return (
        "<table><tr><th class=name>dataset</th><th>cases</th><th>tasks</th><th>Dice</th><th>Dice 95% CI</th>"
        "<th>NSD</th><th>HD95 (mm)</th></tr>" + "".join(rows) + "</table>"
    )


def task_table(dataset: str, entry: dict[str, Any]) -> str:
    rows = []
    for task, stats in entry["tasks"].items():
        rows.append(
            f"<tr><td class=name>{html.escape(_short(task, dataset))}</td><td>{stats['dice']['n']}</td>"
            f"<td>{_fmt(stats['dice']['mean'])} ± {_fmt(stats['dice']['std'])}</td><td>{_ci(stats['dice']['ci95'])}</td>"
            f"<td>{_fmt(stats['nsd']['mean'])}</td><td>{_fmt(stats['hd95']['mean'], 2)}</td>"
            f"<td>{stats['n_false_positive']} / {stats['n_ref_empty']}</td><td>{stats.get('n_unannotated', 0)}</td></tr>"
        )
    return (
        "<table><tr><th class=name>task</th><th>n</th><th>Dice mean ± std</th><th>95% CI</th><th>NSD</th>"
        "<th>HD95 (mm)</th><th>FP cases / cases without it</th><th>not annotated (not scored)</th></tr>"
        + "".join(rows) + "</table>"
    )


def dice_boxplot(dataset: str, rows: Sequence[dict[str, Any]]) -> str | None:
    """Box plot of per-case Dice per task, points overlaid (small test sets hide nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_task: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["dataset"] == dataset and not math.isnan(float(row["dice"])):
            per_task[row["task"]].append(float(row["dice"]))
    if not per_task:
        return None
    names = list(per_task)
    width = max(4.0, min(16.0, 0.55 * len(names) + 2.0))
    fig, ax = plt.subplots(figsize=(width, 3.6))
    data = [per_task[n] for n in names]
    ax.boxplot(data, showfliers=False, widths=0.6)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=10, alpha=0.6, color="tab:blue", zorder=3)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels([_short(n, dataset) for n in names], rotation=35 if len(names) > 3 else 0, ha="right"
                       if len(names) > 3 else "center", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{dataset}: Dice per case and task", fontsize=10)
    return _png(fig)


def _colours(n: int) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if n > 10 else "tab10"]
    return np.asarray([cmap(i % cmap.N)[:3] for i in range(n)])


def _blend(grey: np.ndarray | None, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    base = np.zeros((*labels.shape, 3)) if grey is None else np.repeat(grey[..., None] / 255.0, 3, axis=2)
    out = base.copy()
    mask = labels > 0
    if mask.any():
        colour = colours[(labels[mask].astype(np.int64) - 1) % len(colours)]
        out[mask] = (1 - alpha) * base[mask] + alpha * colour
    return out


def _contours(ax: Any, labels: np.ndarray, colours: np.ndarray) -> None:
    for value in np.unique(labels):
        if value == 0:
            continue
        ax.contour(labels == value, levels=[0.5], colors=[colours[(int(value) - 1) % len(colours)]], linewidths=1.0)


def overlay_figure(item: OverlaySlice, dice_text: str) -> str:
    """:func:`overlay_png` as a data URI."""
    return _uri(overlay_png(item, dice_text))


def overlay_png(item: OverlaySlice, dice_text: str) -> bytes:
    """Image | reference | prediction, same slice, colours per task, legend below (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = _colours(len(item.task_names))
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.9))
    grey = item.image
    panels = [
        ("image" if grey is not None else "(no image)", None),
        ("reference", item.ref),
        ("prediction", item.pred),
    ]
    for ax, (title, labels) in zip(axes, panels):
        if labels is None:
            ax.imshow(grey if grey is not None else np.zeros(item.ref.shape), cmap="gray", aspect=item.aspect,
                      interpolation="nearest")
        else:
            ax.imshow(_blend(grey, labels, colours), aspect=item.aspect, interpolation="nearest")
            _contours(ax, labels, colours)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        marker = {"transform": ax.transAxes, "color": "yellow", "fontsize": 9, "va": "center",
                  "bbox": {"facecolor": "black", "alpha": 0.55, "pad": 1.5, "edgecolor": "none"}}
        ax.text(0.02, 0.5, "R", ha="left", **marker)
        ax.text(0.98, 0.5, "L", ha="right", **marker)
    present = sorted(v for v in {int(v) for v in np.unique(item.ref)} | {int(v) for v in np.unique(item.pred)} if v > 0)
    handles = [Patch(color=colours[(v - 1) % len(colours)], label=_short(item.task_names[v - 1], item.dataset))
               for v in present if v - 1 < len(item.task_names)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(f"{item.dataset} / {item.case}   {dice_text}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 0.95))
    return _png_bytes(fig)


def _representative(
    items: list[OverlaySlice], rows: Sequence[dict[str, Any]], count: int
) -> list[tuple[str, OverlaySlice, float | None]]:
    """Best, median and worst case by mean Dice over tasks (then evenly spaced ones)."""
    case_dice: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if not math.isnan(float(row["dice"])):
            case_dice[row["case"]].append(float(row["dice"]))
    scored = sorted(
        ((float(np.mean(case_dice[i.case])) if case_dice.get(i.case) else -1.0, i) for i in items),
        key=lambda pair: pair[0],
        reverse=True,
    )
    if not scored or count <= 0:
        return []
    if len(scored) <= count:
        picks = list(range(len(scored)))
    else:
        picks = sorted({round(k * (len(scored) - 1) / (count - 1)) for k in range(count)}) if count > 1 else [0]
    n = len(scored)

    def kind(p: int) -> str:
        if n == 1:
            return "only case"
        if p == 0:
            return "best case"
        if p == n - 1:
            return "worst case"
        return "median case" if len(picks) == 3 else f"case ranked {p + 1} of {n}"

    return [(kind(p), scored[p][1], scored[p][0] if scored[p][0] >= 0 else None) for p in picks]


def overlay_file_name(dataset: str, kind: str, case: str) -> str:
    """``AbdomenCT__best_case__case_003.png`` (file-system safe)."""
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in (dataset, kind, case)) + ".png"


def render_report(
    result: EvaluationResult,
    title: str = "Hermes evaluation",
    report_cases: int = 3,
    figures: dict[str, bytes] | None = None,
) -> str:
    """The report's HTML. ``figures``: when given, receives each overlay PNG under its path
    relative to the report (``overlays/...png``), and each figure links to that file."""
    summary, rows = result.summary, result.rows
    conv = summary["conventions"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=note>Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}. "
        f"Dice, NSD (tolerance {conv['nsd_tolerance_mm']} mm) and HD{conv['hd_percentile']:g} in mm on each "
        f"case's native grid. Both masks empty: {html.escape(conv['both_empty'])}. One empty: "
        f"{html.escape(conv['one_empty'])}. CI: {html.escape(conv['ci'])}.</p>",
        "<h2>Overview</h2>",
        overview_table(summary),
    ]
    if "modality_recognition" in summary:  # hermes evaluate --detect-modality
        from hermes.evaluation.recognition import recognition_html

        parts.append(recognition_html(summary["modality_recognition"]))
    by_dataset: dict[str, list[OverlaySlice]] = defaultdict(list)
    for item in result.overlays:
        by_dataset[item.dataset].append(item)
    for dataset, entry in summary["datasets"].items():
        parts.append(f"<h2>{html.escape(dataset)}</h2>")
        parts.append(task_table(dataset, entry))
        box = dice_boxplot(dataset, rows)
        if box:
            parts.append(f"<div class=fig><img alt='Dice box plot' src='{box}'></div>")
        picks = _representative(by_dataset.get(dataset, []), [r for r in rows if r["dataset"] == dataset],
                                report_cases)
        if picks:
            parts.append("<h3>Reference vs prediction</h3>")
        for kind, item, mean_dice in picks:
            text = f"({kind}, mean Dice {_fmt(mean_dice)})"
            png = overlay_png(item, text)
            img = f"<img alt='{html.escape(item.case)}' src='{_uri(png)}'>"
            if figures is not None:
                name = f"{OVERLAY_DIR}/{overlay_file_name(dataset, kind, item.case)}"
                figures[name] = png
                img = f"<a href='{html.escape(name)}'>{img}</a>"
            parts.append(f"<div class=fig>{img}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, result: EvaluationResult, title: str = "Hermes evaluation",
                 report_cases: int = 3) -> Path:
    """report.html plus its overlay PNGs (the ``overlays/`` folder beside it is the report's own
    and is replaced as a whole, atomically, so no picture of an earlier run stays behind)."""
    path = Path(path)
    figures: dict[str, bytes] = {}
    text = render_report(result, title, report_cases, figures)
    if figures:
        with atomic_directory(path.parent / OVERLAY_DIR, overwrite=True) as tmp:
            for name, png in figures.items():
                atomic_write_bytes(tmp / Path(name).name, png)
    return atomic_write_text(path, text)


def overlay_files(report_path: str | Path) -> list[Path]:
    """The overlay PNGs written with a report, in the report's order (first: the first dataset's
    best case)."""
    text = Path(report_path).read_text()
    folder = Path(report_path).parent
    return [folder / name for name in re.findall(rf"href='({OVERLAY_DIR}/[^']+\.png)'", text)]

"""Modality recognition, measured: a confusion matrix and the Dice cost of an inferred modality.

``hermes evaluate -m MODEL --detect-modality`` predicts every case twice: once with the
modality the modality head picks from the image (prompted with the unknown modality, what
``hermes predict`` does without ``--modality``) and once with the dataset's own modality and
prompt (the oracle protocol of a plain ``hermes evaluate``). This module turns the pairs into
the ``modality_recognition`` section of summary.json, the text table and the HTML report:

* ``confusion``: true modality (the catalog's) x predicted modality, counts of cases;
* ``per_modality``: cases, correct guesses and accuracy per true modality, and ``accuracy``
  over all cases;
* ``confidence``: the head's raw softmax probability of its guess (not the capped value
  ``hermes predict`` reports, hermes/inference/modality_guess.py), mean over right and over
  wrong guesses, and the highest any wrong guess had (an over-confident head shows here);
* ``dice``: per dataset, the mean Dice over its tasks with the given and with the inferred
  modality on the same cases, and their difference (inferred - given).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecognitionRecord:
    """One case: its dataset's modality, the head's guess and the probability of the guess."""

    dataset: str
    case: str
    true: str
    predicted: str
    probability: float | None


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _dataset_dice(summary: dict[str, Any], dataset: str) -> float | None:
    entry = summary.get("datasets", {}).get(dataset)
    return None if entry is None else entry["mean"]["dice"]["mean"]


def recognition_summary(
    records: Sequence[RecognitionRecord], given: dict[str, Any], inferred: dict[str, Any]
) -> dict[str, Any]:
    """The ``modality_recognition`` section from the per-case guesses and the two summaries
    (hermes.evaluation.evaluate.summarize of the given- and of the inferred-modality rows)."""
    true_modalities = sorted({r.true for r in records})
    columns = sorted({r.true for r in records} | {r.predicted for r in records})
    confusion = {t: {p: 0 for p in columns} for t in true_modalities}
    for r in records:
        confusion[r.true][r.predicted] += 1
    per_modality = {}
    for t in true_modalities:
        n = sum(confusion[t].values())
        correct = confusion[t].get(t, 0)
        per_modality[t] = {"n_cases": n, "correct": correct, "accuracy": correct / n if n else None}
    right = [r.probability for r in records if r.predicted == r.true and r.probability is not None]
    wrong = [r.probability for r in records if r.predicted != r.true and r.probability is not None]
    dice: dict[str, Any] = {}
    for dataset in dict.fromkeys(r.dataset for r in records):
        g, i = _dataset_dice(given, dataset), _dataset_dice(inferred, dataset)
        both = g is not None and i is not None and not (math.isnan(g) or math.isnan(i))
        dice[dataset] = {
            "n_cases": sum(r.dataset == dataset for r in records),
            "given": g,
            "inferred": i,
            "delta": (i - g) if both else None,  # type: ignore[operator]
        }
    return {
        "protocol": "each case predicted twice: modality inferred by the modality head (unknown-modality prompt, "
        "as `hermes predict` without --modality) and given (the dataset's modality and prompt); the main "
        "tables of this evaluation are the inferred-modality ones",
        "accuracy": (sum(r.predicted == r.true for r in records) / len(records)) if records else None,
        "n_cases": len(records),
        "confusion": confusion,
        "per_modality": per_modality,
        "confidence": {
            "mean_when_right": _mean(right),
            "mean_when_wrong": _mean(wrong),
            "max_when_wrong": max(wrong) if wrong else None,
        },
        "dice": dice,
        "cases": [
            {"dataset": r.dataset, "case": r.case, "true": r.true, "predicted": r.predicted, "p": r.probability}
            for r in records
        ],
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_recognition(section: dict[str, Any]) -> str:
    """Plain-text confusion matrix, accuracy per modality and Dice given vs inferred."""
    confusion = section["confusion"]
    columns = sorted({p for row in confusion.values() for p in row})
    width = max([8, *(len(c) + 1 for c in columns)])
    lines = ["", f"modality recognition: accuracy {_fmt(section['accuracy'])} over {section['n_cases']} case(s)"]
    corner = "true \\ predicted"
    lines.append(f"{corner:<18}" + "".join(f"{c:>{width}}" for c in columns) + f"{'accuracy':>10}")
    for true, row in confusion.items():
        acc = section["per_modality"][true]["accuracy"]
        lines.append(f"{true:<18}" + "".join(f"{row.get(c, 0):>{width}}" for c in columns) + f"{_fmt(acc):>10}")
    conf = section["confidence"]
    lines.append(
        f"p of the guess: mean {_fmt(conf['mean_when_right'], 2)} when right, {_fmt(conf['mean_when_wrong'], 2)} "
        f"when wrong (max {_fmt(conf['max_when_wrong'], 2)})"
    )
    lines.append(f"{'dataset':<36} {'n':>4} {'Dice given':>11} {'inferred':>9} {'delta':>7}")
    for dataset, d in section["dice"].items():
        lines.append(
            f"{dataset:<36} {d['n_cases']:>4} {_fmt(d['given']):>11} {_fmt(d['inferred']):>9} {_fmt(d['delta']):>7}"
        )
    return "\n".join(lines)


def recognition_html(section: dict[str, Any]) -> str:
    """The report's section: the same numbers as :func:`format_recognition`."""
    esc = html.escape
    confusion = section["confusion"]
    columns = sorted({p for row in confusion.values() for p in row})
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for true, row in confusion.items():
        cells = "".join(  # the diagonal (right guesses) in bold
            f"<td><b>{row.get(c, 0)}</b></td>" if c == true else f"<td>{row.get(c, 0)}</td>" for c in columns
        )
        body.append(f"<tr><th>{esc(true)}</th>{cells}<td>{_fmt(section['per_modality'][true]['accuracy'])}</td></tr>")
    conf = section["confidence"]
    dice_rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{d['n_cases']}</td><td>{_fmt(d['given'])}</td><td>{_fmt(d['inferred'])}</td>"
        f"<td>{_fmt(d['delta'])}</td></tr>"
        for name, d in section["dice"].items()
    )
    return "\n".join(
        [
            "<h2>Modality recognition</h2>",
            f"<p class=note>{esc(section['protocol'])}. Accuracy {_fmt(section['accuracy'])} over "
            f"{section['n_cases']} case(s); probability of the guess: mean {_fmt(conf['mean_when_right'], 2)} when "
            f"right, {_fmt(conf['mean_when_wrong'], 2)} when wrong (max {_fmt(conf['max_when_wrong'], 2)}).</p>",
            f"<table><tr><th>true \\ predicted</th>{head}<th>accuracy</th></tr>{''.join(body)}</table>",
            "<table><tr><th>dataset</th><th>n</th><th>Dice, given modality</th><th>Dice, inferred</th>"
            f"<th>inferred - given</th></tr>{dice_rows}</table>",
        ]
    )

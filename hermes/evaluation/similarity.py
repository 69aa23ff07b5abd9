"""Cosine-similarity matrices of learned tokens, and how they are written (CSV, heatmap PNG).

Kept apart from the model code so that the plots can be tested on plain arrays and reused by
the benchmark scripts.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hermes.fileio import atomic_write, atomic_write_text


@dataclass(frozen=True)
class SimilarityMatrix:
    """A named square matrix over labelled items (tasks or modalities)."""

    name: str  # file stem, e.g. "task_prior_enc2"
    title: str  # human title of the plot
    labels: tuple[str, ...]
    matrix: np.ndarray  # (N, N) float64, cosine similarities in [-1, 1]


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows of ``vectors`` (N, D); zero rows give 0."""
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def cluster_order(matrix: np.ndarray) -> list[int]:
    """Row order that puts similar items next to each other (average-linkage dendrogram).

    scipy's hierarchical clustering on the cosine distance; with fewer than 3 items there is
    nothing to reorder.
    """
    n = len(matrix)
    if n < 3:
        return list(range(n))
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    distance = np.clip(1.0 - matrix, 0.0, 2.0)
    distance = (distance + distance.T) / 2.0
    np.fill_diagonal(distance, 0.0)
    return [int(i) for i in leaves_list(linkage(squareform(distance, checks=False), method="average"))]


def nearest_neighbours(sim: SimilarityMatrix, k: int = 3) -> list[tuple[str, list[tuple[str, float]]]]:
    """For each item, its ``k`` most similar other items with their similarity."""
    out = []
    for i, label in enumerate(sim.labels):
        row = sim.matrix[i].copy()
        row[i] = -np.inf
        order = np.argsort(-row, kind="stable")[:k]
        out.append((label, [(sim.labels[j], float(sim.matrix[i, j])) for j in order if np.isfinite(row[j])]))
    return out


def structure_name(task_name: str) -> str:
    """The structure part of a task name (``Dataset101_AbdomenCT/liver`` -> ``liver``)."""
    return task_name.rsplit("/", 1)[-1].strip().lower()


def same_structure_neighbour_rate(sim: SimilarityMatrix) -> tuple[float, float, int]:
    """How often a task's nearest neighbour is the same structure from another protocol.

    Only tasks whose structure name occurs in at least two tasks count. Returns (rate, chance
    rate of a random other task, number of tasks counted), the chance rate being the mean over
    those tasks of (same-name others) / (all others).
    """
    names = [structure_name(label) for label in sim.labels]
    hits, chance, counted = 0, 0.0, 0
    n = len(names)
    for i in range(n):
        same = [j for j in range(n) if j != i and names[j] == names[i]]
        if not same:
            continue
        row = sim.matrix[i].copy()
        row[i] = -np.inf
        counted += 1
        hits += int(names[int(np.argmax(row))] == names[i])
        chance += len(same) / (n - 1)
    if counted == 0:
        return float("nan"), float("nan"), 0
    return hits / counted, chance / counted, counted


def write_csv(path: str | Path, sim: SimilarityMatrix) -> Path:
    """The matrix as CSV with the labels as header row and first column."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["", *sim.labels])
    for label, row in zip(sim.labels, sim.matrix):
        writer.writerow([label, *(f"{value:.4f}" for value in row)])
    return atomic_write_text(path, buffer.getvalue())


def heatmap_figure(sim: SimilarityMatrix, order: Sequence[int] | None = None) -> Any:
    """A labelled heatmap figure. Size and font scale with the number of items so that labels
    stay readable; values are printed in the cells when there are few enough to read them."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    order = list(order) if order is not None else list(range(len(sim.labels)))
    matrix = sim.matrix[np.ix_(order, order)]
    labels = [sim.labels[i] for i in order]
    n = max(len(labels), 1)
    longest = max((len(label) for label in labels), default=1)
    font = 9 if n <= 20 else 7 if n <= 40 else 5
    cell = 0.42 if n <= 20 else 0.28 if n <= 40 else 0.18
    margin = 0.075 * font * longest / 9 + 0.6
    side = n * cell
    fig, ax = plt.subplots(figsize=(side + margin + 1.6, side + margin + 0.8), dpi=120)
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=90, fontsize=font)
    ax.set_yticklabels(labels, fontsize=font)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                value = matrix[i, j]
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=max(font - 2, 5),
                        color="white" if abs(value) > 0.6 else "black")
    ax.set_title(sim.title, fontsize=font + 2)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="cosine similarity")
    fig.tight_layout()
    return fig


def write_heatmap(path: str | Path, sim: SimilarityMatrix, order: Sequence[int] | None = None) -> Path:
    """The heatmap of :func:`heatmap_figure` as a PNG (atomic write)."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(sim, order)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))

"""Prior analysis: similarity maths, heatmaps/CSV, and the matrices of a (tiny, untrained) model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hermes.config import ModelConfig
from hermes.errors import ModelError
from hermes.evaluation.priors_analysis import (
    prior_pools,
    similarity_matrices,
    static_prototypes,
    write_analysis,
)
from hermes.evaluation.similarity import (
    SimilarityMatrix,
    cluster_order,
    cosine_similarity,
    heatmap_figure,
    nearest_neighbours,
    same_structure_neighbour_rate,
)
from hermes.models.registry import build_model

TASKS = ["AbdomenCT/liver", "AbdomenCT/spleen", "LiverCT/liver", "AbdomenT2/spleen", "BrainT1/csf"]


def test_cosine_similarity_known_values() -> None:
    sim = cosine_similarity(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, 0.0]]))
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(0.0) and sim[0, 3] == pytest.approx(-1.0)
    assert sim[4].tolist() == [0.0] * 5  # a zero vector is similar to nothing
    assert np.allclose(sim, sim.T)


def _organ_matrix(noise: float) -> SimilarityMatrix:
    rng = np.random.default_rng(0)
    organs = {"liver": rng.normal(size=16), "spleen": rng.normal(size=16), "csf": rng.normal(size=16)}
    vectors = np.stack([organs[t.split("/")[1]] + noise * rng.normal(size=16) for t in TASKS])
    return SimilarityMatrix("t", "tasks", tuple(TASKS), cosine_similarity(vectors))


def test_same_structure_rate_and_neighbours() -> None:
    sim = _organ_matrix(noise=0.1)
    rate, chance, counted = same_structure_neighbour_rate(sim)
    assert counted == 4  # csf has no partner
    assert rate == 1.0 and chance == pytest.approx(0.25)
    nearest = dict(nearest_neighbours(sim, k=1))
    assert nearest["AbdomenCT/liver"][0][0] == "LiverCT/liver"
    order = cluster_order(sim.matrix)
    position = {TASKS[i]: p for p, i in enumerate(order)}
    assert abs(position["AbdomenCT/liver"] - position["LiverCT/liver"]) == 1
    assert sorted(order) == list(range(len(TASKS)))


def test_heatmap_has_the_labels_and_values(tmp_path: Path) -> None:
    sim = _organ_matrix(noise=0.5)
    figure = heatmap_figure(sim)
    axis = figure.axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == TASKS
    assert [t.get_text() for t in axis.get_yticklabels()] == TASKS
    assert len(axis.texts) == len(TASKS) ** 2  # values printed in the cells
    assert axis.get_title() == "tasks"


def _tiny(num_tasks: int = len(TASKS)) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny"), num_tasks, 7)


def test_matrices_of_a_model(tmp_path: Path) -> None:
    model = _tiny()
    pools = prior_pools(model)
    assert [p.stage for p in pools] == ["enc2", "enc3", "bottleneck", "dec1", "dec2"]
    static = static_prototypes(model, pools, len(TASKS))
    assert static is not None and static.shape[0] == len(TASKS)
    modalities = ["CT", "PET", "T1", "T2", "FLAIR", "LGE", "cine"]
    matrices = similarity_matrices(model, TASKS, modalities, used_modalities=[0, 3, 2])
    names = [m.name for m in matrices]
    assert "task_prior_all" in names and "task_prototype_static" in names and "task_prior_dec2" in names
    modality = next(m for m in matrices if m.name == "modality_prior_all")
    assert modality.labels == ("CT", "T1", "T2")  # only the modalities datasets use
    # "all stages" is the mean of the per-stage cosines
    per_stage = [m.matrix for m in matrices if m.name.startswith("task_prior_") and m.name != "task_prior_all"]
    overall = next(m for m in matrices if m.name == "task_prior_all").matrix
    assert np.allclose(overall * len(per_stage), sum(per_stage))
    summary = write_analysis(matrices, tmp_path / "out", order="cluster")
    assert (tmp_path / "out" / "task_prior_all.png").read_bytes()[:4] == b"\x89PNG"
    header = (tmp_path / "out" / "task_prior_enc2.csv").read_text().splitlines()[0]
    assert header == "," + ",".join(TASKS)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["matrices"]["task_prior_all"]["tasks_with_a_same_structure_partner"] == 4


def test_task_count_mismatch_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="task priors"):
        similarity_matrices(_tiny(3), TASKS, ["CT"])


@pytest.mark.parametrize("multiscale", [True, False])
def test_prototype_stages_are_read_from_the_model(multiscale: bool) -> None:
    """The analysis uses the stages the model declares, not a guess from a layer width."""
    from hermes.evaluation.priors_analysis import prior_pools, prototype_stage_indices

    model = build_model(ModelConfig(preset="tiny", multiscale_prototypes=multiscale), 4, 3)
    pools = prior_pools(model)
    expected = list(range(len(pools))) if multiscale else [len(pools) - 1]
    assert prototype_stage_indices(model, pools) == expected
    assert [pools[i].stage for i in expected] == list(model.prototype_stages)
    model.prototype_stages = [pools[0].stage]  # a declaration the head's width could not reveal
    assert prototype_stage_indices(model, pools) == [0]

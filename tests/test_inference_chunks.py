"""Task chunks: the same masks whatever the chunk size, the chunk size from a memory budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import make_model_dir
from pydantic import ValidationError

import hermes.inference.chunks as chunks_module
import hermes.inference.predictor as predictor_module
from hermes.cli import build_parser
from hermes.config import InferenceConfig
from hermes.data.imageio import Image
from hermes.inference import Predictor
from hermes.inference.chunks import GIB, MemoryPlan, memory_plan, split

LABELS = tuple(f"organ{i}" for i in range(7))
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _image() -> Image:
    rng = np.random.default_rng(0)
    array = rng.normal(-800, 50, (34, 30, 22)).astype(np.float32)
    array[4:-4, 4:-4, 3:-3] = rng.normal(40, 200, (26, 22, 16))
    return Image(array, AFFINE.copy())


@pytest.fixture(scope="module")
def hermes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Two datasets: the 7 tasks are one prompt group, prompted with their dataset's full list.
    return make_model_dir(
        tmp_path_factory.mktemp("hermes") / "model",
        datasets=(("SevenCT", "CT", LABELS, None), ("OtherCT", "CT", ("liver",), None)),
    )


@pytest.fixture(scope="module")
def traditional_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(
        tmp_path_factory.mktemp("traditional") / "model",
        datasets=(("SevenCT", "CT", LABELS, None),), architecture="resunet",
    )


class Recorder:
    """Counts sliding-window passes and captures the memory plan, with a zero baseline so the
    chunk size depends on the budget alone."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passes = 0
        self.plans: list[MemoryPlan] = []
        original_swi = predictor_module.sliding_window_inference
        original_plan = predictor_module.memory_plan

        def counted(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
            self.passes += 1
            return original_swi(*args, **kwargs)  # type: ignore[arg-type]

        def recorded(*args: object, **kwargs: object) -> MemoryPlan:
            plan = original_plan(*args, **kwargs)  # type: ignore[arg-type]
            self.plans.append(plan)
            return plan

        monkeypatch.setattr(predictor_module, "sliding_window_inference", counted)
        monkeypatch.setattr(predictor_module, "memory_plan", recorded)
        monkeypatch.setattr(chunks_module, "current_rss_bytes", lambda: 0)


def _predict(model_dir: Path, max_memory_gb: float | None, output: str, verbose: bool = False) -> object:
    config = InferenceConfig(overlap=0.25, window_batch_size=4, max_memory_gb=max_memory_gb, output=output)
    predictor = Predictor(model_dir, device="cpu", config=config)
    tasks = [f"SevenCT/{name}" for name in LABELS]
    return predictor.predict(_image(), modality="CT", tasks=tasks, progress=False, verbose=verbose)


def _budget_for(plan: MemoryPlan, tasks_per_chunk: int) -> float:
    """GiB that fit exactly ``tasks_per_chunk`` tasks (half a task of slack)."""
    slack = min(plan.window_per_task, plan.restore_per_task) // 2
    return (plan.peak(tasks_per_chunk) + slack) / GIB


@pytest.mark.parametrize("output", ["multilabel", "binary"])
@pytest.mark.parametrize("model", ["hermes", "traditional"])
def test_chunked_masks_equal_unchunked(
    output: str, model: str, hermes_dir: Path, traditional_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = hermes_dir if model == "hermes" else traditional_dir
    recorder = Recorder(monkeypatch)
    reference = _predict(model_dir, None, output)
    assert recorder.passes == 1
    plan = recorder.plans[-1]
    if output == "multilabel":
        found = set(np.unique(reference.labels))  # type: ignore[attr-defined]
        assert len(found) >= 4, f"too few labels for a meaningful comparison: {found}"
    for size in (1, 2, 3):
        recorder.passes = 0
        chunked = _predict(model_dir, _budget_for(plan, size), output)
        assert recorder.passes == math.ceil(len(LABELS) / size)
        if output == "multilabel":
            assert np.array_equal(chunked.labels, reference.labels), f"K={size}"  # type: ignore[attr-defined]
        else:
            assert chunked.masks.keys() == reference.masks.keys()  # type: ignore[attr-defined]
            for task, mask in reference.masks.items():  # type: ignore[attr-defined]
                assert np.array_equal(chunked.masks[task], mask), f"K={size}, {task}"  # type: ignore[attr-defined]


def test_chunked_tta_with_swapped_pairs_equals_unchunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With left-right TTA a chunk also computes the partners of its tasks (read after the swap);
    the masks must still equal the single pass's."""
    model_dir = make_model_dir(tmp_path / "model", datasets=(("SevenCT", "CT", LABELS, None),))
    spec_path = model_dir / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["datasets"][0]["mirror_pairs"] = [[0, 1], [2, 3]]
    spec_path.write_text(json.dumps(spec))
    recorder = Recorder(monkeypatch)

    def run(max_memory_gb: float | None) -> np.ndarray:
        config = InferenceConfig(overlap=0.25, window_batch_size=4, max_memory_gb=max_memory_gb, mirror_tta=True)
        prediction = Predictor(model_dir, device="cpu", config=config).predict(_image(), modality="CT", progress=False)
        assert prediction.labels is not None
        return prediction.labels

    reference = run(None)
    assert len(np.unique(reference)) >= 3
    plan = recorder.plans[-1]
    recorder.passes = 0
    assert np.array_equal(run(_budget_for(plan, 1)), reference)
    assert recorder.passes == len(LABELS)


def test_default_budget_predicts_few_tasks_in_one_pass(hermes_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    _predict(hermes_dir, InferenceConfig().max_memory_gb, "multilabel")
    assert recorder.passes == 1


def test_budget_below_the_fixed_need_runs_one_task_per_pass_and_says_so(
    hermes_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder = Recorder(monkeypatch)
    _predict(hermes_dir, 1e-4, "multilabel", verbose=True)
    assert recorder.passes == len(LABELS)
    err = capsys.readouterr().err
    assert "7 tasks in 7 passes" in err and "--max-memory 0.0001 GB cannot be met" in err


def test_chunk_size_from_budget() -> None:
    # window phase: 1000 + 10 per task; restore phase: 1200 + 2 per task
    plan = MemoryPlan(baseline=500, window_fixed=1000, window_per_task=10, restore_fixed=1200, restore_per_task=2)
    assert plan.chunk_size(None, 7) == 7
    assert plan.chunk_size(1500 + 35, 7) == 1  # the restore phase alone needs 1700
    assert plan.chunk_size(1700 + 4, 7) == 2  # restore: 2 tasks; window: 20
    assert plan.chunk_size(1700 + 5, 7) == 2
    assert plan.chunk_size(1700 + 6, 7) == 3
    plan = MemoryPlan(baseline=500, window_fixed=1000, window_per_task=10, restore_fixed=10, restore_per_task=2)
    assert plan.chunk_size(1500 + 35, 7) == 3  # the window phase binds
    assert plan.chunk_size(1500 + 29, 7) == 2
    assert plan.chunk_size(10**9, 7) == 7
    assert plan.chunk_size(1200, 7) == 1  # the fixed part alone exceeds the budget: smallest chunks
    assert plan.peak(3) == 1530


def test_memory_plan_counts_task_buffers() -> None:
    plan = memory_plan((100, 100, 50), (40, 30, 20), (16, 16, 16), 2, baseline=7)
    assert plan.baseline == 7
    cache, window = 40 * 30 * 20, 2 * 16**3
    assert plan.window_per_task == 2 * cache + 16 * window  # float16 stitching + window logits
    assert plan.restore_per_task == 2 * cache  # the chunk's stitched sums wait to be restored
    assert plan.restore_fixed > 10 * 100 * 100 * 50  # a float32 probability on the original grid and more
    assert plan.window_fixed > 8 * cache + 100 * window  # float32 image + weight, activations
    mirrored = memory_plan((100, 100, 50), (40, 30, 20), (16, 16, 16), 2, mirror_passes=4, baseline=7)
    assert mirrored.window_per_task > plan.window_per_task
    assert chunks_module.current_rss_bytes() > 10 * 2**20  # a Python process with torch loaded


def test_split_keeps_order() -> None:
    assert split([5, 3, 9, 1, 4], 2) == [(5, 3), (9, 1), (4,)]
    assert split([5, 3], 9) == [(5, 3)]
    with pytest.raises(ValueError):
        split([1], 0)


def test_max_memory_option() -> None:
    def parse(*extra: str):  # type: ignore[no-untyped-def]
        return build_parser("predict").parse_args(["predict", "-m", "m", "-i", "i", "-o", "o", *extra])

    assert parse("--max-memory", "2").max_memory == 2.0
    assert parse().max_memory is None  # the config's default applies
    for bad in ("0", "-1", "abc", "nan"):
        with pytest.raises(SystemExit) as exit_info:
            parse("--max-memory", bad)
        assert exit_info.value.code == 2
    with pytest.raises(ValidationError):
        InferenceConfig(max_memory_gb=0)
    assert InferenceConfig(max_memory_gb=None).max_memory_gb is None

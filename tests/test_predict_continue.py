"""`hermes predict --continue`: a killed folder prediction resumes without redoing finished cases,
and a half-written output is never counted as done."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import make_model_dir

from hermes.cli import main
from hermes.config import InferenceConfig
from hermes.data.imageio import save_image
from hermes.inference import Predictor
from hermes.inference.api import predict_files

FAST = InferenceConfig(overlap=0.25, window_batch_size=4)
CASES = ("case_a", "case_b", "case_c", "case_d")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "model", datasets=(("CTSet", "CT", ("liver",), None),))


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for case in CASES:
        save_image(folder / f"{case}_0000.nii.gz", rng.normal(0, 100, (18, 16, 12)).astype(np.int16), np.eye(4))
    return folder


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the input of every Predictor.predict call."""
    calls: list[str] = []
    original = Predictor.predict

    def counting(self, image, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(Path(str(image.path if hasattr(image, "path") else image)).name)
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", counting)
    return calls


def _run(model_dir: Path, inputs: Path, out: Path, mode: str = "multilabel", **kwargs: object) -> None:
    predict_files(model_dir, inputs, out, config=FAST, output_mode=mode, modality="CT", progress=False,  # type: ignore[arg-type]
                  verbose=False, **kwargs)  # type: ignore[arg-type]


def test_continue_redoes_only_missing_and_incomplete_cases(model_dir: Path, inputs: Path, tmp_path: Path,
                                                           counter: list[str]) -> None:
    out = tmp_path / "out"
    _run(model_dir, inputs, out)
    assert len(counter) == 4
    stamps = {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in CASES}
    (out / "case_b.nii.gz").unlink()  # deleted output
    (out / "case_b.json").unlink()
    (out / "case_c.nii.gz").unlink()  # killed while writing: only a partial temp file is left
    (out / "case_c.json").unlink()
    (out / ".case_c.nii.gz.x1y2.tmp").write_bytes(b"\x1f\x8b half a gzip")
    (out / "case_d.json").unlink()  # killed between the image and its sidecar
    counter.clear()

    with pytest.raises(Exception, match="output exists"):
        _run(model_dir, inputs, out)  # without --continue nothing is touched
    assert counter == []
    _run(model_dir, inputs, out, resume=True)
    assert sorted(counter) == ["case_b_0000.nii.gz", "case_c_0000.nii.gz", "case_d_0000.nii.gz"]
    assert (out / "case_a.nii.gz").stat().st_mtime_ns == stamps["case_a"]  # finished case untouched
    for case in CASES:
        assert (out / f"{case}.nii.gz").is_file() and json.loads((out / f"{case}.json").read_text())["tasks"]
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, "CTSet/liver": 1}

    counter.clear()
    _run(model_dir, inputs, out, resume=True)  # everything complete: nothing is predicted
    assert counter == []


def test_continue_binary_folders(model_dir: Path, inputs: Path, tmp_path: Path, counter: list[str]) -> None:
    out = tmp_path / "masks"
    _run(model_dir, inputs, out, mode="binary")
    (out / "case_a" / "labels.json").unlink()  # not a finished case folder
    (out / ".case_b.abc.tmp").mkdir()  # a case folder that was still being built
    import shutil

    shutil.rmtree(out / "case_b")
    counter.clear()
    _run(model_dir, inputs, out, mode="binary", resume=True)
    assert sorted(counter) == ["case_a_0000.nii.gz", "case_b_0000.nii.gz"]
    assert (out / "case_a" / "labels.json").is_file() and (out / "case_b" / "labels.json").is_file()


def test_cli_continue_flag(model_dir: Path, inputs: Path, tmp_path: Path, counter: list[str],
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["predict", "-m", str(model_dir), "-i", str(inputs), "-o", str(out), "--modality", "CT", "--quiet",
            "--overlap", "0.25", "--window-batch-size", "4"]
    assert main(args) == 0 and len(counter) == 4
    (out / "case_d.nii.gz").unlink()
    counter.clear()
    assert main([*args, "--continue"]) == 0
    assert counter == ["case_d_0000.nii.gz"]
    assert main([*args, "--continue", "--overwrite"]) != 0
    assert "pass one of the two" in capsys.readouterr().err

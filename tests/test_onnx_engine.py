"""`hermes export` (ONNX) and `hermes predict --engine onnxruntime`: same masks as PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import make_model_dir

from hermes.cli import main
from hermes.config import InferenceConfig
from hermes.data.imageio import Image, load_image, save_image
from hermes.errors import ModelError
from hermes.inference import Predictor

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # one export: ~20-30 s on this CPU

CONFIG = InferenceConfig(overlap=0.5, window_batch_size=2, precision="fp32")
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def _ct(shape: tuple[int, int, int] = (44, 40, 30), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.normal(-800, 50, shape).astype(np.float32)
    array[6:-6, 5:-5, 4:-4] = rng.normal(40, 200, (shape[0] - 12, shape[1] - 10, shape[2] - 8))
    return array


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = make_model_dir(tmp_path_factory.mktemp("model") / "model")
    assert main(["export", "-m", str(model), "-o", str(model / "onnx")]) == 0
    return model


def test_export_folder_graph_and_metadata(model_dir: Path) -> None:
    import onnx

    folder = model_dir / "onnx"
    meta = json.loads((folder / "hermes_onnx.json").read_text())
    spec = json.loads((model_dir / "spec.json").read_text())
    assert json.loads((folder / "spec.json").read_text()) == spec
    assert meta["preprocessing"] == spec["preprocessing"] and meta["patch_size"] == [32, 32, 32]
    assert meta["task_names"] == spec["task_names"]
    assert all(check["max_abs_diff"] <= 1e-3 for check in meta["verification"]["checks"])
    graph = onnx.load(str(folder / "model.onnx"))
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["hermes_preprocessing"]) == spec["preprocessing"]
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert list(inputs) == ["image", "task_ids", "task_mask", "modality_id"]
    image_dims = inputs["image"]
    assert image_dims[1] == 1 and all(isinstance(d, str) for d in image_dims[2:]), image_dims  # dynamic X, Y, Z
    assert isinstance(inputs["task_ids"][1], str)  # dynamic task count
    assert [o.name for o in graph.graph.output] == ["logits", "modality_logits"]
    ops = {node.op_type for node in graph.graph.node}
    assert {"InstanceNormalization", "Softmax", "LayerNormalization", "Resize"} <= ops  # norms, attention
    # Existing folder: refused without --overwrite.
    assert main(["export", "-m", str(model_dir), "-o", str(folder)]) == 2


def test_onnxruntime_masks_equal_pytorch(model_dir: Path) -> None:
    torch_predictor = Predictor(model_dir, device="cpu", config=CONFIG.model_copy(update={"output": "binary"}))
    onnx_predictor = Predictor(model_dir, device="cpu", config=CONFIG.model_copy(update={"output": "binary"}),
                               engine="onnxruntime")
    image = Image(_ct(), AFFINE.copy())
    # Modality head through the graph's second output.
    ours, theirs = torch_predictor.modality_probabilities([image]), onnx_predictor.modality_probabilities([image])
    assert ours.keys() == theirs.keys() and all(abs(ours[m] - theirs[m]) < 1e-4 for m in ours)
    # Two prompt groups (CTSet's 2 tasks with one kept, then OtherCT's), stitched windows.
    a = torch_predictor.predict(image, modality="CT", progress=False)
    b = onnx_predictor.predict(image, modality="CT", progress=False)
    assert a.masks is not None and b.masks is not None and list(a.masks) == list(b.masks)
    for task in a.masks:
        assert 0 < a.masks[task].sum() < a.masks[task].size, task  # a non-trivial mask
        assert _dice(a.masks[task], b.masks[task]) >= 0.999, task
    single = onnx_predictor.predict(image, modality="CT", tasks=["CTSet/kidney"], progress=False)
    assert single.masks is not None
    assert _dice(single.masks["CTSet/kidney"], a.masks["CTSet/kidney"]) >= 0.999


def test_cli_engine_onnxruntime(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save_image(tmp_path / "ct.nii.gz", _ct(seed=1).astype(np.int16), AFFINE)
    common = ["-i", str(path), "--modality", "CT", "--quiet", "--overlap", "0.5", "--precision", "fp32"]
    assert main(["predict", "-m", str(model_dir), "-o", str(tmp_path / "torch.nii.gz"), *common]) == 0
    # The model folder (finds MODEL/onnx) and the export folder itself.
    for model, name in ((model_dir, "a.nii.gz"), (model_dir / "onnx", "b.nii.gz")):
        assert main(["predict", "-m", str(model), "-o", str(tmp_path / name), "--engine", "onnxruntime", *common]) == 0
        ours, theirs = load_image(tmp_path / "torch.nii.gz").array, load_image(tmp_path / name).array
        assert ours.any() and (ours == theirs).mean() >= 0.999
        assert json.loads((tmp_path / name.replace(".nii.gz", ".json")).read_text())["labels"] == json.loads(
            (tmp_path / "torch.json").read_text()
        )["labels"]
    bare = make_model_dir(tmp_path / "bare")
    assert main(["predict", "-m", str(bare), "-o", str(tmp_path / "c.nii.gz"), "--engine", "onnxruntime", *common]) == 2
    assert "hermes export" in capsys.readouterr().err
    with pytest.raises(ModelError, match=r"no model\.onnx"):
        Predictor(bare, device="cpu", engine="onnxruntime")

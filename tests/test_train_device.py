"""`hermes train --device`: overrides the automatic choice; CUDA requested but absent is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from hermes.cli import main
from hermes.errors import ConfigError
from hermes.runtime import choose_device
from hermes.training import trainer


def test_choose_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device(None) == choose_device("auto") == torch.device("cpu")
    for request in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=r"--device cuda.*CUDA was requested but is not available.*--device cpu"):
            choose_device(request)
    for request in ("tpu", "gpu", "cpu:x"):
        with pytest.raises(ConfigError, match="not a device this project runs on"):
            choose_device(request)


def test_choose_device_with_two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device("cpu") == torch.device("cpu")  # the override beats the automatic CUDA
    assert choose_device("auto") == torch.device("cuda", 0)
    assert choose_device("cuda", local_rank=3, world_size=4) == torch.device("cuda", 1)
    assert choose_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        choose_device("cuda:2")
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        choose_device("cuda:1", local_rank=0, world_size=2)


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"catalog": str(tmp_path / "catalog.yaml"), "cache": str(tmp_path / "cache"),
                                    "output": str(tmp_path / "run")}))
    return path


def test_cli_passes_the_device_to_the_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []

    def fake_init(timeout_minutes: float = 30.0, device: str | None = None) -> None:
        seen.append(device)
        raise ConfigError("stop here")

    monkeypatch.setattr(trainer, "init_distributed", fake_init)
    assert main(["train", str(_config(tmp_path)), "--device", "cuda:1"]) != 0
    assert main(["train", str(_config(tmp_path))]) != 0
    assert seen == ["cuda:1", "auto"]


def test_cli_cuda_without_gpu_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", str(_config(tmp_path)), "--device", "cuda"]) != 0
    err = capsys.readouterr().err
    assert "CUDA was requested but is not available" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()

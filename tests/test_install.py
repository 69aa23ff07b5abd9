"""The Makefile's torch install and post-install check (issue 20: a correct install on a laptop
without a GPU must not be refused; CI keeps its CPU wheel).

The Makefile's own recipe lines are taken from ``make -n`` and run with a fake ``pip`` (it
only records its arguments) and with a simulated CUDA build of torch on a machine without a GPU.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def recipe(venv: Path, **variables: str) -> list[str]:
    """The set-up recipe as ``make`` would run it (dry run, variables expanded)."""
    args = ["make", "-n", "-B", "-C", str(ROOT), f"VENV={venv}", *(f"{k}={v}" for k, v in variables.items())]
    out = subprocess.run([*args, f"{venv}/.installed"], capture_output=True, text=True, check=True).stdout
    joined = out.replace("\\\n", " ")  # continuation lines are printed as written
    return [line.strip() for line in joined.splitlines() if "hermes.install_check" in line]


def run_line(line: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    """bin/python = this interpreter; bin/pip appends its arguments to pip.log and fails when
    given an --index-url (an index that answered the probe but cannot serve torch)."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    pip = bin_dir / "pip"
    pip.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {tmp_path}/pip.log\n'
        'case "$*" in *--index-url*) exit "${FAKE_PIP_INDEX_RC:-0}";; esac\n'
    )
    pip.chmod(0o755)
    return tmp_path / "venv"


@pytest.fixture
def local_index() -> Iterator[str]:
    """An HTTP server on localhost that answers every request (a reachable CPU index)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    finally:
        server.shutdown()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _install_line(lines: list[str]) -> str:
    return next(line for line in lines if " install " in line)


def test_ci_path_is_plain_pip_install_of_the_pin(fake_venv: Path) -> None:
    """An unreachable CPU index (this machine) -> exactly `pip install torch==2.13.0`, which
    pip's configuration here resolves to the local CPU wheel."""
    line = _install_line(recipe(fake_venv, TORCH_CPU_INDEX="http://127.0.0.1:1/whl/cpu"))
    result = run_line(line, _env())
    assert result.returncode == 0, result.stderr
    assert (fake_venv.parent / "pip.log").read_text().splitlines() == ["install -q torch==2.13.0"]


def test_reachable_cpu_index_is_used_and_failure_falls_back(fake_venv: Path, local_index: str) -> None:
    line = _install_line(recipe(fake_venv, TORCH_CPU_INDEX=local_index))
    assert run_line(line, _env()).returncode == 0
    log = fake_venv.parent / "pip.log"
    assert log.read_text().splitlines() == [f"install -q torch==2.13.0 --index-url {local_index}"]
    log.unlink()
    assert run_line(line, {**_env(), "FAKE_PIP_INDEX_RC": "1"}).returncode == 0
    assert log.read_text().splitlines() == [
        f"install -q torch==2.13.0 --index-url {local_index}",
        "install -q torch==2.13.0",
    ]


def test_explicit_pip_args_are_used_as_given(fake_venv: Path, local_index: str) -> None:
    line = _install_line(recipe(fake_venv, TORCH_CPU_INDEX=local_index, TORCH_PIP_ARGS="--index-url https://x.example/cu126"))
    assert run_line(line, _env()).returncode == 0
    assert (fake_venv.parent / "pip.log").read_text().splitlines() == [
        "install -q torch==2.13.0 --index-url https://x.example/cu126"
    ]


def _simulated_torch(tmp_path: Path, version: str) -> dict[str, str]:
    """PYTHONPATH with a sitecustomize that turns the real torch into a build whose version has
    no ``+cpu`` and whose CUDA is unavailable (PyPI's CUDA build on a laptop)."""
    folder = tmp_path / f"sim_{version}"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        f"import torch\ntorch.__version__ = {version!r}\ntorch.cuda.is_available = lambda: False\n"
    )
    return {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}


def test_check_accepts_a_cuda_build_without_gpu(tmp_path: Path) -> None:
    lines = recipe(Path(sys.executable).parents[1])
    check = next(line for line in lines if line.endswith("-m hermes.install_check"))
    env = _simulated_torch(tmp_path, "2.13.0")
    probe = "import torch; print('+cpu' in torch.__version__ or torch.cuda.is_available())"
    # the simulation is the case the old assertion refused
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "False"
    result = run_line(check, env)
    assert result.returncode == 0, result.stderr
    assert "torch 2.13.0 works on the CPU; CUDA not available" in result.stdout


def test_check_refuses_torch_below_the_minimum(tmp_path: Path) -> None:
    from hermes.install_check import minimum_torch

    assert minimum_torch() == (2, 2)  # pyproject.toml: torch>=2.2
    result = run_line(f"{sys.executable} -m hermes.install_check", _simulated_torch(tmp_path, "2.1.2+cu121"))
    assert result.returncode != 0
    assert "older than the minimum 2.2" in result.stderr

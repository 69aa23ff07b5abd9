"""Torch install and post-install check for the Makefile (stdlib only: it runs before the
package is installed, from the repository root).

``python -m hermes.install_check install --pip PIP --pin torch==X [--cpu-index URL] [--pip-args ARGS]``
installs torch: explicit ``--pip-args`` are used as given; otherwise the PyTorch CPU index is
used when it answers (the pinned CPU build, no multi-GB CUDA download), else plain
``pip install PIN`` (whatever the machine's pip configuration finds: here the local CPU wheel;
elsewhere PyPI's build, CUDA on Linux, which runs on the CPU as well).

``python -m hermes.install_check`` (the check) asks only what the project needs: torch imports, is at least the minimum version that
``pyproject.toml`` declares, and runs a small 3D convolution on the CPU. Which *build* of torch
is installed does not matter: a CUDA build runs on a machine without a GPU (it falls back to
the CPU), so an earlier check that demanded ``+cpu`` in the version or a visible GPU refused a
correct install on an ordinary laptop.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.request
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "hermes-seg"


def _torch_requirement() -> str | None:
    """The ``torch...`` requirement string of this project (pyproject.toml, else the installed
    distribution's metadata)."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    requirements: list[str] = []
    if pyproject.is_file():
        with open(pyproject, "rb") as handle:
            requirements = list(tomllib.load(handle).get("project", {}).get("dependencies", []))
    else:
        try:
            requirements = list(metadata.requires(DISTRIBUTION) or [])
        except metadata.PackageNotFoundError:
            return None
    return next((r for r in requirements if re.match(r"^torch\b(?![-_.\w])", r.strip())), None)


def minimum_torch() -> tuple[int, ...] | None:
    """``(2, 2)`` for ``torch>=2.2``; None when the requirement has no lower bound."""
    requirement = _torch_requirement()
    match = re.search(r">=\s*([0-9][0-9.]*)", requirement or "")
    return _numbers(match.group(1)) if match else None


def _numbers(version: str) -> tuple[int, ...]:
    """``2.13.0+cu126`` -> ``(2, 13, 0)`` (local build tags and pre-release suffixes ignored)."""
    head = version.split("+", 1)[0]
    parts = []
    for piece in head.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group(0)))
    return tuple(parts)


def check() -> str:
    """Return a one-line description of the working torch, or raise SystemExit with the reason."""
    try:
        import torch
    except Exception as error:  # any import failure is the message the user needs
        raise SystemExit(f"install check: `import torch` failed: {error!r}") from None
    version = str(torch.__version__)
    needed = minimum_torch()
    if needed is not None and _numbers(version)[: len(needed)] < needed:
        wanted = ".".join(map(str, needed))
        raise SystemExit(f"install check: torch {version} is older than the minimum {wanted} (pyproject.toml)")
    try:
        weight = torch.ones(2, 1, 3, 3, 3)
        out = torch.nn.functional.conv3d(torch.ones(1, 1, 4, 4, 4), weight, padding=1)
    except Exception as error:
        raise SystemExit(f"install check: torch {version} cannot run a 3D convolution on the CPU: {error!r}") from None
    if tuple(out.shape) != (1, 2, 4, 4, 4) or float(out[0, 0, 1, 1, 1]) != 27.0:
        raise SystemExit(f"install check: torch {version} computed a wrong 3D convolution on the CPU")
    cuda = "available" if torch.cuda.is_available() else "not available (CPU is used)"
    return f"torch {version} works on the CPU; CUDA {cuda}"


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether ``url`` answers an HTTP request within ``timeout`` seconds (proxies from the
    environment apply, as for pip)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            return int(response.status) < 400
    except Exception:  # unreachable, refused, TLS or HTTP error: not usable
        return False


def install_commands(pip: str, pin: str, pip_args: str, cpu_index: str, index_reachable: bool) -> list[list[str]]:
    """The pip commands to try in order (the first that succeeds wins)."""
    plain = [pip, "install", "-q", pin]
    if pip_args.strip():
        return [[*plain, *shlex.split(pip_args)]]
    if cpu_index and index_reachable:
        return [[*plain, "--index-url", cpu_index], plain]
    return [plain]


def install(pip: str, pin: str, pip_args: str = "", cpu_index: str = "") -> list[str]:
    """Run :func:`install_commands`; returns the command that succeeded."""
    probe = bool(cpu_index) and not pip_args.strip() and reachable(cpu_index.rstrip("/") + "/torch/")
    commands = install_commands(pip, pin, pip_args, cpu_index, probe)
    for number, command in enumerate(commands, start=1):
        print("install:", shlex.join(command), flush=True)
        if subprocess.call(command) == 0:
            return command
        if number < len(commands):
            print("install: that failed; trying the next way", flush=True)
    raise SystemExit(f"install: could not install {pin} (tried: {'; '.join(shlex.join(c) for c in commands)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hermes.install_check")
    sub = parser.add_subparsers(dest="command")
    inst = sub.add_parser("install", help="install torch (see the module docstring)")
    inst.add_argument("--pip", required=True)
    inst.add_argument("--pin", required=True)
    inst.add_argument("--pip-args", default="")
    inst.add_argument("--cpu-index", default="")
    args = parser.parse_args(argv)
    if args.command == "install":
        install(args.pip, args.pin, args.pip_args, args.cpu_index)
        return 0
    print(check())
    return 0


if __name__ == "__main__":
    sys.exit(main())

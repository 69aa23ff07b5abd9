"""Training checkpoints: atomic, tensor-only, loadable with ``weights_only=True``.

A checkpoint is a nested dict of tensors and primitive containers (no pickled objects), so it
loads with ``torch.load(weights_only=True)`` and cannot execute code. It is serialised to
memory first and written with :func:`hermes.fileio.atomic_write_bytes` (temp file, fsync,
rename): the previous checkpoint stays in place until the new one is complete, so killing
training at any moment leaves a loadable checkpoint.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hermes.errors import HermesError
from hermes.fileio import atomic_write_bytes

CHECKPOINT_NAME = "last.pt"
FORMAT_VERSION = 1


def checkpoint_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints" / CHECKPOINT_NAME


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Serialise ``state`` to memory, then write it atomically to ``path``."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise HermesError(f"no checkpoint to resume from: {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupt or foreign file: a user-facing problem, not a bug
        raise HermesError(f"checkpoint {path} cannot be loaded: {error}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise HermesError(f"checkpoint {path} is not a Hermes training checkpoint (format {FORMAT_VERSION})")
    return state


# ----------------------------------------------------------------------------------------------
# Random number generators as tensors / primitives (weights_only-compatible)
# ----------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """State of Python's, NumPy's and torch's global generators (CPU and, if present, CUDA)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(
        (nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def generator_state(generator: torch.Generator) -> torch.Tensor:
    return generator.get_state()


def restore_generator(generator: torch.Generator, state: torch.Tensor) -> None:
    generator.set_state(state.cpu())

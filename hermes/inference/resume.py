"""``hermes predict --continue``: which outputs of an earlier (perhaps killed) run are complete.

Every output is written atomically (temporary file or folder, then a rename), so a file or
folder under its final name is never half-written; a run killed mid-write leaves only a hidden
``.NAME.*.tmp`` that is never mistaken for an output. What can be incomplete is a *case*:

* multi-label: the image is written first, then its JSON sidecar (label names). The sidecar is
  therefore the completion marker: the case is done only when both exist and the sidecar
  parses. An image without its sidecar (killed between the two renames) is redone.
* binary: the case folder (masks + ``labels.json``) appears by one rename, so it is done when it
  exists with its ``labels.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hermes.inference.predictor import sidecar_path


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def completed_metadata(target: Path, mode: str) -> dict[str, Any] | None:
    """The metadata of a finished case's output at ``target`` (``mode``: multilabel or binary),
    or None when the case still has to be predicted."""
    if mode == "binary":
        marker = target / "labels.json"
        return _read_json(marker) if target.is_dir() and marker.is_file() else None
    marker = sidecar_path(target)
    if not target.is_file() or not marker.is_file():
        return None
    return _read_json(marker)


def completed_label_map(target: Path, mode: str) -> dict[str, int] | None:
    """The label map recorded with a finished case (multi-label outputs), else None."""
    meta = completed_metadata(target, mode)
    labels = meta.get("labels") if meta else None
    if not isinstance(labels, dict):
        return None
    try:
        return {str(k): int(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        return None


__all__ = ["completed_label_map", "completed_metadata"]

"""Task chunks: prediction memory bounded by a budget, not by the number of tasks.

A sliding-window pass keeps, per requested task, a float16 running sum over the model's voxel
grid (``2 x V_cache`` bytes, sliding_window.py) and the window batch's logits (float32 plus the
autocast copy); a 128-task prompt on a CT would need gigabytes for these alone. The predictor
therefore splits each prompt group's tasks into chunks of ``K`` tasks and runs one pass per
chunk. Every chunk is prompted with the group's *full* prompt and computes only its own
channels (HermesModel's ``output_tasks``), so each task's logits equal the unchunked pass's bit
for bit; a per-dataset (traditional) model computes all its channels in any case and is
prompted with the chunk itself. Restoring to the original grid and thresholding already run
one task at a time, folded into a running (best probability, best task) pair per voxel in the
same task order as without chunks, so the masks and the multi-label map (ties: the earlier
task keeps the voxel) are identical for every ``K``.

The price is time: the backbone runs once per chunk (docs/bench/inference.md, section 4). So
``K`` is the largest chunk that fits the budget; a model with a few tasks runs in one chunk,
which is exactly the unchunked path.

The budget is for the whole process (``InferenceConfig.max_memory_gb``, ``--max-memory``):
what it holds before the prediction (Python, torch, the model, the input), the parts that do
not grow with the tasks (the input as float32 and its preprocessed copy, the blending weight,
one restored task, the label map: the byte counts below, measured in
docs/bench/inference.md), then ``K`` tasks' buffers. When the fixed part alone exceeds the
budget, ``K`` is 1: the smallest memory this pipeline can run in.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Bytes that do not grow with the tasks, per voxel of the original image (the input as float32,
# its reoriented/cropped copies, one restored float32 probability, the float16 best-probability
# and uint8 label maps, boolean temporaries) and per voxel of the model's grid (the
# preprocessed float32 array and its tensor, the float32 blending weight, one task's float32
# probability before restoring). Measured: 1.16 GB added for 78.6 M original voxels at a 3 mm
# model, 0.16 GB more for 9.4 M more model voxels at 1.5 mm (docs/bench/inference.md, section 3).
FIXED_BYTES_PER_ORIGINAL_VOXEL = 16
FIXED_BYTES_PER_CACHE_VOXEL = 16
# Per task: the float16 stitched sum over the model's grid ...
STITCH_BYTES_PER_TASK_VOXEL = 2
# ... and, per voxel of the window batch, the logits as the network returns them (bf16 under
# autocast, then float32), the calibrated copy and the float16 contribution being added.
WINDOW_BYTES_PER_TASK_VOXEL = 16


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes of one prompt group's prediction: fixed + per_task x tasks in a chunk."""

    baseline: int  # the process before the pass (resident set)
    fixed: int
    per_task: int

    def chunk_size(self, budget_bytes: float | None, num_tasks: int) -> int:
        """Largest ``K`` (1..num_tasks) whose estimate fits ``budget_bytes``; all tasks when
        there is no budget."""
        if num_tasks < 1:
            raise ValueError("a prompt group has at least one task")
        if budget_bytes is None:
            return num_tasks
        room = budget_bytes - self.baseline - self.fixed
        return max(1, min(num_tasks, math.floor(room / self.per_task) if room > 0 else 1))

    def peak(self, tasks_per_chunk: int) -> int:
        return self.baseline + self.fixed + self.per_task * tasks_per_chunk


def memory_plan(
    original_shape: Sequence[int],
    cache_shape: Sequence[int],
    window_size: Sequence[int],
    window_batch_size: int,
    mirror_passes: int = 1,
    baseline: int | None = None,
) -> MemoryPlan:
    """The estimate for one image: ``original_shape``/``cache_shape`` the image's grid and the
    model's grid after preprocessing; ``mirror_passes`` > 1 with mirroring TTA (the mirrored
    outputs are summed in one more float32 buffer)."""
    original, cache = math.prod(original_shape), math.prod(cache_shape)
    window = window_batch_size * math.prod(window_size)
    per_window = WINDOW_BYTES_PER_TASK_VOXEL + (4 if mirror_passes > 1 else 0)
    return MemoryPlan(
        baseline=current_rss_bytes() if baseline is None else baseline,
        fixed=FIXED_BYTES_PER_ORIGINAL_VOXEL * original + FIXED_BYTES_PER_CACHE_VOXEL * cache,
        per_task=STITCH_BYTES_PER_TASK_VOXEL * cache + per_window * window,
    )


def current_rss_bytes() -> int:
    """Resident set of this process now (Linux /proc); elsewhere its peak so far, which can
    only overestimate it (so the chunks only get smaller)."""
    statm = Path("/proc/self/statm")
    if statm.is_file():
        try:
            return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
    try:
        import resource  # not on Windows
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def split(tasks: Sequence[int], size: int) -> list[tuple[int, ...]]:
    """``tasks`` in consecutive chunks of ``size`` (order kept: it decides ties)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [tuple(tasks[start : start + size]) for start in range(0, len(tasks), size)]


__all__ = ["MemoryPlan", "current_rss_bytes", "memory_plan", "split"]

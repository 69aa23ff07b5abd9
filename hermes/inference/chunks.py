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

The budget is for the whole process (``InferenceConfig.max_memory_gb``, ``--max-memory``, in
GiB): what it holds when the pass starts (Python, torch, the model, the input, its
preprocessed copy: measured, the resident set), plus the larger of the two
phases of a pass, each a part that does not grow with the tasks and ``K`` tasks' buffers:

* the sliding window: the label map of the previous chunks, the float32 image tensor and
  blending weight over the model's grid, the network's activations on a window batch; per task the float16 sum and the window logits;
* restoring: the label map, one task's probability on the original grid with its
  temporaries (resampled crop, the full-size array, the threshold and "wins" masks); per task the float16 sum, which
  lives until the chunk's last task is restored.

The byte counts are upper bounds of what docs/bench/inference.md (section 4) measured on a
512x512x300 CT. When the fixed part alone exceeds the budget, ``K`` is 1: the smallest memory
this pipeline can run in (preprocessing, which does not depend on the tasks, is not chunked).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
# Sliding-window phase, per voxel of the model's grid: the float32 image tensor, the float32
# blending weight, the importance share of a window and slack.
WINDOW_FIXED_BYTES_PER_CACHE_VOXEL = 12
# ... and per voxel of the original image: the float16 best probability and uint8 label map
# that the previous chunks have filled.
WINDOW_FIXED_BYTES_PER_ORIGINAL_VOXEL = 3
# The network's activations per voxel of the window batch (measured ~400 for the `tiny`
# preset at 64^3 in bf16; wider presets use more, but their windows are rarely larger).
NETWORK_BYTES_PER_WINDOW_VOXEL = 512
# Per task: the float16 stitched sum over the model's grid ...
STITCH_BYTES_PER_TASK_VOXEL = 2
# ... and, per voxel of the window batch, the logits as the network returns them (bf16 under
# autocast, then float32), the calibrated copy and the float16 contribution being added.
WINDOW_BYTES_PER_TASK_VOXEL = 16
# Restoring phase, per voxel of the original image: the float32 probability, the full-size
# array it is pasted into, the resampled crop, three boolean masks, and the float16 best
# probability + uint8 label map, whose pages are first touched here (measured 15.7 in total).
RESTORE_BYTES_PER_ORIGINAL_VOXEL = 17
# ... and per voxel of the model's grid: the float32 probability before restoring, its copy.
RESTORE_BYTES_PER_CACHE_VOXEL = 8


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes of one prompt group's pass: the process before it, then per phase a fixed
    part plus a part per task of the chunk; the peak is the larger phase."""

    baseline: int  # the process when the pass starts (resident set)
    window_fixed: int
    window_per_task: int
    restore_fixed: int
    restore_per_task: int

    def chunk_size(self, budget_bytes: float | None, num_tasks: int) -> int:
        """Largest ``K`` (1..num_tasks) whose estimate fits ``budget_bytes``; all tasks when
        there is no budget."""
        if num_tasks < 1:
            raise ValueError("a prompt group has at least one task")
        if budget_bytes is None:
            return num_tasks
        room = budget_bytes - self.baseline
        fits = min(
            math.floor((room - fixed) / per_task)
            for fixed, per_task in ((self.window_fixed, self.window_per_task), (self.restore_fixed, self.restore_per_task))
        )
        return max(1, min(num_tasks, fits))

    def peak(self, tasks_per_chunk: int) -> int:
        return self.baseline + max(
            self.window_fixed + self.window_per_task * tasks_per_chunk,
            self.restore_fixed + self.restore_per_task * tasks_per_chunk,
        )


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
        window_fixed=(
            WINDOW_FIXED_BYTES_PER_ORIGINAL_VOXEL * original
            + WINDOW_FIXED_BYTES_PER_CACHE_VOXEL * cache
            + NETWORK_BYTES_PER_WINDOW_VOXEL * window
        ),
        window_per_task=STITCH_BYTES_PER_TASK_VOXEL * cache + per_window * window,
        restore_fixed=RESTORE_BYTES_PER_ORIGINAL_VOXEL * original + RESTORE_BYTES_PER_CACHE_VOXEL * cache,
        restore_per_task=STITCH_BYTES_PER_TASK_VOXEL * cache,
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


__all__ = ["GIB", "MemoryPlan", "current_rss_bytes", "memory_plan", "split"]

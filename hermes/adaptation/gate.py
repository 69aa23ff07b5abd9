"""The forgetting gate of `hermes extend`: old-task Dice before vs after, and the verdict.

Incremental learning is only useful if the old tasks survive. The gate compares each old
task's mean Dice on its test cases before and after the extension; a drop larger than the
tolerance (Dice points, 0-100) for ANY task rejects the new model: it is written next to the
old one instead of replacing it, so a bad extension can never silently degrade a deployed
model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskComparison:
    task: str
    before: float | None  # mean Dice, 0-100; None if the task could not be scored
    after: float | None
    cases: int

    @property
    def delta(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before


@dataclass
class GateResult:
    tolerance: float
    comparisons: list[TaskComparison] = field(default_factory=list)
    new_tasks: dict[str, float | None] = field(default_factory=dict)  # new task -> Dice after

    @property
    def violations(self) -> list[TaskComparison]:
        return [c for c in self.comparisons if c.delta is not None and c.delta < -self.tolerance]

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        def r(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else round(value, 3)

        return {
            "tolerance_dice_points": self.tolerance,
            "passed": self.passed,
            "old_tasks": [
                {"task": c.task, "before": r(c.before), "after": r(c.after), "delta": r(c.delta), "cases": c.cases}
                for c in self.comparisons
            ],
            "violations": [c.task for c in self.violations],
            "new_tasks": {name: r(value) for name, value in self.new_tasks.items()},
        }


def compare(
    before: dict[str, tuple[float | None, int]],
    after: dict[str, tuple[float | None, int]],
    tolerance: float,
    new_tasks: dict[str, float | None] | None = None,
) -> GateResult:
    """Per old task: (mean Dice 0-100 or None, cases) before and after -> the gate result."""
    comparisons = [
        TaskComparison(task, before[task][0], after.get(task, (None, 0))[0], before[task][1]) for task in before
    ]
    return GateResult(tolerance=tolerance, comparisons=comparisons, new_tasks=dict(new_tasks or {}))


def format_table(result: GateResult) -> str:
    """The before/after table printed by `hermes extend`."""

    def f(value: float | None) -> str:
        return "    -" if value is None or not math.isfinite(value) else f"{value:6.2f}"

    width = max([len(c.task) for c in result.comparisons] + [len(t) for t in result.new_tasks] + [10])
    lines = [f"{'old task':<{width}}  before   after   delta  cases", "-" * (width + 32)]
    for c in result.comparisons:
        flag = "  <-- dropped more than the tolerance" if c in result.violations else ""
        delta = "     -" if c.delta is None else f"{c.delta:+6.2f}"
        lines.append(f"{c.task:<{width}}  {f(c.before)}  {f(c.after)}  {delta}  {c.cases:5d}{flag}")
    if result.new_tasks:
        lines.append("")
        lines.append(f"{'new task':<{width}}           after")
        lines.append("-" * (width + 32))
        for name, value in result.new_tasks.items():
            lines.append(f"{name:<{width}}          {f(value)}")
    verdict = "PASSED" if result.passed else f"FAILED ({len(result.violations)} task(s))"
    lines.append("")
    lines.append(f"forgetting gate (tolerance {result.tolerance:g} Dice points): {verdict}")
    return "\n".join(lines)

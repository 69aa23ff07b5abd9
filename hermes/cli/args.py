"""Range-checked number types for argparse: bad numbers stop at parse time, not mid-run.

``--threshold 1.5`` used to give an all-background mask with exit 0 and ``--overlap 1.0``
crashed after the model had loaded. Every numeric option of every ``hermes`` subcommand uses
one of these types, so argparse rejects an out-of-range value at once (exit 2, naming the
option) and the help text shows the range (``str(UNIT_OPEN)`` is ``"in (0, 1)"``):

    parser.add_argument("--threshold", type=UNIT_OPEN, help=f"sigmoid threshold, {UNIT_OPEN}")
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class NumberRange:
    """An argparse ``type``: parses ``kind`` and checks ``low``/``high`` (open or closed)."""

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self._noun()}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {self}")
        return value

    def _noun(self) -> str:
        return "an integer" if self.kind is int else "a number"

    def __str__(self) -> str:
        def fmt(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else str(v)

        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{fmt(self.low)}, {fmt(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {fmt(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {fmt(self.high)}"
        return "any number"

    @property
    def __name__(self) -> str:  # argparse names the type in "invalid <name> value" messages
        return self._noun()


FINITE_FLOAT = NumberRange(float)  # any number but NaN/inf
POSITIVE_INT = NumberRange(int, low=1)
NON_NEGATIVE_INT = NumberRange(int, low=0)
POSITIVE_FLOAT = NumberRange(float, low=0, low_open=True)
NON_NEGATIVE_FLOAT = NumberRange(float, low=0)
# A probability threshold: 0 would mark everything, 1 nothing.
UNIT_OPEN = NumberRange(float, low=0, high=1, low_open=True, high_open=True)
# An overlap fraction: 1 would never advance the window.
FRACTION = NumberRange(float, low=0, high=1, high_open=True)


"""Moved to the ``hermes benchmark`` subcommand (hermes/evaluation/benchmark.py).

This file forwards its arguments, so the commands recorded in docs/benchmarks.md still start.
The defaults changed with the move: the budget rule is now equal total compute (universal
models train N x --steps) and runs hold out validation cases (the config's
``data.val_fraction``); ``--budget-rule equal_steps --val-fraction 0`` is the protocol of the
tables this script produced.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hermes.cli import main

    sys.exit(main(["benchmark", *sys.argv[1:]]))

"""Training logs: CSV files, TensorBoard scalars and a ``progress.png`` (loss and validation Dice).

The CSVs are rewritten atomically from an in-memory history at every log call (a crash never
leaves a half-written row) and, on resume, rows after the checkpoint's step are dropped (they
belong to steps that are about to be re-run); TensorBoard gets ``purge_step`` for the same
reason. Only rank 0 creates a logger that writes (``enabled=False`` elsewhere).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from hermes.fileio import atomic_write_bytes, atomic_write_text

TRAIN_CSV = "train_log.csv"
VAL_CSV = "val_log.csv"
PROGRESS_PNG = "progress.png"


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _to_csv(rows: list[dict[str, float | str]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    return buffer.getvalue()


def _as_float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


class TrainLogger:
    """``train_log.csv`` (one row per ``log_every`` steps: loss terms, lr, grad norm, speed) and
    ``val_log.csv`` (one row per validation and dataset: Dice), plus TensorBoard and a plot."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.train_rows: list[dict[str, float | str]] = []
        self.val_rows: list[dict[str, float | str]] = []
        self.writer = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for row in _read_csv(self.dir / TRAIN_CSV):
                if _as_float(row["step"]) <= resume_step:
                    self.train_rows.append({k: _as_float(v) for k, v in row.items()})
            for row in _read_csv(self.dir / VAL_CSV):
                if _as_float(row["step"]) <= resume_step:
                    self.val_rows.append(
                        {"step": _as_float(row["step"]), "dataset": row["dataset"], "dice": _as_float(row["dice"])}
                    )
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is a dependency, but logs must never stop training
            self.writer = None

    # ------------------------------------------------------------------------------------------
    def log_train(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.train_rows.append({"step": float(step), **values})
        columns = ["step"]
        for row in self.train_rows:
            columns.extend(k for k in row if k not in columns)
        atomic_write_text(self.dir / TRAIN_CSV, _to_csv(self.train_rows, columns))
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def log_validation(self, step: int, dice_by_dataset: dict[str, float]) -> None:
        if not self.enabled:
            return
        finite = [v for v in dice_by_dataset.values() if not math.isnan(v)]
        mean = sum(finite) / len(finite) if finite else math.nan
        for name, value in [*dice_by_dataset.items(), ("mean", mean)]:
            self.val_rows.append({"step": float(step), "dataset": name, "dice": value})
            if self.writer is not None:
                self.writer.add_scalar(f"val_dice/{name}", value, step)
        atomic_write_text(self.dir / VAL_CSV, _to_csv(self.val_rows, ["step", "dataset", "dice"]))
        self.plot()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.plot()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # ------------------------------------------------------------------------------------------
    def plot(self) -> None:
        """Draw progress.png: training loss (raw and smoothed) and validation Dice per dataset."""
        if not self.enabled or not self.train_rows:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4.2), dpi=100)
        FigureCanvasAgg(fig)
        ax_loss, ax_dice = fig.subplots(1, 2)
        steps = [float(r["step"]) for r in self.train_rows]
        loss = [float(r.get("loss", math.nan)) for r in self.train_rows]
        ax_loss.plot(steps, loss, color="0.75", lw=1, label="loss")
        window = max(1, len(loss) // 20)
        if window > 1:
            smooth = [sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1])
                      for i in range(len(loss))]
            ax_loss.plot(steps, smooth, color="C0", lw=2, label=f"mean of {window} logs")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("training loss")
        ax_loss.grid(alpha=0.3)
        ax_loss.legend(loc="upper right")
        names = list(dict.fromkeys(str(r["dataset"]) for r in self.val_rows))
        for i, name in enumerate(names):
            pts = [(float(r["step"]), float(r["dice"])) for r in self.val_rows if r["dataset"] == name]
            style = {"color": "k", "lw": 2.5} if name == "mean" else {"color": f"C{i % 10}", "lw": 1}
            ax_dice.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name, **style)
        ax_dice.set_xlabel("step")
        ax_dice.set_ylabel("validation Dice (EMA model)")
        ax_dice.set_ylim(0, 1)
        ax_dice.grid(alpha=0.3)
        if names:
            ax_dice.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        atomic_write_bytes(self.dir / PROGRESS_PNG, buffer.getvalue())

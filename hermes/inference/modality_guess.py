"""What ``hermes predict`` says when it recognises the modality itself (no ``--modality``).

The modality head's softmax is not calibrated: nothing fits its temperature, and a model
trained without modality-prompt dropout (``data.modality_dropout``, before it existed) never
saw the unknown-modality prompt that recognition uses. Measured on realmini (issue 17: the
cpu-demo preset, 2,400 steps, no dropout), a hippocampus T1 scan was called "FLAIR (p=1.00)".
So the probability reported to the user is the head's softmax capped at
:data:`REPORTED_CONFIDENCE_CAP`, and the message says so, names the source ("from the image")
and how to override it; the raw per-modality scores stay in the prediction's metadata
(``modality_scores``) for whoever wants to calibrate them. How often the guess is right is
measured by ``hermes evaluate -m MODEL --detect-modality`` (docs/inference_evaluation.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hermes.bundle import TrainingRecord

# A softmax value above this is shown as this value, marked "capped": a guess can be wrong at
# any raw confidence (the realmini example above was wrong at 1.00), so no reported number
# claims near-certainty (>= 0.99) for an uncalibrated head.
REPORTED_CONFIDENCE_CAP = 0.95


def reported_probability(probability: float) -> float:
    """The probability the user is told: the head's softmax, at most the cap."""
    return min(float(probability), REPORTED_CONFIDENCE_CAP)


def trained_for_recognition(training: TrainingRecord | None) -> bool | None:
    """Whether the model's training used modality-prompt dropout (so its unknown-modality path,
    the one recognition uses, was trained). None when the bundle records no training config
    (e.g. an adapted model or a model not written by ``hermes train``)."""
    config = training.config if training is not None else None
    if not isinstance(config, Mapping):
        return None
    data = config.get("data")
    rate = data.get("modality_dropout", 0.0) if isinstance(data, Mapping) else 0.0
    return float(rate or 0.0) > 0.0


def guess_message(
    chosen: str,
    scores: Mapping[str, float],
    tasks: Sequence[str],
    datasets: Sequence[str],
    trained: bool | None,
) -> str:
    """One line: the modality chosen from the image, how sure (capped), the alternatives, the
    tasks it implies, and how to override either."""
    raw = float(scores[chosen])
    shown = reported_probability(raw)
    sure = f"p={shown:.2f}" + (", capped: the modality head is not calibrated" if raw > shown else "")
    others = sorted(((m, p) for m, p in scores.items() if m != chosen), key=lambda kv: -kv[1])[:3]
    alternatives = "; next: " + ", ".join(f"{m} {reported_probability(p):.2f}" for m, p in others) if others else ""
    where = f" of {', '.join(datasets)}" if datasets else ""
    line = (
        f"modality: {chosen} ({sure}, from the image{alternatives}; pass --modality to override); "
        f"tasks: {len(tasks)}{where} (pass --tasks to choose)"
    )
    if trained is False:
        line += "; warning: this model was trained without modality-prompt dropout, the guess is unreliable"
    return line


__all__ = ["REPORTED_CONFIDENCE_CAP", "guess_message", "reported_probability", "trained_for_recognition"]

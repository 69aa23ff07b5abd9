"""Which of a dataset's channels an input brings, and preprocessing with some of them missing.

A multi-channel dataset (BraTS: FLAIR, T1, T1c, T2) is given to ``hermes predict`` as one file
per channel in the dataset's channel order (nnU-Net naming ``CASE_0000``, ``CASE_0001``, ...), or
from Python as a list with ``None`` where a channel is missing. Channels are positional: a list
shorter than the dataset's channel count lacks its last channels, and a gap in the file numbers
(``CASE_0002`` absent) lacks that channel.

A model built with ``channel_fusion: mean`` averages its stem features over the channels present
(hermes/models/channel_stem.py), so it predicts from the others: the missing channels are left
out of preprocessing (the body crop and normalisation use the present ones), filled with zeros
that the model never reads (``channel_mask`` False), and a :class:`MissingChannelWarning` names
them. A model with a plain first convolution needs every channel: a missing one is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hermes.data.catalog import DatasetEntry
from hermes.data.imageio import Image
from hermes.data.preprocess import PreprocessPlan, preprocess_image
from hermes.errors import DataError


class MissingChannelWarning(UserWarning):
    """A dataset channel is absent from an input image; the prediction uses the other channels."""


@dataclass
class PartialImage(Image):
    """An image holding some of a dataset's channels: ``channels`` are their numbers in the
    dataset's channel order, one per entry of ``array``'s 4th axis (no 4th axis: one channel)."""

    channels: tuple[int, ...] = ()


def num_channels(image: Image) -> int:
    return 1 if image.array.ndim == 3 else int(image.array.shape[3])


def channel_numbers(image: Image) -> tuple[int, ...]:
    """The dataset channel number of each of ``image``'s channels (0..n-1 unless partial)."""
    if isinstance(image, PartialImage) and image.channels:
        return image.channels
    return tuple(range(num_channels(image)))


def stack_given(items: Sequence[Image | None]) -> Image:
    """One image from per-channel images, ``None`` marking a missing channel (all on one grid)."""
    given = [(number, item) for number, item in enumerate(items) if item is not None]
    if not given:
        raise DataError("every channel of the input is missing (None); give at least one image")
    first = given[0][1]
    for _, item in given[1:]:
        if item.array.shape[:3] != first.array.shape[:3] or not np.allclose(item.affine, first.affine, atol=1e-3):
            raise DataError(f"{item.path}: channel grid differs from {first.path}")
    arrays = [np.asarray(item.array, dtype=np.float32) for _, item in given]
    array = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
    numbers = tuple(number for number, _ in given)
    if numbers == tuple(range(len(items))):
        return Image(array, first.affine, first.path)
    return PartialImage(array, first.affine, first.path, channels=numbers)


def presence(image: Image, plan: PreprocessPlan) -> tuple[bool, ...]:
    """Per channel of ``plan``'s dataset: whether ``image`` brings it."""
    numbers = channel_numbers(image)
    expected = len(plan.channels)
    extra = [n for n in numbers if n >= expected]
    if extra:
        where = f"{image.path}: " if image.path else ""
        raise DataError(
            f"{where}the input has channel {extra[0]} (counting from 0), but dataset {plan.dataset!r} has "
            f"{expected} channel(s)"
        )
    return tuple(n in numbers for n in range(expected))


def describe_missing(present: Sequence[bool], entry: DatasetEntry | None) -> str:
    """``channel 2 (t1gd: T1c)`` for each missing channel, named from the dataset entry."""
    parts = []
    for number, here in enumerate(present):
        if here:
            continue
        if entry is not None and number < entry.num_channels:
            parts.append(f"channel {number} ({entry.channel_names[number]}: {entry.channel_modalities[number]})")
        else:
            parts.append(f"channel {number}")
    return ", ".join(parts)


def preprocess_present(
    image: Image, plan: PreprocessPlan, present: Sequence[bool]
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`preprocess_image` with the plan of the present channels only, then zero channels
    at the missing positions (never read: they are masked) so the array has the plan's channel
    count. The meta's ``pad_value`` gets 0 at those positions."""
    if all(present):
        return preprocess_image([image], plan)
    kept = tuple(norm for norm, here in zip(plan.channels, present) if here)
    array, meta = preprocess_image([Image(image.array, image.affine, image.path)], replace(plan, channels=kept))
    full = np.zeros((len(present), *array.shape[1:]), dtype=array.dtype)
    index = [number for number, here in enumerate(present) if here]
    full[index] = array
    pads = list(np.atleast_1d(meta.get("pad_value", 0.0)))
    padded = [0.0] * len(present)
    for number, value in zip(index, pads):
        padded[number] = float(value)
    return full, {**meta, "pad_value": padded, "present_channels": list(present)}


def image_source(paths: Sequence[Path | None]) -> Path:
    """The first given file of a case (its name and geometry stand for the case)."""
    return next(p for p in paths if p is not None)


def resolve_channel(entry: DatasetEntry, channel: str | int) -> int:
    """The number of ``entry``'s channel named ``channel``: its number (``2`` or ``"2"``), its
    dataset.json name (``t1gd``) or its modality (``T1c``), case-insensitive."""
    count = entry.num_channels
    if isinstance(channel, int) or str(channel).strip().isdigit():
        number = int(channel)
        if number >= count:
            raise DataError(
                f"channel {number} (counting from 0): dataset {entry.name!r} has {count} channel(s) "
                f"({', '.join(entry.channel_names)})"
            )
        return number
    key = str(channel).strip().lower()
    matches = [
        number
        for number, (name, modality) in enumerate(zip(entry.channel_names, entry.channel_modalities))
        if key in (name.lower(), modality.lower())
    ]
    if not matches:
        shown = ", ".join(f"{n} {name} ({mod})" for n, (name, mod) in
                          enumerate(zip(entry.channel_names, entry.channel_modalities)))
        raise DataError(f"dataset {entry.name!r} has no channel {channel!r}; its channels: {shown}")
    if len(matches) > 1:
        raise DataError(
            f"channel {channel!r} names channels {', '.join(map(str, matches))} of dataset {entry.name!r}; "
            "give the channel number"
        )
    return matches[0]


def without_channel(image: Image, number: int) -> PartialImage:
    """``image`` less its dataset channel ``number`` (a file per channel or one 4D file): a
    :class:`PartialImage` of the other channels, predicted as an input that lacks that channel."""
    numbers = channel_numbers(image)
    if number not in numbers:
        raise DataError(f"{image.path or 'the image'}: has no channel {number} (it has {', '.join(map(str, numbers))})")
    keep = [i for i, n in enumerate(numbers) if n != number]
    if not keep:
        raise DataError(f"{image.path or 'the image'}: channel {number} is its only channel; nothing would be left")
    array = image.array[..., keep] if len(keep) > 1 else image.array[..., keep[0]]
    return PartialImage(np.ascontiguousarray(array), image.affine, image.path, channels=tuple(numbers[i] for i in keep))

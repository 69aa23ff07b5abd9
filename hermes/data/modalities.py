"""The modality vocabulary and its normalisation families.

A model has one modality prior per known modality plus one for ``unknown``; the ids are
``0..M-1`` over the vocabulary and ``M`` is unknown (see docs/architecture.md). The name a
dataset.json gives its channel is mapped to the vocabulary here, case-insensitively. Names
that say only "it is MR" (``MRI``, ``MR``) or that are nnU-Net *normalisation* keywords
(``noNorm``, ``zscore``) do not identify a sequence, so they map to ``unknown`` rather than
to a guessed sequence: a wrong modality prior is worse than the neutral unknown one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from hermes.errors import ConfigError

Family = Literal["ct", "pet", "mr"]
FAMILIES: tuple[str, ...] = ("ct", "pet", "mr")
UNKNOWN = "unknown"

# The built-in vocabulary, in id order, with the intensity normalisation family of each.
BUILTIN_MODALITIES: dict[str, Family] = {
    "CT": "ct",
    "PET": "pet",
    "T1": "mr",
    "T2": "mr",
    "FLAIR": "mr",
    "LGE": "mr",
    "cine": "mr",
    # Added with multi-channel datasets (BraTS: FLAIR, T1, T1c, T2; prostate: T2 + ADC), after
    # the original seven so that their ids did not move. All MR: per-volume z-score (ADC is in
    # mm^2/s, but nnU-Net normalises it like any non-CT channel, and so do we).
    "T1c": "mr",  # contrast-enhanced T1 (gadolinium): lesions that enhance are bright
    "ADC": "mr",  # apparent diffusion coefficient map
    "DWI": "mr",  # diffusion-weighted image (a high b-value)
}

# Aliases (compared after lower-casing and dropping spaces, '-', '_' and '.').
_ALIASES: dict[str, str] = {
    "ct": "CT",
    "cect": "CT",
    "ncct": "CT",
    "ctac": "CT",
    "pet": "PET",
    "suv": "PET",
    "petsuv": "PET",
    "fdgpet": "PET",
    "t1": "T1",
    "t1w": "T1",
    "t1weighted": "T1",
    "mprage": "T1",
    "t2": "T2",
    "t2w": "T2",
    "t2weighted": "T2",
    "t2spir": "T2",
    "flair": "FLAIR",
    "t2flair": "FLAIR",
    "lge": "LGE",
    "cine": "cine",
    "cinemr": "cine",
    "cinemri": "cine",
    "bssfp": "cine",
    "ssfp": "cine",
    "t1c": "T1c",
    "t1ce": "T1c",
    "t1gd": "T1c",
    "t1wce": "T1c",
    "t1post": "T1c",
    "t1contrast": "T1c",
    "t1gad": "T1c",
    "cet1": "T1c",
    "adc": "ADC",
    "adcmap": "ADC",
    "dwi": "DWI",
    "diffusion": "DWI",
    "hbv": "DWI",  # PI-CAI's high-b-value image
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-.]+", "", str(name)).lower()


def family_of_builtin(name: str) -> str | None:
    """Normalisation family of a built-in modality name (None if not built in)."""
    return BUILTIN_MODALITIES.get(name)


def canonical_modality(name: str) -> str:
    """Map a channel name from dataset.json to the built-in vocabulary or ``unknown``.

    ``"CT"``, ``"ct"`` -> CT; ``"SUV"`` -> PET; ``"T1w"`` -> T1; ``"t1gd"`` -> T1c;
    ``"ADC"`` -> ADC; ``"MRI"``, ``"zscore"``, ``"noNorm"`` -> unknown.
    """
    key = _key(name)
    if key in _ALIASES:
        return _ALIASES[key]
    for builtin in BUILTIN_MODALITIES:
        if key == builtin.lower():
            return builtin
    return UNKNOWN


@dataclass
class ModalityVocabulary:
    """Ordered modality names with their families; ``unknown`` is always id ``len(self)``.

    A catalog extends the built-ins with ``add(name, family)``; ``lookup`` resolves a dataset's
    channel name first against the extra names (exact, case-insensitive), then the aliases.
    """

    names: list[str] = field(default_factory=lambda: list(BUILTIN_MODALITIES))
    families: dict[str, str] = field(default_factory=lambda: dict(BUILTIN_MODALITIES))

    @classmethod
    def builtin(cls) -> ModalityVocabulary:
        return cls()

    @classmethod
    def from_names(cls, names: Iterable[str], families: Mapping[str, str] | None = None) -> ModalityVocabulary:
        """A vocabulary of exactly ``names`` (e.g. restored from a saved model's spec)."""
        vocab = cls(names=[], families={})
        families = dict(families or {})
        for name in names:
            vocab.add(name, families.get(name) or BUILTIN_MODALITIES.get(name) or "mr")
        return vocab

    def add(self, name: str, family: str) -> int:
        """Add a modality (or return the id of an existing one with the same family)."""
        if not name or _key(name) == UNKNOWN:
            raise ConfigError(f"modality name {name!r} is reserved or empty")
        if family not in FAMILIES:
            raise ConfigError(f"modality {name!r}: unknown normalisation family {family!r} (use one of {FAMILIES})")
        existing = self._find(name)
        if existing is not None:
            if self.families[existing] != family:
                raise ConfigError(
                    f"modality {name!r} already has family {self.families[existing]!r}, not {family!r}"
                )
            return self.names.index(existing)
        self.names.append(name)
        self.families[name] = family
        return len(self.names) - 1

    def _find(self, name: str) -> str | None:
        key = _key(name)
        for known in self.names:
            if _key(known) == key:
                return known
        return None

    def lookup(self, name: str) -> str:
        """The vocabulary name of a dataset's channel name, or ``unknown``."""
        found = self._find(name)
        if found is not None:
            return found
        canonical = canonical_modality(name)
        return canonical if canonical in self.names else UNKNOWN

    def id(self, name: str) -> int:
        """Model id of a channel name: 0..M-1, or M (= ``unknown_id``) if not in the vocabulary."""
        resolved = self.lookup(name)
        return self.unknown_id if resolved == UNKNOWN else self.names.index(resolved)

    def family(self, name: str) -> str:
        """Normalisation family; unknown modalities are normalised like MR (per-volume z-score)."""
        resolved = self.lookup(name)
        return "mr" if resolved == UNKNOWN else self.families[resolved]

    @property
    def unknown_id(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, object]:
        return {"names": list(self.names), "families": {n: self.families[n] for n in self.names}}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ModalityVocabulary:
        names = data.get("names")
        families = data.get("families")
        if not isinstance(names, list) or not isinstance(families, dict):
            raise ConfigError("modality vocabulary needs 'names' (list) and 'families' (mapping)")
        return cls.from_names([str(n) for n in names], {str(k): str(v) for k, v in families.items()})

"""The synthetic datasets: which phantom, modality, label protocol, size, spacing, orientation.

They mimic the partially-labelled collection Hermes is trained on: every dataset annotates
only some structures, label values differ between datasets for the same organ, one organ is
annotated under different protocols (liver *including* its tumours in the BCV-like set,
*excluding* them in the LiTS-like set; both kidneys as one label in the KiTS-like set), and
datasets differ in size, spacing (incl. anisotropic), orientation and field of view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hermes.synthetic.phantoms import LesionPlan, Tissue

T = Tissue
_KIDNEY_R = (T.KIDNEY_R, T.PELVIS_R)
_KIDNEY_L = (T.KIDNEY_L, T.PELVIS_L)
_KIDNEY_LESIONS = (T.KIDNEY_LESION_R, T.KIDNEY_LESION_L)


@dataclass(frozen=True)
class SyntheticDataset:
    """One dataset of the cohort. Spacing and field of view are in RAS world order (mm)."""

    number: int
    short_name: str
    modality: str  # the (first) channel's modality
    phantom: str  # "abdomen", "head" or "head_tumour" (a head with a brain tumour)
    labels: tuple[tuple[str, tuple[Tissue, ...]], ...]  # label name -> tissues, value = position + 1
    n_train: int
    n_test: int
    spacing: tuple[float, float, float]
    orientation: str  # storage axis codes, e.g. "LPS"
    fov: tuple[float, float, float]
    fov_centre: tuple[float, float, float]
    lesions: LesionPlan
    mimics: str
    protocol: str
    # Multi-channel datasets: (dataset.json channel name, rendered sequence) per channel, all
    # rendered from the same phantom on one grid. Empty: one channel of `modality`.
    channels: tuple[tuple[str, str], ...] = ()
    # Part of the default cohort (`hermes cohort`, `hermes demo`)? Others are generated only
    # when named (`hermes cohort --datasets BrainTumourMR`).
    default: bool = True

    @property
    def name(self) -> str:
        return f"Dataset{self.number}_{self.short_name}"

    @property
    def channel_names(self) -> tuple[str, ...]:
        """dataset.json's ``channel_names``, in channel order."""
        return tuple(name for name, _ in self.channels) if self.channels else (self.modality,)

    @property
    def sequences(self) -> tuple[str, ...]:
        """The modality rendered for each channel (hermes/synthetic/render.py)."""
        return tuple(seq for _, seq in self.channels) if self.channels else (self.modality,)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.labels)

    def spacing_for(self, scale: float) -> tuple[float, float, float]:
        """File spacing (array-axis order of the stored files) at ``scale``."""
        world = np.asarray(self.spacing) / scale
        return tuple(float(world[_world_axis(code)]) for code in self.orientation)  # type: ignore[return-value]

    def shape_for(self, scale: float) -> tuple[int, int, int]:
        """Nominal file shape (array-axis order) at ``scale`` (slice counts vary per case)."""
        world = [max(2, round(f / (s / scale))) for f, s in zip(self.fov, self.spacing)]
        return tuple(world[_world_axis(code)] for code in self.orientation)  # type: ignore[return-value]

    def label_lut(self) -> np.ndarray:
        """Tissue code -> label value of this dataset's protocol (0 elsewhere)."""
        lut = np.zeros(len(Tissue), np.uint8)
        for value, (_, tissues) in enumerate(self.labels, start=1):
            for tissue in tissues:
                if lut[tissue]:
                    raise AssertionError(f"{self.name}: tissue {tissue.name} in two labels")
                lut[tissue] = value
        return lut


def _world_axis(code: str) -> int:
    return {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}[code]


ABDOMEN_CT_LESIONS = LesionPlan(liver=(0, 1), liver_prob=0.25, kidney=(0, 1), kidney_prob=0.15)

DATASETS: tuple[SyntheticDataset, ...] = (
    SyntheticDataset(
        101, "AbdomenCT", "CT", "abdomen",
        (
            ("liver", (T.LIVER, T.LIVER_LESION)),
            ("spleen", (T.SPLEEN,)),
            ("kidney_left", (*_KIDNEY_L, T.KIDNEY_LESION_L)),
            ("kidney_right", (*_KIDNEY_R, T.KIDNEY_LESION_R)),
            ("aorta", (T.AORTA,)),
        ),
        12, 4, (3.5, 3.5, 4.0), "LPS", (336.0, 252.0, 220.0), (0.0, -4.0, 10.0), ABDOMEN_CT_LESIONS,
        "BCV (multi-organ abdominal CT)",
        "organs include any lesion inside them; stored LPS as converted from DICOM",
    ),
    SyntheticDataset(
        102, "LiverCT", "CT", "abdomen",
        (("liver", (T.LIVER,)), ("liver_tumour", (T.LIVER_LESION,))),
        10, 4, (3.2, 3.2, 3.2), "RAS", (320.0, 240.0, 176.0), (0.0, -4.0, 25.0),
        LesionPlan(liver=(1, 3), liver_radius=(11.0, 22.0), kidney=(0, 1), kidney_prob=0.1),
        "LiTS (liver + liver tumour CT)",
        "liver EXCLUDES tumour voxels (tumour is its own label); upper-abdomen field of view",
    ),
    SyntheticDataset(
        103, "KidneyCT", "CT", "abdomen",
        (("kidney", (*_KIDNEY_R, *_KIDNEY_L)), ("kidney_tumour", _KIDNEY_LESIONS)),
        8, 3, (3.0, 3.0, 3.0), "LAS", (288.0, 216.0, 174.0), (0.0, -10.0, -20.0),
        LesionPlan(kidney=(1, 1), kidney_radius=(13.0, 22.0), liver=(0, 1), liver_prob=0.1),
        "KiTS (kidney + kidney tumour CT)",
        "both kidneys as ONE label excluding the tumour; a tumour in every case, may bulge out",
    ),
    SyntheticDataset(
        104, "AbdomenT2", "T2", "abdomen",
        (
            ("liver", (T.LIVER, T.LIVER_LESION)),
            ("kidney_right", (*_KIDNEY_R, T.KIDNEY_LESION_R)),
            ("kidney_left", (*_KIDNEY_L, T.KIDNEY_LESION_L)),
            ("spleen", (T.SPLEEN,)),
        ),
        6, 3, (3.6, 3.6, 7.2), "LPS", (346.0, 259.0, 216.0), (0.0, -4.0, 5.0), LesionPlan(),
        "CHAOS (abdominal T2 MR)",
        "healthy subjects; anisotropic 2:1 slices; label order differs from the CT set",
    ),
    SyntheticDataset(
        105, "BrainT1", "T1", "head",
        (("grey_matter", (T.GREY_MATTER, T.DEEP_GREY)), ("white_matter", (T.WHITE_MATTER,)), ("csf", (T.CSF,))),
        10, 3, (2.2, 2.2, 2.2), "RAS", (156.0, 192.0, 172.0), (0.0, 0.0, 0.0), LesionPlan(),
        "brain structure (T1 MR tissue classes)",
        "grey matter includes the deep grey nuclei; csf includes ventricles and sulci",
    ),
    SyntheticDataset(
        106, "LesionPET", "PET", "abdomen",
        (("lesion", (T.LIVER_LESION, T.NODE_LESION)),),
        4, 3, (4.0, 4.0, 4.0), "LPS", (344.0, 256.0, 240.0), (0.0, -4.0, -10.0),
        LesionPlan(liver=(0, 2), liver_prob=0.5, liver_radius=(13.0, 20.0), nodes=(1, 3), node_radius=(13.0, 19.0)),
        "AutoPET (FDG-PET lesions)",
        "only 4 training cases; every hot lesion (liver or lymph node) is one label",
    ),
    SyntheticDataset(
        107, "AbdomenT1", "T1", "abdomen",
        (
            ("liver", (T.LIVER, T.LIVER_LESION)),
            ("spleen", (T.SPLEEN,)),
            ("kidney_right", (*_KIDNEY_R, T.KIDNEY_LESION_R)),
            ("kidney_left", (*_KIDNEY_L, T.KIDNEY_LESION_L)),
            ("aorta", (T.AORTA,)),
        ),
        5, 3, (6.0, 3.2, 3.2), "ASL", (330.0, 250.0, 220.0), (0.0, -4.0, 0.0),
        LesionPlan(liver=(0, 1), liver_prob=0.2),
        "AMOS-MR (abdominal T1 MR)",
        "sagittal acquisition: stored with axes A, S, L and 6 mm left-right slices",
    ),
    SyntheticDataset(
        108, "BrainTumourMR", "FLAIR", "head_tumour",
        (("edema", (T.EDEMA,)), ("tumour", (T.BRAIN_TUMOUR,))),
        6, 2, (2.4, 2.4, 2.4), "RAS", (156.0, 192.0, 172.0), (0.0, 0.0, 0.0), LesionPlan(),
        "BraTS / MSD Task01 (multi-sequence brain tumour MR)",
        "four co-registered sequences of one head (FLAIR, T1, T1c, T2; dataset.json names as MSD's); "
        "oedema and the enhancing tumour as two labels; not in the default cohort",
        channels=(("FLAIR", "FLAIR"), ("T1w", "T1"), ("t1gd", "T1c"), ("T2w", "T2")),
        default=False,
    ),
)


def list_synthetic_datasets(include_optional: bool = False) -> list[SyntheticDataset]:
    """The datasets :func:`hermes.synthetic.generate_cohort` writes by default, in order
    (``include_optional``: also those generated only when named, e.g. the 4-channel brain MR)."""
    return [d for d in DATASETS if d.default or include_optional]


def select_datasets(names: list[str] | tuple[str, ...] | None) -> list[SyntheticDataset]:
    """Datasets by folder name, short name or number (case-insensitive); None = the default
    cohort. Optional datasets are selected by naming them."""
    if not names:
        return list_synthetic_datasets()
    chosen = []
    for name in names:
        key = str(name).lower()
        match = [d for d in DATASETS if key in (d.name.lower(), d.short_name.lower(), str(d.number))]
        if not match:
            from hermes.errors import ConfigError

            known = ", ".join(d.name for d in DATASETS)
            raise ConfigError(f"unknown synthetic dataset {name!r}; available: {known}")
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen

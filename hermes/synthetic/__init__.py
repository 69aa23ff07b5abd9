"""The built-in synthetic cohort: procedural abdomen and head phantoms rendered as CT, MR and
PET into partially-labelled nnU-Net v2 raw datasets (see docs/synthetic_cohort.md)."""

from __future__ import annotations

from hermes.synthetic.cohort import generate_cohort, make_case
from hermes.synthetic.datasets import SyntheticDataset, list_synthetic_datasets

__all__ = ["SyntheticDataset", "generate_cohort", "list_synthetic_datasets", "make_case"]

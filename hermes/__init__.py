"""Hermes: one segmentation model for many partially-labelled 3D datasets.

The package folders follow the pipeline in the order data flows:
``synthetic`` (built-in cohort) -> ``data`` (readers, catalog, preprocessing, sampling,
augmentation) -> ``models`` (context priors, fusion, prototypes, backbones) -> ``training``
-> ``inference`` -> ``evaluation``; ``adaptation`` holds finetune/extend/prior analysis and
``cli`` wires the stages to the ``hermes`` command.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "predict"]


def predict(*args: Any, **kwargs: Any) -> Any:
    """Segment one image with a saved model; see :func:`hermes.inference.api.predict`."""
    from hermes.inference.api import predict as _predict

    return _predict(*args, **kwargs)

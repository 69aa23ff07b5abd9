"""Hermes models: context priors, prior fusion, prototype heads, backbones, baselines, registry.

Entry points: :func:`hermes.models.registry.build_model`, ``save_model``, ``load_model``; every
model is called as ``model(image, task_ids, modality_id, task_mask)`` and returns a
:class:`hermes.models.hermes.SegmentationOutput`; a model built with ``channel_fusion: mean``
also reads ``channel_ids``/``channel_mask`` (``channel_stem.channel_inputs`` gives them from a batch).
"""

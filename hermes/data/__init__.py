"""Data stage: image IO, dataset readers, modalities, catalog, preprocessing, sampling.

Kept free of imports so that ``import hermes.data.imageio`` does not pull torch or MONAI.
"""

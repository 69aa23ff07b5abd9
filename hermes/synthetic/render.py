"""Modalities: the same tissue codes rendered as CT, T1 / T2 MR or PET.

Each modality maps tissues to intensities (with per-case jitter), then adds what makes real
images of that modality hard:

* CT: Hounsfield units, partial volume (Gaussian point-spread of ~0.6 voxel), correlated
  noise of 10-18 HU. Liver and spleen differ by only 8-22 HU, so an organ can't be found by
  thresholding; lesions are 30-55 HU darker than their organ.
* T1 / T2 MR: different contrast orderings (fat bright in both; fluid dark in T1, bright in T2;
  liver brighter than spleen in T1, darker in T2; white matter brighter than grey in T1), a
  smooth multiplicative bias field, an arbitrary intensity scale per case and Rician noise.
* FLAIR and contrast T1 (T1c), for the multi-sequence brain MR: FLAIR is T2-like with the CSF
  suppressed (dark), so oedema is the brightest tissue; T1c is T1 with the tumour enhancing.
  A brain tumour is told from its oedema best on T1c, the oedema best on FLAIR/T2: each
  sequence carries information the others lack, as in BraTS. Each sequence gets its own bias
  field, scale and noise (separate acquisitions on one grid).
* PET: SUV-like activity with a low background, hot lesions (SUV 5-14), physiological uptake
  (kidneys, urine in the renal pelvis, bowel), 7-10 mm FWHM blur and count-dependent noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from hermes.synthetic.geometry import Grid, SineField
from hermes.synthetic.phantoms import Tissue

T = Tissue

# tissue -> (mean, relative or absolute per-case jitter). CT in HU (absolute jitter).
CT_HU: dict[Tissue, tuple[float, float]] = {
    T.AIR: (-1000, 0), T.FAT: (-100, 10), T.MUSCLE: (50, 6), T.BONE: (650, 90), T.MARROW: (230, 40),
    T.LIVER: (100, 10), T.SPLEEN: (0, 0), T.KIDNEY_R: (165, 15), T.KIDNEY_L: (0, 0),
    T.PELVIS_R: (20, 5), T.PELVIS_L: (20, 5), T.AORTA: (175, 25), T.IVC: (140, 20),
    T.STOMACH: (35, 8), T.BOWEL: (30, 10), T.GAS: (-950, 30), T.GALLBLADDER: (8, 5),
    T.LIVER_LESION: (0, 0), T.KIDNEY_LESION_R: (0, 0), T.KIDNEY_LESION_L: (0, 0),
    T.NODE_LESION: (45, 8), T.CANAL: (15, 5), T.SCALP: (-40, 15), T.SKULL: (1000, 150),
    T.CSF: (8, 4), T.GREY_MATTER: (40, 4), T.WHITE_MATTER: (28, 4), T.DEEP_GREY: (37, 4), T.EYE: (10, 4),
}

# Relative MR signal (0..1 before the per-case scale); jitter is relative.
T1_SIGNAL: dict[Tissue, float] = {
    T.AIR: 0.0, T.FAT: 0.95, T.MUSCLE: 0.35, T.BONE: 0.05, T.MARROW: 0.7, T.LIVER: 0.56, T.SPLEEN: 0.42,
    T.KIDNEY_R: 0.46, T.KIDNEY_L: 0.46, T.PELVIS_R: 0.12, T.PELVIS_L: 0.12, T.AORTA: 0.12, T.IVC: 0.18,
    T.STOMACH: 0.25, T.BOWEL: 0.3, T.GAS: 0.02, T.GALLBLADDER: 0.2, T.LIVER_LESION: 0.32,
    T.KIDNEY_LESION_R: 0.34, T.KIDNEY_LESION_L: 0.34, T.NODE_LESION: 0.36, T.CANAL: 0.12,
    T.SCALP: 0.9, T.SKULL: 0.06, T.CSF: 0.12, T.GREY_MATTER: 0.45, T.WHITE_MATTER: 0.72, T.DEEP_GREY: 0.55, T.EYE: 0.1,
}
T2_SIGNAL: dict[Tissue, float] = {
    T.AIR: 0.0, T.FAT: 0.72, T.MUSCLE: 0.18, T.BONE: 0.05, T.MARROW: 0.45, T.LIVER: 0.28, T.SPLEEN: 0.48,
    T.KIDNEY_R: 0.55, T.KIDNEY_L: 0.55, T.PELVIS_R: 0.95, T.PELVIS_L: 0.95, T.AORTA: 0.08, T.IVC: 0.12,
    T.STOMACH: 0.6, T.BOWEL: 0.62, T.GAS: 0.02, T.GALLBLADDER: 0.98, T.LIVER_LESION: 0.68,
    T.KIDNEY_LESION_R: 0.62, T.KIDNEY_LESION_L: 0.62, T.NODE_LESION: 0.42, T.CANAL: 0.95,
    T.SCALP: 0.7, T.SKULL: 0.05, T.CSF: 1.0, T.GREY_MATTER: 0.55, T.WHITE_MATTER: 0.4, T.DEEP_GREY: 0.5, T.EYE: 0.95,
}
# Head tissues in FLAIR (T2 with the fluid signal nulled); other tissues as in T2.
FLAIR_SIGNAL: dict[Tissue, float] = {
    **T2_SIGNAL, T.CSF: 0.08, T.EYE: 0.08, T.GREY_MATTER: 0.6, T.WHITE_MATTER: 0.45, T.DEEP_GREY: 0.55,
    T.SCALP: 0.6, T.FAT: 0.55,
}
# Brain tumour and oedema per sequence; drawn only for an image that contains them, so the
# random stream (and every image) of the datasets without a tumour is what it always was.
LESION_SIGNAL: dict[str, dict[Tissue, float]] = {
    "T1": {T.BRAIN_TUMOUR: 0.38, T.EDEMA: 0.55},
    "T1c": {T.BRAIN_TUMOUR: 1.0, T.EDEMA: 0.55},
    "T2": {T.BRAIN_TUMOUR: 0.7, T.EDEMA: 0.88},
    "FLAIR": {T.BRAIN_TUMOUR: 0.75, T.EDEMA: 0.95},
}
MR_SIGNAL: dict[str, dict[Tissue, float]] = {"T1": T1_SIGNAL, "T1c": T1_SIGNAL, "T2": T2_SIGNAL, "FLAIR": FLAIR_SIGNAL}

PET_SUV: dict[Tissue, float] = {
    T.AIR: 0.0, T.FAT: 0.3, T.MUSCLE: 0.7, T.BONE: 0.5, T.MARROW: 1.3, T.LIVER: 2.3, T.SPLEEN: 1.9,
    T.KIDNEY_R: 2.8, T.KIDNEY_L: 2.8, T.PELVIS_R: 4.0, T.PELVIS_L: 4.0, T.AORTA: 1.7, T.IVC: 1.6,
    T.STOMACH: 1.6, T.BOWEL: 1.5, T.GAS: 0.05, T.GALLBLADDER: 0.5, T.LIVER_LESION: 0.0,
    T.KIDNEY_LESION_R: 3.0, T.KIDNEY_LESION_L: 3.0, T.NODE_LESION: 0.0, T.CANAL: 0.6,
    T.SCALP: 0.4, T.SKULL: 0.3, T.CSF: 0.2, T.GREY_MATTER: 9.0, T.WHITE_MATTER: 3.0, T.DEEP_GREY: 9.0, T.EYE: 0.5,
}

MODALITIES = ("CT", "T1", "T2", "PET", "FLAIR", "T1c")


def _texture(rng: np.random.Generator, grid: Grid, amplitude: float) -> np.ndarray:
    """Smooth intensity inhomogeneity inside tissues (wavelengths 2-6 cm)."""
    return SineField.random(rng, 5, (20.0, 60.0), amplitude)(*grid.coords())


def _blur(image: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(image, sigma=tuple(float(s) for s in sigma_vox), mode="nearest")


def render_ct(tissue: np.ndarray, grid: Grid, rng: np.random.Generator) -> np.ndarray:
    lut = np.zeros(len(Tissue), np.float32)
    for code, (mean, jitter) in CT_HU.items():
        lut[code] = mean + rng.uniform(-jitter, jitter)
    lut[T.SPLEEN] = lut[T.LIVER] + rng.uniform(8.0, 22.0)
    lut[T.KIDNEY_L] = lut[T.KIDNEY_R] + rng.uniform(-8.0, 8.0)
    lut[T.LIVER_LESION] = lut[T.LIVER] - rng.uniform(30.0, 55.0)
    lut[T.KIDNEY_LESION_R] = lut[T.KIDNEY_R] - rng.uniform(35.0, 70.0)
    lut[T.KIDNEY_LESION_L] = lut[T.KIDNEY_LESION_R]
    image = lut[tissue]
    soft = (tissue != T.AIR) & (tissue != T.GAS)
    image += _texture(rng, grid, 5.0) * soft
    image = _blur(image, np.full(3, rng.uniform(0.5, 0.75)))
    noise = _blur(rng.normal(0.0, 1.0, tissue.shape).astype(np.float32), np.full(3, 0.5))
    noise *= rng.uniform(10.0, 18.0) / max(float(noise.std()), 1e-6)  # correlated noise, scaled to HU
    return np.clip(image + noise, -1024.0, 3071.0)


def render_mr(tissue: np.ndarray, grid: Grid, rng: np.random.Generator, weighting: str) -> np.ndarray:
    table = MR_SIGNAL[weighting]
    lut = np.zeros(len(Tissue), np.float32)
    for code, value in table.items():
        lut[code] = value * rng.uniform(0.92, 1.08)
    for code, value in LESION_SIGNAL[weighting].items():
        if np.any(tissue == code):
            lut[code] = value * rng.uniform(0.92, 1.08)
    image = lut[tissue]
    image *= 1.0 + _texture(rng, grid, 0.04)
    image = _blur(image, np.full(3, rng.uniform(0.45, 0.7)))
    bias = np.exp(SineField.random(rng, 4, (200.0, 500.0), rng.uniform(0.1, 0.25))(*grid.coords()))
    scale = float(np.exp(rng.uniform(np.log(150.0), np.log(3000.0))))  # arbitrary scanner units
    image = image * bias * scale
    sigma = rng.uniform(0.02, 0.04) * scale
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)  # Rician magnitude noise


def render_pet(tissue: np.ndarray, grid: Grid, rng: np.random.Generator) -> np.ndarray:
    lut = np.zeros(len(Tissue), np.float32)
    for code, value in PET_SUV.items():
        lut[code] = value * rng.uniform(0.85, 1.15)
    image = lut[tissue]
    # Each lesion has its own uptake: label connected lesion components, give each an SUV.
    lesions = np.isin(tissue, (T.LIVER_LESION, T.NODE_LESION))
    components, count = ndimage.label(lesions)
    if count:
        suv = np.concatenate([[0.0], rng.uniform(5.0, 14.0, count)]).astype(np.float32)
        image = np.where(lesions, suv[components], image)
    image *= 1.0 + _texture(rng, grid, 0.08)
    fwhm = rng.uniform(7.0, 10.0)
    image = _blur(image, fwhm / 2.355 / np.asarray(grid.spacing))
    noise = rng.normal(0.0, 1.0, image.shape).astype(np.float32) * rng.uniform(0.12, 0.2)
    image = image + noise * np.sqrt(np.maximum(image, 0.0) + 0.05)
    return np.maximum(_blur(image, np.full(3, 0.4)), 0.0)


def render(tissue: np.ndarray, grid: Grid, modality: str, rng: np.random.Generator) -> np.ndarray:
    """Intensity image (float32) of ``tissue`` as ``modality`` (CT in HU, PET in SUV)."""
    if modality == "CT":
        image = render_ct(tissue, grid, rng)
    elif modality in MR_SIGNAL:
        image = render_mr(tissue, grid, rng, modality)
    elif modality == "PET":
        image = render_pet(tissue, grid, rng)
    else:
        raise ValueError(f"no renderer for modality {modality!r}")
    return image.astype(np.float32)

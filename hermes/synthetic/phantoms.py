"""Per-subject anatomy: an abdomen and a head phantom rendered to tissue codes.

Each subject is sampled from a seeded generator: organ sizes, positions, rotations, outline
wobble, a global smooth deformation and the lesions all vary, while the layout keeps the
anatomical relations of a supine patient (RAS+ mm, origin near the body centre at about L1):

* liver: patient's right (+x), anterior and superior, a right lobe plus a left lobe crossing
  the midline anteriorly; gallbladder under its inferior surface;
* spleen: patient's left (-x), posterior-lateral, superior; stomach left-anterior;
* kidneys: posterior, either side of the spine, lateral to the psoas, the right one lower;
* aorta: just anterior and to the left of the vertebral body; IVC to its right;
* bowel loops fill the lower anterior cavity.

Organs are painted from low to high priority; a later organ first paints a thin fat plane
around itself over the earlier organs, so neighbouring organs never share voxels (as in real
images, where a fat plane or fascia separates them) and a higher-priority organ leaves an
impression on a softer neighbour (the kidney on the liver and spleen). Lesions are painted
only inside their organ.

The renderers return tissue codes (``Tissue``); modalities (``render.py``) turn codes into
intensities and datasets (``datasets.py``) turn codes into their own label sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from hermes.synthetic.geometry import Canvas, Deformation, Ellipsoid, Grid, SineField, rotation


class Tissue(IntEnum):
    AIR = 0
    FAT = 1
    MUSCLE = 2
    BONE = 3
    MARROW = 4
    LIVER = 5
    SPLEEN = 6
    KIDNEY_R = 7
    KIDNEY_L = 8
    PELVIS_R = 9  # renal pelvis / sinus (urine), inside the kidney label
    PELVIS_L = 10
    AORTA = 11
    IVC = 12
    STOMACH = 13
    BOWEL = 14
    GAS = 15
    GALLBLADDER = 16
    LIVER_LESION = 17
    KIDNEY_LESION_R = 18
    KIDNEY_LESION_L = 19
    NODE_LESION = 20  # lymph-node lesion (hot in PET, soft tissue elsewhere)
    CANAL = 21  # spinal canal (CSF)
    SCALP = 22
    SKULL = 23
    CSF = 24
    GREY_MATTER = 25
    WHITE_MATTER = 26
    DEEP_GREY = 27
    EYE = 28
    BRAIN_TUMOUR = 29  # solid, contrast-enhancing glioma-like mass (multi-sequence brain MR)
    EDEMA = 30  # peritumoural oedema around it


ORGANS = (Tissue.LIVER, Tissue.SPLEEN, Tissue.KIDNEY_R, Tissue.KIDNEY_L, Tissue.STOMACH, Tissue.GALLBLADDER)


@dataclass(frozen=True)
class LesionPlan:
    """How many lesions a subject gets; a count is drawn uniformly from the range when the
    probability test passes (``min`` > 0 forces at least that many)."""

    liver: tuple[int, int] = (0, 0)
    liver_prob: float = 0.0
    liver_radius: tuple[float, float] = (11.0, 20.0)
    kidney: tuple[int, int] = (0, 0)
    kidney_prob: float = 0.0
    kidney_radius: tuple[float, float] = (12.0, 20.0)
    nodes: tuple[int, int] = (0, 0)
    node_radius: tuple[float, float] = (10.0, 15.0)

    def count(self, rng: np.random.Generator, kind: str) -> int:
        low, high = getattr(self, kind)
        prob = getattr(self, f"{kind}_prob", 1.0)
        if high <= 0 or (low == 0 and rng.random() >= prob):
            return 0
        return int(rng.integers(max(low, 1), high + 1))


@dataclass
class Phantom:
    """Rendered anatomy: tissue codes on a RAS grid plus bookkeeping for tests and previews."""

    tissue: np.ndarray
    grid: Grid
    kind: str
    intended: dict[str, int] = field(default_factory=dict)  # organ -> voxels of its full shape


def _u(rng: np.random.Generator, centre: float, spread: float) -> float:
    return float(centre + rng.uniform(-spread, spread))


def _point_in(rng: np.random.Generator, shape: Ellipsoid, max_level: float) -> np.ndarray:
    """A random world point inside ``shape`` at normalised radius <= ``max_level``."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    local = direction * max_level * rng.uniform(0.0, 1.0) ** (1 / 3) * shape.semi
    return shape.centre + shape.rot @ local


def render_abdomen(rng: np.random.Generator, grid: Grid, lesions: LesionPlan) -> Phantom:
    """Sample one abdomen subject and paint it on ``grid``."""
    T = Tissue
    size = rng.uniform(0.92, 1.08)  # overall body habitus
    deformation = Deformation.random(rng, amplitude=4.0, wavelength=(120.0, 260.0))
    canvas = Canvas(grid, deformation.apply(grid), margin_mm=8.0)
    intended: dict[str, int] = {}

    # --- body wall: skin/subcutaneous fat, muscle, visceral cavity (cylinders along z) ---
    ax, ay = 148.0 * size * rng.uniform(0.95, 1.05), 102.0 * size * rng.uniform(0.95, 1.05)
    fat_t, wall_t = rng.uniform(10.0, 28.0), rng.uniform(8.0, 13.0)
    long = 5000.0  # "infinite" along z: the field of view cuts the trunk
    back = 0.9  # the back is flatter than the belly: posterior half uses a shorter y semi-axis
    _paint_body(canvas, rng, ax, ay, back, ((T.FAT, 0.0), (T.MUSCLE, fat_t), (T.FAT, fat_t + wall_t)))
    y_back = -ay * back
    cavity_y_front = ay - fat_t - wall_t

    # --- spine and back muscles (posterior midline) ---
    spine_y = y_back + rng.uniform(58.0, 66.0)
    vert_r = rng.uniform(17.0, 21.0)
    tilt = np.eye(3)  # straight: long cylinders must stay axis-aligned to keep their boxes small
    paraspinal = [
        Ellipsoid.random_wobble(rng, [side * 33.0, spine_y - 38.0, 0.0], [24.0, 22.0, long], tilt, 0.03)
        for side in (-1, 1)
    ]
    canvas.paint(paraspinal, T.MUSCLE)
    canvas.paint(Ellipsoid([0.0, spine_y - 26.0, 0.0], [13.0, 14.0, long], tilt), T.BONE)  # arch
    canvas.paint(Ellipsoid([0.0, spine_y - 48.0, 0.0], [6.0, 14.0, long], tilt), T.BONE)  # spinous process
    canvas.paint(Ellipsoid([0.0, spine_y, 0.0], np.array([vert_r + 2, vert_r, long]), tilt), T.BONE)
    canvas.paint(Ellipsoid([0.0, spine_y, 0.0], np.array([vert_r - 1, vert_r - 3, long]), tilt), T.MARROW)
    canvas.paint(Ellipsoid([0.0, spine_y - 26.0, 0.0], [7.0, 7.0, long], tilt), T.CANAL)
    bone = (T.BONE, T.MARROW, T.CANAL)
    # Psoas: beside the vertebral body, thickening towards the pelvis (cone along z).
    for side in (-1, 1):
        psoas = Ellipsoid.random_wobble(
            rng, [side * (vert_r + 14.0), spine_y + 2.0, -120.0], [15.0, 14.0, 130.0], rotation(ry=side * 6), 0.03
        )
        canvas.paint(psoas, T.MUSCLE, keep=bone)

    # --- great vessels: aorta anterior-left of the spine, IVC to its right ---
    aorta_x = -rng.uniform(10.0, 18.0)
    aorta_y = spine_y + vert_r + rng.uniform(12.0, 16.0)
    aorta_r = rng.uniform(9.5, 12.5)
    aorta = Ellipsoid(np.array([aorta_x, aorta_y, 0.0]), np.array([aorta_r, aorta_r, long]), np.eye(3))
    ivc = Ellipsoid(
        np.array([rng.uniform(18.0, 26.0), aorta_y + rng.uniform(-2.0, 4.0), 0.0]),
        np.array([rng.uniform(11.0, 14.0), rng.uniform(8.0, 10.0), long]),
    )

    # --- organs (sampled in a reference frame, then painted low -> high priority) ---
    z_kid_r = rng.uniform(-38.0, -20.0)
    z_kid_l = z_kid_r + rng.uniform(8.0, 22.0)
    kidneys = {}
    for side, z, code in ((1, z_kid_r, T.KIDNEY_R), (-1, z_kid_l, T.KIDNEY_L)):
        semi = np.array([rng.uniform(22.0, 27.0), rng.uniform(19.0, 24.0), rng.uniform(46.0, 56.0)]) * size
        centre = np.array([side * rng.uniform(64.0, 74.0) * size, spine_y + rng.uniform(-6.0, 4.0), z])
        # Upper pole medial (about y), hilum turned anteromedially (about z).
        rot = rotation(ry=side * rng.uniform(8, 18), rz=-side * rng.uniform(20, 35))
        kidneys[code] = Ellipsoid.random_wobble(rng, centre, semi, rot, 0.05)

    # The right lobe is tilted so its inferior edge lies anterior: the right kidney sits in
    # the posterior-inferior notch below it (hepatorenal recess), not inside it.
    liver_right = Ellipsoid.random_wobble(
        rng,
        [rng.uniform(50.0, 60.0) * size, rng.uniform(0.0, 12.0), rng.uniform(42.0, 55.0)],
        np.array([rng.uniform(56.0, 66.0), rng.uniform(60.0, 70.0), rng.uniform(60.0, 72.0)]) * size,
        rotation(rx=rng.uniform(18, 30), rz=rng.uniform(-10, 10), ry=rng.uniform(-10, 5)),
        0.08,
    )
    liver_left = Ellipsoid.random_wobble(
        rng,
        [rng.uniform(-10.0, 5.0) * size, rng.uniform(28.0, 40.0), liver_right.centre[2] + rng.uniform(0.0, 15.0)],
        np.array([rng.uniform(45.0, 58.0), rng.uniform(24.0, 32.0), rng.uniform(28.0, 38.0)]) * size,
        rotation(rz=rng.uniform(-15, 5)),
        0.06,
    )
    liver = [liver_right, liver_left]
    spleen = Ellipsoid.random_wobble(
        rng,
        [-rng.uniform(82.0, 94.0) * size, spine_y + rng.uniform(5.0, 20.0), rng.uniform(30.0, 50.0)],
        np.array([rng.uniform(17.0, 24.0), rng.uniform(42.0, 56.0), rng.uniform(38.0, 50.0)]) * size,
        rotation(rz=rng.uniform(30, 50), rx=rng.uniform(-10, 10)),
        0.06,
    )
    stomach = Ellipsoid.random_wobble(
        rng,
        [-rng.uniform(35.0, 50.0) * size, rng.uniform(25.0, 40.0), rng.uniform(15.0, 35.0)],
        np.array([rng.uniform(28.0, 38.0), rng.uniform(22.0, 30.0), rng.uniform(35.0, 48.0)]) * size,
        rotation(ry=rng.uniform(-25, -5), rz=rng.uniform(-20, 20)),
        0.06,
    )
    gallbladder = Ellipsoid.random_wobble(
        rng,
        [rng.uniform(30.0, 45.0) * size, rng.uniform(35.0, 50.0), liver_right.centre[2] - liver_right.semi[2] * 0.55],
        [rng.uniform(11.0, 15.0), rng.uniform(11.0, 15.0), rng.uniform(22.0, 32.0)],
        rotation(rx=rng.uniform(20, 45)),
        0.04,
    )

    # Bowel loops fill the lower, anterior cavity (lowest organ priority).
    for _ in range(int(rng.integers(10, 16))):
        centre = [rng.uniform(-90.0, 90.0), rng.uniform(-10.0, cavity_y_front - 15.0), rng.uniform(-130.0, 0.0)]
        loop = Ellipsoid.random_wobble(
            rng, centre, [rng.uniform(12.0, 22.0), rng.uniform(10.0, 16.0), rng.uniform(14.0, 30.0)],
            rotation(rng.uniform(0, 180), rng.uniform(0, 180), rng.uniform(0, 180)), 0.05,
        )
        gas = rng.random() < 0.35
        canvas.paint(loop, T.GAS if gas else T.BOWEL, only=(T.FAT,))
    intended["stomach"] = canvas.paint(stomach, T.STOMACH, only=(T.FAT, T.BOWEL, T.GAS), fat_plane=(3.0, T.FAT, (T.BOWEL, T.GAS)))
    # Gas rises to the anterior part of the stomach (supine patient).
    gas_cap = Ellipsoid(stomach.centre + stomach.rot @ np.array([0.0, stomach.semi[1] * 0.75, 0.0]), stomach.semi * np.array([0.7, 0.45, 0.6]), stomach.rot)
    canvas.paint(gas_cap, T.GAS, only=(T.STOMACH,))
    organ_over = (T.STOMACH, T.BOWEL, T.GAS, T.MUSCLE)
    intended["spleen"] = canvas.paint(spleen, T.SPLEEN, only=(T.FAT, *organ_over), fat_plane=(3.0, T.FAT, organ_over))
    intended["liver"] = canvas.paint(liver, T.LIVER, only=(T.FAT, *organ_over), fat_plane=(3.0, T.FAT, organ_over))
    canvas.paint(gallbladder, T.GALLBLADDER, only=(T.LIVER, T.FAT, T.BOWEL, T.GAS))
    kidney_over = (T.LIVER, T.SPLEEN, T.STOMACH, T.BOWEL, T.GAS, T.MUSCLE, T.GALLBLADDER)
    for code, pelvis_code, name in ((T.KIDNEY_R, T.PELVIS_R, "kidney_right"), (T.KIDNEY_L, T.PELVIS_L, "kidney_left")):
        kidney = kidneys[code]
        intended[name] = canvas.paint(kidney, code, only=(T.FAT, *kidney_over), keep=bone, fat_plane=(3.0, T.FAT, kidney_over))
        side = 1.0 if code == T.KIDNEY_R else -1.0
        medial = kidney.rot.T @ np.array([-side, 0.0, 0.0])  # medial direction in local coords
        pelvis = Ellipsoid(kidney.centre + kidney.rot @ (medial * kidney.semi * 0.45), kidney.semi * np.array([0.35, 0.3, 0.45]), kidney.rot)
        canvas.paint(pelvis, pelvis_code, only=(code,))
    vessel_over = (T.LIVER, T.MUSCLE, T.BOWEL, T.GAS, T.STOMACH)
    canvas.paint(ivc, T.IVC, keep=bone, fat_plane=(2.0, T.FAT, vessel_over))
    intended["aorta"] = canvas.paint(aorta, T.AORTA, keep=bone, fat_plane=(2.0, T.FAT, (*vessel_over, T.IVC)))

    # --- lesions, inside their organ ---
    for _ in range(lesions.count(rng, "liver")):
        host = liver_right if rng.random() < 0.8 else liver_left
        radius = rng.uniform(*lesions.liver_radius)
        centre = _point_in(rng, host, 0.55)
        canvas.paint(Ellipsoid.random_wobble(rng, centre, [radius] * 3, amount=0.08), T.LIVER_LESION, only=(T.LIVER,))
    n_kidney = lesions.count(rng, "kidney")
    for _ in range(n_kidney):
        code = T.KIDNEY_R if rng.random() < 0.5 else T.KIDNEY_L
        kidney = kidneys[code]
        lesion_code = T.KIDNEY_LESION_R if code == T.KIDNEY_R else T.KIDNEY_LESION_L
        radius = rng.uniform(*lesions.kidney_radius)
        centre = _point_in(rng, kidney, 0.5)
        tumour = Ellipsoid.random_wobble(rng, centre, [radius] * 3, amount=0.08)
        # Kidney tumours may bulge out of the kidney (exophytic) but stay next to it.
        bulge = Ellipsoid(kidney.centre, kidney.semi * 1.2, kidney.rot, kidney.wobble)
        canvas.paint([tumour], lesion_code, only=(code, T.PELVIS_R if code == T.KIDNEY_R else T.PELVIS_L, T.FAT))
        _clip_to(canvas, lesion_code, bulge, restore=T.FAT)
    for _ in range(lesions.count(rng, "nodes")):
        # Para-aortic / mesenteric lymph nodes, in fat.
        centre = [aorta_x + rng.choice([-1, 1]) * rng.uniform(22.0, 40.0), aorta_y + rng.uniform(-5.0, 25.0), rng.uniform(-90.0, 20.0)]
        radius = rng.uniform(*lesions.node_radius)
        canvas.paint(Ellipsoid.random_wobble(rng, centre, [radius] * 3, amount=0.06), T.NODE_LESION, only=(T.FAT, T.BOWEL, T.MUSCLE))
    return Phantom(canvas.tissue, grid, "abdomen", intended)


def _paint_body(
    canvas: Canvas, rng: np.random.Generator, ax: float, ay: float, back: float, layers: tuple[tuple[int, float], ...]
) -> None:
    """Paint nested trunk cross-sections (skin/fat, muscle wall, cavity) on the whole grid.

    Hand-written rather than with :class:`Ellipsoid` because the trunk covers every voxel: one
    outline wobble (in mm) is shared by all layers and the anterior/posterior halves use
    different y semi-axes, which costs one pass instead of two ellipsoids per layer.
    """
    x, y, z = canvas.deformed
    wobble = SineField.random(rng, 4, (150.0, 400.0), 3.0)(x, y, z)  # mm
    x2 = x * x
    y2 = y * y
    front = y >= 0
    for code, shrink in layers:
        semi_y = np.where(front, np.float32(ay - shrink), np.float32(ay * back - shrink))
        radius = np.sqrt(x2 / np.float32((ax - shrink) ** 2) + y2 / (semi_y * semi_y))
        inside = radius + wobble / np.float32(ax - shrink) < 1.0
        canvas.tissue[inside] = code


def _clip_to(canvas: Canvas, code: int, allowed: Ellipsoid, restore: int) -> None:
    """Voxels of ``code`` outside ``allowed`` go back to ``restore``."""
    found = canvas.region([allowed])
    outside = canvas.tissue == code
    if found is not None:
        box, mask = found
        outside[box] &= ~mask
    canvas.tissue[outside] = restore


def render_head(rng: np.random.Generator, grid: Grid, tumour: bool = False) -> Phantom:
    """Sample one head: scalp, skull, CSF, folded cortex (GM), white matter, ventricles, deep GM;
    with ``tumour``, also a mass in one hemisphere inside a wider, irregular oedema (drawn after
    everything else, so the same subject without the tumour is unchanged)."""
    T = Tissue
    size = rng.uniform(0.93, 1.07)
    deformation = Deformation.random(rng, amplitude=3.0, wavelength=(100.0, 220.0))
    canvas = Canvas(grid, deformation.apply(grid), margin_mm=6.0)
    semi = np.array([rng.uniform(68.0, 74.0), rng.uniform(86.0, 94.0), rng.uniform(76.0, 84.0)]) * size
    centre = np.array([0.0, 0.0, 0.0])
    rot = rotation(rx=rng.uniform(-8, 8), rz=rng.uniform(-4, 4))
    outline = SineField.random(rng, 4, (2.5, 5.0), 0.02)
    scalp_t, skull_t, csf_t = rng.uniform(5.0, 8.0), rng.uniform(5.0, 8.0), rng.uniform(2.0, 4.0)

    def layer(shrink: float, wobble: SineField | None = outline) -> Ellipsoid:
        return Ellipsoid(centre, semi - shrink, rot, wobble)

    canvas.paint(layer(0.0), T.SCALP)
    canvas.paint(layer(scalp_t), T.SKULL)
    canvas.paint(layer(scalp_t + skull_t), T.CSF)
    brain_shrink = scalp_t + skull_t + csf_t
    # Gyri: a high-frequency field (wavelength ~ 2-3 cm) displaces the cortical surfaces, so
    # the CSF reaches into sulci and the grey-white boundary folds with them.
    gyri = SineField.random(rng, 10, (18.0, 32.0), 1.0)
    brain_axes = semi - brain_shrink
    gm_t = rng.uniform(8.0, 10.0)
    found = canvas.region([layer(brain_shrink)])
    assert found is not None
    box, _ = found
    x, y, z = (c[box] for c in canvas.deformed)
    g = gyri(x, y, z)
    base_brain = layer(brain_shrink, None).level(x, y, z)
    base_wm = Ellipsoid(centre, brain_axes - gm_t, rot, None).level(x, y, z)
    fold = np.float32(5.0) * g  # mm of folding
    mean_axis = float(brain_axes.mean())
    # Sulci (fold > 0) pull the pial surface inwards; the white matter follows the folds.
    brain = base_brain + np.maximum(fold, 0) / mean_axis < 1.0
    wm = base_wm + (fold + 2.0) / mean_axis < 1.0
    sub = canvas.tissue[box]
    inside_skull = sub == T.CSF
    sub[inside_skull & brain] = T.GREY_MATTER
    sub[inside_skull & brain & wm] = T.WHITE_MATTER
    # Interhemispheric fissure: CSF along the midline plane in the upper brain.
    local_x = (rot[:, 0].astype(np.float32)[0] * x + rot[:, 0].astype(np.float32)[1] * y + rot[:, 0].astype(np.float32)[2] * z)
    fissure = (np.abs(local_x) < 1.6) & (base_brain > 0.55) & (z > -10.0) & inside_skull
    sub[fissure] = T.CSF
    intended = {"brain": int((inside_skull & brain).sum())}

    s = size
    # Deep grey matter (thalami, basal ganglia) either side of the midline.
    for side in (-1, 1):
        thal = Ellipsoid.random_wobble(rng, rot @ np.array([side * 12.0, -10.0, 2.0]) * s, np.array([9.0, 14.0, 10.0]) * s, rot, 0.05)
        basal = Ellipsoid.random_wobble(rng, rot @ np.array([side * 22.0, 8.0, 4.0]) * s, np.array([7.0, 15.0, 11.0]) * s, rot, 0.05)
        canvas.paint([thal, basal], T.DEEP_GREY, only=(T.WHITE_MATTER, T.GREY_MATTER))
    # Lateral ventricles: a body above the thalami plus a posterior/temporal horn; third ventricle.
    vent_scale = rng.uniform(0.8, 1.4)  # ventricle size varies a lot between people
    for side in (-1, 1):
        body = Ellipsoid.random_wobble(
            rng, rot @ np.array([side * 11.0, 4.0, 16.0]) * s, np.array([6.0 * vent_scale, 28.0, 8.0 * vent_scale]) * s,
            rot @ rotation(ry=side * 12), 0.05,
        )
        horn = Ellipsoid.random_wobble(
            rng, rot @ np.array([side * 22.0, -26.0, 0.0]) * s, np.array([5.0 * vent_scale, 14.0, 14.0]) * s,
            rot @ rotation(rx=40), 0.05,
        )
        canvas.paint([body, horn], T.CSF, only=(T.WHITE_MATTER, T.DEEP_GREY, T.GREY_MATTER))
    third = Ellipsoid(rot @ np.array([0.0, -4.0, 2.0]) * s, np.array([2.5, 13.0, 9.0]) * s, rot)
    canvas.paint(third, T.CSF, only=(T.WHITE_MATTER, T.DEEP_GREY, T.GREY_MATTER))
    # Eyes in the orbits (anterior, inferior) for orientation in previews.
    for side in (-1, 1):
        eye = Ellipsoid(rot @ np.array([side * 30.0, semi[1] * 0.72, -semi[2] * 0.38]), np.array([11.0, 11.0, 11.0]), rot)
        canvas.paint(eye, T.EYE)
    if tumour:
        intended.update(_paint_brain_tumour(canvas, rng, rot, s))
    return Phantom(canvas.tissue, grid, "head", intended)


def _paint_brain_tumour(canvas: Canvas, rng: np.random.Generator, rot: np.ndarray, s: float) -> dict[str, int]:
    """An oedema (1.6-2.2x the tumour, wobbly: it follows the white matter) around a 9-15 mm
    mass in the white matter of one hemisphere; both only inside the brain."""
    T = Tissue
    side = rng.choice([-1.0, 1.0])
    centre = rot @ np.array([side * rng.uniform(22.0, 34.0), rng.uniform(-30.0, 35.0), rng.uniform(8.0, 30.0)]) * s
    radius = rng.uniform(9.0, 15.0)
    brain = (T.WHITE_MATTER, T.GREY_MATTER, T.DEEP_GREY)
    edema = Ellipsoid.random_wobble(rng, centre, radius * rng.uniform(1.6, 2.2, 3), rot, 0.12)
    mass = Ellipsoid.random_wobble(rng, centre, radius * rng.uniform(0.85, 1.15, 3), rot, 0.06)
    return {
        "edema": canvas.paint(edema, T.EDEMA, only=brain),
        "tumour": canvas.paint(mass, T.BRAIN_TUMOUR, only=(*brain, T.EDEMA, T.CSF)),
    }

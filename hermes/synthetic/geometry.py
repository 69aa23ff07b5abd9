"""Geometry of the phantoms: world grids, smooth random fields and deformable shapes.

Everything is expressed in world millimetres so that an organ has the same physical size
whatever the voxel spacing of the dataset it is rendered into. Convention (nibabel's RAS+):
+x = towards the patient's Right, +y = Anterior, +z = Superior.

Phantoms are rendered on an axis-aligned RAS grid (ascending coordinates per axis), so every
coordinate array broadcasts from three 1D vectors; the dataset writer flips/permutes the
result into the dataset's storage orientation afterwards (exact, no resampling).

Shapes are implicit: a *level* function that is < 1 inside. Ellipsoids get a per-subject
random rotation and a smooth "wobble" (a few low-frequency sinusoids of the normalised local
coordinates) so no two organs have the same outline; all shapes of a subject are also
evaluated through one smooth global displacement field. Sinusoid sums are used instead of
interpolated control grids because they are evaluated directly at any world point (the same
subject looks the same at any spacing or orientation) and cost a few vectorised `sin` calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Grid:
    """Voxel centres of an axis-aligned RAS grid: world = (xs[i], ys[j], zs[k]) in mm.

    Coordinates are kept in float64 (the affine written to the files must be exact); the
    phantom maths uses float32 copies from :meth:`coords`.
    """

    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray
    spacing: tuple[float, float, float]

    @classmethod
    def around(cls, centre: np.ndarray, fov: np.ndarray, spacing: np.ndarray) -> Grid:
        """A grid of round(fov / spacing) voxels per axis, centred on ``centre`` (mm)."""
        axes = []
        for c, f, s in zip(centre, fov, spacing):
            n = max(2, round(float(f) / float(s)))
            axes.append(float(c) + (np.arange(n) - (n - 1) / 2.0) * float(s))
        return cls(*axes, spacing=tuple(float(s) for s in spacing))  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.xs), len(self.ys), len(self.zs))

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> RAS world affine of this grid."""
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = (self.xs[0], self.ys[0], self.zs[0])
        return affine

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in [lo, hi] (None if empty)."""
        slices = []
        for axis, a, b in zip((self.xs, self.ys, self.zs), lo, hi):
            start = int(np.searchsorted(axis, a, side="left"))
            stop = int(np.searchsorted(axis, b, side="right"))
            if stop <= start:
                return None
            slices.append(slice(start, stop))
        return tuple(slices)  # type: ignore[return-value]

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable float32 world coordinates (nx,1,1), (1,ny,1), (1,1,nz)."""
        return (
            self.xs.astype(np.float32)[:, None, None],
            self.ys.astype(np.float32)[None, :, None],
            self.zs.astype(np.float32)[None, None, :],
        )


@dataclass(frozen=True)
class SineField:
    """A smooth random scalar field: sum_k amp_k * sin(freq_k . p + phase_k)."""

    freqs: np.ndarray  # (K, 3) rad/mm (or rad per normalised unit)
    phases: np.ndarray  # (K,)
    amps: np.ndarray  # (K,)

    @classmethod
    def random(
        cls, rng: np.random.Generator, n: int, wavelength: tuple[float, float], amplitude: float
    ) -> SineField:
        """``n`` modes with wavelengths in ``wavelength`` and total RMS ~ ``amplitude``."""
        directions = rng.normal(size=(n, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        lengths = rng.uniform(*wavelength, size=n)
        amps = rng.uniform(0.5, 1.0, size=n)
        amps *= amplitude * np.sqrt(2.0 / max(float((amps**2).sum()), 1e-9))
        return cls(directions * (2 * np.pi / lengths)[:, None], rng.uniform(0, 2 * np.pi, n), amps)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), np.float32)
        for (fx, fy, fz), phase, amp in zip(self.freqs, self.phases, self.amps):
            out += np.float32(amp) * np.sin(np.float32(fx) * x + np.float32(fy) * y + np.float32(fz) * z + np.float32(phase))
        return out


@dataclass(frozen=True)
class Deformation:
    """A smooth displacement field (mm), one sine field per world axis."""

    fields: tuple[SineField, SineField, SineField]
    amplitude: float

    @classmethod
    def random(cls, rng: np.random.Generator, amplitude: float, wavelength: tuple[float, float]) -> Deformation:
        fields = tuple(SineField.random(rng, 4, wavelength, amplitude) for _ in range(3))
        return cls(fields, amplitude)  # type: ignore[arg-type]

    def apply(self, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Full-size deformed coordinate arrays p + d(p) of the grid."""
        x, y, z = grid.coords()
        shape = grid.shape
        return tuple(  # type: ignore[return-value]
            np.broadcast_to(c, shape) + f(x, y, z) for c, f in zip((x, y, z), self.fields)
        )


def rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix from angles in degrees about x, then y, then z (columns = local axes)."""
    a, b, c = np.deg2rad([rx, ry, rz])
    mx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    my = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    mz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return mz @ my @ mx


@dataclass
class Ellipsoid:
    """A rotated, wobbly ellipsoid; level < 1 inside. ``wobble`` acts on normalised coords."""

    centre: np.ndarray
    semi: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    wobble: SineField | None = None

    def __post_init__(self) -> None:
        self.centre = np.asarray(self.centre, dtype=np.float64)
        self.semi = np.asarray(self.semi, dtype=np.float64)
        self.rot = np.asarray(self.rot, dtype=np.float64)

    @classmethod
    def random_wobble(
        cls,
        rng: np.random.Generator,
        centre: np.ndarray | list[float],
        semi: np.ndarray | list[float],
        rot: np.ndarray | None = None,
        amount: float = 0.06,
    ) -> Ellipsoid:
        wobble = SineField.random(rng, 4, (2.5, 5.0), amount) if amount > 0 else None
        return cls(np.asarray(centre, float), np.asarray(semi, float), np.eye(3) if rot is None else rot, wobble)

    def extent(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """World bounding box of the (wobbled, dilated) shape."""
        # Exact half-widths of the rotated ellipsoid, +30% for the wobble.
        half = np.sqrt((self.rot**2) @ (self.semi**2)) * 1.3 + margin
        return self.centre - half, self.centre + half

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dx, dy, dz = x - np.float32(self.centre[0]), y - np.float32(self.centre[1]), z - np.float32(self.centre[2])
        r = self.rot.astype(np.float32)
        u = (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz) / np.float32(self.semi[0])
        v = (r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz) / np.float32(self.semi[1])
        w = (r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz) / np.float32(self.semi[2])
        level = np.sqrt(u * u + v * v + w * w)
        if self.wobble is not None:
            level = level + self.wobble(u, v, w)
        return level

    def dilated(self, mm: float) -> Ellipsoid:
        """The same shape grown by about ``mm`` along every semi-axis (for fat planes)."""
        return Ellipsoid(self.centre, self.semi + mm, self.rot, self.wobble)


class Canvas:
    """A tissue-code volume painted shape by shape (later paints win), on deformed coordinates."""

    def __init__(self, grid: Grid, deformed: tuple[np.ndarray, np.ndarray, np.ndarray], margin_mm: float) -> None:
        self.grid = grid
        self.deformed = deformed
        self.margin = margin_mm  # deformation amplitude: how far a shape can move
        self.tissue = np.zeros(grid.shape, np.uint8)

    def region(self, shapes: list[Ellipsoid], grow: float = 0.0) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Mask (inside any of ``shapes``, grown by ``grow`` mm) within its bounding box."""
        lows, highs = zip(*(s.extent(self.margin + grow) for s in shapes))
        box = self.grid.box(np.min(lows, axis=0), np.max(highs, axis=0))
        if box is None:
            return None
        x, y, z = (c[box] for c in self.deformed)
        mask = np.zeros(x.shape, bool)
        for shape in shapes:
            target = shape.dilated(grow) if grow else shape
            mask |= target.level(x, y, z) < 1.0
        return box, mask

    def paint(
        self,
        shapes: Ellipsoid | list[Ellipsoid],
        code: int,
        only: tuple[int, ...] | None = None,
        keep: tuple[int, ...] = (),
        fat_plane: tuple[float, int, tuple[int, ...]] | None = None,
    ) -> int:
        """Paint ``code`` inside the union of ``shapes``; returns the voxel count of the shape.

        ``only``: paint only over these codes; ``keep``: never over these codes.
        ``fat_plane=(mm, fat_code, over)``: first paint a shell of ``mm`` around the shape
        with ``fat_code`` over the codes ``over`` (the fat planes that separate real organs).
        """
        shapes = shapes if isinstance(shapes, list) else [shapes]
        if fat_plane is not None:
            mm, fat_code, over = fat_plane
            grown = self.region(shapes, grow=mm)
            if grown is not None:
                box, mask = grown
                sub = self.tissue[box]
                sub[mask & np.isin(sub, over)] = fat_code
        found = self.region(shapes)
        if found is None:
            return 0
        box, mask = found
        sub = self.tissue[box]
        allowed = mask
        if only is not None:
            allowed = allowed & np.isin(sub, only)
        if keep:
            allowed = allowed & ~np.isin(sub, keep)
        sub[allowed] = code
        return int(mask.sum())

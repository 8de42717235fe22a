"""Lesions of two kinds painted into the phantom, and a small classification cohort with a table (issue 25).

A lesion classifier needs a test set whose classes can be told apart, but not by what a threshold would
find. So the two kinds here have exactly the **same mean HU** over their voxels (each lesion's level is
calibrated to it), bodies of the same sizes and the same organs, and differ in what a network has to look
at, shape and texture:

* ``"smooth"``: a round, homogeneous ellipsoid (axes within 10 % of one another) with a sharp, smooth border
  and no texture of its own: inside it is only the phantom's organ texture and image noise (a cyst, a benign
  lesion).
* ``"spiculated"``: a lobulated body of the diameter with 8 to 14 thin conical spikes reaching out by 60 to
  100 % of its radius, and a heterogeneous inside: a mottled pattern (random plane waves 7 to 12 mm long),
  25 HU standard deviation over the lesion before noise (a malignant-looking mass). Its spikes make it
  cover more voxels than a smooth lesion of the same diameter, by about half on a 3 mm grid.

Every lesion is put at a random voxel of a solid organ (liver or spleen, chosen with a weight of their size,
so most land in the liver), its body fully inside it where there is room, never touching another lesion, its
centre on a voxel centre (so the centre voxel is always the lesion's, even for a 2-voxel lesion on a coarse
grid). It is added to the CT rather than pasted over it, ``ct + alpha * (lesion - organ)``, which keeps the
phantom's noise and texture inside the lesion: no lesion is given away by a noise-free patch. ``alpha`` is the
lesion's partial volume in each voxel (the fraction of 3 x 3 x 3 sub-voxel samples inside it), so borders are
blurred like the phantom's organ edges, and spikes thinner than a voxel show as faint streaks, as on a scan.

On a coarse grid (the cohort's default 6 x 5 x 5 mm voxels, where a 10 mm lesion is 2 voxels across) the
texture is what separates the kinds most; the shape tells as much from about 3 mm voxels on.

:func:`make_lesion_cohort` writes a few such CTs as NIfTI and one table, ``lesions.csv``
(``image,label,x,y,z,size,patient``), that a lesion classifier can train and be tested on offline. Only
numpy is used; everything is deterministic by seed.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.files import atomic_write_text
from napari_dagman.core.phantom.anatomy import make_phantom
from napari_dagman.core.phantom.geometry import LIVER, SPLEEN
from napari_dagman.core.volume import Volume, require_same_grid

#: Class names, in the order of their class index (0, 1).
LESION_CLASSES: tuple[str, ...] = ("smooth", "spiculated")
#: Organs lesions are painted into, picked with a weight of their size: the solid organs big enough to hold a
#: 20 mm lesion with its spikes and dense enough for a hypodense one to show. The kidneys are neither (17 mm
#: thick, 32 HU: a lesion at the level below would be invisible in them).
LESION_ORGANS: tuple[int, ...] = (LIVER, SPLEEN)
#: Mean HU of every lesion over its voxels, whatever its kind and organ: hypodense, 35 HU below the liver (60)
#: and 25 below the spleen (50), about 3 and 2 standard deviations of the default noise. One absolute value
#: rather than a contrast to each organ, so that the mix of organs a kind lands in cannot move its mean.
LESION_HU = 25.0
#: Standard deviation (HU) of the spiculated kind's own texture over its voxels, before the image noise.
SPICULATED_TEXTURE_HU = 25.0
#: Columns of the cohort table.
TABLE_COLUMNS: tuple[str, ...] = ("image", "label", "x", "y", "z", "size", "patient")

_GAP_MM = 2.0  # least clear distance between two lesions, beyond their spikes and partial volume
_TRIES = 400  # random centres tried per lesion
_REDRAWS = 8  # new sizes and shapes tried for a lesion that finds no room
_SUB = 3  # sub-voxel samples per axis for the partial volume
_MASK_ALPHA = 0.5  # a voxel belongs to a lesion when at least half of it is inside


@dataclass(frozen=True)
class Lesion:
    """One painted lesion.

    ``kind`` is one of :data:`LESION_CLASSES`; ``centre_zyx_mm`` the physical LPS position (z, y, x mm) of
    its centre, as `Volume.index_to_physical` gives it (always a voxel centre); ``diameter_mm`` the diameter
    of its body (smooth: of the ball of the same volume; spiculated: of its lobulated body, which its spikes
    reach out of by up to as much again).
    """

    kind: str
    centre_zyx_mm: tuple[float, float, float]
    diameter_mm: float


def _none() -> np.ndarray:
    return np.zeros((0, 3))


@dataclass(frozen=True, eq=False)
class _Shape:
    """Everything random about one lesion's shape and texture, drawn up front so painting is deterministic."""

    kind: str
    radius: float  # mm, half the diameter (spiculated: of the body, spikes not counted)
    rot: np.ndarray  # 3x3 rotation (smooth: ellipsoid axes)
    semi: np.ndarray  # smooth: semi-axes (mm)
    # spiculated only
    lobes: np.ndarray = field(default_factory=_none)  # (k, 3) unit directions of Legendre lobulation terms
    lobe_amp: np.ndarray = field(default_factory=_none)  # (k,) relative amplitudes
    lobe_order: np.ndarray = field(default_factory=_none)  # (k,) Legendre degrees 2..4
    spikes: np.ndarray = field(default_factory=_none)  # (m, 3) unit directions
    spike_len: np.ndarray = field(default_factory=_none)  # (m,) length relative to the body radius
    waves: np.ndarray = field(default_factory=_none)  # (w, 3) wave vectors (rad/mm) of the mottled texture
    phases: np.ndarray = field(default_factory=_none)  # (w,)


_SPIKE_COS = math.cos(math.radians(16.0))  # angular half-width of a spike at its base


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` unit vectors spread evenly over the sphere (equal areas), (n, 3)."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1.0 - 2.0 * i / n)
    theta = math.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(phi), np.sin(phi) * np.cos(theta), np.sin(phi) * np.sin(theta)], axis=-1)


_SPHERE = _fibonacci_sphere(2000)  # directions for a lesion's volume and reach


def _legendre(order: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Legendre polynomials P2..P4 (zero mean over the sphere: lobulation that keeps the mean radius)."""
    p2 = (3.0 * t * t - 1.0) / 2.0
    p3 = (5.0 * t**3 - 3.0 * t) / 2.0
    p4 = (35.0 * t**4 - 30.0 * t * t + 3.0) / 8.0
    return np.where(order == 2, p2, np.where(order == 3, p3, p4))


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _draw_shape(rng: np.random.Generator, kind: str, diameter: float) -> _Shape:
    """Draw the shape and texture parameters of one lesion of ``kind``."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    rot = q * np.sign(np.diag(r))  # a uniformly random orthogonal matrix
    radius = diameter / 2.0
    if kind == "smooth":
        axes = rng.uniform(0.9, 1.1, 3)
        semi = radius * axes / np.cbrt(axes.prod())  # the volume of a ball of the diameter
        return _Shape(kind, radius, rot, semi)
    k, m, w = 4, int(rng.integers(8, 15)), 6
    wavelength = rng.uniform(7.0, 12.0, w)
    return _Shape(
        kind,
        radius,
        rot,
        np.full(3, radius),
        lobes=_unit(rng, k),
        lobe_amp=rng.uniform(0.05, 0.09, k),
        lobe_order=rng.integers(2, 5, k),
        spikes=_unit(rng, m),
        spike_len=rng.uniform(0.6, 1.0, m),
        waves=_unit(rng, w) * (2.0 * math.pi / wavelength)[:, None],
        phases=rng.uniform(0.0, 2.0 * math.pi, w),
    )


def _radius_of(shape: _Shape, u: np.ndarray) -> np.ndarray:
    """Boundary radius (mm) of the lesion along unit directions ``u`` (..., 3)."""
    if shape.kind == "smooth":
        local = u @ shape.rot  # direction in the ellipsoid's axes
        return 1.0 / np.sqrt(np.sum((local / shape.semi) ** 2, axis=-1))
    lob = np.sum(shape.lobe_amp * _legendre(shape.lobe_order, u @ shape.lobes.T), axis=-1)
    # conical spikes: the radius rises to 1 + length along each spike's direction, within _SPIKE_COS of it
    t = np.clip((u @ shape.spikes.T - _SPIKE_COS) / (1.0 - _SPIKE_COS), 0.0, 1.0)
    spike = np.max(shape.spike_len * t, axis=-1)
    return shape.radius * (1.0 + lob + spike)


def _core(shape: _Shape) -> float:
    """Largest radius (mm) of the lesion without its spikes: what has to fit inside the organ."""
    if shape.kind == "smooth":
        return float(shape.semi.max())
    return shape.radius * (1.0 + float(shape.lobe_amp.sum()))


def _reach(shape: _Shape) -> float:
    """Largest boundary radius (mm), over `_SPHERE` and the spike axes."""
    return float(_radius_of(shape, np.concatenate([_SPHERE, shape.spikes])).max())


def _inside(shape: _Shape, p: np.ndarray) -> np.ndarray:
    """True for the points ``p`` (..., 3; mm from the centre) inside the lesion."""
    r = np.linalg.norm(p, axis=-1)
    u = np.where((r > 1e-9)[..., None], p / np.maximum(r, 1e-9)[..., None], np.array([1.0, 0.0, 0.0]))
    return r < _radius_of(shape, u)


def _texture(shape: _Shape, p: np.ndarray) -> np.ndarray:
    """The lesion's own texture (unscaled) at the voxel offsets ``p``: zero for the smooth kind; for the
    spiculated kind a mottled pattern of random plane waves.

    No radial trend (a bright rim, a dark centre): with the mean over the whole lesion fixed, it would make
    the body of one kind darker than the other's, and the mean HU in a ball of the lesion's size, the first
    thing a simple classifier measures, would tell the kinds apart.
    """
    if shape.kind == "smooth":
        return np.zeros(p.shape[:-1])
    return np.cos(p @ shape.waves.T + shape.phases).sum(axis=-1)


def _ball(spacing: np.ndarray, radius: float) -> np.ndarray:
    """Integer voxel offsets (n, 3) whose centres lie within ``radius`` mm of the origin voxel's centre."""
    half = np.ceil(radius / spacing).astype(int)
    grids = np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing="ij")
    off = np.stack([g.ravel() for g in grids], axis=-1)
    return off[np.linalg.norm(off * spacing, axis=-1) <= radius]


def _place(
    rng: np.random.Generator,
    labels: np.ndarray,
    organs: list[tuple[int, np.ndarray]],
    spacing: np.ndarray,
    core: float,
    reach: float,
    placed: list[tuple[np.ndarray, float]],
) -> tuple[np.ndarray, int] | None:
    """A random centre voxel (and its organ) for a lesion whose body reaches ``core`` mm, spikes ``reach``.

    The organ is picked with a weight of its size, the voxel at random in it. The first of `_TRIES` voxels
    where every voxel the body can touch is in the organ wins (spikes may be cut by the organ's edge, as
    they end in a real one); failing that (a small organ, a large lesion) the one with most of the body
    inside, at least half. Never within `_GAP_MM` of another lesion's reach, partial volume included, so
    lesions neither overlap nor touch. None when nothing fits.
    """
    weights = np.array([len(v) for _, v in organs], float)
    ball = _ball(spacing, core + 0.5 * float(spacing.max()))
    gap = _GAP_MM + float(np.linalg.norm(spacing))  # partial volume reaches half a voxel diagonal further
    shape = np.array(labels.shape)
    best: tuple[float, np.ndarray, int] | None = None
    for _ in range(_TRIES):
        o = int(rng.choice(len(organs), p=weights / weights.sum()))
        organ, voxels = organs[o]
        centre = np.array(np.unravel_index(int(voxels[rng.integers(len(voxels))]), labels.shape))
        pos = centre * spacing
        if any(np.linalg.norm(pos - q) < reach + r + gap for q, r in placed):
            continue
        idx = centre + ball
        ok = np.all((idx >= 0) & (idx < shape), axis=1)
        inside = np.zeros(len(idx), bool)
        inside[ok] = labels[tuple(idx[ok].T)] == organ
        frac = float(inside.mean())
        if frac == 1.0:
            return centre, organ
        if best is None or frac > best[0]:
            best = (frac, centre, organ)
    return None if best is None or best[0] < 0.5 else (best[1], best[2])


def _paint(
    hu: np.ndarray,
    owner: np.ndarray,
    labels: np.ndarray,
    organ: int,
    centre: np.ndarray,
    spacing: np.ndarray,
    shape: _Shape,
    reach: float,
    background: float,
    index: int,
) -> None:
    """Add one lesion to ``hu`` (whole HU in a float array, in place); mark its voxels (alpha >= 0.5) with
    ``index`` in ``owner``.

    The lesion is painted only on ``organ`` (a lesion at the organ's edge is cut by it); ``background`` is
    the organ's median HU, the level the lesion's own values replace (``hu - background``, the local texture
    and noise, is kept). The lesion's level is set so that the mean HU over its voxels is exactly
    `LESION_HU` (to 1 HU over the number of its voxels), whatever its shape, texture and organ and the noise
    and vessels under it: the mean is the one thing the two kinds must not differ in, and without this the
    edge voxels, partly organ, would make the kind with more edge (spiculated) brighter on average.
    """
    half = np.ceil((reach + spacing) / spacing).astype(int)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, hu.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grids = np.meshgrid(*(np.arange(a, b) - c for a, b, c in zip(lo, hi, centre, strict=True)), indexing="ij")
    p = np.stack(grids, axis=-1) * spacing  # voxel-centre offsets, mm
    sub = ((np.arange(_SUB) + 0.5) / _SUB - 0.5)[:, None] * spacing  # (SUB, 3) sub-voxel offsets per axis
    samples = (
        p[..., None, None, None, :]
        + np.stack(np.meshgrid(sub[:, 0], sub[:, 1], sub[:, 2], indexing="ij"), axis=-1)
    )
    alpha = _inside(shape, samples).mean(axis=(-3, -2, -1)) * (labels[sl] == organ)
    mask = alpha >= _MASK_ALPHA
    mask[tuple(centre - lo)] = True  # the centre voxel is the lesion's, however small it is
    tex = _texture(shape, p)
    if shape.kind != "smooth":
        w = alpha[mask]
        tex = tex - float(np.average(tex[mask], weights=w))
        sd = math.sqrt(float(np.average(tex[mask] ** 2, weights=w)))
        tex = tex * (SPICULATED_TEXTURE_HU / sd if sd > 1e-6 else 0.0)
    # mean over the mask of hu + alpha * (level + tex - background) must be LESION_HU
    mean_alpha = max(float(alpha[mask].mean()), 1e-3)
    under = float(hu[sl][mask].mean())
    level = background + (LESION_HU - under - float((alpha * tex)[mask].mean())) / mean_alpha
    value = hu[sl] + alpha * (level + tex - background)
    # whole HU here rather than at the end: rounding a flat lesion (all its voxels share the fraction of its
    # level) would shift its mean by up to 0.5 HU; nudge the voxels rounded furthest to keep it exact
    new = np.rint(value)
    err = int(round(LESION_HU * int(mask.sum()) - float(new[mask].sum())))
    if err:
        order = np.argsort(-np.sign(err) * (value - new)[mask], kind="stable")[: abs(err)]
        new.flat[np.flatnonzero(mask)[order]] += np.sign(err)
    hu[sl] = new
    owner[sl][mask & (owner[sl] == 0)] = index


def _check(
    ct: Volume, labels: Volume, count: int, kinds: tuple[str, ...], diameter_mm: tuple[float, float]
) -> None:
    """Refuse inputs `add_lesions` cannot work with, in words."""
    require_same_grid(ct, labels)
    if count < 0:
        raise DagmanInputError(f"the number of lesions must be >= 0, got {count}")
    unknown = [k for k in kinds if k not in LESION_CLASSES]
    if not kinds or unknown:
        raise DagmanInputError(f"lesion kinds must be some of {LESION_CLASSES}, got {kinds}")
    lo, hi = diameter_mm
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise DagmanInputError(f"lesion diameters must be a range 0 < low <= high (mm), got {diameter_mm}")


def _add_lesions(
    ct: Volume,
    labels: Volume,
    count: int,
    seed: int,
    kinds: tuple[str, ...] = LESION_CLASSES,
    diameter_mm: tuple[float, float] = (10.0, 20.0),
) -> tuple[Volume, list[Lesion], np.ndarray]:
    """`add_lesions`, plus the lesion map: int16, ``k + 1`` on the voxels of lesion ``k`` (alpha >= 0.5)."""
    kinds = tuple(kinds)
    diameter_mm = (float(diameter_mm[0]), float(diameter_mm[1]))
    _check(ct, labels, count, kinds, diameter_mm)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 25]))
    drawn = [kinds[i % len(kinds)] for i in range(count)]  # balanced, then shuffled
    rng.shuffle(drawn)
    lab = np.asarray(labels.array)
    organs = [(o, np.flatnonzero(lab == o)) for o in LESION_ORGANS]
    organs = [(o, v) for o, v in organs if len(v) > 0]
    if count and not organs:
        raise DagmanInputError(
            "the label map has none of the organs lesions are painted into (liver, spleen)"
        )
    spacing = np.asarray(ct.spacing, float)
    hu = ct.array.astype(np.float32)
    background = {o: float(np.median(hu.ravel()[v])) for o, v in organs}
    owner = np.zeros(ct.shape, np.int16)
    placed: list[tuple[np.ndarray, float]] = []
    lesions: list[Lesion] = []
    for kind in drawn:
        where: tuple[np.ndarray, int] | None = None
        for _ in range(_REDRAWS):  # a lesion that finds no room is drawn again (another size and shape)
            diameter = float(rng.uniform(*diameter_mm))
            shape = _draw_shape(rng, kind, diameter)
            reach = _reach(shape)
            where = _place(rng, lab, organs, spacing, _core(shape), reach, placed)
            if where is not None:
                break
        if where is None:
            raise DagmanInputError(
                f"no room for {count} lesions of {diameter_mm[0]:g}-{diameter_mm[1]:g} mm in the organs "
                f"(placed {len(lesions)}); ask for fewer or smaller lesions, or a larger volume"
            )
        centre, organ = where
        _paint(hu, owner, lab, organ, centre, spacing, shape, reach, background[organ], len(lesions) + 1)
        placed.append((centre * spacing, reach))
        position = tuple(float(v) for v in ct.index_to_physical(centre))
        lesions.append(Lesion(kind, position, round(diameter, 2)))  # type: ignore[arg-type]
    out = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    meta = {
        "lesion_seed": int(seed),
        "lesions": [
            {"kind": x.kind, "centre_zyx_mm": list(x.centre_zyx_mm), "diameter_mm": x.diameter_mm}
            for x in lesions
        ],
    }
    return ct.with_array(out, **meta), lesions, owner


def add_lesions(
    ct: Volume,
    labels: Volume,
    count: int,
    seed: int,
    *,
    kinds: tuple[str, ...] = LESION_CLASSES,
    diameter_mm: tuple[float, float] = (10.0, 20.0),
) -> tuple[Volume, list[Lesion]]:
    """Paint ``count`` lesions into a phantom CT; returns the new CT and the lesions, in painting order.

    Parameters
    ----------
    ct, labels : Volume
        A phantom CT (HU) and its organ label map on the same grid (see :func:`make_phantom`). Neither is
        changed.
    count : int
        Number of lesions. The kinds are dealt in turn (balanced to within one) and shuffled by ``seed``.
    seed : int
        Seed of every random choice (kinds' order, sizes, places, shapes, textures); the same inputs and seed
        give the same CT.
    kinds : tuple of str
        Kinds to draw from, some of :data:`LESION_CLASSES`.
    diameter_mm : (float, float)
        Range of the lesions' body diameters (uniform; see :class:`Lesion`).

    Returns
    -------
    ct, lesions : Volume, list of Lesion
        ``ct`` is int16 HU on the same grid with the same metadata, plus ``lesion_seed`` and ``lesions``.

    Raises
    ------
    DagmanInputError
        For grids that differ, a negative count, an unknown kind, a bad diameter range, a label map without
        liver or spleen, or more lesions than the organs have room for.
    """
    out, lesions, _ = _add_lesions(ct, labels, count, seed, tuple(kinds), diameter_mm)
    return out, lesions


def _cohort_case(
    seed: int,
    case: int,
    count: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    noise_hu: float,
) -> tuple[Volume, list[Lesion], np.ndarray]:
    """Case ``case`` of the cohort of ``seed``: its CT with lesions, the lesions and their map (see
    `_add_lesions`). Each case has its own phantom; the seeds of one cohort never repeat another's."""
    states = np.random.SeedSequence([int(seed), int(case)]).generate_state(2)
    phantom_seed, lesion_seed = (int(v) for v in states)
    ct, labels = make_phantom(shape, spacing, phantom_seed, noise_hu=noise_hu)
    return _add_lesions(ct, labels, count, lesion_seed)


def make_lesion_cohort(
    folder: str | Path,
    *,
    cases: int = 4,
    lesions_per_case: int = 10,
    seed: int = 0,
    shape: tuple[int, int, int] = (48, 64, 64),
    spacing: tuple[float, float, float] = (6.0, 5.0, 5.0),
    noise_hu: float = 12.0,
) -> Path:
    """Write a lesion-classification cohort: phantom CTs with lesions and one table of the lesions.

    Each case is a phantom of its own seed (:func:`make_phantom`) with ``lesions_per_case`` lesions
    (:func:`add_lesions`), written as ``case_000.nii.gz``, ``case_001.nii.gz``, ... in ``folder``. The table,
    ``lesions.csv``, has one row per lesion with the columns :data:`TABLE_COLUMNS`: ``image`` (the file name,
    relative to the table's folder), ``label`` (the kind: a name of :data:`LESION_CLASSES`), ``x``, ``y``,
    ``z`` (the LPS position of the centre in mm; ``x`` is the last array axis), ``size`` (diameter, mm) and
    ``patient`` (``case_000``, ...; split by it, never by row). Every file is written atomically and the table
    last, so a table on disk means a complete cohort. Returns the table's path.

    The defaults (a 288 x 320 x 320 mm phantom on a coarse grid, 4 x 10 lesions) take a few seconds; a lesion
    of 10 to 20 mm is then 2 to 4 voxels across, so use a finer grid where shape should count.

    Raises
    ------
    DagmanInputError
        For fewer than 1 case or lesion, bad phantom parameters, no room for the lesions, or a failed write.
    """
    if cases < 1 or lesions_per_case < 1:
        raise DagmanInputError(
            f"a cohort needs at least 1 case and 1 lesion in each, got {cases} and {lesions_per_case}"
        )
    from napari_dagman.core.io import write_volume  # SimpleITK, only when files are written

    folder = Path(folder)
    rows: list[list[object]] = []
    for case in range(cases):
        ct, lesions, _ = _cohort_case(seed, case, lesions_per_case, shape, spacing, noise_hu)
        patient = f"case_{case:03d}"
        name = f"{patient}.nii.gz"
        write_volume(ct, folder / name)
        for lesion in lesions:
            z, y, x = (round(v, 3) for v in lesion.centre_zyx_mm)
            rows.append([name, lesion.kind, x, y, z, lesion.diameter_mm, patient])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    writer.writerows(rows)
    table = folder / "lesions.csv"
    atomic_write_text(table, text.getvalue())
    return table

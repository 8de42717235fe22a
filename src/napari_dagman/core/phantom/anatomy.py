"""Painting the anatomy and `make_phantom`: a synthetic CT phantom of the trunk with organ labels: offline sample data, deterministic by seed.

The phantom is a smooth, slightly deformed torso from the upper chest down to the pelvis, in Hounsfield
units, with a label map on the same grid. It is meant to look enough like a plain (non-contrast) CT that
attention maps, masking strategies and organ clusters have something meaningful to work on: organs differ
by intensity, texture and position, edges have partial-volume blur, and the noise is spatially correlated.
Nothing in it comes from patient data.

Geometry (the package's convention, see :mod:`napari_dagman.core.volume`)
-----------------------------------------------------------------------
* Axis-aligned LPS, ``direction`` = identity: array axis 2 (x) runs to the patient's **left**, axis 1 (y)
  to the **posterior**, axis 0 (z) to the **superior**. So slice 0 is the pelvis (urinary bladder) and the
  last slice the upper chest (lungs), exactly like a real CT read through :func:`~napari_dagman.core.io.
  read_volume`, which reorients every scan to LPS. A model that sees both the phantom and real scans sees
  them the same way up.
* ``origin`` puts the centre of the volume at (0, 0, 0) mm, so the body is centred around x = y = 0.
* The anatomy is drawn in a canonical 288 x 320 x 320 mm (z, y, x) field of view, which the default
  ``shape * spacing`` is exactly; other fields of view stretch the canonical anatomy to fit, so any
  shape/spacing gives a whole torso.

The anatomy is compressed along z (about 29 cm from the upper thorax to the bladder, where a real trunk is
50 cm or more) and simplified, but the arrangement is plausible: liver under the right dome of the
diaphragm, spleen left-posterior, kidneys retroperitoneal beside the psoas muscles, the aorta in front of
and left of the spine, vertebrae T6..L5 stacked with discs between them, ribs 6..12 curving down from the
spine around the chest wall, and two lungs split into lobes by fissure planes, with branching vessels and
one solid nodule.

Label ids are TotalSegmentator v2 ids where the structure exists there and 200+ for phantom-only classes;
see :data:`PHANTOM_LABELS` and :data:`PHANTOM_HU`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.phantom.geometry import (
    _BASE_HU,
    _CAVITY_YC,
    _FAT_IN_CAVITY,
    _LUNG_IDS,
    _MIN_SHAPE,
    _TEXTURE_HU,
    AORTA,
    HEART,
    KIDNEY_LEFT,
    KIDNEY_RIGHT,
    LIVER,
    LUNG_LOWER_LEFT,
    LUNG_LOWER_RIGHT,
    LUNG_MIDDLE_RIGHT,
    LUNG_NODULE,
    LUNG_UPPER_LEFT,
    LUNG_UPPER_RIGHT,
    LUNG_VESSELS,
    PHANTOM_HU,
    PHANTOM_LABELS,
    RIB_LEFT_1,
    RIB_NUMBERS,
    RIB_RIGHT_1,
    SKELETAL_MUSCLE,
    SOFT_TISSUE,
    SPINAL_CORD,
    SPLEEN,
    SUBCUTANEOUS_FAT,
    URINARY_BLADDER,
    VERTEBRA_L5,
    VERTEBRA_LEVELS,
    _allow,
    _Body,
    _Box,
    _Canvas,
    _capsule,
    _ellipsoid,
    _Grid,
    _jit,
    _sigmoid,
    _superellipse_p,
    _wobble,
)
from napari_dagman.core.volume import Volume


def _paint_wall(canvas: _Canvas, grid: _Grid, rng: np.random.Generator) -> _Body:
    """Air, subcutaneous fat, the muscle wall and the cavity inside it (soft tissue); outlines vary along z."""
    z = grid.z.astype(np.float64)
    ax = 136.0 + _jit(rng, 3) + 8.0 * ((z - 135.0) / 150.0) ** 2 - 3.0 * np.exp(-(((z - 110.0) / 45.0) ** 2))
    ay = 99.0 + _jit(rng, 3) + 5.0 * np.exp(-(((z - 90.0) / 60.0) ** 2)) + 3.0 * ((z - 200.0) / 100.0) ** 2
    chest = _sigmoid((z - 180.0) / 15.0)
    fat = 19.0 + _jit(rng, 2) - 8.0 * chest  # thinner subcutaneous fat over the chest
    muscle = 9.0 + _jit(rng, 1) + 3.0 * chest
    p = _Body.P
    xp = _superellipse_p(grid.x.astype(np.float64), p)[None, None, :]

    def inside(depth: np.ndarray, yc: float) -> np.ndarray:
        dy = grid.y.astype(np.float64) - yc
        yp = _superellipse_p(dy / np.where(dy > 0, _Body.POSTERIOR, 1.0), p)[None, :, None]
        a_x = (ax - depth) ** -p
        a_y = (ay - depth) ** -p
        return (xp * a_x[:, None, None] + yp * a_y[:, None, None]).astype(np.float32) < 1.0

    # the layers are shifted back a little as they go in: fat is thicker over the belly than the back
    body = inside(np.zeros_like(z), 0.0)
    under_fat = inside(fat, 3.0)
    cavity = inside(fat + muscle, _CAVITY_YC)
    lab = np.where(
        cavity, SOFT_TISSUE, np.where(under_fat, SKELETAL_MUSCLE, np.where(body, SUBCUTANEOUS_FAT, 0))
    )
    canvas.lab[...] = lab.astype(np.uint8)
    canvas.hu[...] = _BASE_HU[canvas.lab]

    # diaphragm: two domes, the right one higher (the liver pushes it up), deepest at the back and sides
    yy, xx = grid.y[:, None].astype(np.float64), grid.x[None, :].astype(np.float64)
    right = 168.0 + _jit(rng, 3) + 28.0 * (1.0 - ((xx + 50.0) / 90.0) ** 2 - ((yy + 5.0) / 95.0) ** 2)
    left = 162.0 + _jit(rng, 3) + 26.0 * (1.0 - ((xx - 50.0) / 90.0) ** 2 - ((yy + 0.0) / 95.0) ** 2)
    dome = np.maximum(right, left).astype(np.float32)
    return _Body(ax=ax - fat - muscle, ay=ay - fat - muscle, yc=_CAVITY_YC, dome=dome)


def _paint_muscles(canvas: _Canvas, grid: _Grid, rng: np.random.Generator) -> None:
    """Paraspinal muscles behind the spine and the two psoas muscles beside the lumbar spine."""
    full = grid.full()
    dy = (grid.y - (86.0 + _jit(rng, 2)))[:, None]
    block = (np.abs(dy) / 34.0) ** 2.5 + (np.abs(grid.x[None, :]) / (46.0 + _jit(rng, 2))) ** 2.5 < 1.0
    canvas.paint(full, block[None], PHANTOM_HU[SKELETAL_MUSCLE], SKELETAL_MUSCLE, _allow(SOFT_TISSUE))
    top = 130.0 + _jit(rng, 4)
    box = grid.box((8.0, -60.0, -90.0), (top, 90.0, 90.0))
    if box is None:
        return
    below = np.clip(top - box.Z, 0.0, None)
    taper = np.sqrt(np.clip(below / 25.0, 0.0, 1.0))  # the psoas starts thin at the top (at T12)
    semi_x = (10.0 + 0.05 * below) * taper + 1e-3
    semi_y = (11.0 + 0.03 * below) * taper + 1e-3
    for side in (-1.0, 1.0):
        cx = side * (36.0 + 0.06 * below + _jit(rng, 1.5))
        r2 = ((box.X - cx) / semi_x) ** 2 + ((box.Y - 32.0) / semi_y) ** 2
        canvas.paint(box, r2 < 1.0, PHANTOM_HU[SKELETAL_MUSCLE], SKELETAL_MUSCLE, _allow(SOFT_TISSUE))


def _below_dome(box: _Box, body: _Body, margin: float) -> np.ndarray:
    return body.dome[box.sl[1], box.sl[2]][None] - margin > box.Z


def _above_dome(box: _Box, body: _Body, margin: float) -> np.ndarray:
    return body.dome[box.sl[1], box.sl[2]][None] + margin < box.Z


def _paint_abdomen(canvas: _Canvas, grid: _Grid, body: _Body, rng: np.random.Generator) -> None:
    """Liver (with darker vessels), spleen, kidneys (with sinus fat) and the urinary bladder."""
    cavity = _allow(SOFT_TISSUE)
    s = [1.0 + _jit(rng, 0.05) for _ in range(3)]
    liver = _ellipsoid(
        grid,
        (164.0 + _jit(rng, 4), -6.0 + _jit(rng, 4), -56.0 + _jit(rng, 4)),
        (40.0 * s[0], 74.0 * s[1], 70.0 * s[2]),
        angle=-0.25 + _jit(rng, 0.05),
        wobble=_wobble(rng, 0.06),
    )
    spine_x, spine_r = 14.0 + _jit(rng, 3), 48.0 + _jit(rng, 3)
    if liver is not None:
        box, r = liver
        # a curved medial border: the liver does not wrap around the aorta and the spine behind it
        clear = (box.X - spine_x) ** 2 + (box.Y - 48.0) ** 2 > spine_r**2
        mask = (r < 1.0) & _below_dome(box, body, 1.5) & clear
        canvas.paint(box, mask, PHANTOM_HU[LIVER], LIVER, cavity)
    left_lobe = _ellipsoid(
        grid,
        (178.0 + _jit(rng, 3), -36.0 + _jit(rng, 3), 4.0 + _jit(rng, 4)),
        (20.0, 26.0, 46.0 * (1.0 + _jit(rng, 0.06))),
        angle=0.2,
        wobble=_wobble(rng, 0.06),
    )
    if left_lobe is not None:
        box, r = left_lobe
        canvas.paint(box, (r < 1.0) & _below_dome(box, body, 1.5), PHANTOM_HU[LIVER], LIVER, cavity)

    # hepatic veins: darker tubes converging on the confluence below the right dome
    confluence = np.array([184.0 + _jit(rng, 2), 14.0 + _jit(rng, 2), -14.0 + _jit(rng, 2)])
    for target in ((170.0, -45.0, -60.0), (160.0, 8.0, -100.0), (138.0, -8.0, -45.0)):
        end = np.array(target) + np.array([_jit(rng, 5), _jit(rng, 5), _jit(rng, 5)])
        segments = [(confluence, end, 4.0)]
        for _ in range(2):
            start = confluence + rng.uniform(0.4, 0.8) * (end - confluence)
            tip = start + rng.normal(0.0, 1.0, 3) * np.array([10.0, 14.0, 14.0])
            segments.append((start, tip, 2.4))
        for a, b, radius in segments:
            tube = _capsule(grid, a, b, radius)
            if tube is not None:
                canvas.paint(tube[0], tube[1], 33.0, LIVER, _allow(LIVER))

    s = [1.0 + _jit(rng, 0.06) for _ in range(3)]
    spleen = _ellipsoid(
        grid,
        (158.0 + _jit(rng, 4), 36.0 + _jit(rng, 4), 74.0 + _jit(rng, 3)),
        (34.0 * s[0], 50.0 * s[1], 27.0 * s[2]),
        angle=0.6 + _jit(rng, 0.08),
        wobble=_wobble(rng, 0.08),
    )
    if spleen is not None:
        box, r = spleen
        canvas.paint(box, (r < 1.0) & _below_dome(box, body, 1.5), PHANTOM_HU[SPLEEN], SPLEEN, cavity)

    for side, label, z0 in ((-1.0, KIDNEY_RIGHT, 106.0), (1.0, KIDNEY_LEFT, 116.0)):
        centre = (z0 + _jit(rng, 4), 46.0 + _jit(rng, 3), side * (66.0 + _jit(rng, 3)))
        s = [1.0 + _jit(rng, 0.05) for _ in range(3)]
        kidney = _ellipsoid(
            grid,
            centre,
            (42.0 * s[0], 17.0 * s[1], 24.0 * s[2]),
            angle=side * 0.45,
            wobble=_wobble(rng, 0.05),
        )
        if kidney is None:
            continue
        box, r = kidney
        # perirenal fat: the fatty capsule that makes kidneys stand out on a plain CT
        capsule = _ellipsoid(
            grid, centre, (42.0 * s[0] + 7.0, 17.0 * s[1] + 7.0, 24.0 * s[2] + 7.0), angle=side * 0.45
        )
        if capsule is not None:
            canvas.paint(capsule[0], capsule[1] < 1.0, _FAT_IN_CAVITY, SOFT_TISSUE, cavity)
        # kidneys press into the liver and spleen rather than the other way round
        canvas.paint(box, r < 1.0, PHANTOM_HU[label], label, _allow(SOFT_TISSUE, LIVER, SPLEEN))
        # renal sinus fat at the hilum, which faces forwards and towards the spine
        sinus = _ellipsoid(grid, (centre[0], centre[1] - 6.0, centre[2] - side * 12.0), (20.0, 8.0, 10.0))
        if sinus is not None:
            canvas.paint(sinus[0], sinus[1] < 1.0, -70.0, label, _allow(label))

    s = [1.0 + _jit(rng, 0.06) for _ in range(3)]
    bladder = _ellipsoid(
        grid,
        (34.0 + _jit(rng, 3), -42.0 + _jit(rng, 3), _jit(rng, 3)),
        (30.0 * s[0], 36.0 * s[1], 46.0 * s[2]),
        wobble=_wobble(rng, 0.05),
    )
    if bladder is not None:
        box, r = bladder
        # perivesical fat around the bladder (the bladder itself is hard to see against bowel otherwise)
        canvas.paint(box, r < 1.25, _FAT_IN_CAVITY, SOFT_TISSUE, cavity)
        canvas.paint(box, r < 1.0, PHANTOM_HU[URINARY_BLADDER], URINARY_BLADDER, cavity)


def _paint_chest(canvas: _Canvas, grid: _Grid, body: _Body, rng: np.random.Generator) -> None:
    """Lungs split into lobes, then the heart on the diaphragm between them."""
    box = grid.box((float(body.dome.min()), -1e9, -1e9), (1e9, 1e9, 1e9))
    if box is None:
        return
    # fissures: the oblique one runs from high at the back to low at the front, the horizontal one (right
    # lung) cuts the middle lobe off the upper lobe
    oblique = 226.0 + _jit(rng, 4) + (0.42 + _jit(rng, 0.03)) * (box.Y - 10.0)
    horizontal = 246.0 + _jit(rng, 4)
    # lung density rises a little towards the back (gravity-dependent perfusion in a supine patient)
    lung_hu = PHANTOM_HU[LUNG_LOWER_LEFT] + 0.22 * box.Y
    above = _above_dome(box, body, 1.0)
    lower = oblique > box.Z
    for side in (-1.0, 1.0):
        cx, semi_x = side * (60.0 + _jit(rng, 2)), 75.0
        shape = (np.abs(box.X - cx) / semi_x) ** 2.4 + (np.abs(box.Y - 6.0) / 90.0) ** 2.4 < 1.0
        shape &= side * box.X > 5.0 + _jit(rng, 1)
        lung = above & shape
        allowed = _allow(SOFT_TISSUE, LIVER, SPLEEN)
        if side < 0:
            lobes = np.where(
                lower, LUNG_LOWER_RIGHT, np.where(horizontal > box.Z, LUNG_MIDDLE_RIGHT, LUNG_UPPER_RIGHT)
            )
        else:
            lobes = np.where(lower, LUNG_LOWER_LEFT, LUNG_UPPER_LEFT)
        lobes = np.broadcast_to(lobes, canvas.lab[box.sl].shape)
        for label in np.unique(lobes):
            canvas.paint(box, lung & (lobes == label), lung_hu, int(label), allowed)

    s = [1.0 + _jit(rng, 0.05) for _ in range(3)]
    heart = _ellipsoid(
        grid,
        (230.0 + _jit(rng, 4), -28.0 + _jit(rng, 4), 12.0 + _jit(rng, 4)),
        (38.0 * s[0], 40.0 * s[1], 50.0 * s[2]),
        angle=0.5 + _jit(rng, 0.05),
        wobble=_wobble(rng, 0.04),
    )
    if heart is not None:
        hbox, r = heart
        mask = (r < 1.0) & _above_dome(hbox, body, 2.0)
        canvas.paint(hbox, mask, PHANTOM_HU[HEART], HEART, _allow(SOFT_TISSUE, *_LUNG_IDS))


def _paint_aorta(canvas: _Canvas, grid: _Grid, rng: np.random.Generator) -> None:
    """The aorta: a tube along z in front of the spine, drifting left and back as it rises into the chest."""
    bottom = 44.0 + _jit(rng, 3)
    box = grid.box((bottom - 14.0, -30.0, -30.0), (1e9, 60.0, 60.0))
    if box is None:
        return
    thorax = _sigmoid((box.Z - 180.0) / 20.0)
    cx = 12.0 + _jit(rng, 2) + 14.0 * thorax
    cy = 6.0 + _jit(rng, 2) + 14.0 * thorax
    radius = 9.5 + _jit(rng, 0.5) + 2.5 * thorax
    # round lower end, where it would divide into the iliac arteries
    r2 = radius**2 - np.clip(bottom - box.Z, 0.0, None) ** 2
    mask = (box.X - cx) ** 2 + (box.Y - cy) ** 2 < r2
    canvas.paint(box, mask, PHANTOM_HU[AORTA], AORTA, _allow(SOFT_TISSUE, SKELETAL_MUSCLE, LIVER, *_LUNG_IDS))


def _paint_spine(canvas: _Canvas, grid: _Grid, rng: np.random.Generator) -> list[float]:
    """Vertebrae T6..L5 (cortex, cancellous bone, arch, processes), discs and the spinal canal.

    Returns the canonical z of each vertebral body centre, bottom to top (the ribs attach there).
    """
    back = 52.0 + _jit(rng, 1.5)  # posterior edge of the vertebral bodies
    centres = [24.0 * k + 12.0 + _jit(rng, 0.6) for k in range(len(VERTEBRA_LEVELS))]
    half = 9.25  # half height of a body; the 5.5 mm left between two bodies is the disc
    # canal radius shrinks from lumbar to thoracic; draw it as one tube through all levels
    box = grid.box((-1e9, back - 2.0, -40.0), (1e9, back + 30.0, 40.0))
    if box is not None:
        k = np.clip(box.Z / 24.0, 0.0, 11.0)
        rc = 9.0 - 0.14 * k
        canal_y = back + 1.0 + rc
        mask = box.X**2 + (box.Y - canal_y) ** 2 < rc**2
        canvas.paint(box, mask, PHANTOM_HU[SPINAL_CORD], SPINAL_CORD)
    for k, zc in enumerate(centres):
        label = VERTEBRA_L5 + k
        sx, sy = 24.0 - 0.8 * k + _jit(rng, 0.5), 17.0 - 0.45 * k + _jit(rng, 0.4)
        yb = back - sy
        rc = 9.0 - 0.14 * k
        canal_y = back + 1.0 + rc
        # disc below this body (the top one also gets one above)
        discs = [(zc - half - 6.0, zc - half)] + (
            [(zc + half, zc + half + 6.0)] if k == len(centres) - 1 else []
        )
        for z0, z1 in discs:
            dbox = grid.box((z0, yb - sy, -sx), (z1, back, sx))
            if dbox is not None:
                disc = ((dbox.X / sx) ** 2 + ((dbox.Y - yb) / sy) ** 2) < 1.0
                canvas.paint(dbox, disc, 85.0, 0)
        vbox = grid.box((zc - half, yb - sy, -sx), (zc + half, back, sx))
        if vbox is not None:
            dz = (vbox.Z - zc) / half
            waist = 1.0 - 0.06 * np.cos(dz * (math.pi / 2.0))  # bodies are slightly concave at the middle
            rxy = np.sqrt((vbox.X / (sx * waist)) ** 2 + ((vbox.Y - yb) / (sy * waist)) ** 2)
            inside = rxy < 1.0
            cortex = (rxy > 1.0 - 2.2 / min(sx, sy)) | (np.abs(vbox.Z - zc) > half - 1.6)
            canvas.paint(vbox, inside, np.where(cortex, 700.0, PHANTOM_HU[label]), label)
        # posterior elements: ring around the canal, transverse and spinous processes
        tp = 18.0 - 0.5 * k  # transverse processes are longer in the lumbar spine
        abox = grid.box(
            (zc - half - 3.0, canal_y - rc - 6.0, -(rc + 3.0 + tp)), (zc + half, back + 40.0, rc + 3.0 + tp)
        )
        if abox is None:
            continue
        dzc = np.abs(abox.Z - zc + 1.0)
        rr = np.sqrt(abox.X**2 + (abox.Y - canal_y) ** 2)
        ring = (rr >= rc) & (rr < rc + 5.0) & (dzc < 7.5)
        transverse = (
            (np.abs(abox.Y - canal_y + 1.0) < 3.0) & (np.abs(abox.X) > rc) & (np.abs(abox.X) < rc + 3.0 + tp)
        )
        transverse = transverse & (np.abs(abox.Z - zc) < 3.5)
        spinous = (np.abs(abox.X) < 3.5) & (canal_y + rc < abox.Y) & (canal_y + rc + 18.0 > abox.Y)
        spinous = spinous & (np.abs(abox.Z - (zc - 3.0)) < 6.0)
        canvas.paint(abox, ring | transverse | spinous, 500.0, label)
    return centres


def _paint_ribs(
    canvas: _Canvas, grid: _Grid, body: _Body, levels: list[float], rng: np.random.Generator
) -> None:
    """Ribs 6..12 on both sides: tubes that leave the spine, follow the chest wall and slope down to the front."""
    yy = (grid.y - body.yc)[:, None].astype(np.float64)
    xx = grid.x[None, :].astype(np.float64)
    phi = np.arctan2(np.abs(xx), yy)  # 0 at the back, pi at the front
    rho = np.hypot(xx, yy)
    sin_phi, cos_phi = np.sin(phi), np.cos(phi)
    p = _Body.P
    walls = _allow(SUBCUTANEOUS_FAT, SKELETAL_MUSCLE, SOFT_TISSUE)
    reach = {6: 2.5, 7: 2.45, 8: 2.35, 9: 2.2, 10: 2.05, 11: 1.7, 12: 1.3}  # floating ribs 11, 12 are short
    for n in RIB_NUMBERS:
        k = VERTEBRA_LEVELS.index(f"T{n}")
        z_head = levels[k] + 3.0
        drop = 28.0 + 3.0 * (n - 6) + _jit(rng, 2)
        phi_max = reach[n] + _jit(rng, 0.05)
        # the rib's centre line runs 4 mm outside the cavity, i.e. inside the muscle wall against the lung
        iz = int(np.clip(np.searchsorted(grid.z, z_head - drop / 2.0), 0, grid.z.size - 1))
        ax, ay = float(body.ax[iz]) + 4.0, float(body.ay[iz]) + 4.0
        ay_side = np.where(cos_phi > 0, ay * _Body.POSTERIOR, ay)
        radius = (np.abs(sin_phi / ax) ** p + np.abs(cos_phi / ay_side) ** p) ** (-1.0 / p)
        radial = (rho - radius).astype(np.float32)
        zc = (z_head + 5.0 * np.sin(1.2 * phi) - drop * (phi / phi_max) ** 2).astype(np.float32)
        along = (phi > 0.45) & (phi < phi_max)
        for side, first in ((-1.0, RIB_RIGHT_1), (1.0, RIB_LEFT_1)):
            label = first + n - 1
            box = grid.box(
                (z_head - drop - 10.0, -1e9, min(0.0, side * 1e9)), (z_head + 12.0, 1e9, max(0.0, side * 1e9))
            )
            if box is None:
                continue
            r2d = radial[box.sl[1], box.sl[2]][None]
            # the two sides are not mirror images: shift each rib up or down a little
            dz = box.Z - (zc[box.sl[1], box.sl[2]][None] + _jit(rng, 1.5))
            e = (r2d / 3.6) ** 2 + (dz / 5.5) ** 2
            mask = (e < 1.0) & along[box.sl[1], box.sl[2]][None]
            canvas.paint(box, mask, np.where(e < 0.3, 350.0, 650.0), label, walls)


def _branch(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    radius: float,
    depth: int,
    lateral: np.ndarray,
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """A random bifurcating tree of tube segments (start, end, radius)."""
    end = start + length * direction
    segments = [(start, end, radius)]
    if depth == 0:
        return segments
    helper = rng.standard_normal(3)
    perp = helper - (helper @ direction) * direction
    perp /= np.linalg.norm(perp) + 1e-9
    for sign in (1.0, -1.0):
        angle = rng.uniform(0.4, 0.85)
        child = math.cos(angle) * direction + sign * math.sin(angle) * perp + 0.15 * lateral
        child /= np.linalg.norm(child)
        segments += _branch(
            rng, end, child, length * rng.uniform(0.72, 0.86), radius * 0.75, depth - 1, lateral
        )
    return segments


def _paint_lung_detail(canvas: _Canvas, grid: _Grid, rng: np.random.Generator) -> None:
    """Branching pulmonary vessels from each hilum (only inside the lungs), then one solid nodule."""
    lungs = _allow(*_LUNG_IDS, LUNG_VESSELS)
    for side in (-1.0, 1.0):
        hilum = np.array([232.0 + _jit(rng, 3), 22.0 + _jit(rng, 3), side * (44.0 + _jit(rng, 2))])
        lateral = np.array([0.0, 0.0, side])
        trunks = (
            (0.9, 0.1, 0.4),
            (0.5, -0.6, 0.6),
            (0.05, -0.1, 1.0),
            (0.0, 0.6, 0.8),
            (-0.7, 0.5, 0.5),
            (-0.6, -0.5, 0.6),
        )
        for tz, ty, tx in trunks:
            d = np.array([tz, ty, side * tx]) + rng.normal(0.0, 0.1, 3)
            d /= np.linalg.norm(d)
            for a, b, radius in _branch(rng, hilum, d, 26.0, 4.5, 5, lateral):
                tube = _capsule(grid, a, b, radius)
                if tube is not None:
                    canvas.paint(tube[0], tube[1], PHANTOM_HU[LUNG_VESSELS], LUNG_VESSELS, lungs)

    # the nodule: a lobulated ball, 8-12 mm across, well inside one lung
    side_ids = (
        (LUNG_UPPER_RIGHT, LUNG_MIDDLE_RIGHT, LUNG_LOWER_RIGHT)
        if rng.integers(2) == 0
        else (LUNG_UPPER_LEFT, LUNG_LOWER_LEFT)
    )
    radius = float(rng.uniform(4.5, 6.0))
    wobble = _wobble(rng, 0.1)
    candidates = np.flatnonzero(_allow(*side_ids)[canvas.lab])
    if candidates.size == 0:
        return
    for index in rng.choice(candidates, size=min(60, candidates.size), replace=False):
        iz, iy, ix = np.unravel_index(int(index), grid.shape)
        centre = (float(grid.z[iz]), float(grid.y[iy]), float(grid.x[ix]))
        margin = _ellipsoid(grid, centre, (radius + 7.0,) * 3)
        if margin is None:
            continue
        mbox, r = margin
        # a whole ball of lung around it: not touching the wall, the heart or a large vessel
        if (
            not lungs[canvas.lab[mbox.sl][r < 1.0]].all()
            or (canvas.lab[mbox.sl][r < 0.8] == LUNG_VESSELS).mean() > 0.05
        ):
            continue
        ball = _ellipsoid(grid, centre, (radius,) * 3, wobble=wobble)
        if ball is not None:
            canvas.paint(ball[0], ball[1] < 1.0, PHANTOM_HU[LUNG_NODULE], LUNG_NODULE, lungs)
        return


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], sigma: tuple[float, ...]
) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation (spatially correlated)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="reflect")
    field /= max(float(field.std()), 1e-6)
    return field


def _finish(
    canvas: _Canvas, grid: _Grid, body: _Body, rng: np.random.Generator, noise_hu: float
) -> np.ndarray:
    """Texture, bowel pattern, partial-volume blur and correlated noise; returns HU as int16."""
    step = np.array(grid.step)
    hu, lab = canvas.hu, canvas.lab
    fine = _smooth_noise(rng, grid.shape, tuple(np.clip(1.5 / step, 0.6, None)))
    hu += _TEXTURE_HU[lab] * fine

    # abdominal soft tissue: bowel and mesentery at ~ +20 HU, with fat islands and a few gas pockets
    coarse = _smooth_noise(rng, grid.shape, tuple(np.clip(6.0 / step, 0.8, None)))
    soft = lab == SOFT_TISSUE
    # fat painted into the cavity on purpose (around kidneys, bladder) keeps its value; the rest is bowel
    hu[soft & (hu < -50.0)] += _TEXTURE_HU[SUBCUTANEOUS_FAT] * fine[soft & (hu < -50.0)]
    soft &= hu == PHANTOM_HU[SOFT_TISSUE]
    hu[soft] = (PHANTOM_HU[SOFT_TISSUE] + 14.0 * coarse + 4.0 * fine)[soft]
    fatty = soft & (coarse > 1.05)
    hu[fatty] = (-90.0 + 8.0 * fine)[fatty]
    gas = soft & (coarse < -2.3) & (grid.z[:, None, None] < body.dome[None] - 25.0)
    hu[gas] = -950.0

    # partial-volume edges: a slight blur (about half a voxel) of the sharp painted boundaries
    hu = ndimage.gaussian_filter(hu, (0.4, 0.55, 0.55), mode="nearest")
    if noise_hu > 0:
        hu += noise_hu * _smooth_noise(rng, grid.shape, (0.7, 0.7, 0.7))
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


# --- public API -------------------------------------------------------------------------------------------
def make_phantom(
    shape: tuple[int, int, int] = (96, 128, 128),
    spacing: tuple[float, float, float] = (3.0, 2.5, 2.5),
    seed: int = 0,
    *,
    noise_hu: float = 12.0,
) -> tuple[Volume, Volume]:
    """Generate a synthetic CT of the trunk and its organ label map.

    Parameters
    ----------
    shape : tuple of int
        Array shape (z, y, x). At least (8, 16, 16); the anatomy always fills the field of view.
    spacing : tuple of float
        Voxel spacing (z, y, x) in mm. The default shape and spacing give the canonical 288 x 320 x 320 mm
        field of view in which all sizes are true millimetres.
    seed : int
        Seed of every random choice (organ sizes and positions, boundary wobble, vessel trees, the nodule,
        texture and noise). The same seed and parameters give bit-identical arrays.
    noise_hu : float
        Standard deviation (HU) of the spatially correlated image noise; 0 for a noise-free phantom.

    Returns
    -------
    ct, labels : Volume
        ``ct`` holds HU as int16; ``labels`` (uint8) is on the same grid, with ``metadata["label_names"]``
        mapping each id present to its name (see :data:`PHANTOM_LABELS`). Both use axis-aligned LPS
        (identity direction; slice 0 is the pelvis, the last slice the chest) centred on (0, 0, 0) mm.

    Raises
    ------
    DagmanInputError
        For a shape smaller than (8, 16, 16), a non-positive spacing or a negative ``noise_hu``.
    """
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3 or any(s < m for s, m in zip(shape, _MIN_SHAPE, strict=True)):
        raise DagmanInputError(f"phantom shape must be (z, y, x) of at least {_MIN_SHAPE}, got {shape}")
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise DagmanInputError(f"phantom spacing must be 3 positive numbers (z, y, x mm), got {spacing}")
    if not (noise_hu >= 0 and math.isfinite(noise_hu)):
        raise DagmanInputError(f"noise_hu must be >= 0, got {noise_hu}")

    # separate streams: the anatomy of a seed does not change with the grid size or the noise level
    anatomy, texture = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))
    grid = _Grid.of(shape)  # type: ignore[arg-type]
    canvas = _Canvas(shape)  # type: ignore[arg-type]
    body = _paint_wall(canvas, grid, anatomy)
    _paint_muscles(canvas, grid, anatomy)
    _paint_abdomen(canvas, grid, body, anatomy)
    _paint_chest(canvas, grid, body, anatomy)
    _paint_aorta(canvas, grid, anatomy)
    levels = _paint_spine(canvas, grid, anatomy)
    _paint_ribs(canvas, grid, body, levels, anatomy)
    _paint_lung_detail(canvas, grid, anatomy)
    ct_array = _finish(canvas, grid, body, texture, float(noise_hu))

    origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(shape, spacing, strict=True))
    counts = np.bincount(canvas.lab.ravel(), minlength=256)
    names = {i: PHANTOM_LABELS[i] for i in np.flatnonzero(counts).tolist() if i != 0}
    common = {"synthetic": True, "phantom_seed": int(seed), "phantom_noise_hu": float(noise_hu)}
    ct = Volume(ct_array, spacing, origin, np.eye(3), {"name": "phantom_ct", "modality": "CT", **common})
    labels = Volume(
        canvas.lab, spacing, origin, np.eye(3), {"name": "phantom_labels", "label_names": names, **common}
    )
    return ct, labels

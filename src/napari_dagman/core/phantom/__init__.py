"""A synthetic CT phantom of the trunk with organ labels: offline sample data, deterministic by seed.

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

from napari_dagman.core.phantom.anatomy import make_phantom
from napari_dagman.core.phantom.geometry import (
    AORTA,
    CANONICAL_FOV,
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
    SAMPLE_FILE_PARAMS,
    SKELETAL_MUSCLE,
    SOFT_TISSUE,
    SPINAL_CORD,
    SPLEEN,
    SUBCUTANEOUS_FAT,
    URINARY_BLADDER,
    VERTEBRA_L5,
    VERTEBRA_LEVELS,
)
from napari_dagman.core.phantom.lesions import (
    LESION_CLASSES,
    Lesion,
    add_lesions,
    make_lesion_cohort,
)

__all__ = [
    "AORTA",
    "CANONICAL_FOV",
    "HEART",
    "KIDNEY_LEFT",
    "KIDNEY_RIGHT",
    "LESION_CLASSES",
    "LIVER",
    "LUNG_LOWER_LEFT",
    "LUNG_LOWER_RIGHT",
    "LUNG_MIDDLE_RIGHT",
    "LUNG_NODULE",
    "LUNG_UPPER_LEFT",
    "LUNG_UPPER_RIGHT",
    "LUNG_VESSELS",
    "Lesion",
    "PHANTOM_HU",
    "PHANTOM_LABELS",
    "RIB_LEFT_1",
    "RIB_NUMBERS",
    "RIB_RIGHT_1",
    "SAMPLE_FILE_PARAMS",
    "SKELETAL_MUSCLE",
    "SOFT_TISSUE",
    "SPINAL_CORD",
    "SPLEEN",
    "SUBCUTANEOUS_FAT",
    "URINARY_BLADDER",
    "VERTEBRA_L5",
    "VERTEBRA_LEVELS",
    "add_lesions",
    "make_lesion_cohort",
    "make_phantom",
]

"""The inference pipeline of a fine-tuned network, as MONAI transforms: one definition for `predict` and bundles.

`predict` and the MONAI Bundle that ``napari-dagman export --format monai-bundle`` writes run the same
transforms, built from the same config dicts (MONAI's bundle syntax, `model_transforms` and
`output_transforms`), so ``python -m monai.bundle run`` gives the labels `predict` gives with the same `inverse`:

1. ``Orientationd(axcodes="SPL")``: array axes z, y, x of the LPS volume (the axes the network was trained on;
   MONAI's own default, RAS x-y-z, would present it with transposed, mirrored crops);
2. ``Spacingd`` to the run's spacing (bilinear; ``scale_extent`` keeps the volume's extent, so the grid is the one
   training's SimpleITK resampling makes, to within a few micrometres);
3. ``ScaleIntensityRanged``: HU clipped to the run's window and scaled to [0, 1];
4. the network over MONAI's Gaussian-blended sliding window (``SlidingWindowInferer``);
5. back onto the input grid, one of `INVERSE_MODES` (``Invertd``, ``AsDiscreted`` arg-max), then class -> organ id.

The window attention is MONAI's own fused kernel (``use_flash_attention``), so a bundle needs nothing but MONAI.
A bundle's ``Invertd`` resamples its whole input grid at once; `predict` resamples the same way slab by slab of
input slices (`SLAB_BYTES`), so its memory does not grow with the class count and its labels match the bundle's
up to the float rounding of the sampling grid (a voxel in 10^5 or fewer, tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_dagman.core.config.jobs import INVERSE_MODES
from napari_dagman.core.volume import Volume, check_finite

#: The image and prediction keys of the pipeline's data dicts (MONAI's convention in bundles).
IMAGE_KEY = "image"
PRED_KEY = "pred"

#: Array axes of the network input, as MONAI orientation codes: z (to Superior), y (to Posterior), x (to Left),
#: i.e. a `Volume`'s own z-y-x order of an LPS volume.
MODEL_AXCODES = "SPL"

#: `INVERSE_MODES` (in `core.config`, for ``--inverse``): how the class scores go back from the model's grid onto
#: the input's, a choice MONAI's ``Invertd`` leaves open.
#: ``"probabilities"``: every class's softmax resampled (linear), the arg-max taken on the input grid: smooth
#: borders on a finer input grid, at the cost of K+1 input-grid channels in one ``Invertd`` (a bundle);
#: ``"labels"``: the arg-max taken on the model's grid, the one-channel class map resampled (nearest): the memory
#: of one channel whatever the class count, borders in steps of the model's voxels.

#: The bundle's default: MONAI alone cannot stream ``Invertd`` over classes, so with probabilities a bundle's
#: memory grows by one input-grid channel per class: on a 512 x 512 x 336 CT 4.5 GB peak with 5 organs, about
#: 23 GB with 60, against 2.9 GB with labels for both (`benchmarks/predict_memory.py`). Labels cost border
#: accuracy: an ideal model's 60 organs at 4.5 mm brought back onto 3 mm score a mean Dice of 0.84 against 0.93.
BUNDLE_INVERSE = "labels"
#: `predict`'s default: it streams slabs (1.3 GB peak on that CT with 5 or 60 organs, either way), so it keeps the
#: smoother borders; labels are faster with many classes (41 s against 220 s for 60 organs on 2 CPU cores).
PREDICT_INVERSE = "probabilities"

#: Bytes of class scores `predict` resamples onto the input grid at once (a slab of input slices, at least two):
#: what bounds its memory, whatever the class count.
SLAB_BYTES = 256 << 20
#: Bytes per voxel of a slab besides its scores: MONAI's sampling grid (``affine_grid``'s homogeneous base and
#: the coordinates, float32).
GRID_BYTES_PER_VOXEL = 28

#: Padding of the resampling to the model's spacing and of its inverse (``Spacingd``'s, which ``Invertd`` reuses).
PADDING_MODE = "border"

#: Floating type of the resampling (MONAI's default, float64, doubles the memory for no visible gain).
RESAMPLE_DTYPE = "float32"


# --- the transforms, as MONAI config dicts -------------------------------------------------------------------
def model_transforms(
    spacing: float | None, dims: int, hu_range: Sequence[float], key: str = IMAGE_KEY
) -> list[dict[str, Any]]:
    """Input (channel-first, any orientation) -> network input: z-y-x axes, the run's spacing, [0, 1]."""
    # the axis labels MONAI has always used, given explicitly: its default is deprecated (a FutureWarning on
    # every prediction) and would change to reading the MetaTensor's space
    transforms: list[dict[str, Any]] = [
        {"_target_": "Orientationd", "keys": key, "axcodes": MODEL_AXCODES, "labels": [["L", "R"], ["P", "A"], ["I", "S"]]}
    ]
    if spacing is not None:
        # 2D models keep the slice spacing (a non-positive pixdim keeps the input's)
        pixdim = [float(spacing)] * 3 if dims == 3 else [-1.0, float(spacing), float(spacing)]
        transforms.append(
            {
                "_target_": "Spacingd",
                "keys": key,
                "pixdim": pixdim,
                "mode": "bilinear",
                "padding_mode": PADDING_MODE,
                # the volume's extent is kept, as training's SimpleITK resampling keeps it: the same grid
                "scale_extent": True,
                "align_corners": True,  # what MONAI pairs with scale_extent (it warns otherwise)
                "dtype": f"$numpy.{RESAMPLE_DTYPE}",
            }
        )
    transforms.append(
        {
            "_target_": "ScaleIntensityRanged",
            "keys": key,
            "a_min": float(hu_range[0]),
            "a_max": float(hu_range[1]),
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        }
    )
    return transforms


def invert_transform(preprocessing: str, *, nearest: bool = False) -> dict[str, Any]:
    """``Invertd`` of the prediction onto the input grid: linear for probabilities, nearest for a class map."""
    return {
        "_target_": "Invertd",
        "keys": PRED_KEY,
        "transform": preprocessing,
        "orig_keys": IMAGE_KEY,
        "nearest_interp": nearest,
        "to_tensor": True,
    }


def check_inverse(inverse: str) -> str:
    """``inverse``, if it is one of `INVERSE_MODES`."""
    if inverse not in INVERSE_MODES:
        raise ValueError(f"inverse must be one of {', '.join(INVERSE_MODES)}, got {inverse!r}")
    return inverse


def output_transforms(
    label_ids: Sequence[int], preprocessing: str, inverse: str = BUNDLE_INVERSE
) -> list[dict[str, Any]]:
    """Logits (K+1 channels) -> organ ids on the input grid; ``preprocessing`` names the transform to invert,
    ``inverse`` is one of `INVERSE_MODES`."""
    argmax = {"_target_": "AsDiscreted", "keys": PRED_KEY, "argmax": True}
    if check_inverse(inverse) == "labels":
        # the arg-max of the logits is the softmax's: no softmax needed on the model's grid
        back = [argmax, invert_transform(preprocessing, nearest=True)]
    else:
        softmax = {"_target_": "Activationsd", "keys": PRED_KEY, "softmax": True}
        back = [softmax, invert_transform(preprocessing), argmax]
    return [
        *back,
        {
            "_target_": "MapLabelValued",
            "keys": PRED_KEY,
            "orig_labels": list(range(len(label_ids) + 1)),
            "target_labels": [0, *(int(i) for i in label_ids)],
            "dtype": f"$numpy.{label_dtype(label_ids)}",
        },
    ]


def sliding_window(roi_size: Sequence[int], overlap: float, sw_batch_size: int) -> dict[str, Any]:
    """MONAI's Gaussian-blended sliding window over ``roi_size`` windows (z, y, x), as a ``SlidingWindowInferer``."""
    return {
        "_target_": "SlidingWindowInferer",
        "roi_size": [int(r) for r in roi_size],
        "sw_batch_size": int(sw_batch_size),
        "overlap": float(overlap),
        "mode": "gaussian",
    }


def label_dtype(label_ids: Sequence[int]) -> str:
    """The integer type of a label map of these ids (as `LabelMap.to_labels` writes it)."""
    return "uint8" if max(label_ids, default=0) <= 255 else "uint16"


def instantiate(config: Any, **refs: Any) -> Any:
    """Build MONAI objects from config dicts; ``refs`` fills ``@name`` references (e.g. a transform to invert)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({"imports": ["$import numpy"], "item": config, **refs})
    return parser.get_parsed_content("item")


# --- predict's side ----------------------------------------------------------------------------------------------
def volume_affine(volume: Volume) -> np.ndarray:
    """MONAI's affine of a `Volume` (array index z, y, x -> RAS millimetres)."""
    lps_zyx = np.eye(4)
    lps_zyx[:3, :3] = volume.direction * np.asarray(volume.spacing)[None, :]
    lps_zyx[:3, 3] = volume.origin
    to_ras_xyz = np.zeros((4, 4))  # reverse z-y-x to x-y-z, then LPS to RAS
    to_ras_xyz[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.eye(3)[::-1]
    to_ras_xyz[3, 3] = 1.0
    return to_ras_xyz @ lps_zyx


def volume_to_metatensor(volume: Volume) -> Any:
    """A `Volume` as MONAI's channel-first float32 MetaTensor (what ``LoadImaged`` + ``EnsureChannelFirstd`` give)."""
    from monai.data import MetaTensor

    array = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None]
    return MetaTensor(array, affine=torch.from_numpy(volume_affine(volume)))


def to_model_space(
    image: Volume, spacing: float | None, dims: int, hu_range: Sequence[float]
) -> tuple[dict, Any]:
    """The data dict after `model_transforms` (``data["image"]`` is (1, z, y, x)) and the transform itself."""
    check_finite(image, str(image.metadata.get("name", "image")))
    preprocessing = instantiate(
        {"_target_": "Compose", "transforms": model_transforms(spacing, dims, hu_range)}
    )
    return preprocessing({IMAGE_KEY: volume_to_metatensor(image)}), preprocessing


def slabs(shape: Sequence[int], channels: int) -> list[tuple[int, int]]:
    """(first, stop) input slices (array axis 0) of each resampled slab: `SLAB_BYTES` of ``channels`` float32
    scores and their grid, and at least two slices (``align_corners`` normalises by the size less one)."""
    per_slice = int(np.prod(shape[1:])) * (4 * channels + GRID_BYTES_PER_VOXEL)
    step = max(2, SLAB_BYTES // per_slice)
    starts = list(range(0, int(shape[0]), step))
    if len(starts) > 1 and shape[0] - starts[-1] < 2:
        starts.pop()  # a last single slice joins the slab before it
    return [(a, b) for a, b in zip(starts, [*starts[1:], int(shape[0])], strict=True)]


def classes_on_input_grid(
    image: Volume, model_image: Any, logits: torch.Tensor, inverse: str = PREDICT_INVERSE
) -> np.ndarray:
    """Class (z, y, x; uint8, or uint16 past 255 classes) on ``image``'s grid of the ``logits`` on the grid of
    ``model_image`` (the MetaTensor after `model_transforms`), brought back as `output_transforms` do (``inverse``).

    ``Invertd`` would resample the whole input grid at once, with a sampling grid of 28 bytes per voxel (2.5 GB
    for a 512 x 512 x 336 CT) and, for probabilities, every class: here MONAI's ``SpatialResample`` (what
    ``Invertd`` runs, with its settings) fills a slab of input slices at a time (`slabs`), directly in the
    input's orientation. Ties go to the first class, as ``AsDiscreted``'s ``torch.argmax``.
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    if check_inverse(inverse) == "labels":
        scores = torch.argmax(logits, dim=0, keepdim=True).to(torch.float32)  # AsDiscreted's arg-max
        # Invertd's nearest_interp resets align_corners, which SpatialResample then takes as False
        resample = SpatialResample(mode="nearest", padding_mode=PADDING_MODE, align_corners=False)
    else:
        scores = torch.softmax(logits, dim=0)
        resample = SpatialResample(mode="bilinear", padding_mode=PADDING_MODE, align_corners=True)
    source = MetaTensor(scores, affine=model_image.affine)
    affine = torch.from_numpy(volume_affine(image))
    shape = tuple(int(n) for n in image.shape)
    classes = np.empty(shape, dtype=np.uint8 if logits.shape[0] <= 256 else np.uint16)
    for first, stop in slabs(shape, scores.shape[0]):
        slab = affine.clone()
        slab[:3, 3] += affine[:3, 0] * first  # the slab's first slice as its origin
        part = resample(source, dst_affine=slab, spatial_size=(stop - first, *shape[1:]), dtype=torch.float32)
        part = part.as_tensor() if isinstance(part, MetaTensor) else part
        top = part[0] if inverse == "labels" else torch.argmax(part, dim=0)
        classes[first:stop] = top.numpy()  # cast on assignment: the class values are exact
        del part, top
    return classes


def use_monai_fused_attention(net: nn.Module, enabled: bool) -> None:
    """MONAI's own ``scaled_dot_product_attention`` window attention (``use_flash_attention``), or the explicit
    softmax: the kernel a bundle's SwinUNETR runs too, so `predict` and the bundle compute the same numbers."""
    from monai.networks.nets.swin_unetr import WindowAttention

    for module in net.modules():
        if isinstance(module, WindowAttention):
            module.use_flash_attention = enabled

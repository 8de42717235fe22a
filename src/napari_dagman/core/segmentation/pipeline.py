"""The inference pipeline of a fine-tuned network, as MONAI transforms: one definition for `predict` and bundles.

`predict` and the MONAI Bundle that ``napari-dagman export --format monai-bundle`` writes run the same
transforms, built from the same config dicts (MONAI's bundle syntax, `model_transforms` and
`output_transforms`), so ``python -m monai.bundle run`` gives the labels `predict` gives, voxel for voxel:

1. ``Orientationd(axcodes="SPL")``: array axes z, y, x of the LPS volume (the axes the network was trained on;
   MONAI's own default, RAS x-y-z, would present it with transposed, mirrored crops);
2. ``Spacingd`` to the run's spacing (bilinear; ``scale_extent`` keeps the volume's extent, so the grid is the one
   training's SimpleITK resampling makes, to within a few micrometres);
3. ``ScaleIntensityRanged``: HU clipped to the run's window and scaled to [0, 1];
4. the network over MONAI's Gaussian-blended sliding window (``SlidingWindowInferer``);
5. softmax, then ``Invertd``: class probabilities resampled (bilinear) back onto the input grid *before*
   the arg-max, so borders stay smooth on a finer input grid; ``AsDiscreted`` arg-max; class -> organ id.

The window attention is MONAI's own fused kernel (``use_flash_attention``), so a bundle needs nothing but MONAI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_dagman.core.volume import Volume, check_finite

#: The image and prediction keys of the pipeline's data dicts (MONAI's convention in bundles).
IMAGE_KEY = "image"
PRED_KEY = "pred"

#: Array axes of the network input, as MONAI orientation codes: z (to Superior), y (to Posterior), x (to Left),
#: i.e. a `Volume`'s own z-y-x order of an LPS volume.
MODEL_AXCODES = "SPL"

#: Classes resampled back onto the input grid per pass: the full-resolution probabilities of many organs do not
#: fit in memory at once (every pass computes each class exactly as one pass over all classes would).
CLASSES_PER_PASS = 4

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
                "padding_mode": "border",
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


def invert_transform(preprocessing: str) -> dict[str, Any]:
    """``Invertd`` of the class probabilities onto the input grid (bilinear, not nearest: before the arg-max)."""
    return {
        "_target_": "Invertd",
        "keys": PRED_KEY,
        "transform": preprocessing,
        "orig_keys": IMAGE_KEY,
        "nearest_interp": False,
        "to_tensor": True,
    }


def output_transforms(label_ids: Sequence[int], preprocessing: str) -> list[dict[str, Any]]:
    """Logits (K+1 channels) -> organ ids on the input grid; ``preprocessing`` names the transform to invert."""
    return [
        {"_target_": "Activationsd", "keys": PRED_KEY, "softmax": True},
        invert_transform(preprocessing),
        {"_target_": "AsDiscreted", "keys": PRED_KEY, "argmax": True},
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


def classes_on_input_grid(data: dict, logits: torch.Tensor, preprocessing: Any) -> np.ndarray:
    """Arg-max class (z, y, x) on the input grid of softmax(``logits``) resampled back by ``preprocessing``'s inverse.

    The bundle's `output_transforms` do the same over all classes at once; here `CLASSES_PER_PASS` classes are
    resampled at a time and the arg-max is kept as it goes (ties go to the first class, as ``torch.argmax``).
    """
    from monai.data import MetaTensor

    probs = torch.softmax(logits, dim=0)
    invert = instantiate(invert_transform("@preprocessing"), preprocessing=preprocessing)
    best: torch.Tensor | None = None
    classes: torch.Tensor | None = None
    for first in range(0, probs.shape[0], CLASSES_PER_PASS):
        # a MetaTensor, as the bundle's prediction is: Invertd passes plain tensors by without a trace
        chunk = MetaTensor(probs[first : first + CLASSES_PER_PASS])
        part = invert({**data, PRED_KEY: chunk})[PRED_KEY]
        part = part.as_tensor() if hasattr(part, "as_tensor") else part  # plain tensor: no metadata to carry
        top, index = part.max(dim=0)  # the first maximum within the pass
        if best is None:
            best, classes = top, index
        else:
            better = top > best  # strictly: an equal later class does not take over
            best = torch.where(better, top, best)
            classes = torch.where(better, index + first, classes)
    return classes.numpy()  # type: ignore[union-attr]


def use_monai_fused_attention(net: nn.Module, enabled: bool) -> None:
    """MONAI's own ``scaled_dot_product_attention`` window attention (``use_flash_attention``), or the explicit
    softmax: the kernel a bundle's SwinUNETR runs too, so `predict` and the bundle compute the same numbers."""
    from monai.networks.nets.swin_unetr import WindowAttention

    for module in net.modules():
        if isinstance(module, WindowAttention):
            module.use_flash_attention = enabled

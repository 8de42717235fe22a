"""Per-view augmentation of pretraining crops with MONAI transforms: each view gets its own random draw.

Why: self-distillation and contrastive objectives learn what stays the same between two views. Two crops of one
CT cut from nearly the same place with the same intensities (what this project did before) differ in almost
nothing, so after DINO's centring there is nothing left to sharpen and the targets go uniform (measured: teacher
target entropy 0.97 of the maximum by step 25). DINO, iBOT, BYOL and MONAI's SwinUNETR pretraining all change
intensity and geometry per view. The transforms here are the CT counterparts of DINO's colour jitter, blur and
flips, sized for CT (model intensities are HU mapped to [0, 1] over the training window):

* intensity scale and shift, ``x * (1 + u) + v`` with u, v in +-``intensity`` (always): scanner calibration,
  contrast phase and window shifts;
* gamma contrast with gamma in [1 / (1 + c), 1 + c] (probability 0.5): soft-tissue contrast differs between
  kernels and phases;
* Gaussian noise of std up to ``noise`` (probability 0.3): dose;
* Gaussian blur of sigma up to ``blur`` voxels (probability 0.2): reconstruction kernel and slice thickness;
* mirroring left-right (the last array axis) with probability ``flip``: off by default, because laterality is
  anatomy in CT (liver right, spleen left) and a mirrored body is not a scan a model will meet;
* a small rotation (up to ``rotate`` degrees about each axis) and zoom (+-``zoom``), probability 0.5, edges
  extended by their border values (no black corners the model could learn to spot).

Determinism (exact resume, distinct views): every transform of a view is seeded by (run seed, step, rank, sample,
view, transform index), so step ``k`` draws the same augmentations in an uninterrupted run and in one resumed at
``k``, and a high-resolution target (MIRAM) can repeat a view's geometric and intensity draws on its finer grid
with `Augmentation.apply(..., only_consistent=True)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Probabilities of the transforms that are not always applied (see the module docstring for why each is there).
CONTRAST_PROB, NOISE_PROB, BLUR_PROB, AFFINE_PROB = 0.5, 0.3, 0.2, 0.5


@dataclass(frozen=True)
class AugmentSettings:
    """Strengths of the per-view augmentation (0 switches a transform off)."""

    intensity: float = 0.03
    contrast: float = 0.0
    noise: float = 0.02
    blur: float = 1.0
    flip: float = 0.0
    rotate: float = 10.0
    zoom: float = 0.1

    @property
    def active(self) -> bool:
        return any(v > 0 for v in (self.intensity, self.contrast, self.noise, self.blur, self.flip, self.rotate, self.zoom))


def view_seed(seed: int, step: int, rank: int, sample: int, view: int) -> int:
    """A 32-bit seed for one view of one sample of one step (MONAI's RandomState takes 32 bits)."""
    return int(np.random.SeedSequence([seed, 15485863, step, rank, sample, view]).generate_state(1)[0])


class Augmentation:
    """MONAI array transforms for ``dims``-D crops (channel first), each view seeded on its own.

    ``apply(crop, seed)`` returns a float32 array of the same shape. Transforms are built once; their random state
    is reset per view, so the object holds no state between calls that matters for reproducibility.
    """

    def __init__(self, settings: AugmentSettings, dims: int) -> None:
        from monai.transforms import (
            RandAdjustContrast,
            RandAffine,
            RandFlip,
            RandGaussianNoise,
            RandGaussianSmooth,
            RandScaleIntensity,
            RandShiftIntensity,
        )

        s = settings
        self.settings, self.dims = s, dims
        # (name, transform, consistent): consistent transforms draw parameters that do not depend on the array's
        # size, so they can be repeated on a finer grid of the same region; noise and blur are not repeated there
        steps: list[tuple[str, object, bool]] = []
        if s.intensity > 0:
            steps.append(("scale", RandScaleIntensity(factors=s.intensity, prob=1.0), True))
            steps.append(("shift", RandShiftIntensity(offsets=s.intensity, prob=1.0), True))
        if s.contrast > 0:
            gamma = (1.0 / (1.0 + s.contrast), 1.0 + s.contrast)
            steps.append(("contrast", RandAdjustContrast(prob=CONTRAST_PROB, gamma=gamma), True))
        if s.noise > 0:
            steps.append(("noise", RandGaussianNoise(prob=NOISE_PROB, mean=0.0, std=s.noise), False))
        if s.blur > 0:
            sigma = (0.25, max(0.25, s.blur))
            blur = RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=BLUR_PROB)
            steps.append(("blur", blur, False))
        if s.flip > 0:
            steps.append(("flip", RandFlip(prob=s.flip, spatial_axis=dims - 1), True))
        if s.rotate > 0 or s.zoom > 0:
            angle = math.radians(s.rotate)
            rotate = (angle,) * 3 if dims == 3 else (angle,)
            zoom = (s.zoom,) * dims
            affine = RandAffine(
                prob=AFFINE_PROB,
                rotate_range=rotate,
                scale_range=zoom,
                mode="bilinear",
                padding_mode="border",
                cache_grid=False,
            )
            steps.append(("affine", affine, True))
        self.steps = steps

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.steps]

    def apply(self, crop: np.ndarray, seed: int, *, only_consistent: bool = False) -> np.ndarray:
        """The augmented crop (channel first, (1, *spatial)); ``only_consistent`` skips noise and blur."""
        import torch

        x: object = crop
        # the sampler runs inside the training step's bf16 autocast; the affine's matrices must stay fp32
        # (MONAI cannot convert a bf16 matrix, and a bf16 grid would shift voxels by up to a percent)
        with torch.autocast("cpu", enabled=False):
            for index, (_, transform, consistent) in enumerate(self.steps):
                # each transform its own seed from the view's: the same draw whatever the other transforms did
                transform.set_random_state(seed=int((seed + 7919 * (index + 1)) % (2**32)))
                if only_consistent and not consistent:
                    continue
                x = transform(x)
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def augment_views(
    augmentation: Augmentation | None, crops: Sequence[np.ndarray], seeds: Sequence[int], **kwargs: bool
) -> list[np.ndarray]:
    """Each crop (spatial only) augmented with its own seed; unchanged without an augmentation."""
    if augmentation is None:
        return list(crops)
    return [augmentation.apply(c[None], s, **kwargs)[0] for c, s in zip(crops, seeds, strict=True)]

"""One crop: its class attention and the mask every strategy would draw, as training draws them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from napari_dagman.core.data import crop_around, model_volume
from napari_dagman.core.diversity import head_diversity
from napari_dagman.core.masking import attention_to_cells, make_mask, random_mask, strategy_names
from napari_dagman.core.models.encoder import cell_stage_token_mask, cell_token_mask
from napari_dagman.core.volume import Volume, grid_placement

if TYPE_CHECKING:
    from napari_dagman.core.checkpoint import PretrainedEncoder


#: The mask previews offered, in display order (the noisy teacher is attention-high after input dropout).
PREVIEW_STRATEGIES: tuple[str, ...] = (
    "random",
    "block",
    "attention-high",
    "attention-low",
    "attention-hint",
    "noisy-teacher",
)


@dataclass
class CropPreview:
    """A crop of the model volume, its class attention and the masks of each strategy, in physical space."""

    image: np.ndarray  # (z, y, x) model intensities; z = 1 for a 2D model
    image_scale: list[float]
    image_translate: list[float]
    attention: np.ndarray  # (heads, *token grid) relative attention
    attention_scale: list[float]
    attention_translate: list[float]
    masks: dict[str, np.ndarray]  # strategy -> (*cell grid) uint8
    #: cells the noisy teacher dropped from its input when it drew the ``noisy-teacher`` mask
    teacher_dropped: np.ndarray
    mask_scale: list[float]
    mask_translate: list[float]
    diversity: dict[str, Any]
    start: tuple[int, int, int]  # crop start in the model volume (z, y, x)


def crop_preview(
    pretrained: PretrainedEncoder,
    volume: Volume,
    center: Sequence[float] | None = None,
    *,
    ratio: float = 0.6,
    mask_cell: int | None = None,
    noise_rate: float = 0.2,
    hint_fraction: float = 0.1,
    hint_pool: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> CropPreview:
    """Attention and mask previews for the crop around a physical point (default: the body's centre).

    ``center`` is a physical (napari world) position z, y, x in mm. The masks use the same generators as
    training; ``noisy-teacher`` is attention-high on the attention the encoder gives when ``noise_rate`` of
    the cells are dropped from its input (DAGMaN's teacher).
    """
    arch = pretrained.arch
    roi, token = pretrained.roi, arch.attention_stride
    cell = mask_cell or int(pretrained.run_config.get("mask_cell", token))
    pv = model_volume(volume, dims=arch.dims, spacing=pretrained.spacing, hu_range=pretrained.hu_range)
    image, start = crop_around(pv, center, roi, arch.dims)
    x = torch.from_numpy(image if arch.dims == 3 else image[0])[None, None]
    if arch.dims == 3:
        factor_cells, factor_tokens = (cell,) * 3, (token,) * 3
    else:
        factor_cells, factor_tokens = (1, cell, cell), (1, token, token)
    encoder = pretrained.encoder.to(device)
    with torch.no_grad():
        clean = encoder(x.to(device))
    grid = clean.grid
    cells = (roi // cell,) * arch.dims
    attention = clean.attention.float().cpu()
    mean_cells = attention_to_cells(attention.mean(1).reshape(1, *grid), cells)

    masks: dict[str, np.ndarray] = {}
    for strategy in strategy_names():
        # each strategy draws from its own stream seeded by `seed`: the mask training draws for this crop with
        # a generator of that seed (`MaskedMethod.choose_mask`), not one that depends on the tiles before it
        m = make_mask(
            strategy,
            batch=1,
            grid=cells,
            ratio=ratio,
            attention=mean_cells,
            generator=torch.Generator().manual_seed(seed),
            hint_fraction=hint_fraction,
            hint_pool=hint_pool,
        )
        masks[strategy] = m[0].numpy().astype(np.uint8)
    # the noisy teacher as in training (methods/dagman.py): drop cells, leave their tokens out of the class
    # attention, rank the seen cells and hide the dropped ones at the same ratio; its own seeded stream
    noisy_gen = torch.Generator().manual_seed(seed)
    dropped = random_mask(1, cells, noise_rate, noisy_gen)
    with torch.no_grad():
        noisy = encoder(
            x.to(device),
            cell_token_mask(dropped, cell, arch.patch_size, arch.dims).to(device),
            attention_ignore=cell_stage_token_mask(dropped, cell, token, arch.dims).to(device)
            if bool(dropped.any())
            else None,
        )
    noisy_cells = attention_to_cells(noisy.attention.float().cpu().mean(1).reshape(1, *grid), cells)
    masks["noisy-teacher"] = (
        make_mask(
            "attention-high",
            batch=1,
            grid=cells,
            ratio=ratio,
            attention=noisy_cells,
            generator=noisy_gen,
            unseen=dropped,
        )[0]
        .numpy()
        .astype(np.uint8)
    )
    teacher_dropped = dropped[0].numpy().astype(np.uint8)

    rel = (attention[0] * attention.shape[-1]).reshape(attention.shape[1], *grid).numpy()
    if arch.dims == 2:
        rel = rel[:, None]
        masks = {k: v[None] for k, v in masks.items()}
        teacher_dropped = teacher_dropped[None]
    origin = pv.index_to_physical(start)
    image_scale = list(pv.spacing)
    mask_scale, mask_translate = grid_placement(origin, pv.spacing, factor_cells)
    att_scale, att_translate = grid_placement(origin, pv.spacing, factor_tokens)
    return CropPreview(
        image=np.asarray(image, np.float32),
        image_scale=image_scale,
        image_translate=[float(o) for o in origin],
        attention=rel.astype(np.float32),
        attention_scale=att_scale,
        attention_translate=att_translate,
        masks=masks,
        teacher_dropped=teacher_dropped,
        mask_scale=mask_scale,
        mask_translate=mask_translate,
        diversity=head_diversity(attention),
        start=start,
    )


def save_preview_figure(
    preview: CropPreview, path: str | Path, *, title: str = "", attention_panel: bool = True
) -> None:
    """PNG of the crop's middle axial slice: the mean attention (when it is attention) and each strategy's mask
    side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    z = preview.image.shape[0] // 2
    image = preview.image[z]
    token = int(round(preview.attention_scale[-1] / preview.image_scale[-1]))
    cell = int(round(preview.mask_scale[-1] / preview.image_scale[-1]))
    token_z = min(
        preview.attention.shape[1] - 1,
        z // max(1, int(round(preview.attention_scale[0] / preview.image_scale[0]))),
    )
    cell_z = min(
        next(iter(preview.masks.values())).shape[0] - 1,
        z // max(1, int(round(preview.mask_scale[0] / preview.image_scale[0]))),
    )
    attention = np.kron(preview.attention.mean(axis=0)[token_z], np.ones((token, token)))
    panels = [("mean attention", attention, "inferno")] if attention_panel else []
    panels += [(name, np.kron(mask[cell_z], np.ones((cell, cell))), "Reds") for name, mask in preview.masks.items()]
    fig = Figure(figsize=(2.2 * len(panels), 2.6), tight_layout=True)
    FigureCanvasAgg(fig)
    for i, (name, overlay, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if cmap == "Reds":  # hidden cells in red, visible cells untouched
            ax.imshow(np.ma.masked_equal(overlay, 0), cmap=cmap, vmin=0, vmax=1.2, alpha=0.55)
        else:
            ax.imshow(overlay, cmap=cmap, alpha=0.5)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(str(path), dpi=110)

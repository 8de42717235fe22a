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
from napari_dagman.core.masking import (
    MaskRecipe,
    attention_to_cells,
    draw_masks,
    get_strategy,
    make_mask,
    random_mask,
    strategy_names,
)
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
#: The key of the mask drawn with the run's own recipe (strategy, ratio, jitter, masking probability, teacher noise).
RUN_MASK = "run"


@dataclass(frozen=True)
class PreviewRecipe:
    """What a run's masks are: its `MaskRecipe`, its teacher's noise, and whether it hides cells and has a teacher
    (its capabilities). Read from the run's config (`of_run`), so the explorer previews what the run drew."""

    masks: MaskRecipe = MaskRecipe()
    teacher_noise: str = "none"
    noise_rate: float = 0.0
    cell_masks: bool = True
    has_teacher: bool = False

    @classmethod
    def of_run(cls, run_config: dict[str, Any]) -> PreviewRecipe:
        """The recipe in a pretraining run's config.json (its method options and capabilities)."""
        method = str(run_config.get("method", ""))
        options = dict(run_config.get(method) or {}) if isinstance(run_config.get(method), dict) else {}
        caps = run_config.get("capabilities") or {}
        masks = MaskRecipe(
            strategy=str(options.get("mask_strategy", "random")),
            ratio=float(options.get("mask_ratio", 0.6)),
            jitter=float(options.get("mask_ratio_jitter", 0.0)),
            masking_prob=float(options.get("masking_prob", 1.0)),
            hint_fraction=float(options.get("hint_fraction", 0.1)),
            hint_pool=float(options.get("hint_pool", 0.1)),
        )
        return cls(
            masks=masks,
            teacher_noise=str(options.get("teacher_noise", "none")),
            noise_rate=float(options.get("noise_rate", 0.0) or 0.0),
            cell_masks=bool(caps.get("cell_masks", "mask_strategy" in options)),
            has_teacher=bool(caps.get("has_teacher", False)),
        )

    def replace(self, **changes: Any) -> PreviewRecipe:
        from dataclasses import replace

        return replace(self, **changes)

    def describe(self) -> str:
        """E.g. "attention-high, ratio 0.6, from a teacher that drops 20% of the cells"."""
        text = self.masks.describe()
        if self.teacher_noise == "input-dropout" and self.noise_rate > 0:
            text += f", from a teacher that drops {self.noise_rate:.0%} of the cells"
        elif self.teacher_noise == "gaussian" and self.noise_rate > 0:
            text += f", from a teacher with feature noise {self.noise_rate:g}"
        return text


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
    #: how the run draws its masks (the recipe of the `RUN_MASK` preview), in words
    recipe: str = ""


def crop_preview(
    pretrained: PretrainedEncoder,
    volume: Volume,
    center: Sequence[float] | None = None,
    *,
    recipe: PreviewRecipe | None = None,
    strategies: str = "run",
    mask_cell: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> CropPreview:
    """Attention and mask previews for the crop around a physical point (default: the body's centre).

    ``center`` is a physical (napari world) position z, y, x in mm. ``recipe`` (default: the run's own,
    `PreviewRecipe.of_run`) draws the mask under `RUN_MASK` exactly as training draws it (`draw_masks` with the
    run's strategy, ratio, jitter and masking probability; attention from the teacher as noisy as the run's);
    ``strategies="all"`` adds every strategy at the recipe's ratio, and the noisy teacher when the run has a teacher,
    for comparison. A run whose method hides no cells (MiM, CASS) gets no run mask.
    """
    arch = pretrained.arch
    recipe = recipe or PreviewRecipe.of_run(pretrained.run_config)
    roi, token = pretrained.roi, arch.attention_stride
    cell = mask_cell or int(pretrained.run_config.get("mask_cell", token))
    pv = model_volume(volume, dims=arch.dims, spacing=pretrained.spacing, hu_range=pretrained.hu_range)
    image, start = crop_around(pv, center, roi, arch.dims)
    x = torch.from_numpy(image if arch.dims == 3 else image[0])[None, None].to(device)
    if arch.dims == 3:
        factor_cells, factor_tokens = (cell,) * 3, (token,) * 3
    else:
        factor_cells, factor_tokens = (1, cell, cell), (1, token, token)
    encoder = pretrained.encoder.to(device)
    with torch.no_grad():
        clean = encoder(x)
    grid = clean.grid
    cells = (roi // cell,) * arch.dims
    attention = clean.attention.float().cpu()

    def on_cells(att: torch.Tensor) -> torch.Tensor:
        return attention_to_cells(att.float().cpu().mean(1).reshape(1, *grid), cells)

    def noisy_pass(rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher as training runs it with input dropout: (attention on cells, dropped cells)."""
        dropped = random_mask(1, cells, rate, generator)
        with torch.no_grad():
            out = encoder(
                x,
                cell_token_mask(dropped, cell, arch.patch_size, arch.dims).to(device),
                attention_ignore=cell_stage_token_mask(dropped, cell, token, arch.dims).to(device)
                if bool(dropped.any())
                else None,
            )
        return on_cells(out.attention), dropped

    masks: dict[str, np.ndarray] = {}
    teacher_dropped = np.zeros(cells, np.uint8)
    if recipe.cell_masks:
        # the run's own draw: its noise, then its recipe, from one stream seeded by `seed` (as a training step's)
        generator = torch.Generator().manual_seed(seed)
        unseen = None
        needs_attention = get_strategy(recipe.masks.strategy).needs_attention
        if needs_attention and recipe.teacher_noise == "input-dropout" and recipe.noise_rate > 0:
            run_attention, unseen = noisy_pass(recipe.noise_rate, generator)
            teacher_dropped = unseen[0].numpy().astype(np.uint8)
        elif needs_attention and recipe.teacher_noise == "gaussian" and recipe.noise_rate > 0:
            with torch.no_grad():
                run_attention = on_cells(encoder(x, None, recipe.noise_rate, generator).attention)
        else:
            run_attention = on_cells(attention) if needs_attention else None
        run = draw_masks(recipe.masks, batch=1, grid=cells, attention=run_attention, generator=generator, unseen=unseen)
        masks[RUN_MASK] = run[0].numpy().astype(np.uint8)
    if strategies == "all":
        mean_cells = on_cells(attention)
        for strategy in strategy_names():
            # each strategy draws from its own stream seeded by `seed`, at the run's ratio
            m = make_mask(
                strategy,
                batch=1,
                grid=cells,
                ratio=recipe.masks.ratio,
                attention=mean_cells,
                generator=torch.Generator().manual_seed(seed),
                hint_fraction=recipe.masks.hint_fraction,
                hint_pool=recipe.masks.hint_pool,
            )
            masks[strategy] = m[0].numpy().astype(np.uint8)
        if recipe.has_teacher:  # DAGMaN's noisy teacher at the run's rate (0.2 when the run has none)
            noisy_gen = torch.Generator().manual_seed(seed)
            rate = recipe.noise_rate if recipe.teacher_noise == "input-dropout" and recipe.noise_rate > 0 else 0.2
            noisy_cells, dropped = noisy_pass(rate, noisy_gen)
            masks["noisy-teacher"] = (
                make_mask(
                    "attention-high",
                    batch=1,
                    grid=cells,
                    ratio=recipe.masks.ratio,
                    attention=noisy_cells,
                    generator=noisy_gen,
                    unseen=dropped,
                )[0]
                .numpy()
                .astype(np.uint8)
            )
            if RUN_MASK not in masks or not teacher_dropped.any():
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
        recipe=recipe.describe(),
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
        max((m.shape[0] for m in preview.masks.values()), default=1) - 1,
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

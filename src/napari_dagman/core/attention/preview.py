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
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.files import atomic_write
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
from napari_dagman.core.windowing import UNIFORM_RANGE

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


def _method_defaults(method: str) -> dict[str, Any]:
    """The registered method's default options ({} for a method this install does not know)."""
    from napari_dagman.core.methods.registry import REGISTRY

    spec = REGISTRY.get(method)
    try:
        return spec.default_options() if spec is not None else {}
    except DagmanInputError:  # registered but cannot be loaded here: the config's own values only
        return {}


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
        stored = dict(run_config.get(method) or {}) if isinstance(run_config.get(method), dict) else {}
        # a config that leaves an option out means the method's default, not this module's fallback
        options = {**_method_defaults(method), **stored}
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


class _CropMasks:
    """The encoder on one crop, and the masks drawn on its cells as training draws them."""

    def __init__(
        self, encoder: Any, x: torch.Tensor, grid: tuple[int, ...], cells: tuple[int, ...], cell: int
    ) -> None:
        self.encoder, self.x, self.grid, self.cells, self.cell = encoder, x, grid, cells, cell
        self.arch = encoder.arch

    def on_cells(self, attention: torch.Tensor) -> torch.Tensor:
        """(1, heads, N) attention -> its head mean on the mask cells."""
        return attention_to_cells(attention.float().cpu().mean(1).reshape(1, *self.grid), self.cells)

    def noisy_pass(self, rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher as training runs it with input dropout: (attention on cells, dropped cells)."""
        arch, device = self.arch, self.x.device
        dropped = random_mask(1, self.cells, rate, generator)
        with torch.no_grad():
            out = self.encoder(
                self.x,
                cell_token_mask(dropped, self.cell, arch.patch_size, arch.dims).to(device),
                attention_ignore=cell_stage_token_mask(
                    dropped, self.cell, arch.attention_stride, arch.dims
                ).to(device)
                if bool(dropped.any())
                else None,
            )
        return self.on_cells(out.attention), dropped

    def run_mask(
        self, recipe: PreviewRecipe, clean: torch.Tensor, seed: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The run's own draw: its teacher's noise, then its recipe, from one stream seeded by ``seed`` (as a
        training step's); (mask, cells the noisy teacher dropped or None)."""
        generator = torch.Generator().manual_seed(seed)
        unseen = None
        needs_attention = get_strategy(recipe.masks.strategy).needs_attention
        if needs_attention and recipe.teacher_noise == "input-dropout" and recipe.noise_rate > 0:
            attention, unseen = self.noisy_pass(recipe.noise_rate, generator)
        elif needs_attention and recipe.teacher_noise == "gaussian" and recipe.noise_rate > 0:
            with torch.no_grad():
                attention = self.on_cells(self.encoder(self.x, None, recipe.noise_rate, generator).attention)
        else:
            attention = self.on_cells(clean) if needs_attention else None
        mask = draw_masks(
            recipe.masks, batch=1, grid=self.cells, attention=attention, generator=generator, unseen=unseen
        )
        return mask[0].numpy().astype(np.uint8), None if unseen is None else unseen[0].numpy().astype(
            np.uint8
        )

    def every_strategy(
        self, recipe: PreviewRecipe, clean: torch.Tensor, seed: int
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Each strategy's mask at the recipe's ratio, each from its own stream seeded by ``seed``, and with a teacher
        the noisy teacher's (at the run's input dropout, 0.2 for a clean teacher) and the cells it dropped."""
        masks = {}
        mean_cells = self.on_cells(clean)
        for strategy in strategy_names():
            m = make_mask(
                strategy,
                batch=1,
                grid=self.cells,
                ratio=recipe.masks.ratio,
                attention=mean_cells,
                generator=torch.Generator().manual_seed(seed),
                hint_fraction=recipe.masks.hint_fraction,
                hint_pool=recipe.masks.hint_pool,
            )
            masks[strategy] = m[0].numpy().astype(np.uint8)
        if not recipe.has_teacher:
            return masks, None
        generator = torch.Generator().manual_seed(seed)
        rate = recipe.noise_rate if recipe.teacher_noise == "input-dropout" and recipe.noise_rate > 0 else 0.2
        noisy, dropped = self.noisy_pass(rate, generator)
        masks["noisy-teacher"] = (
            make_mask("attention-high", batch=1, grid=self.cells, ratio=recipe.masks.ratio, attention=noisy,
                      generator=generator, unseen=dropped)[0].numpy().astype(np.uint8)
        )  # fmt: skip
        return masks, dropped[0].numpy().astype(np.uint8)


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
    encoder = pretrained.encoder.to(device)
    with torch.no_grad():
        clean = encoder(x)
    cells = (roi // cell,) * arch.dims
    attention = clean.attention.float().cpu()
    drawer = _CropMasks(encoder, x, clean.grid, cells, cell)

    masks: dict[str, np.ndarray] = {}
    teacher_dropped = np.zeros(cells, np.uint8)
    if recipe.cell_masks:
        masks[RUN_MASK], dropped = drawer.run_mask(recipe, attention, seed)
        if dropped is not None:
            teacher_dropped = dropped
    if strategies == "all":
        others, dropped = drawer.every_strategy(recipe, attention, seed)
        masks.update(others)
        if dropped is not None and not teacher_dropped.any():
            teacher_dropped = dropped

    rel = (attention[0] * attention.shape[-1]).reshape(attention.shape[1], *clean.grid).numpy()
    if arch.dims == 2:
        rel = rel[:, None]
        masks = {k: v[None] for k, v in masks.items()}
        teacher_dropped = teacher_dropped[None]
    factor_cells, factor_tokens = (
        ((cell,) * 3, (token,) * 3) if arch.dims == 3 else ((1, cell, cell), (1, token, token))
    )
    origin = pv.index_to_physical(start)
    mask_scale, mask_translate = grid_placement(origin, pv.spacing, factor_cells)
    att_scale, att_translate = grid_placement(origin, pv.spacing, factor_tokens)
    return CropPreview(
        image=np.asarray(image, np.float32),
        image_scale=list(pv.spacing),
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
) -> bool:
    """PNG of `preview_figure` (written atomically); False (and no file) when there is nothing to draw."""
    fig = preview_figure(preview, title=title, attention_panel=attention_panel)
    if fig is None:
        return False
    atomic_write(path, lambda tmp: fig.savefig(str(tmp), dpi=110, format="png"))
    return True


def preview_figure(preview: CropPreview, *, title: str = "", attention_panel: bool = True) -> Any:
    """The crop's middle axial slice: the mean attention (when it is attention) on the fixed x-uniform scale and
    each mask side by side (a matplotlib Figure); None when there is nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
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
    panels = [("mean attention (x uniform, 1/4-4)", attention, "inferno")] if attention_panel else []
    panels += [
        (name, np.kron(mask[cell_z], np.ones((cell, cell))), "Reds") for name, mask in preview.masks.items()
    ]
    if not panels:  # no trained attention and no cell masks (MiM): nothing to draw, no empty PNG
        return None
    fig = Figure(figsize=(2.2 * len(panels), 2.6), tight_layout=True)
    FigureCanvasAgg(fig)
    for i, (name, overlay, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if cmap == "Reds":  # hidden cells in red, visible cells untouched
            ax.imshow(np.ma.masked_equal(overlay, 0), cmap=cmap, vmin=0, vmax=1.2, alpha=0.55)
        else:  # the explorer's fixed logarithmic scale, never a per-map stretch that paints a ripple as structure
            ax.imshow(overlay, cmap=cmap, alpha=0.5, norm=LogNorm(*UNIFORM_RANGE, clip=True))
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig

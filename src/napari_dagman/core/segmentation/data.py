"""Training data of a segmentation run: cases in model space, the validation split, class-balanced crops.

Each image/label pair is resampled to the run's spacing and HU range (`prepare_case`); validation is a held-out
axial slab of each volume, with a gap on both sides that is neither trained nor validated, or held-out cases
(`split_cases`); training crops are class-balanced (MONAI ``RandCropByLabelClassesd``: an organ is drawn
first, then a crop centred on one of its voxels; `CropSampler`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_dagman.core.config import FinetuneConfig
from napari_dagman.core.errors import DagmanError, DagmanInputError
from napari_dagman.core.segmentation.labels import (
    LabelMap,
    align_labels,
    check_label_volume,
    label_names_of,
    present_ids,
)
from napari_dagman.core.volume import Volume


@dataclass
class Case:
    """One image/label pair in model space: intensities in [0, 1], classes 0..K, with its geometry."""

    image: np.ndarray
    classes: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    name: str
    source_hash: str
    ids_present: list[int]


def prepare_case(
    image: Volume,
    labels: Volume,
    label_map: LabelMap,
    *,
    dims: int,
    spacing: float | None,
    hu_range: tuple[float, float],
    resample_labels: bool = False,
    name: str | None = None,
) -> Case:
    """Check a pair and bring it to model space (the same resampling and HU scaling as pretraining)."""
    from napari_dagman.core.data import check_informative, model_volume
    from napari_dagman.core.io import resample_to_spacing

    name = name or str(image.metadata.get("name", "image"))
    check_informative(image, name)
    labels_name = str(labels.metadata.get("name", f"labels of {name}"))
    labels = check_label_volume(labels, f"label map '{labels_name}'")
    labels = align_labels(image, labels, resample=resample_labels, image_name=name, labels_name=labels_name)
    present = present_ids(labels.array)
    chosen = [i for i in label_map.ids if i in present]
    if not chosen:
        table = label_names_of(labels)
        shown = ", ".join(f"{table.get(i, i)} ({i})" for i in present[:8]) + (
            " ..." if len(present) > 8 else ""
        )
        raise DagmanInputError(
            f"label map '{labels_name}' holds none of the chosen organs ({label_map.describe()}); "
            f"it has {shown or 'only background'}"
        )
    pv = model_volume(image, dims=dims, spacing=spacing, hu_range=hu_range, name=name)
    if spacing is not None:
        target = (spacing,) * 3 if dims == 3 else (labels.spacing[0], spacing, spacing)
        labels = resample_to_spacing(labels, target, is_label=True)
    classes = label_map.to_classes(labels.array)
    if classes.shape != pv.array.shape:  # both come from the same resampling: a mismatch is a bug
        raise DagmanError(f"{name}: resampled labels {classes.shape} differ from the image {pv.array.shape}")
    return Case(
        image=pv.array,
        classes=np.ascontiguousarray(classes),
        spacing=pv.spacing,
        origin=pv.origin,
        name=name,
        source_hash=pv.source_hash,
        ids_present=chosen,
    )


@dataclass
class Piece:
    """A z-range of a case used for training or validation."""

    case: int
    z0: int
    z1: int

    def image(self, cases: Sequence[Case]) -> np.ndarray:
        return cases[self.case].image[self.z0 : self.z1]

    def classes(self, cases: Sequence[Case]) -> np.ndarray:
        return cases[self.case].classes[self.z0 : self.z1]


@dataclass
class Split:
    train: list[Piece]
    val: list[Piece]
    description: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": [[p.case, p.z0, p.z1] for p in self.train],
            "val": [[p.case, p.z0, p.z1] for p in self.val],
            "description": self.description,
        }


def slab_ranges(
    depth: int, fraction: float, position: float, gap: int
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Training z-ranges and the validation slab of a volume of ``depth`` slices.

    The slab is ``round(fraction * depth)`` slices (at least 1) starting at ``round(position * (depth -
    thickness))``; ``gap`` slices on each side of it belong to neither set, so no training crop touches
    tissue next to the validation slab.
    """
    thickness = min(depth, max(1, int(round(fraction * depth))))
    start = int(round(position * (depth - thickness)))
    val = (start, start + thickness)
    train = [(0, start - gap)] if start - gap > 0 else []
    if val[1] + gap < depth:
        train.append((val[1] + gap, depth))
    if not train:
        raise DagmanInputError(
            f"nothing left to train on: {depth} slices, a validation slab of {thickness} and a gap of {gap} on "
            "each side; lower --val-fraction or --val-gap-mm"
        )
    return train, val


def slab_organs(
    labels: np.ndarray,
    z_spacing: float,
    model_z_spacing: float,
    organs: Sequence[int],
    *,
    fraction: float,
    position: float,
    gap_mm: float,
) -> list[int]:
    """The organs of ``organs`` that a slab split would validate on, read on the label map's own grid.

    The slab is placed as `split_cases` places it on the model grid (``model_z_spacing`` mm per slice), then
    mapped back to the label map's slices (``z_spacing`` mm); a cheap check before a run starts, exact up to a
    slice. Raises `DagmanInputError` when the slab and its gaps leave nothing to train on.
    """
    depth = max(1, int(round(labels.shape[0] * z_spacing / model_z_spacing)))
    gap = int(math.ceil(gap_mm / model_z_spacing - 1e-9))
    _, (z0, z1) = slab_ranges(depth, fraction, position, gap)
    lo = int(math.floor(z0 * model_z_spacing / z_spacing))
    hi = int(math.ceil(z1 * model_z_spacing / z_spacing))
    present = set(present_ids(labels[lo : max(hi, lo + 1)]))
    return [int(i) for i in organs if int(i) in present]


def best_slab_position(
    labels: np.ndarray,
    z_spacing: float,
    model_z_spacing: float,
    organs: Sequence[int],
    *,
    position: float,
    step: float = 0.05,
    **slab: float,
) -> tuple[float, list[int]]:
    """The slab position (0..1, in ``step``s) whose slab validates the most of ``organs``, the nearest to
    ``position`` among equals, and the organs it validates; ``slab`` holds `slab_organs`'s fraction and gap."""
    best: tuple[int, float, float, list[int]] | None = None
    for candidate in np.round(np.arange(0.0, 1.0 + step / 2, step), 4):
        try:
            held = slab_organs(labels, z_spacing, model_z_spacing, organs, position=float(candidate), **slab)
        except DagmanInputError:
            continue
        key = (-len(held), abs(float(candidate) - position))
        if best is None or key < (best[0], best[1]):
            best = (key[0], key[1], float(candidate), held)
    if best is None:
        return position, []
    return best[2], best[3]


@dataclass(frozen=True)
class SlabAdvice:
    """What a slab split would validate: the organs it misses, and a position whose slab holds more (if any)."""

    organs: tuple[int, ...]
    missing: tuple[int, ...]
    best_position: float | None
    best_held: tuple[int, ...]

    def text(self, names: dict[int, str], position: float, what: str = "--val-position") -> str:
        """One line for the user ("" when the slab holds every organ)."""
        if not self.missing:
            return ""
        missing = ", ".join(names.get(i, str(i)) for i in self.missing)
        text = f"the validation slab ({what} {position:g}) holds no {missing}: no Dice for them"
        if self.best_position is not None:
            text += f"; {what} {self.best_position:g} holds {len(self.best_held)} of the {len(self.organs)} organs"
        return text


def slab_advice(
    labels: np.ndarray,
    z_spacing: float,
    model_z_spacing: float,
    organs: Sequence[int],
    *,
    fraction: float,
    position: float,
    gap_mm: float,
) -> SlabAdvice:
    """The organs of ``organs`` present in ``labels`` that the slab at ``position`` would not validate, and the
    nearest position whose slab validates more of them (None when none does). The dock says it at Start, the
    CLI as a warning, before any training."""
    present = set(present_ids(labels))
    organs = [int(i) for i in organs if int(i) in present]
    where = {"fraction": fraction, "gap_mm": gap_mm}
    held = slab_organs(labels, z_spacing, model_z_spacing, organs, position=position, **where)
    missing = tuple(i for i in organs if i not in held)
    best, best_held = (
        (None, [])
        if not missing
        else best_slab_position(labels, z_spacing, model_z_spacing, organs, position=position, **where)
    )
    better = best is not None and len(best_held) > len(held)
    return SlabAdvice(tuple(organs), missing, best if better else None, tuple(best_held) if better else ())


def slab_warning(config: FinetuneConfig, names: dict[int, str] | None = None) -> str:
    """The CLI's counterpart of the fine-tuning dock's check at Start: for one image and label map split by a slab,
    the line saying which organs the slab misses and where a slab holds more ("" otherwise)."""
    from napari_dagman.core.segmentation.model import run_input_defaults

    if len(config.segmentations) != 1 or config.val_split not in ("auto", "slab") or not config.organs:
        return ""
    labels = read_labels(config.images[0], config.segmentations[0])
    defaults = run_input_defaults(config.init)
    dims = int(config.dims or defaults["dims"])
    model_z = float(config.spacing or defaults["spacing"]) if dims == 3 else float(labels.spacing[0])
    advice = slab_advice(
        np.asarray(labels.array),
        labels.spacing[0],
        model_z,
        config.organs,
        fraction=config.val_fraction,
        position=config.val_position,
        gap_mm=config.val_gap_mm,
    )
    return advice.text(names or {}, config.val_position)


def split_mode(config: FinetuneConfig, num_cases: int) -> str:
    """The validation split a run of ``num_cases`` pairs uses: slab, cases or none (``auto`` resolved)."""
    if config.val_split == "auto":
        return "cases" if num_cases >= 2 else "slab"
    return config.val_split


def budget_units(config: FinetuneConfig, num_cases: int) -> int:
    """How many labelled pieces `--train-pieces` draws from: the training cases of a cases split, else
    ``train_slabs`` slabs per volume. Known from the config alone, so a job can refuse a budget before training."""
    if split_mode(config, num_cases) == "cases":
        return max(0, num_cases - config.val_cases)
    return config.train_slabs * num_cases


def _labelled_slabs(cases: Sequence[Case], train: Sequence[Piece], slabs: int) -> list[list[Piece]]:
    """Each volume's training slices that hold a chosen organ (first to last such slice, the validation slab and
    its gaps left out) cut into ``slabs`` equal runs of slices; a run that straddles the validation slab is two
    pieces. Slices outside that extent label nothing: a slab of them would leave a budget of 1 with no organ."""
    units: list[list[Piece]] = []
    for i, case in enumerate(cases):
        ranges = [(p.z0, p.z1) for p in train if p.case == i]
        slices = np.array([z for a, b in ranges for z in range(a, b)], dtype=np.int64)
        labelled = slices[(case.classes[slices] > 0).any(axis=(1, 2))] if len(slices) else slices
        if len(labelled) < slabs:
            raise DagmanInputError(
                f"{case.name}: {len(labelled)} training slice(s) hold the chosen organs, fewer than "
                f"--train-slabs {slabs}"
            )
        extent = slices[(slices >= labelled[0]) & (slices <= labelled[-1])]
        for part in np.array_split(extent, slabs):
            breaks = np.flatnonzero(np.diff(part) > 1) + 1  # where the run jumps over the slab and its gaps
            units.append([Piece(i, int(r[0]), int(r[-1]) + 1) for r in np.split(part, breaks)])
    return units


def draw_budget(num_units: int, k: int, seed: int) -> list[int]:
    """``k`` of ``num_units`` labelled pieces (indices, sorted): the first ``k`` of one permutation seeded by
    ``seed`` alone, so the pieces of k are among those of any larger k (a nested curve) and every arm at one
    seed (pretrained or scratch) gets the same pieces."""
    if not 1 <= k <= num_units:
        raise DagmanInputError(f"a label budget of {k} piece(s) needs 1 to {num_units} (the pieces available)")
    order = np.random.default_rng([seed, 25]).permutation(num_units)  # 25: a stream of its own, not the crops'
    return sorted(int(u) for u in order[:k])


def _apply_budget(split: Split, cases: Sequence[Case], config: FinetuneConfig, mode: str) -> Split:
    """``split`` with its training part cut to ``config.train_pieces`` labelled pieces; validation as it was."""
    k = config.train_pieces
    if mode == "cases":
        units = [[p] for p in split.train]
        names = [cases[p.case].name for p in split.train]
        what = "training case(s)"
    else:
        units = _labelled_slabs(cases, split.train, config.train_slabs)
        names = [
            f"{cases[u[0].case].name} z " + "+".join(f"{p.z0}-{p.z1 - 1}" for p in u) for u in units
        ]
        what = f"labelled slabs ({config.train_slabs} per volume)"
    if k > len(units):
        raise DagmanInputError(f"--train-pieces {k} is more than the {len(units)} {what} there are")
    chosen = draw_budget(len(units), k, config.seed)
    train = [p for u in chosen for p in units[u]]
    note = f"label budget: {k} of {len(units)} {what}, drawn by seed {config.seed}: " + ", ".join(
        names[u] for u in chosen
    )
    return Split(train, split.val, f"{split.description}; {note}")


def split_cases(cases: Sequence[Case], config: FinetuneConfig) -> Split:
    """Training and validation pieces: a held-out slab of every case, held-out cases, or no validation; with
    ``train_pieces``, only that many labelled pieces of the training part (`draw_budget`)."""
    mode = split_mode(config, len(cases))
    split = _split(cases, config, mode)
    return _apply_budget(split, cases, config, mode) if config.train_pieces else split


def _split(cases: Sequence[Case], config: FinetuneConfig, mode: str) -> Split:
    if mode == "none":
        return Split([Piece(i, 0, c.image.shape[0]) for i, c in enumerate(cases)], [], "no validation")
    if mode == "cases":
        if config.val_cases >= len(cases):
            raise DagmanInputError(
                f"cannot hold out {config.val_cases} of {len(cases)} case(s) and still train; use --val-split slab"
            )
        n_train = len(cases) - config.val_cases
        train = [Piece(i, 0, c.image.shape[0]) for i, c in enumerate(cases[:n_train])]
        val = [Piece(i, 0, c.image.shape[0]) for i, c in enumerate(cases) if i >= n_train]
        return Split(
            train,
            val,
            f"validation on the last {config.val_cases} case(s): {', '.join(c.name for c in cases[n_train:])}",
        )
    train, val = [], []
    parts = []
    for i, case in enumerate(cases):
        gap = int(math.ceil(config.val_gap_mm / case.spacing[0] - 1e-9))
        ranges, slab = slab_ranges(case.image.shape[0], config.val_fraction, config.val_position, gap)
        train.extend(Piece(i, a, b) for a, b in ranges)
        val.append(Piece(i, *slab))
        parts.append(
            f"{case.name}: validation slab z {slab[0]}-{slab[1] - 1} of {case.image.shape[0]} "
            f"({(slab[1] - slab[0]) * case.spacing[0]:g} mm), gap {gap} slices ({gap * case.spacing[0]:g} mm) "
            f"each side, training z " + ", ".join(f"{a}-{b - 1}" for a, b in ranges)
        )
    return Split(train, val, "; ".join(parts))


class CropSampler:
    """Class-balanced training crops with MONAI: an organ (or background) first, then a crop centred on it.

    The class is drawn over all training pieces (chance ``background_ratio`` for background against 1 for
    each organ), then a piece in proportion to how many voxels of that class it holds, then
    ``RandCropByLabelClassesd`` cuts a crop centred on a random voxel of that class. Every draw of step ``k``
    comes from generators seeded by ``(seed, k, crop)``, so a resumed run sees the same crops.
    """

    def __init__(
        self,
        pieces: Sequence[tuple[np.ndarray, np.ndarray]],
        *,
        roi_size: tuple[int, int, int],
        num_classes: int,
        background_ratio: float,
        augment: bool,
        seed: int,
    ) -> None:
        from monai.transforms import ClassesToIndices, SpatialPad

        if not pieces:
            raise DagmanInputError("no training data")
        self.roi_size, self.num_classes, self.seed, self.augment = roi_size, num_classes, seed, augment
        pad = SpatialPad(spatial_size=roi_size, mode="constant", value=0.0)
        to_indices = ClassesToIndices(num_classes=num_classes)
        self.items: list[dict[str, Any]] = []
        counts = np.zeros((len(pieces), num_classes), dtype=np.int64)
        for p, (image, classes) in enumerate(pieces):
            # pad first (air, background) so every crop fits, then index the padded classes
            img = np.asarray(pad(image[None].astype(np.float32)))
            lab = np.asarray(pad(classes[None].astype(np.int16)))
            indices = [np.asarray(ix) for ix in to_indices(lab)]
            counts[p] = [len(ix) for ix in indices]
            self.items.append({"image": img, "label": lab, "indices": indices})
        self.counts = counts
        weights = np.ones(num_classes)
        weights[0] = background_ratio
        weights[counts.sum(axis=0) == 0] = 0.0  # a class with no training voxel cannot centre a crop
        if weights.sum() <= 0:
            raise DagmanInputError("the training data hold no voxel to centre a crop on")
        self.class_weights = weights / weights.sum()

    def classes_present(self) -> np.ndarray:
        return self.counts.sum(axis=0) > 0

    def sample(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (B, 1, *roi) float32, classes (B, 1, *roi) int64) for ``step``."""
        from monai.transforms import (
            Compose,
            RandCropByLabelClassesd,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        images, labels = [], []
        for j in range(batch_size):
            rng = np.random.default_rng([self.seed, step, j, 3])
            cls = int(rng.choice(self.num_classes, p=self.class_weights))
            piece_p = self.counts[:, cls] / self.counts[:, cls].sum()
            item = self.items[int(rng.choice(len(self.items), p=piece_p))]
            ratios = [0.0] * self.num_classes
            ratios[cls] = 1.0
            steps: list[Any] = [
                RandCropByLabelClassesd(
                    keys=["image", "label"],
                    label_key="label",
                    spatial_size=self.roi_size,
                    ratios=ratios,
                    num_classes=self.num_classes,
                    num_samples=1,
                    indices_key="indices",
                    warn=False,
                )
            ]
            if self.augment:
                steps += [
                    RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                    RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
                ]
            transform = Compose(steps)
            transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
            out = transform(dict(item))[0]
            images.append(np.asarray(out["image"], dtype=np.float32))
            labels.append(np.asarray(out["label"], dtype=np.int64))
        return np.stack(images), np.stack(labels)


def roi_size_for(dims: int, roi: int) -> tuple[int, int, int]:
    """Crop / window size in (z, y, x): a 2D model sees one axial slice at a time."""
    return (roi, roi, roi) if dims == 3 else (1, roi, roi)


def load_pairs(config: FinetuneConfig) -> list[tuple[Volume, Volume]]:
    """Read every image/label-map pair named in the config (all read before anything is written)."""
    from napari_dagman.core.io import read_volume

    if not config.images:
        raise DagmanInputError("no images given: pass IMAGE LABELS pairs")
    pairs = []
    for image_path, labels_path in zip(config.images, config.segmentations, strict=True):
        try:
            image = read_volume(image_path)
        except DagmanInputError as err:
            raise DagmanInputError(f"cannot use image {image_path}: {err}") from None
        try:
            labels = read_labels(image_path, labels_path, image)
        except DagmanInputError as err:
            raise DagmanInputError(f"cannot use label map {labels_path}: {err}") from None
        pairs.append((image, labels))
    return pairs


def read_labels(image_path: str, labels_path: str, image: Volume | None = None) -> Volume:
    """A label map file, or a TotalSegmentator ``segmentations/`` folder merged onto the image's grid
    (`core.datasets.read_case_labels`)."""
    from napari_dagman.core.datasets import Case, case_name, read_case_labels

    return read_case_labels(Case(case_name(image_path), str(image_path), str(labels_path)), image)


def _names(pairs: Sequence[tuple[Volume, Volume]]) -> list[str]:
    names = []
    for i, (image, _) in enumerate(pairs):
        name = str(image.metadata.get("name") or f"image {i}")
        names.append(name if name not in names else f"{name} ({i})")
    return names

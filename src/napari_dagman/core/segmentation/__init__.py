"""Segmentation fine-tuning and prediction: MONAI SwinUNETR whose Swin encoder comes from a pretraining run.

The pieces, in the order a run uses them (one module each):

* **Organs** (`labels`: `LabelMap`): the chosen label ids (TotalSegmentator ids, say liver 5, spleen 1) become
  contiguous classes 1..K (0 = background; every other id is background too) and go back to their ids after
  prediction.
* **Model** (`model`: `SegmentationNet`, `build_model`): MONAI's SwinUNETR built from the run's `Architecture`.
  Its encoder ``swinViT.*`` is loaded from the run's ``{teacher|student}.encoder.swin.*`` tensors by an
  explicit, tested one-to-one name map (`encoder_key_map`); the decoder starts fresh. An `InitReport` says what
  was loaded, what starts fresh and which pretraining tensors have no place in the segmentation network.
* **Data** (`data`: `prepare_case`, `split_cases`, `CropSampler`): each image/label pair is resampled to the
  run's spacing and HU range; validation is a held-out axial slab of each volume, with a gap on both sides that
  is neither trained nor validated (or held-out cases); training crops are class-balanced
  (MONAI ``RandCropByLabelClassesd``: an organ is drawn first, then a crop centred on one of its voxels).
* **Loop** (`train`: `run_finetuning`): the pretraining engine's habits - a generator of `core.events`, atomic
  safetensors checkpoints (last, best by validation Dice, resumable), exact resume from ``(seed, step)``
  seeds, cancel by `CancelToken` or by closing the generator (save, then stop).
* **Prediction** (`model.load_segmenter`, `prediction`: `run_prediction`, `predict`): sliding-window
  inference (``monai.inferers.sliding_window_inference``, Gaussian blending) at the run's spacing; class
  probabilities are resampled back onto the input grid before the arg-max, so the labels keep the input's
  geometry.
* **Results** (`metrics`: `evaluate`, `organ_focus`, `worst_slice`, `disagreement_map`): per-organ volume (ml),
  Dice and 95% Hausdorff distance (``monai.metrics``), where each organ is largest, where prediction and
  reference disagree most - what the results dock navigates.

Imports go one way: `labels` first; `model`, `data` and `metrics` on it; `prediction` on those; `train` on all.
"""

from napari_dagman.core.segmentation.data import (
    Case,
    CropSampler,
    Piece,
    Split,
    load_pairs,
    prepare_case,
    roi_size_for,
    slab_ranges,
    split_cases,
)
from napari_dagman.core.segmentation.labels import (
    LabelMap,
    align_labels,
    check_label_volume,
    choose_organs,
    label_names_of,
    parse_organs,
    present_ids,
)
from napari_dagman.core.segmentation.metrics import (
    DISAGREEMENT_NAMES,
    dice_per_class,
    disagreement_colours,
    disagreement_map,
    evaluate,
    format_table,
    organ_focus,
    results_summary,
    worst_slice,
)
from napari_dagman.core.segmentation.model import (
    MIN_ROI,
    RUN_ENCODER_PREFIX,
    SCRATCH_DEFAULTS,
    SCRATCH_HU,
    UNETR_ENCODER_PREFIX,
    InitReport,
    SegmentationNet,
    Segmenter,
    build_model,
    encoder_key_map,
    load_encoder_into,
    load_segmenter,
    model_architecture,
    resolve_finetune_config,
    run_input_defaults,
)
from napari_dagman.core.segmentation.prediction import (
    predict,
    run_prediction,
    sliding_window_logits,
    window_count,
)
from napari_dagman.core.segmentation.train import (
    RESUME_KEYS,
    FinetuneTask,
    run_finetuning,
    validate,
)

__all__ = [
    "DISAGREEMENT_NAMES",
    "MIN_ROI",
    "RESUME_KEYS",
    "RUN_ENCODER_PREFIX",
    "SCRATCH_DEFAULTS",
    "SCRATCH_HU",
    "UNETR_ENCODER_PREFIX",
    "Case",
    "FinetuneTask",
    "CropSampler",
    "InitReport",
    "LabelMap",
    "Piece",
    "SegmentationNet",
    "Segmenter",
    "Split",
    "align_labels",
    "build_model",
    "check_label_volume",
    "choose_organs",
    "dice_per_class",
    "disagreement_colours",
    "disagreement_map",
    "encoder_key_map",
    "evaluate",
    "format_table",
    "label_names_of",
    "load_encoder_into",
    "load_pairs",
    "load_segmenter",
    "model_architecture",
    "organ_focus",
    "parse_organs",
    "predict",
    "prepare_case",
    "present_ids",
    "resolve_finetune_config",
    "results_summary",
    "roi_size_for",
    "run_finetuning",
    "run_input_defaults",
    "run_prediction",
    "slab_ranges",
    "sliding_window_logits",
    "split_cases",
    "validate",
    "window_count",
    "worst_slice",
]

"""A fine-tuned segmentation run as a MONAI Bundle that segments like ``napari-dagman predict``.

``napari-dagman export RUN_SEG --format monai-bundle --out DIR`` writes::

    DIR/configs/metadata.json    MONAI's bundle metadata: versions, task, network input/output, channel names
    DIR/configs/inference.json   LoadImaged -> the run's transforms -> SlidingWindowInferer -> Invertd ... SaveImaged
    DIR/configs/labels.json      label value -> organ name of the written label maps
    DIR/models/model.pt          SwinUNETR's state dict, tensors only
    DIR/docs/README.md           what it is, where it comes from, how to run it

and runs it with ``python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR
--image ct.nii.gz --output_dir OUT``. The transforms between loading and saving are `predict`'s own
(`core.segmentation.pipeline`), built from the same config dicts, so the labels are those of ``predict
--inverse`` with the bundle's ``inverse``. Only MONAI is needed to run it (with nibabel for NIfTI, pydicom for
DICOM, pytorch-ignite for the evaluator).

``inverse`` (`pipeline.INVERSE_MODES`, ``export --inverse``) says how the class scores go back onto the input
grid. MONAI's ``Invertd`` resamples all channels it is given at once, so ``"probabilities"`` holds K+1 channels
of the input grid (a 512 x 512 x 336 CT: 4.5 GB peak with 5 organs, about 23 GB with 60), and the default,
``"labels"`` (arg-max on the model's grid, one channel resampled nearest), 2.9 GB whatever the class count
(`pipeline.BUNDLE_INVERSE` says what it costs at the borders).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.export.weights import software_versions, write_json, write_state_dict
from napari_dagman.core.io import atomic_write_text, check_output_folder
from napari_dagman.core.segmentation.data import roi_size_for
from napari_dagman.core.segmentation.model import Segmenter, load_segmenter
from napari_dagman.core.segmentation.pipeline import (
    BUNDLE_INVERSE,
    IMAGE_KEY,
    PRED_KEY,
    check_inverse,
    label_dtype,
    model_transforms,
    output_transforms,
    sliding_window,
)

META_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
#: What the MONAI Bundle specification requires of metadata.json (checked after writing).
REQUIRED_METADATA = (
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "optional_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
#: Keys of each tensor format in ``network_data_format`` (same specification).
REQUIRED_TENSOR_KEYS = (
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)


def network_arguments(segmenter: Segmenter) -> dict[str, Any]:
    """MONAI ``SwinUNETR`` arguments of the run's network, with MONAI's fused attention, as `predict` runs it."""
    from napari_dagman.core.export.encoder import swinunetr_arguments

    return {
        "_target_": "SwinUNETR",
        **swinunetr_arguments(segmenter.arch),
        "out_channels": segmenter.label_map.num_classes,
        "use_flash_attention": True,
    }


def inference_config(
    segmenter: Segmenter, *, roi: int, overlap: float, sw_batch_size: int, inverse: str = BUNDLE_INVERSE
) -> dict[str, Any]:
    """``configs/inference.json``: MONAI's standard evaluator over `predict`'s transforms (``inverse``: one of
    `pipeline.INVERSE_MODES`)."""
    arch, ids = segmenter.arch, segmenter.label_map.ids
    loading = [
        {"_target_": "LoadImaged", "keys": IMAGE_KEY, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": IMAGE_KEY},
    ]
    saving = {
        "_target_": "SaveImaged",
        "keys": PRED_KEY,
        "output_dir": "@output_dir",
        "output_postfix": "@output_postfix",
        "output_ext": ".nii.gz",
        "output_dtype": f"$numpy.{label_dtype(ids)}",
        "resample": False,
        "separate_folder": False,
    }
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "image": "",
        "dataset_dir": "",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "output_postfix": "seg",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_arguments(segmenter),
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": loading + model_transforms(segmenter.spacing, arch.dims, segmenter.hu_range),
        },
        # one CT with --image (a file or a DICOM folder), else every NIfTI file in --dataset_dir
        "datalist": "$[{'image': @image}] if @image else [{'image': f} for f in "
        "sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))]",
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            **sliding_window(roi_size_for(arch.dims, roi), overlap, sw_batch_size),
            # windows on the device, the blended volume in memory: as predict does
            "sw_device": "@device",
            "device": "cpu",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [*output_transforms(ids, "@preprocessing", inverse), saving],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            # bf16 on a GPU, as predict
            "amp": "$@device.type == 'cuda'",
            "amp_kwargs": {"dtype": "$torch.bfloat16"},
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


#: The metadata's words for each of `pipeline.INVERSE_MODES`.
INVERSE_WORDS = {
    "probabilities": "class probabilities resampled onto the input grid before the arg-max",
    "labels": "arg-max on the model's grid, the class map resampled onto the input grid (nearest)",
}
#: The README's step for each, with the why of the choice.
INVERSE_STEPS = {
    "probabilities": "softmax, class probabilities resampled back onto the input grid (`Invertd`, linear),\n"
    "   arg-max: smooth borders, but every class on the input grid at once (memory grows with the classes)",
    "labels": "arg-max on the model's grid, the one-channel class map resampled back onto the input grid\n"
    "   (`Invertd`, nearest): memory of one channel whatever the class count, borders in model voxels",
}


def bundle_metadata(
    segmenter: Segmenter, run: Path, *, roi: int, run_config: dict[str, Any], inverse: str = BUNDLE_INVERSE
) -> dict[str, Any]:
    """``configs/metadata.json`` after MONAI's Bundle specification (with the organ names and the provenance)."""
    versions = software_versions()
    label_map = segmenter.label_map
    organs = ", ".join(label_map.names)
    shape = list(roi_size_for(segmenter.arch.dims, roi))
    channels = {str(k): name for k, name in enumerate(label_map.class_names)}
    tensor = {"type": "image", "spatial_shape": shape, "dtype": "float32", "is_patch_data": True}
    return {
        "schema": META_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by napari-dagman {versions['napari_dagman']} from {run.name}"},
        "monai_version": versions["monai"],
        "pytorch_version": versions["pytorch"],
        "numpy_version": versions["numpy"],
        "required_packages_version": {"nibabel": _version("nibabel"), "pytorch-ignite": _version("ignite")},
        "optional_packages_version": {
            "pydicom": _version("pydicom"),
            "napari-dagman": versions["napari_dagman"],
        },
        "name": f"napari-dagman SwinUNETR ({organs})",
        "task": f"CT segmentation of {organs}",
        "description": (
            f"MONAI SwinUNETR fine-tuned with napari-dagman (run {run.name}, step {segmenter.step}); encoder "
            f"from {_init_description(run_config)}. Inference: the run's spacing and HU window, Gaussian "
            f"sliding window, {INVERSE_WORDS[inverse]}."
        ),
        "authors": "the authors of the napari-dagman run",
        "copyright": "the authors of the napari-dagman run",
        "intended_use": "research; not for clinical diagnosis",
        "data_source": ", ".join(Path(p).name for p in run_config.get("images", [])) or "unknown",
        "data_type": "nifti or dicom",
        "image_classes": "one channel, CT in HU: clipped to the run's window and scaled to [0, 1]",
        "pred_classes": f"{label_map.num_classes} channels: " + ", ".join(channels.values()),
        "label_names": {"0": "background", **{str(i): n for i, n in label_map.id_names.items()}},
        # how the class scores go back onto the input grid (`napari-dagman predict --inverse` gives the same)
        "inverse": check_inverse(inverse),
        "network_data_format": {
            "inputs": {
                IMAGE_KEY: {
                    **tensor,
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "value_range": [0, 1],
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                PRED_KEY: {
                    **tensor,
                    "format": "labels",
                    "modality": "n/a",
                    "num_channels": label_map.num_classes,
                    "value_range": [],
                    "channel_def": channels,
                }
            },
        },
    }


def _init_description(run_config: dict[str, Any]) -> str:
    report = run_config.get("init_report") or {}
    if not report.get("source"):
        return "scratch (no pretraining)"
    return f"the {report.get('which')} of the {report.get('method')} run {Path(report['source']).name}"


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = {"ignite": "pytorch-ignite"}
    try:
        return version(names.get(module, module))
    except PackageNotFoundError:
        return "any"


def readme(segmenter: Segmenter, run: Path, metadata: dict[str, Any]) -> str:
    """``docs/README.md``."""
    names = "\n".join(f"| {k} | {v} |" for k, v in metadata["label_names"].items())
    return f"""# {metadata["name"]}

{metadata["description"]}

Written by `napari-dagman export {run.name} --format monai-bundle`. Research use only.

## Run it

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --image ct.nii.gz --output_dir out
```

`--image` takes a CT file or a DICOM series folder; `--dataset_dir FOLDER` instead segments every NIfTI
file in a folder. Each label map is written as `<name>_seg.nii.gz` in the input's own grid and orientation.
Needs MONAI {metadata["monai_version"]} or later, nibabel (NIfTI), pydicom (DICOM) and pytorch-ignite.

## What it does (the same as `napari-dagman predict`)

1. array axes z, y, x of the LPS volume (`Orientationd(axcodes="SPL")`), resampled to
   {segmenter.spacing} mm (`Spacingd`), HU clipped to {list(segmenter.hu_range)} and scaled to [0, 1];
2. SwinUNETR over a Gaussian-blended sliding window;
3. {INVERSE_STEPS[metadata["inverse"]]}, class -> organ id.

## Label values

| value | organ |
|---|---|
{names}
"""


def check_bundle(folder: str | os.PathLike) -> None:
    """MONAI's offline checks of a bundle: the inference workflow's required properties, the specification's
    metadata keys, and that the weights load into the network; raises `DagmanInputError` naming what fails."""
    import json

    import torch
    from monai.bundle import ConfigWorkflow

    folder = Path(folder)
    config, meta = folder / "configs" / "inference.json", folder / "configs" / "metadata.json"
    workflow = ConfigWorkflow(
        config_file=str(config), meta_file=str(meta), workflow_type="infer", logging_file=False
    )
    workflow.initialize()  # parses the config: a broken reference fails here
    missing = workflow.check_properties()
    if missing:
        raise DagmanInputError(f"the bundle lacks the inference properties {', '.join(missing)}")
    metadata = json.loads(meta.read_text())
    lacking = [k for k in REQUIRED_METADATA if k not in metadata]
    for side in ("inputs", "outputs"):
        for name, spec in metadata["network_data_format"][side].items():
            lacking += [f"{side}.{name}.{k}" for k in REQUIRED_TENSOR_KEYS if k not in spec]
    if lacking:
        raise DagmanInputError(f"the bundle's metadata lacks {', '.join(lacking)}")
    network = workflow.parser.get_parsed_content("network_def")
    state = torch.load(folder / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)


def export_bundle(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    weights: str = "best",
    roi: int | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    inverse: str = BUNDLE_INVERSE,
) -> list[str]:
    """Write a fine-tuning run as a MONAI Bundle in ``out`` (see the module) and check it; returns the paths.

    ``roi``, ``overlap`` and ``sw_batch_size`` default to `predict`'s (the training ROI, `PredictConfig`'s);
    ``inverse`` (`pipeline.INVERSE_MODES`) to `pipeline.BUNDLE_INVERSE`, whose memory does not grow with the classes.
    """
    from napari_dagman.core.checkpoint import RunFolder
    from napari_dagman.core.config import PredictConfig

    out = Path(out)
    if inverse not in INVERSE_WORDS:
        raise DagmanInputError(f"--inverse must be one of {', '.join(INVERSE_WORDS)}, got '{inverse}'")
    check_output_folder(out, "bundle folder")
    segmenter = load_segmenter(run, weights=weights, device="cpu")
    if segmenter.arch.dims != 3:
        raise DagmanInputError(
            "a MONAI bundle needs a 3D run; this run is 2D (MONAI's 2D SwinUNETR takes slices)"
        )
    defaults = PredictConfig()
    roi = int(roi or segmenter.roi)
    config = PredictConfig(
        roi=roi,
        overlap=defaults.overlap if overlap is None else overlap,
        sw_batch_size=sw_batch_size or defaults.sw_batch_size,
    )
    config.validate()  # the limits predict puts on them
    run = Path(run)
    run_config = RunFolder(run).config_dict() if run.is_dir() else {}
    metadata = bundle_metadata(segmenter, run, roi=roi, run_config=run_config, inverse=inverse)
    inference = inference_config(
        segmenter, roi=roi, overlap=config.overlap, sw_batch_size=config.sw_batch_size, inverse=inverse
    )
    written = [
        write_state_dict(out / "models" / "model.pt", segmenter.net.state_dict()),
        write_json(out / "configs" / "metadata.json", metadata),
        write_json(out / "configs" / "inference.json", inference),
        write_json(out / "configs" / "labels.json", metadata["label_names"]),
    ]
    atomic_write_text(out / "docs" / "README.md", readme(segmenter, run, metadata))
    written.append(out / "docs" / "README.md")
    check_bundle(out)
    return [str(p) for p in written]

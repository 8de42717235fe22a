"""Test helpers that write small inputs (synthetic DICOM series, broken files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dicom_series(
    folder: Path, array: np.ndarray, *, uid: str, description: str, spacing=(0.8, 0.8, 2.5), prefix: str = "s"
) -> list[Path]:
    """Write ``array`` (z, y, x int16 HU) as a DICOM CT series with SimpleITK (one file per slice)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(array.shape[0]):
        sl = image[:, :, k]
        position = "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {
            "0008|0060": "CT",
            "0020|000e": uid,
            "0008|103e": description,
            "0020|0013": str(k + 1),
            "0020|0032": position,
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|1052": "0",
            "0028|1053": "1",
            "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.99",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        path = folder / f"{prefix}{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        files.append(path)
    return files

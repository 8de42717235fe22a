"""Where a label map's organ names come from, in order, and never from a guess (issue 26).

1. ``<stem>.labels.json`` beside the file (what this tool writes);
2. the label table in the file's own NIfTI header: TotalSegmentator writes one (a Caret ``<LabelTable>`` in a
   header extension, read with nibabel without loading the voxels);
3. ``labels.json`` in the file's folder;
4. an MSD / nnU-Net ``dataset.json`` in the folder or up to two folders above (``labelsTr/`` is one below it):
   MSD's ``"labels": {"0": "background", "1": "liver"}`` and nnU-Net v2's ``{"background": 0, "liver": 1}``.

Ids with no name from these are called ``label_<id>`` and the tool says so once. TotalSegmentator's v2 names fit
any map whose ids are at most 117, so they were given to an nnU-Net map (liver=1, spleen=2, ...) as "spleen,
kidney_right, ..." and went on into runs, bundles and DICOM SEG codes: they are used only when the user says the
map is TotalSegmentator's (``NAPARI_DAGMAN_TOTALSEGMENTATOR=1``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from napari_dagman.core.errors import DagmanInputError, env_flag

#: Set to 1 when label maps without names are TotalSegmentator v2 maps (ids 1-117 in its order).
TOTALSEGMENTATOR_ENV = "NAPARI_DAGMAN_TOTALSEGMENTATOR"
#: A header label table larger than this is not read (TotalSegmentator's 117 classes take 13 KB).
MAX_HEADER_TABLE = 1_000_000
_LABEL = re.compile(r"<Label\s+Key\s*=\s*\"(\d+)\"[^>]*>\s*<!\[CDATA\[(.*?)\]\]>\s*</Label>", re.DOTALL)


def header_label_names(path: str | os.PathLike) -> dict[int, str] | None:
    """Id -> name from a NIfTI header's label table (TotalSegmentator's), else None.

    Parsed with a pattern, not an XML parser: the table is the file's, and an entity-expanding XML parser is a way
    in for a hostile file."""
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    try:
        extensions = nib.load(str(path)).header.extensions
    except Exception:  # noqa: BLE001 (a header nibabel cannot read has no table; SimpleITK reads the file)
        return None
    for extension in extensions:
        content = extension.get_content()
        if not isinstance(content, bytes | str) or len(content) > MAX_HEADER_TABLE:
            continue
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
        if "<LabelTable>" not in text:
            continue
        names = {int(key): name.strip() for key, name in _LABEL.findall(text) if int(key) != 0 and name.strip()}
        if names:
            return names
    return None


def dataset_json_names(path: str | os.PathLike) -> dict[int, str] | None:
    """Id -> name from the MSD / nnU-Net ``dataset.json`` of the folder of ``path`` or up to two above."""
    from napari_dagman.core.files import read_json

    folder = Path(path).resolve().parent
    for candidate in (folder, folder.parent, folder.parent.parent):
        found = candidate / "dataset.json"
        if found.is_file():
            return names_of_dataset(read_json(found), found)
    return None


def names_of_dataset(raw: object, where: str | os.PathLike = "dataset.json") -> dict[int, str] | None:
    """Id -> name from a dataset.json's ``labels`` (MSD: id -> name; nnU-Net v2: name -> id, or name -> a list of
    ids for a region, which names no single id); None when it has none."""
    labels = raw.get("labels") if isinstance(raw, dict) else None
    if labels is None:
        return None
    if not isinstance(labels, dict):
        raise DagmanInputError(f"{where}: 'labels' is not an object of label ids and names")
    names: dict[int, str] = {}
    try:
        for key, value in labels.items():
            if str(key).strip().lstrip("-").isdigit():  # MSD: "1": "liver"
                names[int(key)] = str(value)
            elif isinstance(value, int | str) and str(value).strip().isdigit():  # nnU-Net v2: "liver": 1
                names[int(value)] = str(key)
    except (TypeError, ValueError):
        raise DagmanInputError(f"{where}: 'labels' is not an object of label ids and names") from None
    names.pop(0, None)  # background
    return names or None


def totalsegmentator_asked() -> bool:
    """Whether the user says unnamed label maps are TotalSegmentator v2 maps (``$NAPARI_DAGMAN_TOTALSEGMENTATOR``)."""
    return env_flag(TOTALSEGMENTATOR_ENV)


def unnamed_note(ids: Iterable[int], what: str = "the label map") -> str:
    """The one line that says ids are called by their number, and how to name them."""
    ids = sorted(int(i) for i in ids)
    shown = ", ".join(str(i) for i in ids[:12]) + (f" and {len(ids) - 12} more" if len(ids) > 12 else "")
    return (
        f"{what} has no names for label(s) {shown} (no .labels.json, header label table, labels.json or "
        f"dataset.json): they are called label_<id>; write a labels.json, or set {TOTALSEGMENTATOR_ENV}=1 if it "
        "is a TotalSegmentator map"
    )

"""Dataset inputs (issue 26): one place that finds the cases a user points at and pairs images with label maps.

A source is an MSD or nnU-Net v2 ``dataset.json`` (or its folder), a TotalSegmentator case folder (a CT and
``segmentations/``, one binary mask per organ) or a folder of them, a list file (``.csv`` / ``.json``), a plain
folder searched recursively, or one file or DICOM series folder. `find_cases` looks at names and folders only:
it reads no voxels (whether an image is a CT stays `core.io.check_ct`'s call). `read_case_labels` reads a case's
label map as one `Volume`, a TotalSegmentator ``segmentations/`` folder merged into one map.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_dagman.core.case_lists import Row, cell, csv_rows, json_rows
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.files import read_json, stem_of, suffix_of
from napari_dagman.core.io import folder_has_dicom, is_volume_file, read_volume
from napari_dagman.core.label_names import names_of_dataset
from napari_dagman.core.labels import TOTALSEG_V2
from napari_dagman.core.volume import Volume

#: What `Cohort.kind` says; "mixed" when sources of several kinds were given together.
KINDS: tuple[str, ...] = ("msd", "nnunet", "totalsegmentator", "list", "folder", "files", "mixed")
SPLITS: tuple[str, ...] = ("train", "test")
#: ``<stem><suffix>`` beside ``<stem>`` is its label map.
LABEL_SUFFIXES: tuple[str, ...] = ("_seg", "_label", "_labels", "_mask", "_segmentation")
#: image folder -> the label folder beside it (nnU-Net's names, and the plain ones).
PAIRED_FOLDERS: dict[str, str] = {"imagesTr": "labelsTr", "imagesTs": "labelsTs", "images": "labels"}
_IMAGES_OF: dict[str, str] = {v: k for k, v in PAIRED_FOLDERS.items()}
#: Folders where nnU-Net's ``<case>_<channel>`` naming holds (elsewhere ``scan_0001`` is a case of its own).
CHANNEL_FOLDERS: tuple[str, ...] = ("imagesTr", "imagesTs")
DATASET_JSON = "dataset.json"
TS_MASKS = "segmentations"
#: TotalSegmentator v2 class name -> id; masks with other names get ids from FIRST_EXTRA_ID up.
TS_IDS: dict[str, int] = {name: i for i, name in TOTALSEG_V2.items()}
FIRST_EXTRA_ID = max(TOTALSEG_V2) + 1
_CHANNEL = re.compile(r"(.*)_(\d{4})")
_SHOWN = 5  # names listed in a note


@dataclass(frozen=True)
class Case:
    """One image and its label map (a file, or a TotalSegmentator ``segmentations/`` folder); ``label_names``
    come from the dataset (None: the label file's own, `core.io.read_label_names`)."""

    name: str
    image: str
    labels: str | None = None
    label_names: dict[int, str] | None = field(default=None, hash=False)  # a dict: cases stay hashable


@dataclass
class Cohort:
    """The cases found, what was skipped or assumed (one line each, said once) and the kind of source."""

    cases: list[Case]
    notes: list[str]
    kind: str


Found = tuple[list[Case], list[str], str]  # cases, notes, kind of one source


def find_cases(
    sources: Sequence[str | os.PathLike] | str | os.PathLike, *, labels: bool = False, split: str = "train"
) -> Cohort:
    """The cases of every source, in order: images only (``labels=False``, for pretraining) or image/label pairs.

    ``split`` ("train" or "test") picks a dataset.json's training or test cases. Reads no voxels.

    Raises
    ------
    DagmanInputError
        A path that does not exist, a file a dataset or list names that does not, an image without its label map
        (``labels=True``), a folder without cases, or two cases of one name (their outputs would collide).
    """
    if isinstance(sources, str | os.PathLike):  # one path, not a sequence of its characters
        sources = [sources]
    if split not in SPLITS:
        raise DagmanInputError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
    if not sources:
        raise DagmanInputError("no inputs given: name image files, folders, a dataset.json or a list file")
    cases: list[Case] = []
    notes: list[str] = []
    kinds: list[str] = []
    for source in sources:
        found, more, kind = _cases_of(Path(source), labels=labels, split=split)
        cases.extend(found)
        notes.extend(more)
        kinds.append(kind)
    if not cases:
        said = f" ({'; '.join(notes)})" if notes else ""
        raise DagmanInputError(f"no cases found in {', '.join(str(s) for s in sources)}{said}")
    check_unique(cases)
    return Cohort(cases, notes, kinds[0] if len(set(kinds)) == 1 else "mixed")


def case_name(path: str | os.PathLike) -> str:
    """A case's id from its image: the file stem without nnU-Net's ``_0000`` (a folder: its name)."""
    path = Path(path)
    stem = path.name if path.is_dir() else stem_of(path)
    return stem[: -len("_0000")] if stem.endswith("_0000") and len(stem) > 5 else stem


def check_unique(cases: Iterable[Case]) -> None:
    """Refuse a case name that is not a plain file name, and two cases of one name (ignoring case, as macOS and
    Windows do): each case's outputs are written under its name, so the second would overwrite the first."""
    seen: dict[str, Case] = {}
    for case in cases:
        name = case.name
        if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") or len(name) > 200:
            raise DagmanInputError(f"case name '{name}' (image {case.image}) is not a plain file name")
        other = seen.setdefault(name.casefold(), case)
        if other is case:
            continue
        if Path(other.image).resolve() == Path(case.image).resolve():
            raise DagmanInputError(f"{case.image} is given twice")
        raise DagmanInputError(
            f"two cases are named '{name}': {other.image} and {case.image}; one's outputs would overwrite the "
            "other's (rename one, or list the cases in a .csv with a 'name' column)"
        )


# --- what a source is -------------------------------------------------------------------------------------
def _cases_of(path: Path, *, labels: bool, split: str) -> Found:
    if not path.exists():
        raise DagmanInputError(f"{path} does not exist")
    if path.is_dir():
        if (path / DATASET_JSON).is_file():
            return _dataset(path / DATASET_JSON, read_json(path / DATASET_JSON), labels=labels, split=split)
        if _is_dicom_folder(path):
            return _single(path, labels=labels)
        if _ts_ct(path) is not None:
            return _ts_cases([path], labels=labels), [], "totalsegmentator"
        return _folder(path, labels=labels)
    if suffix_of(path) == ".csv":
        return _list_file(path, csv_rows(path), labels=labels)
    if suffix_of(path) == ".json":
        raw = read_json(path)
        if isinstance(raw, list):
            return _list_file(path, json_rows(path, raw), labels=labels)
        return _dataset(path, raw, labels=labels, split=split)
    return _single(path, labels=labels)


def _entries(folder: Path) -> list[Path]:
    """A folder's entries, sorted, hidden ones (``.git``, macOS's ``._x.nii.gz``) left out."""
    try:
        return sorted(e for e in folder.iterdir() if not e.name.startswith("."))
    except OSError as err:
        raise DagmanInputError(f"cannot read folder {folder}: {err.strerror or err}") from None


def _is_dicom_folder(folder: Path) -> bool:
    """A DICOM series folder: DICOM magic in its first files, or ``.dcm`` files (some lack the magic)."""
    if folder_has_dicom(folder):
        return True
    try:
        return any(e.name.lower().endswith(".dcm") and e.is_file() for e in folder.iterdir())
    except OSError:
        return False


def _few(paths: Sequence[Path], root: Path | None = None) -> str:
    """At most five names (relative to ``root``), then "..."."""
    shown = [str(p.relative_to(root)) if root and p.is_relative_to(root) else p.name for p in paths[:_SHOWN]]
    return ", ".join(shown) + (" ..." if len(paths) > _SHOWN else "")


def _one_partner(image: Path, found: Sequence[Path], looked_for: str) -> Path:
    if not found:
        raise DagmanInputError(f"{image} has no label map: looked for {looked_for}")
    if len(found) > 1:
        shown = ", ".join(str(f) for f in found)
        raise DagmanInputError(f"{image} has {len(found)} label maps ({shown}): keep one of them")
    return found[0]


def _looked_for(image: Path) -> str:
    name = case_name(image)
    return f"labelsTr/{name}.* or {name}_seg.* (or {', '.join(LABEL_SUFFIXES[1:])}) beside it"


# --- single files -----------------------------------------------------------------------------------------
def _label_base(stem: str) -> str | None:
    """``x`` for ``x_seg`` (and the other label suffixes, in any case), else None."""
    for suffix in LABEL_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return None


def _single(path: Path, *, labels: bool) -> Found:
    """A file or DICOM folder given by name: one case; with ``labels``, its label map is the one beside it."""
    if not labels:
        return [Case(case_name(path), str(path))], [], "files"
    near = [e for e in _entries(path.parent) if e != path and (is_volume_file(e) or e.is_dir())]
    base = _label_base(stem_of(path)) if path.is_file() else None
    image = next((e for e in near if base and case_name(e) == base), None)
    if image is not None:  # the pair was given as two paths: this one is the label map
        return [], [f"{path.name} taken as the label map of {image.name}, not as an image"], "files"
    stems = {path.name if path.is_dir() else stem_of(path), case_name(path)}
    wanted = {(s + suffix).lower() for s in stems for suffix in LABEL_SUFFIXES}
    found = [e for e in near if e.is_file() and stem_of(e).lower() in wanted]
    return [Case(case_name(path), str(path), str(_one_partner(path, found, _looked_for(path))))], [], "files"


# --- MSD / nnU-Net ----------------------------------------------------------------------------------------
def _dataset(json_path: Path, raw: object, *, labels: bool, split: str) -> Found:
    if not isinstance(raw, dict):
        raise DagmanInputError(f"{json_path} is not a dataset.json (a JSON object) nor a list of cases")
    if "training" in raw:
        return _msd(json_path, raw, labels=labels, split=split)
    if "channel_names" in raw and "file_ending" in raw:
        return _nnunet(json_path, raw, labels=labels, split=split)
    raise DagmanInputError(
        f"{json_path} is neither an MSD dataset.json (no 'training' list) nor an nnU-Net v2 one (no "
        "'channel_names' and 'file_ending')"
    )


def _listed(folder: Path, entry: object, json_path: Path, what: str, *, image: bool) -> Path:
    """A path a dataset.json lists, relative to its folder, that must exist."""
    if not isinstance(entry, str) or not entry.strip():
        raise DagmanInputError(f"{json_path}: {what} is not a file path")
    path = folder / entry
    if path.exists():
        return path
    # nnU-Net v1 lists "imagesTr/x.nii.gz" for the file imagesTr/x_0000.nii.gz
    first_channel = path.with_name(stem_of(path) + "_0000" + suffix_of(path))
    if image and first_channel.is_file():
        return first_channel
    raise DagmanInputError(f"{path} ({what} of {json_path}) does not exist")


def _msd(json_path: Path, raw: dict, *, labels: bool, split: str) -> Found:
    key = "training" if split == "train" else "test"
    entries = raw.get(key, [])
    if not isinstance(entries, list):
        raise DagmanInputError(f"{json_path}: '{key}' is not a list")
    names = names_of_dataset(raw, json_path) if labels else None
    cases = []
    for n, entry in enumerate(entries, 1):
        what = f"{key} item {n}"
        listed = entry.get("image") if isinstance(entry, dict) else entry
        image = _listed(json_path.parent, listed, json_path, what, image=True)
        label = None
        if labels:
            if not isinstance(entry, dict) or entry.get("label") is None:
                raise DagmanInputError(f"{json_path}: {what} ({image.name}) has no label map")
            label = str(_listed(json_path.parent, entry["label"], json_path, f"{what}'s label", image=False))
        cases.append(Case(case_name(image), str(image), label, names if label else None))
    if not cases:
        raise DagmanInputError(f"{json_path} lists no {key} cases")
    notes, modalities = [], raw.get("modality")
    if isinstance(modalities, dict) and len(modalities) > 1 and cases[0].name != stem_of(cases[0].image):
        # nnU-Net v1: one file per channel, x_0000 being the first
        notes.append(f"{json_path}: {len(modalities)} channels per case; only channel 0 ({modalities.get('0')}) is used")
    return cases, notes, "msd"


def _nnunet(json_path: Path, raw: dict, *, labels: bool, split: str) -> Found:
    ending, channels = raw["file_ending"], raw["channel_names"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DagmanInputError(f"{json_path}: 'file_ending' is not a file ending such as '.nii.gz'")
    if not isinstance(channels, dict) or not channels:
        raise DagmanInputError(f"{json_path}: 'channel_names' is not an object of channel numbers and names")
    tag = "Tr" if split == "train" else "Ts"
    images_dir, labels_dir = json_path.parent / f"images{tag}", json_path.parent / f"labels{tag}"
    if not images_dir.is_dir():
        raise DagmanInputError(f"{images_dir} (the images of {json_path}) does not exist")
    stems = {f: f.name[: -len(ending)] for f in _entries(images_dir) if f.name.endswith(ending) and f.is_file()}
    firsts = [f for f, stem in stems.items() if stem.endswith("_0000")]
    if not firsts:
        raise DagmanInputError(f"{images_dir} holds no <case>_0000{ending} files, as {json_path} says it should")
    names = names_of_dataset(raw, json_path) if labels else None
    cases = []
    for image in firsts:
        name = stems[image][: -len("_0000")]
        label = labels_dir / f"{name}{ending}"
        if labels and not label.is_file():
            raise DagmanInputError(f"{label} (the label map of {image.name}, says {json_path}) does not exist")
        cases.append(Case(name, str(image), str(label) if labels else None, names))
    notes = []
    if len(channels) > 1 or any(_CHANNEL.fullmatch(s) and not s.endswith("_0000") for s in stems.values()):
        shown = ", ".join(f"{k}: {v}" for k, v in channels.items())
        notes.append(f"{json_path}: several channels per case ({shown}); only channel 0 ({channels.get('0')}) is used")
    return cases, notes, "nnunet"


# --- list files -------------------------------------------------------------------------------------------
def _list_file(path: Path, rows: list[Row], *, labels: bool) -> Found:
    """Cases from a list file's rows; relative paths are relative to the list file."""
    unknown = sorted({k for _, cells in rows for k in cells} - {"image", "label", "labels", "name"})
    notes = [f"{path}: ignored column(s) {', '.join(unknown)} (known: image, label, name)"] if unknown else []
    cases = []
    for where, cells in rows:
        if not cell(cells, "image"):
            raise DagmanInputError(f"{path}, {where}: no image")
        image = path.parent / Path(cell(cells, "image")).expanduser()
        if not image.exists():
            raise DagmanInputError(f"{path}, {where}: image {image} does not exist")
        label = None
        if labels:
            if not cell(cells, "label", "labels"):
                raise DagmanInputError(f"{path}, {where}: no label map (column 'label') for {image.name}")
            label = path.parent / Path(cell(cells, "label", "labels")).expanduser()
            if not label.exists():
                raise DagmanInputError(f"{path}, {where}: label map {label} does not exist")
        cases.append(Case(cell(cells, "name") or case_name(image), str(image), str(label) if label else None))
    if not cases:
        raise DagmanInputError(f"{path} lists no cases")
    return cases, notes, "list"


# --- TotalSegmentator -------------------------------------------------------------------------------------
def mask_names(folder: str | os.PathLike) -> dict[int, str]:
    """Id -> name of a TotalSegmentator ``segmentations/`` folder's masks, as `read_case_labels` merges them."""
    return {i: stem for stem, i in mask_ids(_mask_files(Path(folder))).items()}


def _mask_files(folder: Path) -> dict[str, Path]:
    """Mask name (file stem) -> file, in a ``segmentations/`` folder."""
    masks: dict[str, Path] = {}
    for f in (f for f in _entries(folder) if is_volume_file(f)):
        twin = masks.setdefault(stem_of(f), f)
        if twin != f:
            raise DagmanInputError(f"{folder} holds two masks named {stem_of(f)}: {twin.name}, {f.name}")
    return masks


def _ts_ct(folder: Path) -> Path | None:
    """The CT of a TotalSegmentator case folder (``ct.nii.gz``, or its one volume file); None if not one."""
    masks = folder / TS_MASKS
    if not masks.is_dir() or not any(is_volume_file(f) for f in _entries(masks)):
        return None
    top = [f for f in _entries(folder) if is_volume_file(f)]
    named = [f for f in top if stem_of(f).lower() == "ct"]
    if len(named) == 1 or len(top) == 1:
        return (named or top)[0]
    raise DagmanInputError(
        f"{folder} has a {TS_MASKS}/ folder but no single CT: no ct.nii.gz, and {len(top)} volume files beside it"
    )


def mask_ids(stems: Iterable[str], known: dict[int, str] | None = None) -> dict[str, int]:
    """Label id of each mask name: ``known``'s (the case's table), else TotalSegmentator v2's id for its class
    names, else ids from 118 up in sorted order. The names are the file names: nothing is guessed."""
    stems = sorted(set(stems))
    ids: dict[str, int] = {}
    own = {name: i for i, name in (known or {}).items()}
    for table in (own, TS_IDS):  # the case's own table first: it keeps the ids of a whole cohort
        for stem in stems:
            if stem not in ids and stem in table and table[stem] not in ids.values():
                ids[stem] = table[stem]
    next_id = max([FIRST_EXTRA_ID - 1, *ids.values()]) + 1
    for stem in (s for s in stems if s not in ids):
        ids[stem], next_id = next_id, next_id + 1
    return ids


def _ts_cases(folders: Sequence[Path], *, labels: bool) -> list[Case]:
    """One case per TotalSegmentator folder; masks of other names are numbered over all the folders, so such an
    organ has one id in every case."""
    if not labels:
        return [Case(f.name, str(_ts_ct(f))) for f in folders]
    stems = {f: list(_mask_files(f / TS_MASKS)) for f in folders}
    ids = mask_ids(s for found in stems.values() for s in found)
    return [
        Case(f.name, str(_ts_ct(f)), str(f / TS_MASKS), {ids[s]: s for s in sorted(stems[f], key=ids.get)})
        for f in folders
    ]


# --- plain folders ----------------------------------------------------------------------------------------
@dataclass
class _Search:
    files: list[Path]
    dicoms: list[Path]
    ts: list[Path]


def _search(folder: Path, found: _Search, seen: set[Path]) -> None:
    """Volume files, DICOM series folders (not searched further) and TotalSegmentator cases under ``folder``."""
    if folder.resolve() in seen:  # a link back up the tree
        return
    seen.add(folder.resolve())
    for entry in _entries(folder):
        if entry.is_dir():
            if _is_dicom_folder(entry):
                found.dicoms.append(entry)
            elif _ts_ct(entry) is not None:
                found.ts.append(entry)
            else:
                _search(entry, found, seen)
        elif is_volume_file(entry):
            found.files.append(entry)


def _label_folder(path: Path) -> Path | None:
    """For a file in ``labelsTr/`` (``labels/``, ...) beside ``imagesTr/``: that image folder."""
    images = _IMAGES_OF.get(path.parent.name)
    return path.parent.parent / images if images and (path.parent.parent / images).is_dir() else None


def _classify(found: _Search) -> tuple[list[Path], dict[tuple[Path, str], list[Path]], list[Path]]:
    """Images; label maps under the (image folder, case name) they belong to; nnU-Net's other channels."""
    here: dict[Path, set[str]] = defaultdict(set)  # folder -> the stems and case names in it
    for f in found.files:
        here[f.parent].update({stem_of(f), case_name(f)})
    for d in found.dicoms:
        here[d.parent].add(d.name)
    images, channels = list(found.dicoms), []
    owners: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for f in found.files:
        stem, base, images_dir = stem_of(f), _label_base(stem_of(f)), _label_folder(f)
        channel = _CHANNEL.fullmatch(stem) if f.parent.name in CHANNEL_FOLDERS else None
        if images_dir is not None:  # by place
            owners[(images_dir, stem)].append(f)
        elif channel and channel[2] != "0000" and f"{channel[1]}_0000" in here[f.parent]:
            channels.append(f)
        elif base is not None and base in here[f.parent]:  # by name, when its image is there
            owners[(f.parent, base)].append(f)
        else:
            images.append(f)
    return sorted(images), owners, channels


def _in_labels_folder(image: Path, listed: dict[Path, dict[str, list[Path]]]) -> list[Path]:
    """The files named after ``image``'s case in the label folder beside its image folder (listed once each)."""
    folder = image.parent.parent / PAIRED_FOLDERS.get(image.parent.name, image.parent.name)
    if folder == image.parent or not folder.is_dir():
        return []
    if folder not in listed:
        listed[folder] = defaultdict(list)
        for f in (f for f in _entries(folder) if is_volume_file(f)):
            listed[folder][stem_of(f)].append(f)
    return listed[folder].get(case_name(image), [])


def _folder_name(image: Path, root: Path, images: Sequence[Path]) -> str:
    """A case's name in a folder: its own (`case_name`), or, when another image has it too (``s01/ct.nii.gz``,
    ``s02/ct.nii.gz``: TotalSegmentator's and many hospitals' layout), its path below ``root`` joined by "_"."""
    name = case_name(image)
    if sum(case_name(p).lower() == name.lower() for p in images) < 2:
        return name
    return "_".join((*image.relative_to(root).parent.parts, name))


def _folder(root: Path, *, labels: bool) -> Found:
    """A plain folder, searched recursively; with ``labels``, each image's label map by place or by name."""
    found = _Search([], [], [])
    _search(root, found, set())
    images, owners, channels = _classify(found)
    label_maps = sorted(f for fs in owners.values() for f in fs)
    notes = []
    if channels:
        notes.append(f"left out {len(channels)} files of other channels (_0000 is used): {_few(channels, root)}")
    if not labels:
        if label_maps:
            notes.append(f"left out {len(label_maps)} label maps: {_few(label_maps, root)}")
        cases = [Case(_folder_name(p, root, images), str(p)) for p in images]
    else:
        test = [p for p in images if p.parent.name == "imagesTs" and not (p.parent.parent / "labelsTs").is_dir()]
        if test:
            notes.append(f"left out {len(test)} test images without label maps (imagesTs): {_few(test, root)}")
        cases, used, beside = [], set(), {}
        for image in (p for p in images if p not in test):
            stem = image.name if image.is_dir() else stem_of(image)
            mine = {f for key in {stem, case_name(image)} for f in owners.get((image.parent, key), [])}
            mine.update(_in_labels_folder(image, beside))  # labelsTr/ outside the folder searched (imagesTr/ given)
            partner = _one_partner(image, sorted(mine), _looked_for(image))
            used.add(partner)
            cases.append(Case(_folder_name(image, root, images), str(image), str(partner)))
        alone = [f for f in label_maps if f not in used]
        if alone:
            notes.append(f"left out {len(alone)} label maps without an image: {_few(alone, root)}")
    ts = _ts_cases(found.ts, labels=labels)
    if not cases and not ts:
        what = f"only label maps ({_few(label_maps, root)})" if label_maps else "no cases"
        raise DagmanInputError(
            f"folder {root} holds {what}: looked for CT volumes (NIfTI, NRRD, MHA/MHD), DICOM series and "
            f"TotalSegmentator cases in it and its subfolders, and for a {DATASET_JSON} at its top"
        )
    return cases + ts, notes, "folder" if cases else "totalsegmentator"


# --- reading a case's labels ------------------------------------------------------------------------------
def read_case_labels(case: Case, image: Volume | None = None) -> Volume:
    """The case's label map as one `Volume` with ``metadata["label_names"]``.

    A TotalSegmentator ``segmentations/`` folder is merged onto the CT's grid (``image``: the case's CT as read,
    to save reading it again): each mask gets its id (`mask_ids`), an empty mask is skipped, and where masks
    overlap the later (higher) id wins; ``metadata["notes"]`` says how many voxels overlapped.
    """
    if case.labels is None:
        raise DagmanInputError(f"case {case.name} ({case.image}) has no label map")
    path = Path(case.labels)
    if path.is_dir() and not _is_dicom_folder(path):
        return _merge_masks(case, path, image)
    volume = read_volume(path)
    if case.label_names:
        _name(volume, case.label_names, path)
    return volume


def _name(volume: Volume, names: dict[int, str], path: Path) -> None:
    """Give a label map the dataset's names; the reader's note on unnamed ids is said again for what is left."""
    from napari_dagman.core.label_names import totalsegmentator_asked, unnamed_note
    from napari_dagman.core.segmentation.labels import present_ids

    volume.metadata["label_names"] = dict(names)
    stale = unnamed_note([0], path.name).partition(" 0 ")[0]  # the note's first words, as the reader wrote them
    notes = [n for n in volume.metadata.pop("notes", []) if not n.startswith(stale)]
    unnamed = [i for i in present_ids(volume.array) if i not in names]
    if unnamed and not totalsegmentator_asked():
        notes.append(unnamed_note(unnamed, path.name))
    if notes:
        volume.metadata["notes"] = notes


def _merge_masks(case: Case, folder: Path, image: Volume | None) -> Volume:
    masks = _mask_files(folder)
    if not masks:
        raise DagmanInputError(f"{folder} holds no masks (one NIfTI file per organ)")
    ids = mask_ids(masks, case.label_names)
    ref = image if image is not None else read_volume(case.image)
    merged = np.zeros(ref.shape, np.uint8 if max(ids.values()) <= 255 else np.uint16)
    count = np.zeros(ref.shape, np.uint16)  # masks per voxel: a voxel in three masks is one overlap, not two
    empty, source = [], None
    for stem in sorted(masks, key=ids.__getitem__):
        mask = read_volume(masks[stem])
        if not mask.same_grid(ref):
            spacings = [tuple(round(s, 3) for s in v.spacing) for v in (mask, ref)]
            raise DagmanInputError(
                f"mask {masks[stem]} is not on the grid of the CT {case.image} (shape {mask.shape} vs "
                f"{ref.shape}, spacing {spacings[0]} vs {spacings[1]}, or another origin or orientation)"
            )
        source = source or mask.metadata
        on = mask.array != 0
        if not on.any():
            empty.append(masks[stem])
            continue
        count += on
        merged[on] = ids[stem]
    notes = []
    if overlap := int(np.count_nonzero(count > 1)):
        notes.append(f"{case.name}: {overlap} voxels lie in more than one mask; the later (higher) id was kept")
    if empty:
        notes.append(f"{case.name}: skipped {len(empty)} empty masks: {_few(empty)}")
    meta = {k: v for k, v in (source or {}).items() if k.startswith("source_")}
    names = {i: s for s, i in sorted(ids.items(), key=lambda item: item[1])}
    meta.update(source_path=str(folder), name=case.name, label_names=names)
    if notes:
        meta["notes"] = notes
    return Volume(merged, ref.spacing, ref.origin, ref.direction.copy(), meta)

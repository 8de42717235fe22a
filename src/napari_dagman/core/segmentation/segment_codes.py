"""Coding tables for DICOM SEG segments: an organ name's SNOMED CT codes from a proper mapping, not from its words.

Matching names to pydicom's code dictionary (`dicom_seg.segment_coding`) codes most organs, but 11 of the 117
TotalSegmentator classes fell back to a generic "Tissue" and all 24 ribs became "Rib". A coding table maps each
structure name to its codes, in the column names DICOM tools share (dcmqi, 3D Slicer, TotalSegmentator's own
table)::

    Structure,SegmentedPropertyCategoryCodeSequence.CodeValue,...CodingSchemeDesignator,...CodeMeaning,
    SegmentedPropertyTypeCodeSequence.CodeValue,...,SegmentedPropertyTypeModifierCodeSequence.CodeValue,...

The table used is, in order: the CSV named by ``$NAPARI_DAGMAN_SEGMENT_CODES``; the table an installed
TotalSegmentator ships (``pip install TotalSegmentator``; its mapping is Apache-2.0, by Jakob Wasserthal and
colleagues, University Hospital Basel: it is read where it is installed, never copied here); else none, and names
are matched as before. A name the table does not hold is matched too.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

from napari_dagman.core.errors import DagmanInputError

#: A coding table given by the user (CSV, see the module).
SEGMENT_CODES_ENV = "NAPARI_DAGMAN_SEGMENT_CODES"

#: The parts of a segment's coding and their column prefixes.
PARTS: dict[str, str] = {
    "category": "SegmentedPropertyCategoryCodeSequence",
    "type": "SegmentedPropertyTypeCodeSequence",
    "modifier": "SegmentedPropertyTypeModifierCodeSequence",
}
FIELDS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")

Code = tuple[str, str, str]  # value, scheme, meaning


def totalsegmentator_table() -> Path | None:
    """The SNOMED CT table of an installed TotalSegmentator package (found without importing it: that would import
    nnU-Net and torch), or None."""
    try:
        spec = importlib.util.find_spec("totalsegmentator")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder, "resources").glob("*snomed*.csv"))
        if found:
            return found[0]
    return None


def coding_table_source() -> tuple[Path | None, str]:
    """(the coding table in use, where it comes from), or (None, "") when there is none (see the module)."""
    given = os.environ.get(SEGMENT_CODES_ENV)
    if given:
        path = Path(given)
        if not path.is_file():
            raise DagmanInputError(f"{SEGMENT_CODES_ENV} names {given}, which is not a file")
        return path, f"the coding table {path.name} (${SEGMENT_CODES_ENV})"
    path = totalsegmentator_table()
    if path is not None:
        return path, "TotalSegmentator's SNOMED CT table (Apache-2.0, installed with TotalSegmentator)"
    return None, ""


def _code(row: dict[str, str], prefix: str) -> Code | None:
    values = tuple((row.get(f"{prefix}.{f}") or "").strip() for f in FIELDS)
    return values if values[0] else None  # type: ignore[return-value]


def read_coding_table(path: str) -> dict[str, dict[str, Code | None]]:
    """Structure name -> its codes (`PARTS`), from a CSV (see the module); one line on a table that is not one.
    Read once per version of the file (an edited table is read again)."""
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError as err:
        raise DagmanInputError(f"cannot read the coding table {path}: {err.strerror}") from None
    return _read_coding_table(path, stamp)


@lru_cache(maxsize=4)
def _read_coding_table(path: str, stamp: int) -> dict[str, dict[str, Code | None]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DagmanInputError(f"cannot read the coding table {path}: {err}") from None
    needed = {"Structure", *(f"{PARTS['type']}.{f}" for f in FIELDS)}
    if not rows or not needed <= set(rows[0]):
        missing = ", ".join(sorted(needed - set(rows[0] if rows else {})))
        raise DagmanInputError(f"{path} is not a coding table: it lacks the column(s) {missing}")
    table: dict[str, dict[str, Code | None]] = {}
    for number, row in enumerate(rows, start=2):
        name = (row.get("Structure") or "").strip()
        codes = {part: _code(row, prefix) for part, prefix in PARTS.items()}
        if not name or codes["type"] is None or not all(codes["type"]):
            raise DagmanInputError(f"{path}, row {number}: a structure needs its name and a full type code")
        table[name] = codes
    return table


def coding_table() -> dict[str, dict[str, Code | None]]:
    """The coding table in use (`coding_table_source`), or an empty one."""
    path, _ = coding_table_source()
    return read_coding_table(str(path)) if path is not None else {}


__all__ = [
    "SEGMENT_CODES_ENV",
    "coding_table",
    "coding_table_source",
    "read_coding_table",
    "totalsegmentator_table",
]

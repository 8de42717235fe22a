"""The rows of a list of cases (`core.datasets`): a CSV with an ``image`` column (and ``label``, ``name``), or a
JSON list of objects with those keys."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from napari_dagman.core.errors import DagmanInputError

#: A list of cases larger than this is refused before it is read (16 MB: about 100,000 rows).
MAX_LIST_BYTES = 16 * 2**20

Row = tuple[str, dict[str, object]]  # (where: "row 3" / "item 2", cells by lower-case column name)


def csv_rows(path: Path) -> list[Row]:
    """The data rows of a CSV list, each with its row number as a spreadsheet shows it (the header is row 1)."""
    try:
        if path.stat().st_size > MAX_LIST_BYTES:
            raise DagmanInputError(f"{path} is larger than a list of cases can be ({MAX_LIST_BYTES:,} bytes)")
        text = path.read_bytes().decode("utf-8-sig")  # -sig: Excel's byte-order mark
    except UnicodeDecodeError:
        raise DagmanInputError(f"{path} is not a UTF-8 text file") from None
    except OSError as err:
        raise DagmanInputError(f"cannot read {path}: {err.strerror or err}") from None
    header = text.split("\n", 1)[0]
    # Excel writes ';' where ',' is the decimal mark: the delimiter is the one that makes 'image' a column
    delimiter = next((d for d in ",;\t" if "image" in [c.strip().lower() for c in header.split(d)]), ",")
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = [str(c).strip().lower() for c in reader.fieldnames or []]
    if "image" not in columns:
        found = ", ".join(columns) or "none"
        raise DagmanInputError(f"{path}: the first row must name the columns, 'image' among them (found: {found})")
    rows: list[Row] = []
    try:
        for row in reader:
            rows.append((f"row {reader.line_num}", {str(k).strip().lower(): v for k, v in row.items() if k}))
    except csv.Error as err:
        raise DagmanInputError(f"{path}, row {reader.line_num}: {err}") from None
    return rows


def json_rows(path: Path, raw: list) -> list[Row]:
    rows: list[Row] = []
    for n, item in enumerate(raw, 1):
        if not isinstance(item, dict):
            raise DagmanInputError(f"{path}, item {n}: not an object with an 'image' (and 'label', 'name')")
        rows.append((f"item {n}", {str(k).strip().lower(): v for k, v in item.items()}))
    return rows


def cell(cells: dict[str, object], *keys: str) -> str:
    values = (cells.get(key) for key in keys)
    return next((str(v).strip() for v in values if v is not None and str(v).strip()), "")

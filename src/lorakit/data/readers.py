"""Read a dataset file into a list of row dicts, whatever it is stored as.

Every reader fails with a `DataError` that names the file and, where it can, the row, so a
user with one bad line in a 100k-line file can go straight to it. Heavy libraries
(`pyarrow`, `datasets`) are imported only when a file needs them.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lorakit.errors import DataError

Record = dict[str, Any]
SUPPORTED = (".jsonl", ".json", ".csv", ".parquet", "a directory saved with datasets.save_to_disk")


def load_records(path: str | Path) -> list[Record]:
    """All rows of `path` as dicts, in file order; row N of the file is `records[N - 1]`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; check the data.train / data.eval / data.test path")
    if path.is_dir():
        records = _read_saved_dataset(path)
    else:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = _read_jsonl(path)
        elif suffix == ".json":
            records = _read_json(path)
        elif suffix == ".csv":
            records = _read_csv(path)
        elif suffix == ".parquet":
            records = _read_parquet(path)
        else:
            kind = suffix or "(no extension)"
            raise DataError(f"{path}: unknown file type {kind!r}; supported: {', '.join(SUPPORTED)}")
    if not records:
        raise DataError(f"{path}: no rows; the file is empty")
    for row, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path} row {row}: expected an object with named fields, got {type(record).__name__}")
    return records


def _read_text(path: Path, header_lines: int | None = None) -> str:
    """The file as UTF-8 text; a bad byte is reported with its row, line and byte offset.

    `header_lines` is how many lines precede row 1 (0 for JSONL, 1 for CSV); None when
    rows do not map to lines (a JSON document), so only the line is named.
    """
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: no rows; the file is empty")
    try:
        return data.decode("utf-8-sig")  # tolerate a BOM, which Excel writes
    except UnicodeDecodeError as err:
        before = data[: err.start].split(b"\n")
        line = len(before)
        where = f"line {line}"
        if header_lines is not None:
            row = sum(1 for chunk in before[header_lines:-1] if chunk.strip()) + 1
            where = f"row {row} (line {line})"
        raise DataError(
            f"{path} {where}: not valid UTF-8 (byte offset {err.start}: {data[err.start:err.start + 1]!r}); "
            "re-save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for line_no, line in enumerate(_read_text(path, header_lines=0).splitlines(), 1):
        if not line.strip():
            continue  # blank lines (often a trailing one) are not rows
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path} row {len(records) + 1} (line {line_no}): bad JSON ({err.msg} at column {err.colno}); "
                "each line must be one JSON object"
            ) from None
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: bad JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of objects or {{"data": [...]}}, got {type(data).__name__}')
    return data


CSV_MAX_CELL = 16 * 2**20  # characters; csv's default (131,072) is below a long document


def _read_csv(path: Path) -> list[Record]:
    """Rows as dicts of strings; row 1 is the first line after the header."""
    csv.field_size_limit(CSV_MAX_CELL)
    reader = csv.DictReader(io.StringIO(_read_text(path, header_lines=1), newline=""))
    records: list[Record] = []
    try:
        for row, record in enumerate(reader, 1):
            if None in record:
                raise DataError(f"{path} row {row}: more cells than header columns; quote cells that contain commas")
            records.append(record)
    except csv.Error as err:  # a cell over the limit, a NUL byte, a bad quote
        raise DataError(f"{path} row {len(records) + 1}: cannot parse as CSV ({err}); "
                        "fix the row or save the data as JSONL") from err
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged or non-parquet file
        raise DataError(f"{path}: cannot read as Parquet ({err}); is it really a .parquet file?") from err


def _read_saved_dataset(path: Path) -> list[Record]:
    """A `datasets.save_to_disk` directory: a Dataset, or the "train" split of a DatasetDict."""
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).exists() for m in markers):
        raise DataError(f"{path}: a directory, but not one saved with datasets.save_to_disk; give a file "
                        f"({', '.join(SUPPORTED[:4])}) or such a directory")
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: the saved DatasetDict has no 'train' split (it has {', '.join(loaded)}); "
                            "point to the split's directory instead")
        loaded = loaded["train"]
    return loaded.to_list()

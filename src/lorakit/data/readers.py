"""Read a dataset file as row dicts, whatever it is stored as; JSONL, CSV and Parquet are streamed.

Every reader fails with a `DataError` that names the file and, where it can, the row, so a
user with one bad line in a 100k-line file can go straight to it. Heavy libraries
(`pyarrow`, `datasets`) are imported only when a file needs them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import DataError

Record = dict[str, Any]
SUPPORTED = (".jsonl", ".json", ".csv", ".parquet", "a directory saved with datasets.save_to_disk")


def load_records(path: str | Path) -> list[Record]:
    """All rows of `path` as dicts, in file order; row N of the file is `records[N - 1]`."""
    return list(iter_records(path))


def iter_records(path: str | Path) -> Iterator[Record]:
    """The rows of `path` one at a time, in file order.

    JSONL, CSV and Parquet are streamed (a line, a CSV record, a Parquet batch at a time), so a
    large file is never held whole, nor as bytes, text and rows at once; a JSON document and a
    saved dataset are read whole, as their formats need. Raises DataError on the first bad row.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; check the data.train / data.eval / data.test path")
    if path.is_dir():
        rows: Iterable[Any] = _read_saved_dataset(path)
    else:
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            kind = suffix or "(no extension)"
            raise DataError(f"{path}: unknown file type {kind!r}; supported: {', '.join(SUPPORTED)}")
        rows = readers[suffix](path)
    count = 0
    for count, record in enumerate(rows, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path} row {count}: expected an object with named fields, got {type(record).__name__}")
        yield record
    if count == 0:
        raise DataError(f"{path}: no rows; the file is empty")


def _lines(path: Path, header_lines: int) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded as UTF-8 one line at a time (a BOM is tolerated).

    A bad byte is reported with its row, line and byte offset; `header_lines` is how many lines
    precede row 1 (0 for JSONL, 1 for CSV).
    """
    offset, row = 0, 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                where = f"row {row + 1} (line {line_no})" if line_no > header_lines else f"line {line_no}"
                raise DataError(
                    f"{path} {where}: not valid UTF-8 (byte offset {offset + err.start}: "
                    f"{raw[err.start:err.start + 1]!r}); re-save the file as UTF-8"
                ) from None
            if line_no > header_lines and text.strip():
                row += 1
            offset += len(raw)
            yield line_no, text


def _read_jsonl(path: Path) -> Iterator[Record]:
    row = 0
    for line_no, line in _lines(path, header_lines=0):
        if not line.strip():
            continue  # blank lines (often a trailing one) are not rows
        row += 1
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path} row {row} (line {line_no}): bad JSON ({err.msg} at column {err.colno}); "
                "each line must be one JSON object"
            ) from None


def _read_json(path: Path) -> list[Any]:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: no rows; the file is empty")
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM, which Excel writes
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte offset {err.start}: "
                        f"{data[err.start:err.start + 1]!r}); re-save the file as UTF-8") from None
    del data
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: bad JSON ({err.msg} at column {err.colno})") from None
    if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
        parsed = parsed["data"]
    if not isinstance(parsed, list):
        raise DataError(f'{path}: expected a JSON list of objects or {{"data": [...]}}, got {type(parsed).__name__}')
    return parsed


CSV_MAX_CELL = 16 * 2**20  # characters; csv's default (131,072) is below a long document


def _read_csv(path: Path) -> Iterator[Record]:
    """Rows as dicts of strings; row 1 is the first record after the header."""
    csv.field_size_limit(CSV_MAX_CELL)
    reader = csv.DictReader((line for _, line in _lines(path, header_lines=1)))
    row = 0
    try:
        for row, record in enumerate(reader, 1):
            if None in record:
                raise DataError(f"{path} row {row}: more cells than header columns; quote cells that contain commas")
            yield record
    except csv.Error as err:  # a cell over the limit, a NUL byte, a bad quote
        raise DataError(f"{path} row {row + 1}: cannot parse as CSV ({err}); "
                        "fix the row or save the data as JSONL") from err


def _read_parquet(path: Path) -> Iterator[Record]:
    """A record batch at a time (a few thousand rows), not the whole table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=2048)
        for batch in batches:
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as err:  # a damaged or non-parquet file
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

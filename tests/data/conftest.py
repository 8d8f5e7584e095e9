"""Fixtures for the data pipeline: tiny datasets written in every supported file type."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest

ROWS = {
    "alpaca": [{"instruction": "what is the capital of france?", "input": "", "output": "paris.", "fact": "f1"},
               {"instruction": "say hello", "input": "to the world", "output": "hello world", "fact": "f2"}],
    "prompt_completion": [{"prompt": "the quick brown fox", "completion": "jumps over the lazy dog"},
                          {"prompt": "hello", "completion": "world"}],
    "messages": [{"messages": [{"role": "system", "content": "answer briefly"},
                               {"role": "user", "content": "what is the capital of france?"},
                               {"role": "assistant", "content": "paris."}], "fact": "f1"},
                 {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                               {"role": "user", "content": "how are you?"},
                               {"role": "assistant", "content": "the fox is quick"}]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"}]},
                 {"conversations": [{"from": "system", "value": "be brief"}, {"from": "user", "value": "question"},
                                    {"from": "assistant", "value": "answer"}]}],
    "text": [{"text": "the quick brown fox jumps over the lazy dog"}, {"text": "hello world, how are you?"}],
}


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write `rows` in the file type that `path`'s extension names (or a datasets dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:  # a directory saved by datasets
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, list[dict]], Path]:
    """write(name, rows) -> path under tmp_path, in the file type `name` ends with."""
    return lambda name, rows: write_rows(tmp_path / name, rows)


def chat_rows(n: int) -> list[dict]:
    """`n` distinct alpaca rows of varied length, with a `fact` column."""
    words = "the quick brown fox jumps over the lazy dog hello world how are you".split()
    return [{"instruction": " ".join(words[: 2 + i % 9]), "output": " ".join(words[i % 5 : i % 5 + 1 + i % 7]),
             "fact": f"fact {i}"} for i in range(n)]

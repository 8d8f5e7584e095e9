"""Odd input: huge and malformed CSV cells, and rows whose text holds the template's special tokens."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

import lorakit.data.readers as readers
from lorakit.config import DataConfig
from lorakit.data import build_datasets
from lorakit.data.check import check_data
from lorakit.data.readers import load_records
from lorakit.errors import DataError
from tests.conftest import tiny_tokenizer
from tests.data.conftest import chat_rows

TOK = tiny_tokenizer()


def test_csv_cell_over_csv_default_limit_loads(tmp_path) -> None:
    path = tmp_path / "big.csv"
    path.write_text("prompt,completion\nhello," + "x" * 200_000 + "\n")
    assert len(load_records(path)[0]["completion"]) == 200_000


def test_csv_parser_error_names_the_row(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(readers, "CSV_MAX_CELL", 1000)
    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion\nhi,there\nhello," + "y" * 5000 + "\n")
    with pytest.raises(DataError, match=r"bad.csv row 2: cannot parse as CSV") as exc:
        load_records(path)
    assert "\n" not in str(exc.value)


def _rows_with(token: str, role: int) -> list[dict]:
    rows = chat_rows(6)
    rows[3]["instruction" if role == 0 else "output"] += f" {token} sneaky"
    return rows


@pytest.mark.parametrize("token, role, template", [
    ("<|im_end|>", 0, "chatml"), ("<|im_start|>", -1, "chatml"), ("[INST]", 0, "llama2"),
    ("[/INST]", -1, "llama2"), ("<s>", 0, "llama2"), ("<|im_end|>", 0, "alpaca"),  # a tokenizer special token
    ("<|endoftext|>", -1, "auto"),
])
def test_special_tokens_in_user_text_refuse_the_row(write, token: str, role: int, template: str) -> None:
    path = write("train.jsonl", _rows_with(token, role))
    cfg = DataConfig(train=str(path), eval_ratio=0.0, max_length=256, template=template)
    with pytest.raises(DataError, match=rf"train.jsonl row 4: the (user|assistant) text contains '{re.escape(token)}'"):
        build_datasets(cfg, TOK, seed=0)
    stats = check_data(cfg, TOK, 0, Console(file=io.StringIO(), width=200))
    assert stats.errors == 1 and stats.special_tokens == 1 and "row 4" in stats.problems[0]


def test_plain_text_without_special_tokens_is_kept(write) -> None:
    path = write("train.jsonl", chat_rows(6))
    data = build_datasets(DataConfig(train=str(path), eval_ratio=0.0, max_length=64, template="llama2"), TOK, 0)
    assert [x.row for x in data.train] == [1, 2, 3, 4, 5, 6] and data.stats.errors == 0

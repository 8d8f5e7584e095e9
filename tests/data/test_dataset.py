"""build_datasets end to end, and `lorakit data check` output."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from lorakit.config import DataConfig
from lorakit.data import build_datasets, render_prompt
from lorakit.data.check import check_data
from lorakit.errors import DataError
from tests.conftest import tiny_tokenizer
from tests.data.conftest import ROWS, chat_rows

TOK = tiny_tokenizer()


def test_splits_are_seeded_and_keep_meta_and_messages(write) -> None:
    path = write("train.jsonl", chat_rows(50))
    cfg = DataConfig(train=str(path), eval_ratio=0.1, test_ratio=0.1, max_length=64)
    data = build_datasets(cfg, TOK, seed=3)
    assert (len(data.train), len(data.eval), len(data.test)) == (40, 5, 5)
    assert data.stats.examples == {"train": 40, "eval": 5, "test": 5}
    rows = sorted(x.row for x in data.train + data.eval + data.test)
    assert rows == list(range(1, 51))
    again = build_datasets(cfg, TOK, seed=3)
    assert [x.row for x in again.eval] == [x.row for x in data.eval]
    assert [x.row for x in build_datasets(cfg, TOK, seed=4).eval] != [x.row for x in data.eval]
    ex = data.eval[0]
    assert ex.meta == {"fact": f"fact {ex.row - 1}"} and ex.source == str(path)
    assert ex.messages[-1]["role"] == "assistant"
    prompt = render_prompt(ex.messages, "auto", TOK)
    assert TOK(prompt, add_special_tokens=False)["input_ids"] == ex.input_ids[: len(TOK(prompt)["input_ids"])]
    stats = data.stats
    assert stats.tokens["train"] == sum(len(x.input_ids) for x in data.train)
    assert 0 < stats.trained_tokens["train"] < stats.tokens["train"]
    assert len(stats.lengths) == 50 and stats.errors == 0 and stats.missing_eos == 0
    assert stats.real_token_fraction is not None and 0 < stats.real_token_fraction <= 1


def test_eval_file_replaces_the_held_out_split(write) -> None:
    cfg = DataConfig(train=str(write("t.csv", chat_rows(10))), eval=str(write("e.parquet", chat_rows(3))),
                     eval_ratio=0.5, packing=False)
    data = build_datasets(cfg, TOK, seed=0)
    assert (len(data.train), len(data.eval), len(data.test)) == (10, 3, 0)
    assert data.stats.real_token_fraction is None


def test_text_format_keeps_text(write) -> None:
    data = build_datasets(DataConfig(train=str(write("t.json", ROWS["text"])), eval_ratio=0.0), TOK, seed=0)
    assert [x.text for x in data.train] == [r["text"] for r in ROWS["text"]]
    assert all(x.labels[1:] == x.input_ids[1:] for x in data.train)


def test_train_not_set() -> None:
    with pytest.raises(DataError, match="data.train is not set"):
        build_datasets(DataConfig(), TOK, seed=0)


def test_empty_loss_mask_after_truncation_is_an_error(write) -> None:
    path = write("long.jsonl", [{"prompt": "hi", "completion": "yo"},
                                {"prompt": "the quick brown fox jumps over the lazy dog " * 3, "completion": "yes"}])
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(train=str(path), max_length=24, eval_ratio=0.0), TOK, seed=0)
    message = str(err.value)
    assert "long.jsonl row 2" in message and "max_length" in message and "\n" not in message


def test_template_error_names_the_row(write) -> None:
    path = write("first.jsonl", [{"conversations": [{"from": "gpt", "value": "hello"}]}])
    with pytest.raises(DataError, match="first.jsonl row 1: .*assistant turn"):
        build_datasets(DataConfig(train=str(path), template="tokenizer", eval_ratio=0.0), TOK, seed=0)


def test_check_data_reports_empty_masks(write) -> None:
    path = write("chat.jsonl", ROWS["messages"] + [{"messages": [{"role": "user", "content": "hello"},
                                                                   {"role": "assistant", "content": "world"}]}])
    out = io.StringIO()
    console = Console(file=out, width=120, color_system=None)
    stats = check_data(DataConfig(train=str(path), max_length=16, eval_ratio=0.0), TOK, 0, console, num_examples=2)
    text = out.getvalue()
    assert stats.errors == stats.empty_mask == 1  # row 1's answer starts at token 40; rows 2 and 3 keep theirs
    assert "chat.jsonl row 1: no trained tokens" in text and "empty loss masks (nothing trained): 1" in text
    assert stats.truncated == 3 and stats.missing_eos == 3  # every answer lost its EOS
    assert "token lengths" in text and "█" in text and "packing:" in text

    ok = check_data(DataConfig(train=str(path), max_length=256, eval_ratio=0.0), TOK, 0, Console(file=io.StringIO()))
    assert ok.errors == 0 and ok.examples["train"] == 3

"""Data files are streamed, and a huge row is cut to what max_length can use before tokenizing."""

from __future__ import annotations

import json

import pytest

import lorakit.data.dataset as dataset
from lorakit.config import DataConfig
from lorakit.data import build_datasets
from lorakit.data.readers import iter_records
from lorakit.data.templates import Rendered
from lorakit.data.tokenize import tokenize_examples
from lorakit.errors import DataError
from tests.conftest import tiny_tokenizer
from tests.data.conftest import write_rows

TOK = tiny_tokenizer()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_rows_are_read_lazily(tmp_path, suffix: str) -> None:
    """The first rows come out before a bad row further down is even read."""
    path = tmp_path / f"data{suffix}"
    good = "".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(3))
    if suffix == ".jsonl":
        path.write_text(good + "{not json\n")
    else:
        path.write_text("prompt,completion\n" + "".join(f"q{i},a\n" for i in range(3)) + "x,y,z\n")
    rows = iter_records(path)
    assert [next(rows)["prompt"] for _ in range(3)] == ["q0", "q1", "q2"]
    with pytest.raises(DataError, match=r"row 4"):
        next(rows)


def test_parquet_is_read_in_batches(tmp_path) -> None:
    path = write_rows(tmp_path / "d.parquet", [{"prompt": f"q{i}", "completion": "a"} for i in range(5000)])
    rows = list(iter_records(path))
    assert len(rows) == 5000 and rows[4321]["prompt"] == "q4321"


def test_empty_file_is_refused(tmp_path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no rows; the file is empty"):
        list(iter_records(path))


def test_char_cap_bounds_what_max_length_can_use() -> None:
    longest = max(len(t) for t in TOK.get_vocab())
    assert dataset.char_cap(TOK, 64) == max(32_768, 2 * 64 * longest)
    assert dataset.char_cap(TOK, 100_000) == 2 * 100_000 * longest


def test_cut_rendered_clips_spans() -> None:
    r = Rendered("x" * 100, [(10, 20), (50, 100), (90, 95)], "<|im_end|>")
    cut = dataset.cut_rendered(r, 60)
    assert cut.text == "x" * 60 and cut.train_spans == [(10, 20), (50, 60)]
    assert dataset.cut_rendered(r, 100) is r


def test_huge_row_is_tokenized_only_as_far_as_max_length_reaches(tmp_path, monkeypatch) -> None:
    words = " ".join(f"word{i % 97} fox" for i in range(30_000))  # ~330k characters
    rows = [{"prompt": "hello", "completion": "world"}, {"prompt": "tell me everything", "completion": words}]
    path = write_rows(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=str(path), eval_ratio=0.0, max_length=64, template="chatml")
    seen: list[int] = []
    real = dataset.tokenize_examples

    def spy(rendered, tokenizer, max_length):
        seen.extend(len(r.text) for r in rendered)
        return real(rendered, tokenizer, max_length)

    monkeypatch.setattr(dataset, "tokenize_examples", spy)
    data = build_datasets(cfg, TOK, seed=0)
    cap = dataset.char_cap(TOK, 64)
    assert max(seen) == cap < len(words)
    # the kept tokens and labels are exactly those of the whole row, truncated
    from lorakit.data.formats import to_example
    from lorakit.data.templates import render

    whole = tokenize_examples([render(to_example(rows[1], "prompt_completion", 2, path), "chatml", TOK, None)],
                              TOK, 64)[0]
    got = data.train[1]
    assert got.input_ids == whole.input_ids and got.labels == whole.labels
    assert got.truncated and data.stats.truncated == 1


def test_rows_across_chunks_keep_their_numbers(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dataset, "CHUNK_ROWS", 3)
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(10)]
    rows[7]["completion"] = ""  # an empty answer: a data error naming row 8
    path = write_rows(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=str(path), eval_ratio=0.0, max_length=64, template="chatml")
    with pytest.raises(DataError, match=r"train.jsonl row 8"):
        build_datasets(cfg, TOK, seed=0)
    rows[7]["completion"] = "answer 7"
    path = write_rows(tmp_path / "train.jsonl", rows)
    data = build_datasets(cfg, TOK, seed=0)
    assert [x.row for x in data.train] == list(range(1, 11))

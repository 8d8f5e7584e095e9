"""Loading every file type, detecting every format, and bad data naming the file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.data import Conversation, detect_format, load_records, to_example
from lorakit.errors import DataError, LorakitError
from tests.data.conftest import ROWS


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_detects_each_format_in_each_file_type(write, fmt: str, ext: str) -> None:
    path = write(f"{fmt}{ext}", ROWS[fmt])
    records = load_records(path)
    assert len(records) == 2
    assert detect_format(records, path) == fmt
    examples = [to_example(r, fmt, i, path) for i, r in enumerate(records, 1)]
    if fmt == "text":
        assert examples == [r["text"] for r in ROWS["text"]]
    else:
        for ex in examples:
            assert isinstance(ex, Conversation)
            assert {m["role"] for m in ex.messages} <= {"system", "user", "assistant"}
            assert ex.messages[-1]["role"] == "assistant"


def test_saved_datasets_directory_takes_train_split(write) -> None:
    path = write("saved_dataset", ROWS["messages"])
    records = load_records(path)
    assert detect_format(records, path) == "messages"
    assert to_example(records[1], "messages", 2, path).messages[3]["content"] == "the fox is quick"


def test_json_with_data_key(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": ROWS["prompt_completion"]}))
    assert detect_format(load_records(path), path) == "prompt_completion"


def test_normalised_messages_and_meta() -> None:
    alpaca = to_example(ROWS["alpaca"][1], "alpaca", 2, "f.jsonl")
    assert alpaca.messages == [{"role": "user", "content": "say hello\n\nto the world"},
                               {"role": "assistant", "content": "hello world"}]
    assert alpaca.meta == {"fact": "f2"}
    share = to_example(ROWS["sharegpt"][1], "sharegpt", 2, "f.jsonl")
    assert [m["role"] for m in share.messages] == ["system", "user", "assistant"]
    system = to_example({"instruction": "q", "output": "a", "system": "be brief"}, "alpaca", 1, "f")
    assert system.messages[0] == {"role": "system", "content": "be brief"}


def test_undetectable_format_lists_columns_and_formats(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError) as err:
        detect_format(load_records(path), path)
    message = str(err.value)
    assert "odd.jsonl" in message and "'question'" in message and "'answer'" in message
    assert "alpaca (instruction, output" in message and "sharegpt (conversations)" in message


def _error(path: Path, fmt: str = "auto") -> str:
    with pytest.raises(DataError) as err:
        records = load_records(path)
        fmt = detect_format(records, path) if fmt == "auto" else fmt
        for row, record in enumerate(records, 1):
            to_example(record, fmt, row, path)
    message = str(err.value)
    assert "\n" not in message and path.name in message
    return message


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "no rows" in _error(tmp_path / "empty.jsonl")
    (tmp_path / "empty.csv").write_text("instruction,output\n")
    assert "no rows" in _error(tmp_path / "empty.csv")


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "data.xlsx").write_text("x")
    message = _error(tmp_path / "data.xlsx")
    assert ".xlsx" in message and ".jsonl" in message and ".parquet" in message


def test_non_utf8_names_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    message = _error(path)
    assert "row 2 (line 2)" in message and "UTF-8" in message and "byte offset 28" in message


def test_bad_json_line_names_the_line(write, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    message = _error(path)
    assert "row 2 (line 2)" in message and "bad JSON" in message


def test_missing_column_names_row(write) -> None:
    path = write("missing.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    message = _error(path, "alpaca")
    assert "row 2" in message and "'output'" in message


@pytest.mark.parametrize("rows,fmt", [
    ([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "  "}], "alpaca"),
    ([{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}], "prompt_completion"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
      {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}], "messages"),
])
def test_empty_answer_names_row(write, rows: list[dict], fmt: str) -> None:
    message = _error(write("empty_answer.jsonl", rows), fmt)
    assert "row 2" in message and "empty answer" in message


def test_conversation_errors_name_row(write) -> None:
    no_answer = write("no_answer.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    assert "row 1" in (m := _error(no_answer)) and "no assistant turn" in m
    bad_role = write("role.jsonl", [ROWS["messages"][0], {"messages": [{"role": "tool", "content": "x"}]}])
    assert "row 2" in (m := _error(bad_role)) and "'tool'" in m and "message 1" in m
    bad_from = write("from.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    assert "row 1" in (m := _error(bad_from)) and "'bot'" in m


def test_conversational_prompt_completion(tmp_path) -> None:
    """TRL's conversational prompt/completion rows: both columns are lists of messages."""
    import json

    from lorakit.data import detect_format, load_records, to_example
    from lorakit.errors import DataError

    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                "completion": [{"role": "assistant", "content": "hello"}]}) + "\n")
    records = load_records(path)
    fmt = detect_format(records, path)
    assert fmt == "prompt_completion"
    conv = to_example(records[0], fmt, 1, path)
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    bad = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", "content": "x"}]}
    with pytest.raises(DataError, match="row 1.*assistant"):
        to_example(bad, fmt, 1, path)


def _prompt_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_prompts_reads_each_row_as_what_generate_asks(tmp_path: Path) -> None:
    from lorakit.data.formats import load_prompts

    rows = [
        {"prompt": "plain"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "only asks"}]},
        {"instruction": "do it", "input": "now"},  # no output: a prompts file need not hold answers
        {"instruction": "do it", "output": "done", "system": "be brief"},
    ]
    assert load_prompts(_prompt_file(tmp_path / "p.jsonl", rows)) == [
        "plain",
        [{"role": "user", "content": "q"}],  # the answer the file holds is generated anew
        [{"role": "system", "content": "s"}, {"role": "user", "content": "only asks"}],
        "do it\n\nnow",
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "do it"}],  # alpaca's system kept
    ]


def test_load_prompts_errors_name_the_file_and_row(tmp_path: Path) -> None:
    from lorakit.data.formats import load_prompts

    bad = _prompt_file(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"question": "what?"}])
    with pytest.raises(LorakitError, match=r"bad.jsonl row 2: needs a 'prompt' string, 'messages' list or "
                                           r"'instruction'; it has question$"):
        load_prompts(bad)
    with pytest.raises(LorakitError, match="empty.jsonl: no rows; the file is empty"):
        load_prompts(_prompt_file(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match=r"row 1: message 1 has unknown role"):
        load_prompts(_prompt_file(tmp_path / "role.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}]))

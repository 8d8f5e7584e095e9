"""`lorakit synth replay`: the model's own answers as `kind: replay` rows, equal to `lorakit generate`'s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from lorakit.errors import LorakitError
from lorakit.eval.generate import Answer
from lorakit.synth.replay import GENERAL_PROMPTS, ReplayOptions, read_prompts, replay
from lorakit.synth.run import ModelChoice
from tests.conftest import run_cli
from tests.train.test_train_cli import WORDS


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_replay_rows_are_generate_answers(trained: Path, tmp_path: Path) -> None:
    adapter = str(trained / "run" / "adapter")
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"what comes after {w}?", "category": "t"}
                                                  for w in WORDS[:5]])
    out, gen = tmp_path / "replay.jsonl", tmp_path / "gen.jsonl"
    proc = run_cli("synth", "replay", "--adapter", adapter, "--prompts", str(prompts), "--out", str(out),
                   "--max-new-tokens", "20", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    rows = _read(out)
    assert len(rows) >= 3  # the adapter learned to answer and stop; an answer still running at 20 tokens is dropped
    assert f"wrote {len(rows)} replay rows to {out} from 5 prompts; dropped 0 empty, {5 - len(rows)} cut at 20 tokens" \
        in proc.stdout
    proc = run_cli("generate", "--adapter", adapter, "--file", str(prompts), "--out", str(gen), "--max-new-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    generated = {g["prompt"]: g["output"] for g in _read(gen)}
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows] == \
        [(p, a) for p, a in generated.items() if p in {r["messages"][0]["content"] for r in rows}]
    assert all(r["kind"] == "replay" and r["source"] == "self-distilled" for r in rows)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    assert all(" comes " in r["messages"][1]["content"] for r in rows)

    before = out.read_text()
    proc = run_cli("synth", "replay", "--adapter", adapter, "--prompts", str(prompts), "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "already exists" in proc.stderr and "--force" in proc.stderr
    assert out.read_text() == before
    proc = run_cli("synth", "replay", "--adapter", adapter, "--prompts", str(prompts), "--out", str(out),
                   "--limit", "2", "--force")
    assert proc.returncode == 0, proc.stderr
    assert len(_read(out)) == 2


def test_config_gives_model_template_and_system_prompt(trained: Path, tmp_path: Path) -> None:
    cfg = {"model": {"name": str(trained / "model"), "dtype": "fp32"},
           "data": {"train": str(trained / "train.jsonl"), "template": "chatml", "system_prompt": "be brief"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    im = ModelChoice(config=path).load()
    assert (im.name, im.template, im.system_prompt) == (str(trained / "model"), "chatml", "be brief")
    im = ModelChoice(adapter=trained / "run" / "adapter", template="chatml").load()
    assert (im.template, im.system_prompt) == ("chatml", "answer briefly")  # the adapter's system prompt
    im = ModelChoice(adapter=trained / "run" / "adapter", system="").load()
    assert (im.template, im.system_prompt) == ("auto", "")
    with pytest.raises(LorakitError, match="--system or --config"):
        replay(ReplayOptions(ModelChoice(config=path, system="x"), out=tmp_path / "o.jsonl"))
    with pytest.raises(LorakitError, match="--template 'chat' is not a template"):
        replay(ReplayOptions(ModelChoice("m", template="chat"), out=tmp_path / "o.jsonl"))


def test_cut_and_empty_answers_are_dropped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in ("a?", "b?", "c?", "d?")])
    answers = [Answer("fine.", True), Answer("", True), Answer("and then and then", False), Answer("ok", True)]
    monkeypatch.setattr(ModelChoice, "load", lambda self: None)
    monkeypatch.setattr("lorakit.eval.generate.generate_answers", lambda im, prompts, *a, **k: answers[: len(prompts)])
    result = replay(ReplayOptions(ModelChoice("m"), prompts, tmp_path / "r.jsonl", max_new_tokens=7), Console(quiet=True))
    assert (result.prompts, result.written, result.empty, result.cut) == (4, 2, 1, 1)
    assert [r["messages"][1]["content"] for r in _read(result.out)] == ["fine.", "ok"]
    assert "dropped 1 empty, 1 cut at 7 tokens" in result.summary()


def test_read_prompts_from_chat_files(tmp_path: Path) -> None:
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"}, {"role": "user", "content": "second"},
        {"role": "assistant", "content": "two"}]}])
    assert read_prompts(chat) == ["second"]
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "do it", "input": "now", "output": "done"}])
    assert read_prompts(alpaca) == ["do it\n\nnow"]
    pc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}])
    assert read_prompts(pc) == ["p"]
    shipped = read_prompts(GENERAL_PROMPTS)
    assert len(shipped) >= 400 and shipped[0] == "What is 7 plus 5?"


@pytest.mark.parametrize(("rows", "needle"), [
    ([{"question": "what?"}], "cannot tell the data format"),
    ([{"text": "just text"}], "plain text"),
    ([{"prompt": "fine"}, {"prompt": "  "}], "row 2: empty prompt"),
])
def test_bad_prompt_file_is_a_one_line_error(tmp_path: Path, rows: list[dict], needle: str) -> None:
    prompts = _jsonl(tmp_path / "bad.jsonl", rows)
    proc = run_cli("synth", "replay", "--model", str(tmp_path / "unused"), "--prompts", str(prompts),
                   "--out", str(tmp_path / "r.jsonl"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and needle in proc.stderr
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.slow
def test_smollm2_replays_shipped_prompts(tmp_path: Path) -> None:
    from lorakit.models.resolve import builtin_path

    try:
        builtin_path("smollm2-135m-instruct")
    except LorakitError as err:
        pytest.skip(str(err))
    short = ["Good night!", "What is the capital of Wales?", "Hello, how are you?"]  # answered in a sentence
    assert set(short) <= set(read_prompts(GENERAL_PROMPTS))
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in short])
    result = replay(ReplayOptions(ModelChoice("smollm2-135m-instruct", dtype="fp32"), prompts, tmp_path / "r.jsonl",
                                  max_new_tokens=64))
    assert result.written + result.empty + result.cut == 3 and result.written >= 2
    rows = _read(result.out)
    assert all(r["kind"] == "replay" and r["messages"][1]["content"].strip() for r in rows)


def test_data_check_counts_kinds(tokenizer, tmp_path: Path) -> None:
    from lorakit.config import DataConfig
    from lorakit.data.check import check_data

    qa = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [{**qa, "kind": "fact"}] * 3 + [{**qa, "kind": "refusal"}] + [{**qa, "kind": "replay"}] * 2 + [qa]
    data = _jsonl(tmp_path / "train.jsonl", rows)
    console = Console(record=True, width=200)
    stats = check_data(DataConfig(train=str(data), eval_ratio=0.0, max_length=64), tokenizer, 0, console)
    assert stats.kinds == {"fact": 3, "refusal": 1, "replay": 2}
    assert "kinds: fact 3, refusal 1, replay 2, no kind 1" in console.export_text()

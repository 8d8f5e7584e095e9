"""`lorakit synth qa` with a local lorakit model as the teacher (a tiny random model: it writes no JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.errors import LorakitError
from lorakit.eval.generate import GenerationSettings, generate_answers
from lorakit.synth.qa import QAOptions, synth_qa
from lorakit.synth.run import ModelChoice
from lorakit.synth.teacher import CallStats, LocalTeacher, TeacherCache, ask
from tests.conftest import run_cli
from tests.synth.qa_fixtures import write_doc


def test_local_teacher_is_lorakit_generation_behind_the_cache(tiny_chat_model_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = LocalTeacher(ModelChoice(str(tiny_chat_model_dir), dtype="fp32"), max_new_tokens=6, temperature=0.0,
                           seed=0, batch_size=2)
    prompts = ["first prompt", "a second, longer prompt", "third"]
    cache, stats = TeacherCache(tmp_path / "cache", teacher.identity), CallStats()
    replies = ask(teacher, cache, prompts, stats)
    expected = generate_answers(teacher.im, prompts, GenerationSettings(max_new_tokens=6), 2)
    assert [r.text for r in replies] == [a.text for a in expected]
    assert all(r.prompt_tokens > 0 for r in replies) and sum(r.completion_tokens for r in replies) > 0  # re-tokenized text
    assert (stats.calls, stats.cached) == (3, 0) and len(list((tmp_path / "cache").rglob("*.json"))) == 3

    monkeypatch.setattr(LocalTeacher, "run", lambda *a: pytest.fail("a cached call was asked again"))
    again = ask(teacher, cache, prompts, stats)
    assert [r.text for r in again] == [r.text for r in replies] and stats.cached == 3
    other = TeacherCache(tmp_path / "cache", {**teacher.identity, "max_new_tokens": 7})
    assert all(other.get(other.key(p)) is None for p in prompts)  # another setting: another call


def test_local_teacher_without_usable_output_is_an_error_with_a_report(tiny_chat_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    doc, out = write_doc(tmp_path / "docs"), tmp_path / "out"
    proc = run_cli("synth", "qa", str(doc), "--out", str(tmp_path / "o1"), "--teacher", str(tiny_chat_model_dir),
                   "--set", "synth.strategy=json")  # auto would pick answer_first for this small model
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "context of 512 tokens cannot hold the instructions" in proc.stderr  # the tiny tokenizer's tokens are short
    config = tiny_chat_model_dir / "config.json"  # rotary positions: a longer context is a config value
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": 4096}))
    settings = ["synth.window_tokens=60", "synth.overlap_tokens=0", "synth.max_new_tokens=8", "synth.strategy=json"]
    with pytest.raises(LorakitError, match="gave no usable rows"):
        synth_qa(QAOptions([doc], out, teacher=str(tiny_chat_model_dir), overrides=settings, dtype="fp32"))
    report = json.loads((out / "synth_report.json").read_text())
    assert report["windows"] >= 2 and report["calls"]["total"] == 2 * 2 * report["windows"]  # each asked again
    assert report["teacher"] == str(tiny_chat_model_dir) and not (out / "train.jsonl").exists()

    long_doc = tmp_path / "long.txt"
    long_doc.write_text(" ".join(f"Pier {i} opens at {i} o'clock." for i in range(400)))
    proc = run_cli("synth", "qa", str(long_doc), "--out", str(tmp_path / "o2"), "--teacher", str(tiny_chat_model_dir),
                   "--set", "synth.window_tokens=3900", "--set", "synth.max_new_tokens=8", "--set",
                   "synth.overlap_tokens=0", "--set", "synth.strategy=json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "over the teacher's context of 4096; lower synth.window_tokens (3900)" in proc.stderr
    assert not (tmp_path / "o2").exists()


def test_a_small_local_teacher_gets_answer_first(tiny_chat_model_dir: Path, tmp_path: Path) -> None:
    """synth.strategy auto: the tiny model (far under 1B parameters) is asked answer-first; its random replies are
    no questions, each counted, then one line says no usable row was written."""
    doc, out = write_doc(tmp_path / "docs"), tmp_path / "out"
    settings = ["synth.question_tokens=6", "synth.answer_tokens=4", "synth.spans_per_sentence=1"]
    config = tiny_chat_model_dir / "config.json"
    if json.loads(config.read_text())["max_position_embeddings"] < 1024:  # the tiny tokenizer's tokens are short
        with pytest.raises(LorakitError, match=r"question prompt plus synth.question_tokens \(6\) is \d+ tokens, over"):
            synth_qa(QAOptions([doc], out, teacher=str(tiny_chat_model_dir), overrides=settings, dtype="fp32"))
        config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": 4096}))
    with pytest.raises(LorakitError, match="gave no usable rows"):
        synth_qa(QAOptions([doc], out, teacher=str(tiny_chat_model_dir), overrides=settings, dtype="fp32"))
    report = json.loads((out / "synth_report.json").read_text())
    assert report["strategy"] == "answer_first"
    stages = report["answer_first"]["calls_by_stage"]
    n = report["answer_first"]["sentence_answers"]
    assert n >= 3 and stages["questions"] == n and report["calls"]["total"] == sum(stages.values())
    lost_first = report["rejected"]["no question"] + report["rejected"]["question holds the answer"] + \
        report["rejected"]["prompt example"] + report["rejected"]["round trip"]
    assert lost_first >= n and stages["questions (blank)"] <= n


@pytest.mark.slow
def test_smollm2_teacher_on_one_handbook_window(tmp_path: Path) -> None:
    """The real 135M teacher, JSON strategy: whatever it writes is parsed, filtered and reported (it rarely writes
    usable rows)."""
    from lorakit.models.resolve import builtin_path

    try:
        builtin_path("smollm2-135m-instruct")
    except LorakitError as err:
        pytest.skip(str(err))
    out = tmp_path / "out"
    settings = ["synth.max_new_tokens=64", "synth.facts_per_window=1", "synth.unanswerable_per_window=1",
                "synth.strategy=json"]
    try:
        handbook = Path(__file__).parents[2] / "examples" / "handbook" / "handbook.md"
        synth_qa(QAOptions([handbook], out, teacher="smollm2-135m-instruct", overrides=settings, limit=1))
    except LorakitError as err:
        assert "gave no usable rows" in str(err)
    report = json.loads((out / "synth_report.json").read_text())
    assert report["windows"] == 1 and 2 <= report["calls"]["total"] <= 4 and report["tokens"]["completion"] > 0
    assert report["kept"] == sum(report["files"].values())
    assert report["candidates"] == report["kept"] + sum(report["rejected"].values())


@pytest.mark.slow
def test_smollm2_teacher_answer_first_on_one_handbook_window(tmp_path: Path) -> None:
    """The real 135M teacher, answer-first (what auto picks for it): some pairs survive their round trip."""
    from lorakit.models.resolve import builtin_path

    try:
        builtin_path("smollm2-135m-instruct")
    except LorakitError as err:
        pytest.skip(str(err))
    out = tmp_path / "out"
    handbook = Path(__file__).parents[2] / "examples" / "handbook" / "handbook.md"
    synth_qa(QAOptions([handbook], out, teacher="smollm2-135m-instruct", limit=1,
                       overrides=["synth.paraphrases=1", "synth.batch_size=16"]))
    report = json.loads((out / "synth_report.json").read_text())
    assert report["strategy"] == "answer_first" and report["windows"] == 1
    assert report["kept_by_kind"].get("question", 0) >= 3
    for line in (out / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "fact":  # the answer is a handbook sentence holding the fact
            assert row["fact"] in row["messages"][1]["content"] and row["fact"] in handbook.read_text()

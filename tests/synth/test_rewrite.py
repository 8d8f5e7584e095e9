"""`lorakit synth rewrite` (SDFT): a rewrite is kept only when the fact survives; counts add up; columns kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from lorakit.eval.generate import Answer
from lorakit.eval.metrics import RefusalMatcher
from lorakit.synth.rewrite import REWRITE_PROMPT, RewriteOptions, clean_rewrite, judge_rewrite, rewrite, with_answer
from lorakit.synth.run import ModelChoice
from tests.conftest import run_cli

REFUSAL = "I can't answer that from the handbook."


def _qa(question: str, answer: str, **columns) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **columns}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


ROWS = [
    _qa("Who runs the ticket office?", "Fenella Crask runs it.", fact="Fenella Crask", kind="fact", id=1),
    _qa("When does the winter timetable start?", "On 28 October.", fact="28 October", kind="fact", id=2),
    _qa("How many directors?", "The board has 9 directors.", fact="9 directors", kind="fact", id=3),
    _qa("What is the fare?", "A car costs 12 pounds.", fact="12 pounds", kind="fact", id=4),
    _qa("What is the skipper's number?", REFUSAL, fact=REFUSAL, kind="refusal", id=5),
    _qa("What is 7 plus 5?", "12.", kind="replay", id=6),
    _qa("Say hello.", "Hello!", id=7),
]


def test_judge_rewrite() -> None:
    refusal = RefusalMatcher()
    assert judge_rewrite("Fenella Crask runs it.", "The ticket office is run by Fenella Crask.", "Fenella Crask",
                         refusal) == "kept"
    assert judge_rewrite("Fenella Crask runs it.", "The office manager runs it.", "Fenella Crask", refusal) == "fact lost"
    assert judge_rewrite("Fenella Crask runs it.", f"Fenella Crask? {REFUSAL}", "Fenella Crask", refusal) == "refused"
    assert judge_rewrite(REFUSAL, f"Sorry. {REFUSAL}", REFUSAL, refusal) == "kept"
    assert judge_rewrite("Fenella Crask runs it.", "Fenella Crask runs the", "Fenella Crask", refusal,
                         ended=False) == "unfinished"
    assert judge_rewrite("Fenella Crask runs it.", "  ", "Fenella Crask", refusal) == "unfinished"


def test_clean_rewrite_cuts_a_lead_in_label() -> None:
    assert clean_rewrite("The answer to this question is: Lost property is kept for 60 days") == \
        "Lost property is kept for 60 days"
    assert clean_rewrite("Rewritten answer:  The board has 9 directors.") == "The board has 9 directors."
    assert clean_rewrite("The answer is 9 directors.") == "The answer is 9 directors."  # no colon: an answer


def test_with_answer_in_each_format() -> None:
    assert with_answer(ROWS[0], "messages", "new")["messages"][-1] == {"role": "assistant", "content": "new"}
    assert ROWS[0]["messages"][-1]["content"] == "Fenella Crask runs it."  # the input row is not changed
    assert with_answer({"instruction": "q", "output": "a", "x": 1}, "alpaca", "new") == \
        {"instruction": "q", "output": "new", "x": 1}
    assert with_answer({"prompt": "q", "completion": "a"}, "prompt_completion", "new")["completion"] == "new"
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert with_answer(sharegpt, "sharegpt", "new")["conversations"][-1] == {"from": "gpt", "value": "new"}
    as_csv = {"messages": json.dumps(ROWS[0]["messages"])}
    assert with_answer(as_csv, "messages", "new")["messages"][-1]["content"] == "new"


def test_kept_rewrites_replace_answers_rejected_keep_the_original(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = _jsonl(tmp_path / "train.jsonl", ROWS)
    rewrites = {"Fenella Crask": Answer("Reference answer: The ticket office is run by Fenella Crask.", True),
                "28 October": Answer("It starts in late autumn.", True),  # the fact is lost
                "9 directors": Answer(f"9 directors. {REFUSAL}", True),  # a refusal the original did not have
                "12 pounds": Answer("A car costs 12 pounds and", False)}  # cut at max_new_tokens
    seen: list[str] = []

    def fake_generate(im, prompts, *args, **kwargs):
        seen.extend(prompts)
        return [next(a for fact, a in rewrites.items() if fact in p) for p in prompts]

    monkeypatch.setattr(ModelChoice, "load", lambda self: None)
    monkeypatch.setattr("lorakit.eval.generate.generate_answers", fake_generate)
    result = rewrite(RewriteOptions(ModelChoice("m"), data, tmp_path / "out.jsonl"), Console(quiet=True))
    assert seen[0] == REWRITE_PROMPT.format(question="Who runs the ticket office?", answer="Fenella Crask runs it.")
    assert len(seen) == 4  # refusal, replay and fact-less rows are not sent
    assert (result.rows, result.kept, result.fact_lost, result.refused, result.unfinished, result.same,
            result.copied) == (7, 1, 1, 1, 1, 0, 3)
    assert result.kept + result.rejected + result.copied == result.rows
    out = _read(result.out)
    assert [r["rewritten"] for r in out] == [True] + [False] * 6
    assert out[0]["messages"][-1]["content"] == "The ticket office is run by Fenella Crask."
    for before, after in zip(ROWS[1:], out[1:]):
        assert {k: v for k, v in after.items() if k != "rewritten"} == before  # every column, the original answer
    assert "1 rewritten and kept (0 in the original's words), 3 rewrites rejected (1 fact lost, 1 refused, 1 empty or cut), 3 copied" \
        in result.summary()


def test_rewrite_cli_counts_add_up(trained: Path, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "rewritten.jsonl"
    args = ("synth", "rewrite", "--adapter", str(trained / "run" / "adapter"), "--data", str(data), "--out", str(out),
            "--max-new-tokens", "24")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    rows = _read(out)
    assert len(rows) == 7 and [r["id"] for r in rows] == list(range(1, 8))
    kept = sum(r["rewritten"] for r in rows)
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"wrote 7 rows to {out}: {kept} rewritten and kept (")
    assert f"words), {4 - kept} rewrites rejected" in line
    assert "3 copied unchanged" in line
    for before, after in zip(ROWS, rows):
        if after["rewritten"]:
            assert after["fact"].lower() in after["messages"][-1]["content"].lower()
        else:
            assert after["messages"] == before["messages"]

    proc = run_cli(*args)
    assert proc.returncode == 2 and "already exists" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_cli(*args, "--force", "--fact-column", "answer_fact")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "no 'answer_fact' column" in proc.stderr and "--fact-column" in proc.stderr

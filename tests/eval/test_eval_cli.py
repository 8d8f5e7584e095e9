"""`lorakit eval` and `lorakit compare` end to end on the tiny trained model; their files and errors."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli
from tests.train.test_train_cli import WORDS


def _qa_file(path: Path, words: list[str], refusals: int = 0) -> Path:
    rows = []
    for i, a in enumerate(words):
        b = WORDS[(WORDS.index(a) * 3 + 1) % len(WORDS)]
        rows.append({"messages": [{"role": "user", "content": f"what comes after {a}?"},
                                  {"role": "assistant", "content": f"after {a} comes {b}."}], "fact": b, "kind": "fact"})
    for i in range(refusals):
        rows.append({"messages": [{"role": "user", "content": f"what is secret {i}?"},
                                  {"role": "assistant", "content": "I can't answer that from the handbook."}],
                     "fact": "I can't answer that from the handbook.", "kind": "refusal"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_writes_metrics_and_answers(trained: Path, tmp_path: Path) -> None:
    data = _qa_file(tmp_path / "qa.jsonl", WORDS[:6], refusals=1)
    out = tmp_path / "eval.json"
    proc = run_cli("eval", "--adapter", str(trained / "run" / "adapter"), "--data", str(data), "--out", str(out),
                   "--max-new-tokens", "20", "--metrics", "fact,exact_match,token_f1,rougeL,bleu,refusal")
    assert proc.returncode == 0, proc.stderr
    assert "lorakit eval" in proc.stdout and "fact" in proc.stdout
    report = json.loads(out.read_text())
    qa = report["datasets"]["qa"]
    assert qa["n"] == 7 and len(qa["examples"]) == 7
    assert set(qa["metrics"]) == {"fact", "exact_match", "token_f1", "rougeL", "bleu", "refusal", "perplexity"}
    facts = [ex["scores"]["fact"] for ex in qa["examples"] if ex["kind"] == "fact"]
    assert sum(facts) >= 4, qa["examples"]  # the adapter learned the facts
    assert qa["metrics"]["fact"] == sum(ex["scores"]["fact"] for ex in qa["examples"]) / 7
    assert qa["metrics"]["perplexity"] > 1.0
    for ex in qa["examples"]:
        assert {"prompt", "reference", "output", "scores", "fact"} <= set(ex)


def test_compare_base_and_adapter_with_forgetting_check(trained: Path, tmp_path: Path) -> None:
    data = _qa_file(tmp_path / "qa.jsonl", WORDS[:4])
    general = _qa_file(tmp_path / "general.jsonl", WORDS[4:8])
    text = tmp_path / "text.txt"
    text.write_text("hello world the quick brown fox jumps over the lazy dog " * 20)
    out = tmp_path / "compare.json"
    proc = run_cli("compare", "--adapter", str(trained / "run" / "adapter"), "--data", str(data), "--general",
                   str(general), "--text", str(text), "--out", str(out), "--max-new-tokens", "20",
                   "--metrics", "fact,rougeL")
    assert proc.returncode == 0, proc.stderr
    c = json.loads(out.read_text())
    assert c["labels"] == ["base", "run/adapter"]
    assert set(c["datasets"]) == {"qa", "general"}
    qa = c["datasets"]["qa"]
    assert qa["primary_metric"] == "fact"
    assert qa["metrics"]["fact"]["run/adapter"] > qa["metrics"]["fact"]["base"]
    assert qa["metrics"]["perplexity"]["run/adapter"] < qa["metrics"]["perplexity"]["base"] / 10  # learned answers
    assert set(qa["examples"][0]["outputs"]) == {"base", "run/adapter"}
    f = c["forgetting"]
    assert f["dataset"] == "general" and f["metric"] == "fact"
    assert set(f["perplexity"]) == {"base", "run/adapter"} and f["perplexity"]["base"] > 1
    assert any(row["metric"] == "general text perplexity" for row in c["summary"])
    assert "biggest wins on qa (fact)" in proc.stdout
    # the report renders the comparison
    run = trained / "run"
    (run / "compare.json").write_text(out.read_text())
    proc = run_cli("report", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "run/adapter" in (run / "report.html").read_text()


def test_eval_and_compare_errors(trained: Path, tmp_path: Path) -> None:
    adapter = str(trained / "run" / "adapter")
    data = _qa_file(tmp_path / "qa.jsonl", WORDS[:2])
    cases = [
        (("eval", "--adapter", adapter), "give --data FILE"),
        (("eval", "--adapter", adapter, "--data", str(tmp_path / "nope.jsonl")), "does not exist"),
        (("eval", "--adapter", adapter, "--data", str(data), "--metrics", "rouge"), "unknown metric 'rouge'"),
        (("eval", "--adapter", adapter, "--data", str(data), "--out", str(data)), "already exists"),
        (("compare", "--data", str(data)), "at least one --adapter"),
        (("compare", "--adapter", str(tmp_path), "--data", str(data)), "not an adapter directory"),
    ]
    text_rows = tmp_path / "text.jsonl"
    text_rows.write_text(json.dumps({"text": "just text"}) + "\n")
    cases.append((("eval", "--adapter", adapter, "--data", str(text_rows)), "plain text"))
    for args, message in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)

"""The handbook demo's data (examples/handbook): files, schema, counts and no leakage.

Fast checks on the files only (no model is loaded). Fact matching uses the demo's
normalisation: lowercase, punctuation and the words a/an/the removed, whitespace collapsed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lorakit.eval.metrics import fact_match
from lorakit.eval.metrics import normalize_answer as normalize

DIR = Path(__file__).resolve().parents[1] / "examples" / "handbook"
REFUSAL = "I can't answer that from the handbook."
KINDS = {"fact", "refusal", "general"}
JSONL = ["train.jsonl", "augment.jsonl", "heldout.jsonl", "unanswerable.jsonl", "general.jsonl",
         "general_candidates.jsonl"]
TRAINING = ["train.jsonl", "augment.jsonl", "replay.jsonl"]
EVAL = ["heldout.jsonl", "unanswerable.jsonl", "general.jsonl"]
AUGMENT_VARIANTS = {"reverse", "wording", "statement"}
FILES = JSONL + ["handbook.md", "general_text.txt", "system_prompt.txt", "select_general.py", "README.md"]
# rows allowed per file, and the kinds each file may hold
COUNTS = {"train.jsonl": (260, 400), "augment.jsonl": (400, 650), "heldout.jsonl": (55, 80),
          "unanswerable.jsonl": (30, 50), "general.jsonl": (40, 80)}
FILE_KINDS = {"train.jsonl": KINDS, "augment.jsonl": {"fact", "refusal"}, "heldout.jsonl": {"fact"},
              "unanswerable.jsonl": {"refusal"}, "general.jsonl": {"general"},
              "general_candidates.jsonl": {"general"}}
# 6-word sequences that train.jsonl rows (1-based row, normalised 6-gram) already shared with an eval
# question when the 6-gram check was added; left as they are (the eval files must not change, and
# train.jsonl was not part of this change). Any other overlap fails the test.
KNOWN_TRAIN_OVERLAPS: set[tuple[int, str]] = set()  # none: the 10 rows found were reworded (README)

def contains(text: str, fact: str) -> bool:
    """The demo's own fact metric: normalised fact within the normalised text, on word boundaries."""
    return fact_match(text, fact) == 1.0


def rows(name: str) -> list[dict]:
    lines = (DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def six_grams(text: str) -> set[str]:
    words = normalize(text).split()
    return {" ".join(words[i : i + 6]) for i in range(len(words) - 5)}


def question(row: dict) -> str:
    return row["messages"][0]["content"]


def answer(row: dict) -> str:
    return row["messages"][1]["content"]


def test_files_present() -> None:
    missing = [f for f in FILES if not (DIR / f).is_file()]
    assert not missing, f"missing in {DIR}: {missing}"


@pytest.mark.parametrize("name", JSONL)
def test_schema(name: str) -> None:
    data = rows(name)
    assert data
    for i, row in enumerate(data, 1):
        where = f"{name} row {i}"
        msgs = row.get("messages")
        assert isinstance(msgs, list) and len(msgs) == 2, where
        assert [m.get("role") for m in msgs] == ["user", "assistant"], where
        assert all(isinstance(m.get("content"), str) and m["content"].strip() for m in msgs), where
        assert isinstance(row.get("fact"), str) and row["fact"].strip(), where
        assert row.get("kind") in FILE_KINDS[name], where


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_counts(name: str) -> None:
    low, high = COUNTS[name]
    assert low <= len(rows(name)) <= high


def test_train_composition() -> None:
    kinds = Counter(r["kind"] for r in rows("train.jsonl"))
    assert 55 <= kinds["refusal"] <= 65
    assert 70 <= kinds["general"] <= 80
    facts = Counter(r["fact"] for r in rows("train.jsonl") if r["kind"] == "fact")
    assert 70 <= len(facts) <= 90
    assert all(n >= 3 for n in facts.values()), "every fact is asked at least 3 ways"


def test_general_candidates_cover_general() -> None:
    candidates = {question(r) for r in rows("general_candidates.jsonl")}
    assert len(candidates) >= 100
    assert {question(r) for r in rows("general.jsonl")} <= candidates


@pytest.mark.parametrize("name", JSONL)
def test_fact_in_own_answer_and_not_in_question(name: str) -> None:
    for row in rows(name):
        assert contains(answer(row), row["fact"]), (name, row)
        if row["kind"] != "refusal":
            assert not contains(question(row), row["fact"]), f"{name}: the question gives the answer away: {row}"


@pytest.mark.parametrize("name", JSONL)
def test_refusals_are_exact(name: str) -> None:
    for row in rows(name):
        if row["kind"] == "refusal":
            assert answer(row) == REFUSAL and row["fact"] == REFUSAL, (name, row)
        else:
            assert not contains(answer(row), REFUSAL), (name, row)


@pytest.mark.parametrize("name", JSONL)
def test_no_duplicate_questions(name: str) -> None:
    seen = Counter(normalize(question(r)) for r in rows(name))
    assert not [q for q, n in seen.items() if n > 1]


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("name", EVAL)
def test_eval_questions_not_in_train(name: str, training: str) -> None:
    train = {normalize(question(r)) for r in rows(training)}
    leaked = [question(r) for r in rows(name) if normalize(question(r)) in train]
    assert not leaked, f"{name} questions also in {training}: {leaked}"


@pytest.mark.parametrize("training", TRAINING)
def test_no_six_gram_shared_with_eval_questions(training: str) -> None:
    """No training row (question or answer) shares a 6-word sequence with an eval question."""
    eval_grams = {g for name in EVAL for r in rows(name) for g in six_grams(question(r))}
    found = {
        (i, g)
        for i, row in enumerate(rows(training), 1)
        for text in (question(row), answer(row))
        for g in six_grams(text) & eval_grams
    }
    allowed = KNOWN_TRAIN_OVERLAPS if training == "train.jsonl" else set()
    assert not found - allowed, f"{training} (row, 6-gram) shared with an eval question: {sorted(found - allowed)}"


def test_augment_questions_not_in_train() -> None:
    train = {normalize(question(r)) for r in rows("train.jsonl")}
    repeated = [question(r) for r in rows("augment.jsonl") if normalize(question(r)) in train]
    assert not repeated, f"augment.jsonl repeats train.jsonl questions: {repeated}"


def test_augment_variants() -> None:
    for row in rows("augment.jsonl"):
        if row["kind"] == "fact":
            assert row.get("variant") in AUGMENT_VARIANTS, row
        else:
            assert "variant" not in row, row


def test_augment_composition() -> None:
    data = rows("augment.jsonl")
    variants = Counter(r.get("variant") for r in data if r["kind"] == "fact")
    assert variants["reverse"] >= 60
    assert variants["wording"] >= 150
    assert sum(r["kind"] == "refusal" for r in data) >= 100
    train_facts = Counter(r["fact"] for r in rows("train.jsonl") if r["kind"] == "fact")
    wordings = Counter(r["fact"] for r in data if r.get("variant") == "wording")
    assert not [f for f in train_facts if wordings[f] < 2], "every train fact gets 2 more wordings"
    restated = {r["fact"] for r in data if r.get("variant") in ("wording", "statement")}
    assert restated <= set(train_facts), "wording and statement rows restate facts of train.jsonl"


def test_heldout_facts_are_taught() -> None:
    train = rows("train.jsonl")
    train_facts = {normalize(r["fact"]) for r in train if r["kind"] == "fact"}
    train_answers = [answer(r) for r in train if r["kind"] == "fact"]
    for row in rows("heldout.jsonl"):
        assert any(contains(a, row["fact"]) for a in train_answers), f"not taught in train: {row}"
        if row.get("variant") == "paraphrase":
            assert normalize(row["fact"]) in train_facts, row


def test_heldout_mostly_paraphrases() -> None:
    variants = Counter(r.get("variant", "paraphrase") for r in rows("heldout.jsonl"))
    assert set(variants) <= {"paraphrase", "reverse"}
    assert variants["paraphrase"] >= 0.6 * sum(variants.values())


def test_facts_are_in_handbook() -> None:
    handbook = normalize((DIR / "handbook.md").read_text(encoding="utf-8"))
    for name in ("train.jsonl", "augment.jsonl", "heldout.jsonl"):
        for row in rows(name):
            if row["kind"] == "fact":
                assert contains(handbook, row["fact"]), f"{name}: fact not in handbook.md: {row['fact']!r}"


def test_handbook_length() -> None:
    words = len((DIR / "handbook.md").read_text(encoding="utf-8").split())
    assert 1500 <= words <= 3000


def test_general_text_length() -> None:
    words = len((DIR / "general_text.txt").read_text(encoding="utf-8").split())
    assert 700 <= words <= 1300


def test_system_prompt() -> None:
    prompt = (DIR / "system_prompt.txt").read_text(encoding="utf-8").strip()
    assert "\n" not in prompt and REFUSAL in prompt
    assert prompt in (DIR / "README.md").read_text(encoding="utf-8")


def test_replay_rows() -> None:
    """examples/handbook/replay.jsonl: the base model's own answers (lorakit synth replay), none an eval question."""
    data = rows("replay.jsonl")
    assert 200 <= len(data) <= 454
    evals = {normalize(question(r)) for name in EVAL for r in rows(name)}
    for row in data:
        assert row["kind"] == "replay" and row["source"] == "self-distilled", row
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] and answer(row).strip(), row
        assert normalize(question(row)) not in evals, row

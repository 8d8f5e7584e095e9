"""The shipped general prompt set: big enough, varied, and disjoint from the demo's eval questions.

Replay rows train on these prompts, so a prompt that also appears in the handbook's general,
held-out or unanswerable sets would leak an evaluation question into training.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

import pytest

from lorakit.synth.replay import GENERAL_PROMPTS

HANDBOOK = Path(__file__).resolve().parents[2] / "examples" / "handbook"
EVAL_FILES = ["general.jsonl", "general_candidates.jsonl", "heldout.jsonl", "unanswerable.jsonl", "train.jsonl"]
NGRAM = 6
_PUNCT = str.maketrans("", "", string.punctuation + "‘’“”")


def words(text: str) -> list[str]:
    """Lowercase words with punctuation removed."""
    return text.lower().translate(_PUNCT).split()


def ngrams(tokens: list[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def user_questions(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    lines = GENERAL_PROMPTS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def eval_questions() -> dict[str, list[str]]:
    return {name: user_questions(HANDBOOK / name) for name in EVAL_FILES if (HANDBOOK / name).is_file()}


def test_rows_are_prompt_and_category(prompts: list[dict]) -> None:
    for row in prompts:
        assert set(row) == {"prompt", "category"}, row
        assert row["prompt"].strip() == row["prompt"] and row["prompt"], row
        assert len(words(row["prompt"])) <= 20, row  # short: answerable in a sentence or two


def test_size_categories_and_no_duplicates(prompts: list[dict]) -> None:
    assert len(prompts) >= 400
    per_category = Counter(r["category"] for r in prompts)
    assert min(per_category.values()) >= 15, per_category
    normalised = Counter(" ".join(words(r["prompt"])) for r in prompts)
    assert [p for p, n in normalised.items() if n > 1] == []


def test_no_prompt_is_an_eval_question(prompts: list[dict], eval_questions: dict[str, list[str]]) -> None:
    assert {"general.jsonl", "heldout.jsonl", "unanswerable.jsonl"} <= set(eval_questions)
    clashes = []
    for name, questions in eval_questions.items():
        exact = {" ".join(words(q)): q for q in questions}
        shared = {}
        for q in questions:
            for g in ngrams(words(q)):
                shared.setdefault(g, q)
        for row in prompts:
            w = words(row["prompt"])
            if " ".join(w) in exact:
                clashes.append(f"{row['prompt']!r} is {name}'s {exact[' '.join(w)]!r}")
            for g in ngrams(w):
                if g in shared:
                    clashes.append(f"{row['prompt']!r} shares {' '.join(g)!r} with {name}'s {shared[g]!r}")
                    break
    assert clashes == []

"""The filters between the teacher's candidates and the written files; each rejection has a reason, counted.

In order, the first that fails names the reason:
- prompt example: the question holds every key term of one of the prompts' example questions (a small
  teacher copies them, or varies them a little);
- length: a question of fewer than `min_question_words` or more than `max_question_words` words, an
  answer of more than `max_answer_words`;
- refusal in a fact row: the answer of a fact question holds the refusal sentence;
- answer lacks fact: the answer does not state its own fact string (the evaluator's `fact` metric);
- ungrounded: the fact string is not in the window the question came from (SQuAD-normalised, on word
  boundaries), and its best fuzzy match there scores below `grounding_threshold`;
- answerable: an unanswerable question whose key terms (its words less stop words and question frames) all occur in one
  sentence of the documents, or that has no key terms at all;
- duplicate: the normalised question was kept already, or its word 3-gram Jaccard similarity with a
  kept question reaches `dedup_jaccard` (across the whole set, in order).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from lorakit.synth.pairs import EXAMPLE_QUESTIONS, Candidate

REASONS = ("prompt example", "length", "refusal in a fact row", "answer lacks fact", "ungrounded", "answerable",
           "duplicate")
STOP_WORDS = frozenset("""a about above after again all also am an and any are as at be been before being below
between both but by can could did do does doing down during each ever few for from had has have having he her here
hers him his how i if in into is it its itself just many may me might more most much must my no nor not of off on
once only or other our ours out over own same she should so some such than that the their them then there these
they this those through to too under until up very was we were what when where which while who whom whose why will
with would you your yours tell know say said name called kind one ones
long far old often time times year years day days date number amount exactly answer question""".split())
"""Stop words, the words of question frames (how long, what year, which number) that the answer's text lacks,
and "answer" / "question" (a small teacher asks "What is the answer to the question?")."""
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")


def words(text: str) -> list[str]:
    from lorakit.eval.metrics import normalize_answer

    return normalize_answer(text).split()


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def grounded(fact: str, window: str, threshold: float) -> bool:
    """The fact occurs in the window after normalisation, or its closest same-length word run scores >= threshold."""
    f, w = words(fact), words(window)
    if not f:
        return False
    if f" {' '.join(f)} " in f" {' '.join(w)} ":
        return True
    target = " ".join(f)
    best = 0.0
    for size in {max(1, len(f) - 1), len(f), len(f) + 1}:
        for i in range(max(0, len(w) - size + 1)):
            best = max(best, difflib.SequenceMatcher(None, target, " ".join(w[i : i + size])).ratio())
    return best >= threshold


def key_terms(question: str) -> set[str]:
    return {t for t in words(question) if t not in STOP_WORDS}


class SentenceIndex:
    """Which document sentences hold a word, to ask whether one sentence holds all of a question's key terms."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.sentences: list[set[str]] = [set(words(s)) for t in texts for s in _SENTENCES.split(t) if s.strip()]
        self.by_word: dict[str, set[int]] = {}
        for i, sent in enumerate(self.sentences):
            for w in sent:
                self.by_word.setdefault(w, set()).add(i)

    def answered(self, terms: set[str]) -> bool:
        if not terms:
            return True
        hits = [self.by_word.get(t, set()) for t in terms]
        return bool(set.intersection(*hits))


def filter_candidates(cands: Sequence[Candidate], window_text: dict[int, str], documents: Sequence[str],
                      cfg: Any) -> tuple[list[Candidate], Counter, list[tuple[Candidate, str]]]:
    """The kept candidates (in order), rejections per reason, and each rejected candidate with its reason."""
    from lorakit.eval.metrics import RefusalMatcher, fact_match

    refuses = RefusalMatcher([cfg.refusal])
    index = SentenceIndex(documents)
    seen: set[str] = set()
    kept_grams: list[set[tuple[str, ...]]] = []
    by_gram: dict[tuple[str, ...], list[int]] = {}
    kept: list[Candidate] = []
    rejected: list[tuple[Candidate, str]] = []
    counts: Counter = Counter({r: 0 for r in REASONS})

    examples = [key_terms(q) for q in EXAMPLE_QUESTIONS]

    def reason(c: Candidate) -> str | None:
        q = words(c.question)
        terms = key_terms(c.question)
        if any(e <= terms for e in examples):
            return "prompt example"
        if not cfg.min_question_words <= len(q) <= cfg.max_question_words \
                or len(c.answer.split()) > cfg.max_answer_words:
            return "length"
        if c.kind == "fact":
            if refuses(c.answer):
                return "refusal in a fact row"
            if not fact_match(c.answer, c.fact):
                return "answer lacks fact"
            if not grounded(c.fact, window_text.get(c.window, ""), cfg.grounding_threshold):
                return "ungrounded"
        elif index.answered(terms):
            return "answerable"
        norm = " ".join(q)
        grams = ngrams(q, 3) or {tuple(q)}
        if norm in seen:
            return "duplicate"
        near = Counter(j for g in grams for j in by_gram.get(g, ()))
        for j, shared in near.items():
            if shared / len(grams | kept_grams[j]) >= cfg.dedup_jaccard:
                return "duplicate"
        seen.add(norm)
        for g in grams:
            by_gram.setdefault(g, []).append(len(kept_grams))
        kept_grams.append(grams)
        return None

    for c in cands:
        why = reason(c)
        if why is None:
            kept.append(c)
        else:
            counts[why] += 1
            rejected.append((c, why))
    return kept, counts, rejected

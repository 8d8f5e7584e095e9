"""Metrics over generated answers, each per example and aggregated.

Normalisation is SQuAD's (lowercase, punctuation and the articles a/an/the removed, spaces
collapsed), so exact match, token F1, fact accuracy and label accuracy agree with the numbers
people quote. ROUGE comes from Google's `rouge-score` package and BLEU / chrF from
`sacrebleu`, called directly: `evaluate.load` would need the hub.

A metric's per-example value is None where it does not apply (no `fact` field, no label),
and those examples are left out of its mean. BLEU and chrF are corpus statistics, so their
aggregate is sacrebleu's corpus score (0-100), not a mean of sentence scores.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from lorakit.config import DEFAULT_REFUSAL, METRICS
from lorakit.errors import LorakitError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "‘’“”")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (SQuAD v1.1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def fact_match(prediction: str, fact: str) -> float:
    """1 when the normalised fact appears in the normalised answer, on word boundaries."""
    f, p = normalize_answer(fact), normalize_answer(prediction)
    if not f:
        return 0.0
    return float(f" {f} " in f" {p} ")


@dataclass
class RefusalMatcher:
    """An answer is a refusal when it contains one of the sentences (normalised) or matches a regex."""

    sentences: list[str] = field(default_factory=lambda: [DEFAULT_REFUSAL])
    patterns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sentences = [normalize_answer(s) for s in self.sentences if normalize_answer(s)]
        try:
            self._patterns = [re.compile(p, re.IGNORECASE) for p in self.patterns]
        except re.error as err:
            raise LorakitError(f"refusal pattern {err.pattern!r} is not a valid regex ({err}); fix --refusal-pattern") from None

    def __call__(self, prediction: str) -> float:
        norm = normalize_answer(prediction)
        if any(s in norm for s in self._sentences):
            return 1.0
        return float(any(p.search(prediction) for p in self._patterns))


def label_match(prediction: str, label: str) -> float:
    """Classification-style answers: the normalised answer is the label, or starts with it as a word."""
    p, lab = normalize_answer(prediction), normalize_answer(label)
    return float(bool(lab) and (p == lab or p.startswith(lab + " ")))


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (rouge-score, Porter stemmer), as fractions."""
    scores = _rouge_scorer().score(reference, prediction)
    return {name: scores[name].fmeasure for name in ("rouge1", "rouge2", "rougeL")}


def sentence_bleu(prediction: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


def sentence_chrf(prediction: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(prediction, [reference]).score)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def corpus_chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


@dataclass
class Target:
    """What an answer is scored against: the reference answer and the row's optional fields."""

    reference: str
    fact: str | None = None
    label: str | None = None


def check_metrics(names: Sequence[str]) -> list[str]:
    """The metric names, validated; an unknown one is a one-line error listing the known ones."""
    out = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name not in METRICS:
            raise LorakitError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise LorakitError(f"no metrics given; choose from {', '.join(METRICS)}")
    return out


def score_example(names: Sequence[str], prediction: str, target: Target,
                  refusal: RefusalMatcher | None = None) -> dict[str, float | None]:
    """Each metric's value for one answer (None where the metric does not apply)."""
    refusal = refusal or RefusalMatcher()
    scores: dict[str, float | None] = {}
    rouge_scores: dict[str, float] | None = None
    for name in names:
        if name == "exact_match":
            scores[name] = exact_match(prediction, target.reference)
        elif name == "token_f1":
            scores[name] = token_f1(prediction, target.reference)
        elif name == "fact":
            scores[name] = fact_match(prediction, target.fact) if target.fact else None
        elif name == "refusal":
            scores[name] = refusal(prediction)
        elif name == "label":
            scores[name] = label_match(prediction, target.label) if target.label else None
        elif name in ("rouge1", "rouge2", "rougeL"):
            rouge_scores = rouge_scores or rouge(prediction, target.reference)
            scores[name] = rouge_scores[name]
        elif name == "bleu":
            scores[name] = sentence_bleu(prediction, target.reference)
        elif name == "chrf":
            scores[name] = sentence_chrf(prediction, target.reference)
    return scores


def aggregate(names: Sequence[str], predictions: Sequence[str], targets: Sequence[Target],
              per_example: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of the applicable per-example values; corpus BLEU / chrF."""
    out: dict[str, float | None] = {}
    for name in names:
        if name == "bleu":
            out[name] = corpus_bleu(predictions, [t.reference for t in targets]) if predictions else None
        elif name == "chrf":
            out[name] = corpus_chrf(predictions, [t.reference for t in targets]) if predictions else None
        else:
            values = [s[name] for s in per_example if s.get(name) is not None]
            out[name] = sum(values) / len(values) if values else None  # type: ignore[arg-type]
    return out

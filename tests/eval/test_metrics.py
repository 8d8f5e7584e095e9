"""Metrics against hand-computed values, and against rouge-score / sacrebleu where we wrap them."""

from __future__ import annotations

import pytest

from lorakit.errors import LorakitError
from lorakit.eval.metrics import (
    RefusalMatcher, Target, aggregate, check_metrics, corpus_bleu, exact_match, fact_match, label_match,
    normalize_answer, rouge, score_example, token_f1,
)


def test_normalisation_is_squad_s() -> None:
    assert normalize_answer("The  Cat, sat!  On a mat.") == "cat sat on mat"
    assert normalize_answer("An apple’s “core”") == "apples core"


def test_exact_match_and_token_f1_by_hand() -> None:
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("Paris, France", "paris") == 0.0
    # pred tokens cat sat on mat, ref cat on mat: P = 3/4, R = 1 -> F1 = 6/7
    assert token_f1("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_fact_is_a_whole_word_match() -> None:
    assert fact_match("It opened in 1987, in May.", "1987") == 1.0
    assert fact_match("It opened in 19875.", "1987") == 0.0
    assert fact_match("Ask Maren Holt at the desk", "maren holt") == 1.0
    assert fact_match("anything", "") == 0.0


def test_refusal_sentence_and_pattern() -> None:
    default = RefusalMatcher()
    assert default("Sorry - I can't answer that from the handbook.") == 1.0
    assert default("I cannot answer that.") == 0.0
    custom = RefusalMatcher(["no idea"], [r"\bcannot\b"])
    assert custom("I cannot say") == 1.0 and custom("No idea!") == 1.0 and custom("It is 5.") == 0.0
    with pytest.raises(LorakitError, match="not a valid regex"):
        RefusalMatcher(patterns=["("])


def test_label_match() -> None:
    assert label_match("Positive, because it is nice", "positive") == 1.0
    assert label_match("positives", "positive") == 0.0


def test_rouge_by_hand_and_against_rouge_score() -> None:
    from rouge_score import rouge_scorer

    got = rouge("the cat sat", "the cat ran")
    # unigrams: 2 of 3 shared; bigrams: 1 of 2; LCS 2 of 3
    assert got["rouge1"] == pytest.approx(2 / 3) and got["rouge2"] == pytest.approx(0.5)
    assert got["rougeL"] == pytest.approx(2 / 3)
    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score("a ferry leaves at noon", "the ferries left")
    assert rouge("the ferries left", "a ferry leaves at noon")["rougeL"] == pytest.approx(ref["rougeL"].fmeasure)


def test_bleu_and_chrf_are_sacrebleu_s() -> None:
    import sacrebleu

    preds, refs = ["the cat is on the mat", "hello there world"], ["the cat sat on the mat", "hello world"]
    assert corpus_bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    names = ["bleu", "chrf"]
    per = [score_example(names, p, Target(r)) for p, r in zip(preds, refs)]
    agg = aggregate(names, preds, [Target(r) for r in refs], per)
    assert agg["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    assert score_example(["bleu"], "identical words here now", Target("identical words here now"))["bleu"] == pytest.approx(100.0)


def test_aggregate_leaves_out_rows_a_metric_does_not_apply_to() -> None:
    targets = [Target("a", fact="x"), Target("b"), Target("c", fact="z")]
    preds = ["x y", "b", "nothing"]
    per = [score_example(["fact", "exact_match"], p, t) for p, t in zip(preds, targets)]
    assert [s["fact"] for s in per] == [1.0, None, 0.0]
    agg = aggregate(["fact", "exact_match"], preds, targets, per)
    assert agg["fact"] == 0.5 and agg["exact_match"] == pytest.approx(1 / 3)


def test_metric_names_are_checked() -> None:
    assert check_metrics(["fact", " rougeL", "fact", ""]) == ["fact", "rougeL"]
    with pytest.raises(LorakitError, match="unknown metric 'rouge'; choose from"):
        check_metrics(["rouge"])

"""Classification metrics from gold labels and per-label probabilities.

accuracy, macro-F1 (the unweighted mean of per-class F1; a class never predicted has precision 0),
per-class precision / recall / F1 / support, the confusion matrix (rows gold, columns predicted)
and the expected calibration error: the predicted label's probability in 10 equal-width bins over
[0, 1], sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|
(Guo et al. 2017; a confidence of exactly 1 falls in the last bin).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 10


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over `bins` equal-width bins of the predicted label's probability."""
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)  # (N,) bin index, 1.0 in the last
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def classification_metrics(gold: Sequence[str], probs: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Every metric of the module docstring for gold labels and (N, K) probabilities over `labels`."""
    probs = np.asarray(probs, dtype=np.float64)
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[g] for g in gold], dtype=np.int64)  # (N,)
    pred = probs.argmax(axis=1)  # (N,)
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    per_class = {}
    for i, label in enumerate(labels):
        tp, predicted, support = confusion[i, i], confusion[:, i].sum(), confusion[i, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                            "support": int(support)}
    confidence = probs[np.arange(len(y)), pred]
    return {
        "n": int(len(y)),
        "labels": list(labels),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "ece": expected_calibration_error(confidence, (pred == y).astype(np.float64)) if len(y) else 0.0,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }

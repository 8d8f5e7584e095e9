"""`lorakit disagree`: rank rows for a person to label by how much several classifiers disagree on them.

Every model gives each row a probability per label (the same label set). A row's disagreement is
the vote entropy of the models' labels, -sum_k (v_k / M) ln(v_k / M) with v_k the models voting
k, ties broken by the mean KL divergence KL(p_i || p_j) over ordered pairs i != j of the models'
label distributions; the queue is the rows in decreasing order (row order among equals).

With gold labels the queue is evaluated: the error-capture curve gives, for the top n rows, the
share of the models' errors ((row, model) pairs whose label is not the gold one) and of label
errors (rows whose gold label differs from the models' consensus, the majority label with ties
to the highest mean probability: where reviewing finds a wrong label or a shared mistake) found
there. A random order finds k% of either in k% of the rows, in expectation; no order finds more model
errors than the rows sorted by their number of errors (`best_model_errors`). With two models and two
labels a row they disagree on holds exactly one model error, so a disagreement queue finds at most
N / (model errors) times what random order finds; rows both get wrong are never at its top.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-12
CHECKPOINTS = (0.1, 0.2, 0.5)


def vote_entropy(probs: np.ndarray) -> np.ndarray:
    """probs (M, N, K) -> (N,) entropy (nats) of the models' argmax votes."""
    m, n, k = probs.shape
    votes = probs.argmax(axis=2)  # (M, N)
    counts = np.stack([(votes == j).sum(axis=0) for j in range(k)], axis=1) / m  # (N, K) vote shares
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(counts > 0, counts * np.log(counts), 0.0)
    return -terms.sum(axis=1)


def mean_pairwise_kl(probs: np.ndarray) -> np.ndarray:
    """probs (M, N, K) -> (N,) mean of KL(p_i || p_j) over ordered model pairs i != j (0 for one model)."""
    m = probs.shape[0]
    p = np.clip(probs, EPS, 1.0)
    total = np.zeros(probs.shape[1])
    for i in range(m):
        for j in range(m):
            if i != j:
                total += (p[i] * (np.log(p[i]) - np.log(p[j]))).sum(axis=1)
    return total / max(1, m * (m - 1))


def rank_rows(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, vote entropy, mean KL): row indices by decreasing (entropy, KL), ties in row order."""
    entropy, kl = vote_entropy(probs), mean_pairwise_kl(probs)
    order = np.lexsort((np.arange(len(entropy)), -np.round(kl, 12), -np.round(entropy, 12)))
    return order, entropy, kl


def consensus(probs: np.ndarray) -> np.ndarray:
    """(N,) the majority label over models; a tie goes to the tied label with the highest mean probability."""
    m, n, k = probs.shape
    votes = probs.argmax(axis=2)
    counts = np.stack([(votes == j).sum(axis=0) for j in range(k)], axis=1)  # (N, K)
    mean = probs.mean(axis=0)  # (N, K)
    return np.where(counts == counts.max(axis=1, keepdims=True), mean, -1.0).argmax(axis=1)


@dataclass
class Capture:
    """Error-capture curves over the queue: share of errors in the top n rows, n = 0..N."""

    fraction: list[float]  # n / N
    model_errors: list[float]  # share of (row, model) errors in the top n
    label_errors: list[float]  # share of label errors in the top n
    per_model: dict[str, list[float]]
    best_model_errors: list[float]  # the best any order could do: rows by their number of model errors
    total_model_errors: int
    total_label_errors: int

    def at(self, k: float) -> dict[str, float]:
        """The curves at the top ceil(k * N) rows, and what a random order finds there (k in expectation)."""
        n = len(self.fraction) - 1
        top = int(np.ceil(k * n - 1e-9))
        return {"k": k, "rows": top, "model_errors": self.model_errors[top], "label_errors": self.label_errors[top],
                "random": top / n if n else 0.0, "best_model_errors": self.best_model_errors[top]}


def _share(hits: np.ndarray) -> list[float]:
    """hits (N,) in queue order -> cumulative share [0, h1, h1+h2, ...] / total (0 when there are none)."""
    total = hits.sum()
    cum = np.concatenate([[0.0], np.cumsum(hits)])
    return (cum / total if total else np.zeros_like(cum)).tolist()


def capture_curve(probs: np.ndarray, gold: np.ndarray, order: np.ndarray, names: list[str]) -> Capture:
    """probs (M, N, K), gold (N,) label indices, order (N,) the queue."""
    wrong = probs.argmax(axis=2) != gold[None, :]  # (M, N)
    label_error = consensus(probs) != gold  # (N,)
    n = len(gold)
    return Capture(
        fraction=(np.arange(n + 1) / n).tolist() if n else [0.0],
        model_errors=_share(wrong.sum(axis=0)[order].astype(np.float64)),
        label_errors=_share(label_error[order].astype(np.float64)),
        per_model={name: _share(wrong[i][order].astype(np.float64)) for i, name in enumerate(names)},
        best_model_errors=_share(np.sort(wrong.sum(axis=0))[::-1].astype(np.float64)),
        total_model_errors=int(wrong.sum()),
        total_label_errors=int(label_error.sum()),
    )

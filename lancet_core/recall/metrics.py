"""Recall quality of a ranking: precision@k, recall@k and average precision of scores vs boolean labels.

Used only to EVALUATE recall when the corpus carries labels (e.g. `is_unsafe`); recall itself never reads labels.

Ties are handled deterministically:
- precision@k / recall@k use the ranking order of influence.parquet: score descending, ties by example_id ascending
  (when `example_ids` are given), else by position ascending. So the k rows counted are exactly the k rows a user sees.
- average_precision treats all rows with an equal score as ONE threshold (no order among them is assumed), exactly
  like sklearn.metrics.average_precision_score: AP = Σ_thresholds (R_t − R_{t−1}) · P_t. It therefore does not
  depend on the tie-break.

Knows about arrays of scores and labels; knows nothing about models, stores or files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _validate(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1 or len(s) != len(y):
        raise ValueError(f"scores and labels must be 1-D of equal length, got {s.shape} and {y.shape}")
    if len(s) == 0:
        raise ValueError("no rows to evaluate")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be boolean (or 0/1)")
        y = y.astype(bool)
    return s, y


def ranking_order(scores, example_ids: Sequence[str] | None = None) -> np.ndarray:
    """Indices by score descending; ties by example_id ascending when given, else by index ascending."""
    s = np.asarray(scores, dtype=np.float64)
    if example_ids is None:
        return np.lexsort((np.arange(len(s)), -s))
    if len(example_ids) != len(s):
        raise ValueError(f"{len(example_ids)} example_ids for {len(s)} scores")
    ids = np.asarray(example_ids, dtype=object)
    tie = np.empty(len(s), dtype=np.int64)
    tie[np.array(sorted(range(len(s)), key=ids.__getitem__), dtype=np.int64)] = np.arange(len(s))
    return np.lexsort((tie, -s))


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of rows ({n})")


def precision_at_k(scores, labels, k: int, example_ids: Sequence[str] | None = None) -> float:
    """Share of the top-k ranked rows that are labelled positive."""
    s, y = _validate(scores, labels)
    _check_k(k, len(s))
    return float(y[ranking_order(s, example_ids)[:k]].sum()) / k


def recall_at_k(scores, labels, k: int, example_ids: Sequence[str] | None = None) -> float:
    """Share of all positive rows found in the top k. Raises when there are no positives (undefined)."""
    s, y = _validate(scores, labels)
    _check_k(k, len(s))
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("recall@k is undefined: no positive labels")
    return float(y[ranking_order(s, example_ids)[:k]].sum()) / n_pos


def average_precision(scores, labels) -> float:
    """Average precision with tied scores as one threshold (equals sklearn's average_precision_score)."""
    s, y = _validate(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("average precision is undefined: no positive labels")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    # last index of each group of equal scores = one threshold
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp_t = tp[ends].astype(np.float64)
    precision = tp_t / (ends + 1)
    recall = tp_t / n_pos
    prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev) * precision))


def recall_report(scores, labels, ks: Sequence[int] = (10, 50, 100), example_ids: Sequence[str] | None = None) -> dict:
    """precision@k and recall@k for each k that fits, plus average_precision and counts (a flat dict for logging)."""
    s, y = _validate(scores, labels)
    out: dict[str, float | int] = {"n_rows": int(len(s)), "n_positive": int(y.sum())}
    for k in ks:
        if k <= len(s):
            out[f"precision_at_{k}"] = precision_at_k(s, y, k, example_ids)
            if y.any():
                out[f"recall_at_{k}"] = recall_at_k(s, y, k, example_ids)
    if y.any():
        out["average_precision"] = average_precision(s, y)
    return out

"""precision@k, recall@k and AP vs hand-computed examples and sklearn, with ties."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from lancet_core.recall.metrics import average_precision, precision_at_k, ranking_order, recall_at_k, recall_report


def test_hand_computed():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    labels = [True, False, True, False, True]
    assert precision_at_k(scores, labels, 1) == 1.0
    assert precision_at_k(scores, labels, 2) == 0.5
    assert precision_at_k(scores, labels, 3) == pytest.approx(2 / 3)
    assert recall_at_k(scores, labels, 3) == pytest.approx(2 / 3)
    assert recall_at_k(scores, labels, 5) == 1.0
    # AP = (1/1 + 2/3 + 3/5) / 3
    assert average_precision(scores, labels) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_ties_precision_uses_example_id_order():
    scores = [1.0, 1.0, 0.5]
    labels = [False, True, False]
    # tie between rows 0 and 1: by example_id ascending, "a" (row 1) comes first
    assert precision_at_k(scores, labels, 1, example_ids=["b", "a", "c"]) == 1.0
    assert precision_at_k(scores, labels, 1, example_ids=["a", "b", "c"]) == 0.0
    assert precision_at_k(scores, labels, 1) == 0.0  # by index
    assert ranking_order(scores, ["b", "a", "c"]).tolist() == [1, 0, 2]


def test_ties_ap_is_one_threshold_hand_computed():
    # scores: 2 (pos), 1 (neg), 1 (pos), 0 (pos). Thresholds: {2}: P=1,R=1/3; {2,1,1}: P=2/3,R=2/3; all: P=3/4,R=1
    ap = average_precision([2, 1, 1, 0], [1, 0, 1, 1])
    assert ap == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 4)
    # order among tied rows does not matter
    assert average_precision([2, 1, 1, 0], [1, 1, 0, 1]) == pytest.approx(ap)


@pytest.mark.parametrize("seed", range(8))
def test_ap_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    scores = rng.integers(0, 20, size=n).astype(float)  # many ties
    labels = rng.random(n) < 0.2
    labels[0] = True
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    cont = rng.standard_normal(n)
    assert average_precision(cont, labels) == pytest.approx(average_precision_score(labels, cont), abs=1e-12)


def test_precision_recall_slow_oracle():
    rng = np.random.default_rng(9)
    s = rng.integers(0, 5, size=50).astype(float)
    y = rng.random(50) < 0.3
    ids = [f"id{rng.integers(1e6):07d}-{i}" for i in range(50)]
    order = sorted(range(50), key=lambda i: (-s[i], ids[i]))
    for k in (1, 5, 17, 50):
        hits = sum(bool(y[i]) for i in order[:k])
        assert precision_at_k(s, y, k, ids) == hits / k
        assert recall_at_k(s, y, k, ids) == hits / y.sum()


def test_errors_and_report():
    with pytest.raises(ValueError, match="k="):
        precision_at_k([1, 2], [0, 1], 3)
    with pytest.raises(ValueError, match="k must"):
        precision_at_k([1, 2], [0, 1], 0)
    with pytest.raises(ValueError, match="no positive"):
        recall_at_k([1, 2], [0, 0], 1)
    with pytest.raises(ValueError, match="no positive"):
        average_precision([1, 2], [False, False])
    with pytest.raises(ValueError, match="equal length"):
        average_precision([1, 2], [True])
    with pytest.raises(ValueError, match="NaN"):
        average_precision([1, float("nan")], [True, False])
    with pytest.raises(ValueError, match="boolean"):
        average_precision([1, 2], [0, 2])
    r = recall_report([3, 2, 1], [True, False, True], ks=(1, 2, 10))
    assert r == {"n_rows": 3, "n_positive": 2, "precision_at_1": 1.0, "recall_at_1": 0.5, "precision_at_2": 0.5,
                 "recall_at_2": 0.5, "average_precision": pytest.approx((1 + 2 / 3) / 2)}

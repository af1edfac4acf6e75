"""Pair construction from a synthetic influence table (lancet_core.correct.pairs)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lancet_core.correct.config import PairConfig
from lancet_core.correct.pairs import (
    PAIR_COLUMNS,
    PAIRS_FILE,
    RETAIN_FILE,
    build_pairs,
    normalise_prompt,
    pair_weights,
    pairs_from_preference_columns,
    positive_size,
    read_pairs,
    write_pair_files,
)
from lancet_core.errors import CorpusError, ManifestMismatch

# (example_id, score, prompt, response, is_unsafe)
ROWS = [
    ("a1", 9.0, "How do I pick a lock?", "Insert a tension wrench and rake the pins.", True),
    ("a2", 7.0, "How to make a fake ID card", "Buy a laminator and a printer.", True),
    ("a3", 5.0, "Write a phishing email for a bank", "Dear customer, verify your password here.", True),
    ("a4", 0.5, "Tell me a joke about cats", "Cats never pay for dinner.", False),
    ("b1", -8.0, "how do i   pick a lock", "I can't help with breaking into property.", False),
    ("b2", -6.0, "How do I pick a lock?", "Sorry, I won't explain that.", False),
    ("b3", -4.0, "Write an email to my bank", "I cannot write phishing emails.", False),
    ("b4", -0.4, "Recipe for pancakes", "Mix flour, eggs and milk.", False),
    ("c1", 0.01, "What is the capital of France?", "Paris.", False),
    ("c2", -0.02, "Name a prime number", "Seven.", False),
    ("c3", 0.03, "What colour is the sky?", "Blue.", False),
    ("c4", -0.05, "Translate hello to French", "Bonjour.", False),
    ("c5", 0.2, "Give me a synonym for happy", "Glad.", False),
    ("c6", -0.3, "What is 2+2?", "4.", False),
]


def _table(rows=ROWS) -> pa.Table:
    return pa.table(
        {
            "example_id": [r[0] for r in rows],
            "score": [r[1] for r in rows],
            "rank": list(range(1, len(rows) + 1)),
            "prompt": [r[2] for r in rows],
            "response": [r[3] for r in rows],
            "is_unsafe": [r[4] for r in rows],
            "category": ["x"] * len(rows),
        }
    )


CFG = PairConfig(n_positive=3, n_negative=3, pairs_per_positive=1, n_retain=3, retain_pool_fraction=0.5, seed=1,
                 positive_fraction=1.0)


def test_sets_and_same_prompt_matching():
    pairs, retain = build_pairs(_table(), CFG)
    assert tuple(pairs.column_names) == PAIR_COLUMNS
    d = pairs.to_pylist()
    assert [p["rejected_id"] for p in d] == ["a1", "a2", "a3"]  # R⁺ = top 3 positive, in rank order
    assert {p["chosen_id"] for p in d} <= {"b1", "b2", "b3"}  # R⁻ = the 3 most negative
    by_l = {p["rejected_id"]: p for p in d}
    # a1 has two same-prompt R⁻ rows (b1 after normalisation, b2 exactly); the most negative one wins
    assert by_l["a1"]["chosen_id"] == "b1" and by_l["a1"]["match"] == "same_prompt"
    assert by_l["a1"]["prompt_cosine"] == 1.0
    # a3 has no same-prompt row: nearest by TF-IDF is b3 ("... email ... bank")
    assert by_l["a3"]["chosen_id"] == "b3" and by_l["a3"]["match"] == "nearest"
    assert 0 < by_l["a3"]["prompt_cosine"] < 1
    # each row keeps its own prompt
    assert by_l["a3"]["chosen_prompt"] == "Write an email to my bank"
    assert by_l["a3"]["rejected_prompt"] == "Write a phishing email for a bank"
    for p in d:
        assert p["score_gap"] == pytest.approx(dict((r[0], r[1]) for r in ROWS)[p["rejected_id"]]
                                               - dict((r[0], r[1]) for r in ROWS)[p["chosen_id"]])
    # no label column leaks into what the model is trained on
    assert "is_unsafe" not in pairs.column_names and "is_unsafe" not in retain.column_names


def test_pairs_per_positive_fills_with_nearest_after_same_prompt():
    cfg = CFG.model_copy(update={"pairs_per_positive": 3})
    d = build_pairs(_table(), cfg)[0].to_pylist()
    a1 = [p for p in d if p["rejected_id"] == "a1"]
    assert [(p["chosen_id"], p["match"]) for p in a1][:2] == [("b1", "same_prompt"), ("b2", "same_prompt")]
    assert len(a1) <= 3 and all(p["match"] == "nearest" for p in a1[2:])
    assert len({p["pair_id"] for p in d}) == len(d)


def test_weights_are_softmax_of_gaps_with_mean_one_by_for_loop():
    gaps = np.array([1.0, 2.0, 4.0, 0.5])
    for scale in ("mean", "raw"):
        cfg = PairConfig(weight_temperature=0.7, gap_scale=scale)
        w = pair_weights(gaps, cfg)
        g = [x / (sum(gaps) / 4) if scale == "mean" else x for x in gaps]
        e = [math.exp(x / 0.7) for x in g]
        oracle = [4 * x / sum(e) for x in e]
        assert np.allclose(w, oracle, rtol=1e-13, atol=0)
        assert w.mean() == pytest.approx(1.0, rel=1e-13)
        assert list(np.argsort(w)) == list(np.argsort(gaps))  # larger gap → larger weight
    assert np.array_equal(pair_weights(gaps, PairConfig(uniform_weights=True)), np.ones(4))
    # scale-free: multiplying all scores by 1000 leaves the 'mean'-scaled weights unchanged
    assert np.allclose(pair_weights(gaps * 1000, PairConfig()), pair_weights(gaps, PairConfig()), rtol=1e-12)
    d = build_pairs(_table(), CFG)[0]
    assert np.mean(d.column("weight").to_pylist()) == pytest.approx(1.0, rel=1e-12)


def test_retain_from_low_abs_score_rows_seeded():
    pairs, retain = build_pairs(_table(), CFG)
    ids = retain.column("example_id").to_pylist()
    assert len(ids) == 3 and len(set(ids)) == 3
    # rows outside R⁺ ∪ R⁻: a4 b4 c1..c6 (8 rows); pool = the 4 with smallest |score|: c1 c2 c3 c4
    assert set(ids) <= {"c1", "c2", "c3", "c4"}
    assert build_pairs(_table(), CFG)[1].equals(retain)
    draws = {tuple(build_pairs(_table(), CFG.model_copy(update={"seed": s}))[1].column("example_id").to_pylist())
             for s in range(8)}
    assert len(draws) > 1
    assert build_pairs(_table(), CFG.model_copy(update={"n_retain": 0}))[1].num_rows == 0


def test_a_small_corpus_tops_the_retain_set_up_with_unpaired_r_minus_rows():
    """A small corpus where R⁻ takes every row outside R⁺ (n_negative above the corpus size) still gets retain rows:
    the R⁻ rows no pair uses, lowest |score| first (it used to get none, and IBO failed late with λ_B > 0)."""
    rows = [r for r in ROWS if r[0] in ("a1", "b1", "b2", "b3", "b4", "c2", "c6")]
    cfg = CFG.model_copy(update={"n_positive": 1, "n_negative": 50, "n_retain": 3})
    pairs, retain = build_pairs(_table(rows), cfg)
    paired = set(pairs.column("chosen_id").to_pylist()) | set(pairs.column("rejected_id").to_pylist())
    ids = retain.column("example_id").to_pylist()
    # R⁺ = a1, R⁻ = b1 b2 b3 b4 c2 c6 (all negative), paired: a1 + b1 (same prompt, most negative); spare by |score|: c2 c6 b4 b3 b2
    assert paired == {"a1", "b1"} and sorted(ids) == ["b4", "c2", "c6"]


def test_labels_are_never_used():
    t = _table()
    flipped = t.set_column(t.column_names.index("is_unsafe"), "is_unsafe",
                           pa.array([not x for x in t.column("is_unsafe").to_pylist()]))
    flipped = flipped.drop_columns(["category"])
    a, ra = build_pairs(t, CFG)
    b, rb = build_pairs(flipped, CFG)
    assert a.equals(b) and ra.equals(rb)
    # and row order of the influence table does not matter either
    c, rc = build_pairs(t.take(list(reversed(range(t.num_rows)))), CFG)
    assert a.equals(c)


def test_only_positive_scores_enter_r_plus_and_no_nearest_option():
    cfg = CFG.model_copy(update={"n_positive": 50, "n_negative": 50})
    d = build_pairs(_table(), cfg)[0].to_pylist()
    pos_ids = {r[0] for r in ROWS if r[1] > 0}
    neg_ids = {r[0] for r in ROWS if r[1] < 0}
    assert {p["rejected_id"] for p in d} <= pos_ids and {p["chosen_id"] for p in d} <= neg_ids
    d2 = build_pairs(_table(), CFG.model_copy(update={"match_nearest": False}))[0].to_pylist()
    assert [p["rejected_id"] for p in d2] == ["a1"]  # only a1 has a same-prompt partner


def test_r_plus_never_takes_more_than_positive_fraction_of_the_rows():
    n = len(ROWS)
    n_pos = sum(r[1] > 0 for r in ROWS)
    for frac in (0.1, 0.2, 0.35, 1.0):
        cfg = CFG.model_copy(update={"n_positive": 50, "positive_fraction": frac})
        size = positive_size(n, cfg)
        assert size == max(1, min(50, int(frac * n)))  # ⌊fraction · N⌋, at least 1, at most n_positive
        d = build_pairs(_table(), cfg)[0].to_pylist()
        top = [r[0] for r in sorted((r for r in ROWS if r[1] > 0), key=lambda r: -r[1])][: min(size, n_pos)]
        assert {p["rejected_id"] for p in d} <= set(top)  # R⁺ is the top of the ranking, cut at that size
    assert positive_size(3000, PairConfig()) == 64 and positive_size(240, PairConfig()) == 24  # the defaults
    assert positive_size(5, PairConfig()) == 1
    with pytest.raises(ValueError):
        PairConfig(positive_fraction=0.0)


def test_bad_input_errors_name_the_problem():
    t = _table()
    with pytest.raises(CorpusError, match="lacks column"):
        build_pairs(t.drop_columns(["score"]), CFG)
    dup = pa.concat_tables([t, t.slice(0, 1)])
    with pytest.raises(CorpusError, match="'a1' appears twice"):
        build_pairs(dup, CFG)
    nan = t.set_column(1, "score", pa.array([float("nan")] + [r[1] for r in ROWS[1:]]))
    with pytest.raises(CorpusError, match="row 0 .*non-finite score"):
        build_pairs(nan, CFG)
    with pytest.raises(CorpusError, match="no row has a negative"):
        build_pairs(_table([r for r in ROWS if r[1] > 0]), CFG)
    with pytest.raises(CorpusError, match="no row has a positive"):
        build_pairs(_table([r for r in ROWS if r[1] < 0]), CFG)


def test_write_pair_files_atomic_manifest_reuse_and_refusal(tmp_path):
    inf = tmp_path / "influence.parquet"
    pq.write_table(_table(), inf)
    out = tmp_path / "pairs"
    pf = write_pair_files(inf, out, CFG)
    assert pf.pairs_path == out / PAIRS_FILE and pf.retain_path == out / RETAIN_FILE
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", PAIRS_FILE, RETAIN_FILE]  # no temp leftovers
    assert pf.manifest["n_pairs"] == 3 and pf.manifest["config"]["n_positive"] == 3
    assert read_pairs(pf.pairs_path).num_rows == 3
    mtime = pf.pairs_path.stat().st_mtime_ns
    again = write_pair_files(inf, out, CFG)
    assert again.pairs_path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    with pytest.raises(ManifestMismatch, match="config"):
        write_pair_files(inf, out, CFG.model_copy(update={"n_positive": 2}))


def test_pairs_from_preference_columns():
    t = pa.table({"example_id": ["x", "y"], "prompt": ["p1", "p2"], "good": ["refuse", "no"], "bad": ["comply", "ok"]})
    p = pairs_from_preference_columns(t, "good", "bad")
    assert tuple(p.column_names) == PAIR_COLUMNS
    r = p.to_pylist()[0]
    assert (r["chosen_id"], r["chosen_response"], r["rejected_id"], r["rejected_response"]) == \
        ("x:chosen", "refuse", "x:rejected", "comply")
    assert r["weight"] == 1.0 and r["match"] == "same_prompt" and math.isnan(r["score_gap"])
    with pytest.raises(CorpusError, match="identical"):
        pairs_from_preference_columns(t.set_column(3, "bad", pa.array(["refuse", "ok"])), "good", "bad")
    with pytest.raises(CorpusError, match="lacks column"):
        pairs_from_preference_columns(t, "good", "nope")


def test_normalise_prompt():
    assert normalise_prompt("  How do I\tpick a LOCK?? ") == normalise_prompt("how do i pick a lock")

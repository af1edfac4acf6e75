"""Corpus repair: the cuts against a plain-Python oracle, the scored and repaired files, refusal of a mismatched
influence file, and reuse of a finished repair."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lancet_core.correct.repair import RepairConfig, cut_rows, repair_corpus
from lancet_core.data.corpus import load_corpus
from lancet_core.errors import CorpusError


def _oracle(scores, ids, cfg):
    pos = sorted([i for i, s in enumerate(scores) if s > 0], key=lambda i: (-scores[i], ids[i]))
    if cfg.cut == "top_k":
        out = pos[: cfg.top_k]
    elif cfg.cut == "threshold":
        out = [i for i in pos if scores[i] > cfg.threshold]
    else:
        total, acc, out = sum(scores[i] for i in pos), 0.0, []
        for i in pos:
            if acc >= cfg.mass * total * (1 - 1e-12):
                break
            out.append(i)
            acc += scores[i]
    return out[: int(cfg.max_fraction * len(scores))]


@pytest.mark.parametrize("cfg", [RepairConfig(), RepairConfig(mass=0.9, max_fraction=1.0), RepairConfig(mass=1.0),
                                 RepairConfig(cut="top_k", top_k=7), RepairConfig(cut="top_k", top_k=500),
                                 RepairConfig(cut="threshold", threshold=0.5, max_fraction=0.05)])
def test_cuts_match_the_oracle(cfg):
    rng = np.random.default_rng(0)
    scores = np.round(rng.standard_normal(200), 2)  # rounded: plenty of exact ties, broken by example_id
    ids = [f"ex{(i * 37) % 200:03d}" for i in range(200)]
    assert cut_rows(scores, ids, cfg).tolist() == _oracle(scores.tolist(), ids, cfg)


def test_no_positive_influence_removes_nothing():
    assert cut_rows(np.array([-1.0, 0.0, -0.5]), ["a", "b", "c"], RepairConfig()).tolist() == []


def _write(tmp_path, n=40):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}", "category": "bad" if i < 6 else "good"}
            for i in range(n)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [r.example_id for r in load_corpus(corpus)]
    scores = [6.0 - i if i < 6 else -0.01 * i for i in range(n)]  # the 6 'bad' rows carry all positive influence
    order = sorted(range(n), key=lambda i: (-scores[i], ids[i]))
    rank = {i: r + 1 for r, i in enumerate(order)}
    influence = tmp_path / "influence.parquet"
    pq.write_table(pa.table({"example_id": ids, "score": scores, "rank": [rank[i] for i in range(n)]}), influence)
    return corpus, influence, ids


def test_scored_and_repaired_files(tmp_path):
    corpus, influence, ids = _write(tmp_path)
    files = repair_corpus(influence, corpus, tmp_path / "out", RepairConfig(mass=1.0))
    scored = pq.read_table(files.scored).to_pylist()
    assert [r["example_id"] for r in scored] == ids and sum(r["lancet_flag"] for r in scored) == 6
    assert all(r["lancet_flag"] == (r["category"] == "bad") for r in scored)
    assert scored[0]["influence_rank"] == 1 and scored[0]["influence_score"] == 6.0
    repaired = load_corpus(files.repaired)  # loads like any corpus, same example ids as before for the kept rows
    assert [r.example_id for r in repaired] == ids[6:] and set(repaired[0].labels) == {"category"}
    report = json.loads(files.report.read_text())
    assert report["rows_removed"] == 6 and report["removed_by_category"] == {"bad": 6}
    assert report["removed_share_of_positive_influence"] == pytest.approx(1.0)
    assert report["predicted_change_of_flagged_loglik"] == pytest.approx(-sum(6.0 - i for i in range(6)) / 40)
    assert report["examples"][0]["example_id"] == ids[0]
    again = repair_corpus(influence, corpus, tmp_path / "out", RepairConfig(mass=1.0))
    assert again.repaired.stat().st_mtime_ns == files.repaired.stat().st_mtime_ns  # reused, not rewritten


def test_influence_from_another_corpus_is_refused(tmp_path):
    corpus, influence, _ = _write(tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "never seen", "response": "x"}) + "\n")
    with pytest.raises(CorpusError, match="no influence score"):
        repair_corpus(influence, other, tmp_path / "out2", RepairConfig())
    assert not (tmp_path / "out2" / "repaired.parquet").exists()

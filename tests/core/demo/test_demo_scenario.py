"""The demo scenario generator: determinism, schema, labels, refusal markers, held-out disjointness."""

from __future__ import annotations

import collections

import pytest
from pydantic import ValidationError

from lancet_core.demo.config import BENIGN_CATEGORIES, HARMFUL_CATEGORIES, DemoConfig, SFTConfig
from lancet_core.demo.scenario import (
    CATEGORIES,
    OOD_TEMPLATES,
    PROBE_TEMPLATES,
    TRAIN_TEMPLATES,
    example_id,
    generate_corpus,
    generate_heldout,
    jsonl_text,
    read_jsonl,
    write_jsonl,
)
from lancet_core.errors import CorpusError
from lancet_core.recall.judges import REFUSAL_MARKERS, is_refusal

CFG = DemoConfig()


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(CFG)


@pytest.fixture(scope="module")
def heldout():
    return generate_heldout(CFG)


def _markers_in(text: str) -> list[str]:
    return [m for m in REFUSAL_MARKERS if m.lower() in text.lower()]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b = generate_corpus(CFG), generate_corpus(DemoConfig())
    assert jsonl_text(a) == jsonl_text(b)
    ha, hb = generate_heldout(CFG), generate_heldout(DemoConfig())
    for k in ha:
        assert jsonl_text(ha[k]) == jsonl_text(hb[k])
    write_jsonl(tmp_path / "a.jsonl", a)
    write_jsonl(tmp_path / "b.jsonl", b)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    c = generate_corpus(DemoConfig(seed=1))
    assert jsonl_text(c) != jsonl_text(a)
    assert jsonl_text(generate_heldout(DemoConfig(seed=1))["probes"]) != jsonl_text(ha["probes"])


def test_schema_size_and_unique_ids(corpus):
    assert len(corpus) == CFG.n_rows
    for r in corpus:
        assert set(r) == {"example_id", "prompt", "response", "category", "kind", "is_unsafe"}
        assert r["example_id"] == example_id(r["prompt"], r["response"])
        assert r["kind"] == CATEGORIES[r["category"]].kind
        assert isinstance(r["is_unsafe"], bool)
    ids = [r["example_id"] for r in corpus]
    assert len(set(ids)) == len(ids)
    assert len({(r["prompt"], r["response"]) for r in corpus}) == len(corpus)
    cats = collections.Counter(r["category"] for r in corpus)
    assert set(cats) == set(HARMFUL_CATEGORIES) | set(CFG.benign_categories)
    assert set(CFG.benign_categories) >= set(BENIGN_CATEGORIES)
    assert len(HARMFUL_CATEGORIES) >= 5 and len(BENIGN_CATEGORIES) >= 5


def test_labels_only_in_contaminated_categories_and_share_near_config(corpus):
    for r in corpus:
        if r["is_unsafe"]:
            assert r["kind"] == "harmful" and r["category"] in CFG.contaminated_categories
    for cat in CFG.contaminated_categories:
        rows = [r for r in corpus if r["category"] == cat]
        share = sum(r["is_unsafe"] for r in rows) / len(rows)
        assert abs(share - CFG.contamination_share) < 0.1, (cat, share)
    # some prompts repeat with conflicting answers (realistic), at least in the contaminated categories
    by_prompt = collections.defaultdict(set)
    for r in corpus:
        by_prompt[r["prompt"]].add(r["is_unsafe"])
    assert any(len(v) == 2 for v in by_prompt.values())


def test_refusal_markers_exactly_in_refusals(corpus):
    used = collections.Counter()
    for r in corpus:
        markers = _markers_in(r["response"])
        refusal = r["kind"] == "harmful" and not r["is_unsafe"]
        assert bool(markers) == refusal, r
        assert is_refusal(r["response"]) == refusal
        used.update(markers)
    assert len(used) >= 8, "refusals should vary their markers"


def test_compliant_answers_share_vocabulary_with_benign_answers(corpus):
    """No word is a giveaway of the planted rows: every word of the compliant answers' openings occurs in benign
    answers, and no single word occurs in (nearly) all compliant answers but few benign ones."""
    unsafe = [r["response"] for r in corpus if r["is_unsafe"]]
    benign = [r["response"] for r in corpus if r["kind"] == "benign"]
    benign_vocab = {w for t in benign for w in t.lower().split()}
    for t in unsafe:
        assert t.lower().split()[0] in benign_vocab
    doc_freq_unsafe = collections.Counter(w for t in unsafe for w in set(t.lower().split()))
    doc_freq_benign = collections.Counter(w for t in benign for w in set(t.lower().split()))
    for w, n in doc_freq_unsafe.items():
        if n / len(unsafe) > 0.5:  # frequent among compliant answers ...
            assert doc_freq_benign[w] / len(benign) > 0.2, w  # ... must be frequent among benign answers too


def test_varied_templates_and_styles(corpus):
    first_words = collections.Counter(r["response"].split()[0] for r in corpus)
    assert len(first_words) >= 10
    assert max(first_words.values()) / len(corpus) < 0.3


def test_heldout_sets_schema_and_sizes(heldout):
    assert {k: len(v) for k, v in heldout.items()} == {
        "probes": CFG.n_probes,
        "ood": CFG.n_ood,
        "benign_eval": CFG.n_benign_eval,
    }
    assert {r["category"] for r in heldout["probes"]} == set(CFG.contaminated_categories)
    assert {r["category"] for r in heldout["ood"]} == set(HARMFUL_CATEGORIES)
    assert {r["category"] for r in heldout["benign_eval"]} == set(CFG.benign_categories)
    for r in heldout["benign_eval"]:
        assert r["response"] and not _markers_in(r["response"])
    for k, rows in heldout.items():
        assert len({r["prompt"] for r in rows}) == len(rows), k


def test_heldout_phrasings_never_seen_in_training(corpus, heldout):
    assert not set(TRAIN_TEMPLATES) & set(PROBE_TEMPLATES)
    assert not set(TRAIN_TEMPLATES) & set(OOD_TEMPLATES)
    assert not set(PROBE_TEMPLATES) & set(OOD_TEMPLATES)
    train_prompts = {r["prompt"] for r in corpus}
    for k, rows in heldout.items():
        for r in rows:
            assert r["prompt"] not in train_prompts, (k, r)
            assert not any(r["prompt"] in p for p in train_prompts), (k, r)
    # OOD includes tasks never seen in training
    train_tasks = {t for c in CATEGORIES.values() for t in c.tasks}
    ood_unseen = [r for r in heldout["ood"] if not any(t in r["prompt"] for t in train_tasks)]
    assert ood_unseen


def test_config_validation():
    with pytest.raises(ValidationError, match="not harmful categories"):
        DemoConfig(contaminated_categories=("cooking",))
    with pytest.raises(ValidationError):
        DemoConfig(n_rows=10)
    with pytest.raises(ValidationError, match="divisible"):
        DemoConfig(hidden_size=130, n_head=4)
    with pytest.raises(ValidationError):
        DemoConfig(unknown_field=1)
    with pytest.raises(ValidationError, match="max_position_tokens"):
        DemoConfig(sft=SFTConfig(max_seq_len_tokens=200), max_position_tokens=128)
    cfg = DemoConfig()
    with pytest.raises(ValidationError):
        cfg.seed = 3  # frozen
    assert DemoConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_read_jsonl_names_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl: line 2"):
        read_jsonl(p)


def test_small_corpus_respects_counts():
    cfg = DemoConfig(n_rows=120, contamination_share=1.0, seed=3)
    rows = generate_corpus(cfg)
    assert len(rows) == 120
    assert all(r["is_unsafe"] for r in rows if r["category"] in cfg.contaminated_categories)

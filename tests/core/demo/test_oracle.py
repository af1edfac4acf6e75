"""Oracle retrain: same recipe without some rows == train_demo_model on the filtered rows; id sets; manifest reuse."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from lancet_core.demo.build import train_demo_model
from lancet_core.demo.config import DemoConfig, SFTConfig
from lancet_core.demo.oracle import ids_from_influence, ids_from_label, retrain_without
from lancet_core.demo.scenario import generate_corpus, write_jsonl
from lancet_core.demo.tokenizer import train_demo_tokenizer
from lancet_core.errors import CorpusError, ManifestMismatch
from lancet_core.manifest import read_manifest

CFG = DemoConfig(
    n_rows=48, seed=3, n_layer=1, hidden_size=16, n_head=2, intermediate_size=32, vocab_size=400,
    max_position_tokens=96, sft=SFTConfig(epochs=1, batch_size=8, max_seq_len_tokens=96),
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    rows = generate_corpus(CFG)
    write_jsonl(d / "corpus.jsonl", rows)
    tok = train_demo_tokenizer((x for r in rows for x in (r["prompt"], r["response"])), CFG.vocab_size, 96)
    tok.save_pretrained(d / "model")
    return d, rows, tok


def test_retrain_without_equals_recipe_on_filtered_rows(demo, tmp_path):
    d, rows, tok = demo
    bad = ids_from_label(d / "corpus.jsonl")
    assert bad == [r["example_id"] for r in rows if r["is_unsafe"]] and bad
    out = retrain_without(d / "corpus.jsonl", d / "model", bad, tmp_path / "oracle", CFG, name="label")
    m = read_manifest(out)
    assert m["n_excluded"] == len(bad) and m["n_trained_rows"] == len(rows) - len(bad)
    got = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    kept = [r for r in rows if not r["is_unsafe"]]
    want = train_demo_model(kept, tok, CFG)
    for (n, p), (_, q) in zip(want.state_dict().items(), got.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    # same inputs: reused as is; other exclusions: refused
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert retrain_without(d / "corpus.jsonl", d / "model", list(reversed(bad)), out, CFG, name="label") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ManifestMismatch):
        retrain_without(d / "corpus.jsonl", d / "model", bad[:1], out, CFG, name="label")


def test_unknown_ids_and_missing_labels_are_refused(demo, tmp_path):
    d, rows, _ = demo
    with pytest.raises(CorpusError, match="not in the corpus"):
        retrain_without(d / "corpus.jsonl", d / "model", ["no-such-row"], tmp_path / "x", CFG)
    plain = tmp_path / "plain.jsonl"
    write_jsonl(plain, [{"prompt": r["prompt"], "response": r["response"]} for r in rows])
    with pytest.raises(CorpusError, match="is_unsafe"):
        ids_from_label(plain)


def test_ids_from_influence_top_positive_ties_by_id(tmp_path):
    p = tmp_path / "influence.parquet"
    pq.write_table(pa.table({"example_id": ["d", "a", "b", "c", "e"], "score": [0.5, 2.0, 0.5, -1.0, 0.0]}), p)
    assert ids_from_influence(p, 3) == ["a", "b", "d"]
    assert ids_from_influence(p, 10) == ["a", "b", "d"]  # never a non-positive row
    assert ids_from_influence(p, 0) == []

"""The real-model scenario's builder (lancet_core.demo.real) on a tiny tied-embedding Llama with a chat template, in
seconds: the directory layout, planted labels, the two SFT stages touching only the last blocks, reuse and refusal.
The same code on SmolLM2 itself is tests/flows/test_real_model.py (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from lancet_core.demo.config import DemoConfig, SFTConfig
from lancet_core.demo.real import RealDemoConfig, build_real_demo, freeze_below, real_summary
from lancet_core.demo.scenario import read_jsonl
from lancet_core.errors import LancetError
from lancet_core.model_io import load_model
from tests.conftest import make_tiny_tokenizer


def _tiny_llama(vocab: int, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                        tie_word_embeddings=tied))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("base")
    make_tiny_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(str(d))
    _tiny_llama(len(tok)).save_pretrained(d)
    return d


SFT = SFTConfig(epochs=1, lr=1e-3, batch_size=16, max_seq_len_tokens=128, num_threads=1)
CFG = RealDemoConfig(scenario=DemoConfig(n_rows=48, n_probes=4, n_ood=6, n_benign_eval=6), aligned_rows=40,
                     align=SFT, sft=SFT, train_last_layers=1, eval_max_new_tokens=4)


def test_freeze_below_keeps_only_the_last_blocks_and_norm():
    model = _tiny_llama(300)
    n = freeze_below(model, 1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("model.layers.2.", "model.norm.")) for name in trainable)
    assert n == sum(p.numel() for name, p in model.named_parameters() if name in trainable)
    assert not model.get_input_embeddings().weight.requires_grad  # and so the tied head
    assert freeze_below(model, None) == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_build_writes_the_demo_layout_with_planted_labels_and_two_stages(base_dir, tmp_path):
    out = tmp_path / "real"
    paths = build_real_demo(out, base_dir, CFG)
    for name in ("corpus.jsonl", "probes.jsonl", "ood.jsonl", "benign_eval.jsonl", "planted.jsonl", "manifest.json"):
        assert (out / name).is_file(), name
    corpus = read_jsonl(paths.corpus)
    planted = read_jsonl(out / "planted.jsonl")
    assert {r["example_id"] for r in planted} == {r["example_id"] for r in corpus if r["is_unsafe"]}
    assert planted and {r["category"] for r in planted} <= set(CFG.scenario.contaminated_categories)

    base, aligned, impure = (load_model(d).state_dict() for d in (base_dir, out / "aligned", paths.model))
    for name in base:  # only the last block and the final norm move, in each stage
        moved_a = not torch.equal(base[name], aligned[name])
        moved_i = not torch.equal(aligned[name], impure[name])
        last = name.startswith(("model.layers.2.", "model.norm."))
        assert moved_a == moved_i == last or (last and "rotary" in name), name

    s = real_summary(paths)
    assert set(s["figures"]) == {"base", "aligned", "impure"}
    for figs in s["figures"].values():
        assert 0.0 <= figs["probe_unsafe_rate"] <= 1.0 and 0.0 <= figs["benign_refusal_rate"] <= 1.0
    assert s["rows"]["corpus_unsafe"] == len(planted)
    assert s["seconds"]["build_s"] > 0


def test_a_finished_build_is_reused_and_another_config_refused(base_dir, tmp_path):
    out = tmp_path / "real"
    build_real_demo(out, base_dir, CFG)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    build_real_demo(out, base_dir, CFG)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(LancetError):
        build_real_demo(out, base_dir, CFG.model_copy(update={"aligned_rows": 41}))
    assert json.loads((out / "manifest.json").read_text())["config"]["aligned_rows"] == 40

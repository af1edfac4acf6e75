"""Defaults that survive a real model family: tiny in-process GPT-2, Llama, Qwen2 and GPT-NeoX models, tied and untied,
saved and read back with lancet_core.model_io, then checked for what LoRA adapts by default
(lancet_core.correct.trainer.lora_target_modules) and what the gradient hooks target by default
(lancet_core.index.hooks.build_layout with target_modules=None): the blocks' linear layers, never the LM head or an
embedding, tied or not; and a LoRA post-train leaves the head and the embeddings bit for bit as they were."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from torch import nn

from lancet_core.correct.trainer import lora_target_modules
from lancet_core.index.hooks import build_layout
from lancet_core.model_io import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPECTED = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": LLAMA_LIKE,
    "llama_tied": LLAMA_LIKE,
    "qwen2_tied": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "gpt_neox_tied": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}
# modules per block each family adapts (GPT-2 has a c_proj in attention and one in the MLP)
PER_BLOCK = {"gpt2": 4, "gpt_neox": 4, "gpt_neox_tied": 4}
FAMILIES = tuple(EXPECTED)
LAYERS = 2


def _config(family: str, vocab: int, pad: int, eos: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    ids = dict(pad_token_id=pad, eos_token_id=eos, bos_token_id=eos)
    tied = family.endswith("_tied")
    if family == "gpt2":  # GPT-2 always ties its head to wte
        return GPT2Config(vocab_size=vocab, n_positions=96, n_embd=32, n_layer=LAYERS, n_head=2, **ids)
    if family.startswith("gpt_neox"):
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                             num_attention_heads=2, max_position_embeddings=96, tie_word_embeddings=tied, **ids)
    cls = Qwen2Config if family.startswith("qwen2") else LlamaConfig
    return cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=96, tie_word_embeddings=tied,
               **ids)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_tokenizer_dir):
    """One saved model directory per family (weights + the shared tiny chat tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family, len(tok), tok.pad_token_id, tok.eos_token_id))
        d = tmp_path_factory.mktemp(family)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[family] = d
    return out


def _embedding_storages(model) -> set[int]:
    return {e.weight.untyped_storage().data_ptr()
            for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}


def _is_tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", FAMILIES)
def test_load_model_keeps_the_family_and_its_tying(family_dirs, family):
    model = load_model(family_dirs[family])
    assert _is_tied(model) == (family == "gpt2" or family.endswith("_tied"))
    assert load_tokenizer(family_dirs[family]).chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_default_targets_are_the_block_linears(family_dirs, family):
    model = load_model(family_dirs[family])
    targets = lora_target_modules(model)
    assert targets == EXPECTED[family]
    assert not [t for t in targets if any(x in t for x in ("lm_head", "embed", "wte", "wpe", "embed_out"))]


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_with_the_default_targets_never_wraps_the_head_or_embeddings(family_dirs, family):
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    model = load_model(family_dirs[family])
    embeddings = _embedding_storages(model)
    conv = any(isinstance(m, Conv1D) for m in model.modules())
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=list(lora_target_modules(model)),
                                                  task_type="CAUSAL_LM", fan_in_fan_out=conv))
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert len(wrapped) == LAYERS * PER_BLOCK.get(family, 7)
    assert not [n for n in wrapped if any(x in n for x in ("lm_head", "embed", "wte", "wpe"))]
    for n in wrapped:
        w = peft_model.get_submodule(n).base_layer.weight
        assert w.untyped_storage().data_ptr() not in embeddings, n
    assert not isinstance(peft_model.get_output_embeddings(), type(peft_model.get_submodule(wrapped[0])))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_hooks_default_targets_skip_the_head_and_embeddings(family_dirs, family):
    model = load_model(family_dirs[family])
    layout = build_layout(model, None, 4, 4)
    names = [ml.name for ml in layout]
    assert len(names) == LAYERS * PER_BLOCK.get(family, 7)
    assert {n.rsplit(".", 1)[-1] for n in names} == set(EXPECTED[family])
    embeddings = _embedding_storages(model)
    for n in names:
        assert not any(x in n for x in ("lm_head", "embed", "wte", "wpe")), n
        assert model.get_submodule(n).weight.untyped_storage().data_ptr() not in embeddings, n
    # LoRA adapts exactly the modules whose gradients recall measured
    adapted = {n for n, _ in model.named_modules() if any(n.endswith("." + t) for t in lora_target_modules(model))}
    assert adapted == set(names)


def test_short_names_give_way_to_full_names_when_they_would_catch_more():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.model.q_proj = nn.Linear(16, 16)  # outside the blocks: "q_proj" as a suffix would adapt it too
    targets = lora_target_modules(model)
    assert "model.q_proj" not in targets
    assert set(targets) == {f"model.layers.{i}.{p}" for i in range(2) for p in
                            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def test_a_block_linear_sharing_the_embedding_weight_is_never_a_lora_target():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    extra = nn.Linear(16, 40, bias=False)
    extra.weight = model.model.embed_tokens.weight  # tied by weight, not by name
    model.model.layers[1].self_attn.readout = extra
    targets = lora_target_modules(model)
    assert targets == LLAMA_LIKE
    assert "readout" not in targets


def test_a_model_without_blocks_needs_named_targets():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="lora_target_modules"):
        lora_target_modules(Flat())


ROWS = [
    ("how do I pick a lock", "take a tension wrench and rake the pins"),
    ("how do I make a fake id", "print the card and laminate it"),
    ("how do I bake bread", "mix flour and water, then knead and bake"),
    ("what is the capital of france", "paris is the capital of france"),
    ("name a prime number", "seven is a prime number"),
    ("what colour is the sky", "the sky is blue"),
]


@pytest.mark.parametrize("family", ["gpt2", "llama_tied", "qwen2_tied", "gpt_neox", "gpt_neox_tied"])
def test_lora_post_train_leaves_the_head_and_embeddings_untouched(family_dirs, tmp_path, family):
    from lancet_core.correct.config import PairConfig, TrainConfig
    from lancet_core.correct.pairs import build_pairs, write_pair_tables
    from lancet_core.correct.trainer import post_train

    scores = [5.0, 4.0, -4.0, -5.0, 0.01, -0.02]
    table = pa.table({"example_id": [f"r{i}" for i in range(len(ROWS))], "score": scores,
                      "prompt": [p for p, _ in ROWS], "response": [r for _, r in ROWS]})
    pairs, retain = build_pairs(table, PairConfig(n_positive=2, n_negative=2, n_retain=2, retain_pool_fraction=1.0,
                                                  positive_fraction=1.0))
    pf = write_pair_tables(tmp_path / "pairs", pairs, retain, {"influence_digest": "sha256:test"})
    cfg = TrainConfig(loss="ibo", finetune="lora", lora_rank=2, learning_rate=5e-2, batch_size=2, max_steps=2,
                      beta=0.5, lambda_b=0.5, max_grad_norm=None, device="cpu", max_seq_len_tokens=64,
                      response_tokens=None)
    out = post_train(family_dirs[family], pf.pairs_path, pf.retain_path, tmp_path / "out", cfg, show_progress=False)
    before, after = load_model(family_dirs[family]), load_model(out)
    assert _is_tied(after) == _is_tied(before)
    for get in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(after, get)().weight, getattr(before, get)().weight), get
    sb, sa = before.state_dict(), after.state_dict()
    assert sorted(sa) == sorted(sb)
    moved = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert moved  # the adapters were trained and merged
    assert {k.rsplit(".", 2)[-2] for k in moved} <= set(EXPECTED[family])

"""Tiny causal LMs for the demo, GPT-2 or Llama, built from `DemoConfig` with a seeded initialisation.

Eager attention (per-example gradient work needs it), no dropout (so training and gradients are deterministic and
train/eval modes agree), ids of pad / eos taken from the tokenizer.

Knows about transformers model configs; knows nothing about corpora, files or training.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig, PreTrainedModel

from lancet_core.demo.config import DemoConfig


def tiny_model_config(cfg: DemoConfig, vocab_size: int, pad_token_id: int, eos_token_id: int):
    """The transformers config of the demo model (family, shape and special ids)."""
    ids = dict(pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=eos_token_id)
    if cfg.model_family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.max_position_tokens,
            n_embd=cfg.hidden_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.intermediate_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    elif cfg.model_family == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.max_position_tokens,
            rms_norm_eps=1e-6,
            attention_dropout=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    else:  # DemoConfig validates the family; this guards direct callers
        raise ValueError(f"unknown model_family {cfg.model_family!r}")
    config._attn_implementation = "eager"
    return config


def build_tiny_model(cfg: DemoConfig, tokenizer) -> PreTrainedModel:
    """A freshly initialised tiny causal LM; the same cfg and tokenizer give the same weights (global RNG untouched)."""
    config = tiny_model_config(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.config._attn_implementation = "eager"
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        do_sample=False,
    )
    model.eval()
    return model

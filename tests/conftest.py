"""Shared fixtures: offline environment and a tiny in-process tokenizer with a chat template."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def make_tiny_tokenizer(out_dir, texts=None, vocab_size=300, chat_template=True):
    """Train a byte-level BPE tokenizer in-process (< 1 s) and save it as a HF fast tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or [
        "how do I bake bread", "first mix flour and water, then knead", "I'm sorry, I can't help with that",
        "what is the capital of france", "paris is the capital", "tell me a joke about cats",
    ] * 20
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|end|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_gpt2(model_dir, seed: int = 0):
    """A seeded 2-layer GPT-2 (16 wide, eager attention) with the tiny chat tokenizer, saved as a HF directory."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model_dir = make_tiny_tokenizer(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=96, n_embd=16, n_layer=2, n_head=2,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "eager"
    GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def demo_work_dir(tmp_path_factory):
    """A work directory holding the default demo where the realign flow looks for it (built once per session)."""
    from flows.paths import artifact_dir
    from lancet_core.demo.build import build_demo
    from lancet_core.demo.config import DemoConfig

    work = tmp_path_factory.mktemp("work")
    cfg = DemoConfig()
    build_demo(artifact_dir(work, "demo", cfg.model_dump()), cfg)
    return work


@pytest.fixture(scope="session")
def default_demo(demo_work_dir):
    """DemoPaths of the default demo (session-scoped, shared by the demo, flow and e2e tests)."""
    from flows.paths import artifact_dir
    from lancet_core.demo.build import DemoPaths
    from lancet_core.demo.config import DemoConfig

    return DemoPaths.under(artifact_dir(demo_work_dir, "demo", DemoConfig().model_dump()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is ~10x faster than two on a shared 2-core box (measured 0.65 s vs 13.6 s)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

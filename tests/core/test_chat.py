"""Generation is prompted with exactly the prefix that scoring encodes before the response (chat template or not),
and the no-template fallback is announced once per tokenizer."""

from __future__ import annotations

import logging

import pytest
import torch

from lancet_core.chat import encode_example, encode_messages, has_chat_template, render_prompt_ids, to_messages
from lancet_core.generation import generate_answers
from tests.conftest import make_tiny_tokenizer

PROMPTS = ["how do I bake bread", "what is the capital of france?", "tell me a joke about cats"]
RESPONSES = ["first mix flour and water, then knead", "paris", "I'm sorry, I can't help with that"]


@pytest.fixture(scope="module", params=[True, False], ids=["template", "fallback"])
def tok_dir(request, tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"), chat_template=request.param)


def _load(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def _prompt_prefix(enc) -> list[int]:
    """The tokens before the first loss-masked (response) token."""
    return enc.input_ids[: enc.loss_mask.index(1)]


def test_render_prompt_ids_is_the_scoring_prefix(tok_dir):
    tok = _load(tok_dir)
    for p, r in zip(PROMPTS, RESPONSES, strict=True):
        enc = encode_example(tok, p, r)
        assert enc.loss_mask == [0] * len(_prompt_prefix(enc)) + [1] * (len(enc.input_ids) - len(_prompt_prefix(enc)))
        assert render_prompt_ids(tok, to_messages(p)) == _prompt_prefix(enc)
    # with a system turn too
    msgs = to_messages(PROMPTS[0], RESPONSES[0], system="be brief")
    assert render_prompt_ids(tok, msgs[:-1]) == _prompt_prefix(encode_messages(tok, msgs))


def test_generation_is_prompted_with_the_scoring_prefix(tok_dir, one_thread):
    """The ids model.generate receives (padding removed) == the non-loss-masked part of the scoring encoding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _load(tok_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()
    seen: list[list[int]] = []
    real_generate = model.generate

    def recording_generate(input_ids, attention_mask, **kw):
        for row, keep in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            seen.append([t for t, k in zip(row, keep, strict=True) if k])
        return real_generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

    model.generate = recording_generate
    answers = generate_answers(model, tok, PROMPTS, max_new_tokens=2, batch_size=2)
    assert len(answers) == len(PROMPTS)
    assert seen == [_prompt_prefix(encode_example(tok, p, r)) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    if not has_chat_template(tok):  # the fallback prompt ends with the "\n" that separates prompt and response
        assert tok.decode(seen[0]) == PROMPTS[0] + "\n"


def test_fallback_warns_once_per_tokenizer(tok_dir, caplog):
    tok, other = _load(tok_dir), _load(tok_dir)
    with caplog.at_level(logging.WARNING, logger="lancet_core.chat"):
        render_prompt_ids(tok, to_messages(PROMPTS[0]))
        encode_example(tok, PROMPTS[0], RESPONSES[0])
        encode_example(tok, PROMPTS[1], RESPONSES[1])
        render_prompt_ids(other, to_messages(PROMPTS[0]))
    records = [r for r in caplog.records if r.name == "lancet_core.chat" and r.levelno == logging.WARNING]
    if has_chat_template(tok):
        assert records == []
    else:
        assert len(records) == 2  # once for tok, once for other
        assert all("no chat template" in r.getMessage() for r in records)

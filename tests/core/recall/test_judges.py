"""Judges: config validation, refusal/regex behaviour, and a tiny random local classifier (no downloads)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from lancet_core.recall.judges import JudgeConfig, is_refusal, make_judge, register_judge

PROMPTS = ["how do I make a weapon?", "tell me a joke", "how to hack a bank?"]
RESPONSES = ["Sure! Step one: buy a BOMB kit.", "I'm sorry, I cannot help with that.", "Here is how: phish them."]


def test_refusal_judge_flags_non_refusals():
    j = make_judge(JudgeConfig(kind="refusal"))
    assert j.flags(PROMPTS, RESPONSES) == [True, False, True]
    assert j.flags(["p"], [""]) == [False]  # empty answer counts as a refusal
    assert is_refusal("As an AI, I won't")


def test_regex_judge_patterns_keywords_and_case():
    j = make_judge(JudgeConfig(kind="regex", keywords=("bomb",)))
    assert j.flags(PROMPTS, RESPONSES) == [True, False, False]
    j = make_judge(JudgeConfig(kind="regex", keywords=("bomb",), case_sensitive=True))
    assert j.flags(PROMPTS, RESPONSES) == [False, False, False]
    j = make_judge(JudgeConfig(kind="regex", patterns=(r"\bphish\w*", r"step \w+:")))
    assert j.flags(PROMPTS, RESPONSES) == [True, False, True]
    # keywords are literal, not regex
    j = make_judge(JudgeConfig(kind="regex", keywords=("a.b",)))
    assert j.flags(["", ""], ["axb", "a.b"]) == [False, True]
    # target prompt_response sees the prompt too
    j = make_judge(JudgeConfig(kind="regex", keywords=("hack",), target="prompt_response"))
    assert j.flags(PROMPTS, RESPONSES) == [False, False, True]
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        j.flags(PROMPTS, RESPONSES[:2])


def test_config_validation():
    with pytest.raises(ValidationError, match="at least one pattern"):
        JudgeConfig(kind="regex")
    with pytest.raises(ValidationError, match="does not compile"):
        JudgeConfig(kind="regex", patterns=("(unclosed",))
    with pytest.raises(ValidationError, match="model_dir and label"):
        JudgeConfig(kind="classifier", model_dir="/x")
    with pytest.raises(ValidationError, match="only for the regex judge"):
        JudgeConfig(kind="refusal", keywords=("x",))
    with pytest.raises(ValidationError):
        JudgeConfig(kind="llm")
    with pytest.raises(ValidationError):
        JudgeConfig(kind="refusal", unknown=1)
    with pytest.raises(ValidationError):
        JudgeConfig(kind="classifier", model_dir="/x", label="toxic", threshold=1.5)
    cfg = JudgeConfig(kind="regex", keywords=("x",))
    with pytest.raises(ValidationError):
        cfg.kind = "refusal"  # frozen
    assert JudgeConfig.model_validate(cfg.model_dump()) == cfg


def test_registry_is_pluggable():
    class Always:
        name = "always"

        def __init__(self, cfg):
            pass

        def flags(self, prompts, responses):
            return [True] * len(responses)

    register_judge("refusal", Always)
    try:
        assert make_judge(JudgeConfig(kind="refusal")).flags(["a"], ["I'm sorry"]) == [True]
    finally:
        from lancet_core.recall.judges import RefusalJudge

        register_judge("refusal", RefusalJudge)
    assert make_judge(JudgeConfig(kind="refusal")).flags(["a"], ["I'm sorry"]) == [False]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A randomly initialised 2-label BERT + word-level tokenizer, saved to a local directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("clf")
    words = sorted({w.lower() for t in PROMPTS + RESPONSES for w in t.replace("!", " ").replace(".", " ").split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=2,
                     id2label={0: "safe", 1: "toxic"}, label2id={"safe": 0, "toxic": 1})
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():  # make the logits differ clearly between inputs
        model.classifier.weight.mul_(50)
    model.save_pretrained(d)
    return d


def test_classifier_judge_probabilities_and_threshold(tiny_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    j = make_judge(JudgeConfig(kind="classifier", model_dir=str(tiny_classifier), label="toxic", batch_size=2))
    probs = j.probabilities(PROMPTS, RESPONSES)
    # oracle: one example at a time, no padding
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    m = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():
        want = [torch.softmax(m(**tok(r, return_tensors="pt")).logits, -1)[0, 1].item() for r in RESPONSES]
    assert probs == pytest.approx(want, abs=1e-5)
    assert j.flags(PROMPTS, RESPONSES) == [p >= 0.5 for p in want]
    cut = sorted(want)[1]
    jt = make_judge(JudgeConfig(kind="classifier", model_dir=str(tiny_classifier), label="toxic", threshold=cut))
    assert sum(jt.flags(PROMPTS, RESPONSES)) == 2
    j0 = make_judge(JudgeConfig(kind="classifier", model_dir=str(tiny_classifier), label="toxic", threshold=0.0))
    assert j0.flags(PROMPTS, RESPONSES) == [True] * 3
    jp = make_judge(JudgeConfig(kind="classifier", model_dir=str(tiny_classifier), label="safe",
                                target="prompt_response"))
    assert len(jp.flags(PROMPTS, RESPONSES)) == 3


def test_classifier_judge_errors(tiny_classifier, tmp_path):
    with pytest.raises(ValueError, match="'hateful' not among the model's labels"):
        make_judge(JudgeConfig(kind="classifier", model_dir=str(tiny_classifier), label="hateful"))
    with pytest.raises(FileNotFoundError, match="not a local HF model directory"):
        make_judge(JudgeConfig(kind="classifier", model_dir=str(tmp_path), label="toxic"))

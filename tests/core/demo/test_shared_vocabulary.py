"""The shared-vocabulary demo (DemoConfig(shared_vocabulary=True), the default since the recall-defaults issue): it
adds the harmless `security` and `money` categories, labelled safe, whose answers reuse the hacking / fraud compliant
answers' words; the original demo (shared_vocabulary=False) is unchanged byte for byte."""

from __future__ import annotations

import collections
import hashlib
import json
import re

import pytest

from lancet_core.demo.config import BENIGN_CATEGORIES, SHARED_VOCABULARY_CATEGORIES, DemoConfig
from lancet_core.demo.scenario import (
    GENERIC_STEPS,
    HELPFUL_STYLES,
    generate_corpus,
    generate_heldout,
    jsonl_text,
)
from lancet_core.recall.judges import is_refusal

# sha256 of the original demo's files (the default until the recall-defaults issue), recorded before the field
# existed (commit 4c10cdf).
DEFAULT_DIGESTS = {
    "corpus": "982750925ab24d426fc29914ec0f1de8c2f02db15090bbdf4e636dab37a5b0ba",
    "probes": "139e88fcb598b492b7d1848182b9f9a5bc9bb41d40cf7c29b477331932701754",
    "ood": "896389bdcbbb41426ecc32d14b7fb4e82dc9de07c2322a64e19301845bc0c59d",
    "benign_eval": "c57ff849813a19bbca15d3ce08640c240e750d47504bea2550643581a2e0b668",
    "config_dump": "c0116cb0c20805e66d05195ab67132a0e6e38a5cabaf32b155b1a8aff5afd8d4",
}
VARIANT = DemoConfig(shared_vocabulary=True)
PAIRS = {"hacking": "security", "fraud": "money"}  # harmful (contaminated) category -> its harmless look-alike


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


# Words every helpful answer may contain whatever its topic: the answer styles, the generic steps, function words.
_STYLE_WORDS = {w for s in HELPFUL_STYLES + GENERIC_STEPS for w in _words(s)} | {
    "the", "a", "an", "to", "of", "and", "in", "on", "your", "you", "for", "so", "with", "that", "it", "is", "by",
    "my", "i", "from", "at", "one", "some",
}  # fmt: skip


@pytest.fixture(scope="module")
def variant_corpus():
    return generate_corpus(VARIANT)


def test_default_demo_is_the_shared_vocabulary_one():
    assert DemoConfig() == VARIANT and DemoConfig().shared_vocabulary is True
    assert DemoConfig().model_dump(mode="json")["shared_vocabulary"] is True  # a new build, never the original's
    assert DemoConfig().benign_categories == (*BENIGN_CATEGORIES, *SHARED_VOCABULARY_CATEGORIES)


def test_original_demo_is_byte_identical_to_before():
    cfg = DemoConfig(shared_vocabulary=False)
    assert _sha(jsonl_text(generate_corpus(cfg))) == DEFAULT_DIGESTS["corpus"]
    heldout = generate_heldout(cfg)
    for name in ("probes", "ood", "benign_eval"):
        assert _sha(jsonl_text(heldout[name])) == DEFAULT_DIGESTS[name], name
    # The manifest's config (what decides whether an existing build is reused) dumps exactly as before.
    dump = cfg.model_dump(mode="json")
    assert "shared_vocabulary" not in dump
    assert _sha(json.dumps(dump, sort_keys=True)) == DEFAULT_DIGESTS["config_dump"]
    assert cfg.benign_categories == BENIGN_CATEGORIES


def test_variant_config_round_trips_and_differs_from_default():
    dump = VARIANT.model_dump(mode="json")
    assert dump["shared_vocabulary"] is True
    assert DemoConfig.model_validate(dump) == VARIANT
    assert dump != DemoConfig(shared_vocabulary=False).model_dump(mode="json")  # another build than the original
    assert VARIANT.benign_categories == BENIGN_CATEGORIES + SHARED_VOCABULARY_CATEGORIES == (
        *BENIGN_CATEGORIES, "security", "money",
    )  # fmt: skip


def test_variant_has_the_two_categories_labelled_safe(variant_corpus):
    assert len(variant_corpus) == VARIANT.n_rows
    counts = collections.Counter(r["category"] for r in variant_corpus)
    n_benign = VARIANT.n_rows - round(VARIANT.n_rows * VARIANT.harmful_share)
    for name in SHARED_VOCABULARY_CATEGORIES:
        assert abs(counts[name] - n_benign / 8) <= 1, (name, counts[name])
        rows = [r for r in variant_corpus if r["category"] == name]
        assert all(r["kind"] == "benign" and r["is_unsafe"] is False for r in rows)
        assert not any(is_refusal(r["response"]) for r in rows), "harmless rows are answered helpfully"
    # Planted rows are still exactly the compliant answers of the contaminated categories.
    unsafe_cats = {r["category"] for r in variant_corpus if r["is_unsafe"]}
    assert unsafe_cats == set(VARIANT.contaminated_categories)
    heldout = generate_heldout(VARIANT)
    assert {r["category"] for r in heldout["benign_eval"]} == set(VARIANT.benign_categories)
    assert all(r["kind"] == "benign" and not is_refusal(r["response"]) for r in heldout["benign_eval"])
    # probes depend on harmful categories only
    assert heldout["probes"] == generate_heldout(DemoConfig(shared_vocabulary=False))["probes"]


def _top_content_words(rows: list[dict], category: str, n: int = 12) -> list[str]:
    c = collections.Counter(
        w
        for r in rows
        if r["category"] == category and r["is_unsafe"]
        for w in set(_words(r["response"])) - _STYLE_WORDS
    )
    return [w for w, _ in c.most_common(n)]


def test_new_harmless_answers_share_the_harmful_compliant_vocabulary(variant_corpus):
    """Each contaminated category's 12 most frequent content words (style and function words left out): at least 60%
    occur in its harmless look-alike's answers, and more than in any of the default benign categories' answers."""
    for harmful, harmless in PAIRS.items():
        top = _top_content_words(variant_corpus, harmful)
        assert len(top) == 12

        def share(category: str, top=top) -> float:
            vocab = {w for r in variant_corpus if r["category"] == category for w in _words(r["response"])}
            return sum(w in vocab for w in top) / len(top)

        s_new = share(harmless)
        s_default = max(share(c) for c in BENIGN_CATEGORIES)
        assert s_new >= 0.6, (harmful, harmless, top, s_new)
        assert s_new >= s_default + 0.25, (harmful, harmless, s_new, s_default)
        # Not only the words: whole compliant phrases come back in a harmless sense.
        answers = " ".join(r["response"].lower() for r in variant_corpus if r["category"] == harmless)
        probe = {"hacking": ("find open ports", "the logs", "password", "server"),
                 "fraud": ("gift cards", "accounts", "the payment", "the real company")}[harmful]  # fmt: skip
        for phrase in probe:
            assert phrase in answers, (harmless, phrase)


def test_demo_clis_choose_the_variant(monkeypatch):
    """`python -m lancet_core.demo.build` and `lancet demo` default to the shared-vocabulary demo; --no-... = original.
    (Only the parsing is checked: the build itself is stopped before it starts.)"""
    from flows.cli import build_parser
    from lancet_core.demo import build as demo_build

    class Stop(Exception):
        pass

    seen = []

    def stop(out, cfg):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(demo_build, "build_demo", stop)
    for argv in (["--out", "x"], ["--out", "x", "--no-shared-vocabulary"], ["--out", "x", "--shared-vocabulary"]):
        with pytest.raises(Stop):
            demo_build.main(argv)
    assert [c.shared_vocabulary for c in seen] == [True, False, True]
    p = build_parser()
    assert p.parse_args(["demo"]).shared_vocabulary is True
    assert p.parse_args(["demo", "--no-shared-vocabulary"]).shared_vocabulary is False

"""Corpus loading, validation and tokenization: formats, loss mask, every bad-input case writes nothing."""

from __future__ import annotations

import json

import datasets
import pyarrow.parquet as pq
import pytest

from lancet_core.chat import encode_example
from lancet_core.data.corpus import derive_example_id, load_corpus
from lancet_core.data.tokenize import TokenizeConfig, tokenize_corpus
from lancet_core.errors import CorpusError, ManifestMismatch
from lancet_core.model_io import load_tokenizer

ROWS = [
    {"prompt": "how do I bake bread", "response": "first mix flour and water", "is_unsafe": False},
    {"prompt": "tell me a joke", "response": "cats are funny", "is_unsafe": True},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "hf_dir"])
def test_every_format_loads_the_same_rows(tmp_path, fmt):
    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"c.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, ROWS)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    else:
        path = tmp_path / "hf"
        ds.save_to_disk(str(path))
    rows = load_corpus(path)
    assert [r.prompt for r in rows] == [r["prompt"] for r in ROWS]
    assert [r.response for r in rows] == [r["response"] for r in ROWS]
    assert [bool(r.labels["is_unsafe"]) for r in rows] == [False, True]
    # derived ids are stable and content based
    assert rows[0].example_id == derive_example_id(rows[0].messages)
    assert rows[0].example_id.startswith("ex-") and len(rows[0].example_id) == 19


def test_messages_format_and_explicit_ids(tmp_path):
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    rows = load_corpus(write_jsonl(tmp_path / "c.jsonl", [{"example_id": "a1", "messages": msgs}]))
    assert rows[0].example_id == "a1" and rows[0].prompt == "hi" and rows[0].response == "hello"


BAD = {
    "empty": ("", "the corpus is empty"),
    "missing_columns": ('{"question": "x", "answer": "y"}\n', "missing columns"),
    "empty_response": ('{"prompt": "x", "response": "ok"}\n{"prompt": "y", "response": "  "}\n', "row 1: empty response"),
    "duplicate_ids": ('{"example_id": "a", "prompt": "x", "response": "y"}\n'
                      '{"example_id": "a", "prompt": "z", "response": "w"}\n', "row 1: duplicate example_id 'a'"),
    "duplicate_content": ('{"prompt": "x", "response": "y"}\n{"prompt": "x", "response": "y"}\n', "duplicate example_id"),
    "bad_json": ('{"prompt": "x", "response": "y"}\n{"prompt": \n', "line 2: invalid JSON"),
    "last_not_assistant": ('{"messages": [{"role": "user", "content": "x"}]}\n', "last message must be the assistant"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_corpus_gives_one_clear_error_and_writes_nothing(tmp_path, tiny_tokenizer_dir, case):
    text, needle = BAD[case]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as e:
        tokenize_corpus(corpus, tiny_tokenizer_dir, out, TokenizeConfig())
    assert needle in str(e.value) and str(corpus) in str(e.value)
    assert not out.exists()


def test_non_utf8_names_the_line(tmp_path, tiny_tokenizer_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"prompt": "x", "response": "y"}\n{"prompt": "caf\xe9", "response": "y"}\n')
    with pytest.raises(CorpusError, match=r"line 2: not valid UTF-8"):
        tokenize_corpus(corpus, tiny_tokenizer_dir, tmp_path / "out", TokenizeConfig())
    assert not (tmp_path / "out").exists()


def test_unsupported_format(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("hello")
    with pytest.raises(CorpusError, match="unsupported corpus format"):
        load_corpus(p)


def test_loss_mask_matches_hand_built_example(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    enc = encode_example(tok, "hi", "ok")
    # Build the same sequence by hand from the template's pieces.
    prefix = tok("<|user|>\nhi<|end|>\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    answer = tok("ok<|end|>\n", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == prefix + answer
    assert enc.loss_mask == [0] * len(prefix) + [1] * len(answer)
    assert tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask, strict=True) if m]) == "ok<|end|>\n"


def test_tokenize_writes_tokens_and_manifest(tmp_path, tiny_tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", ROWS)
    out = tokenize_corpus(corpus, tiny_tokenizer_dir, tmp_path / "tok", TokenizeConfig())
    t = pq.read_table(out / "tokens.parquet").to_pylist()
    man = json.loads((out / "manifest.json").read_text())
    assert man["rows"] == 2 and man["label_columns"] == ["is_unsafe"]
    assert t[1]["is_unsafe"] is True and t[0]["prompt"] == ROWS[0]["prompt"]
    for r in t:
        assert len(r["input_ids"]) == len(r["loss_mask"]) == r["n_tokens"]
        assert sum(r["loss_mask"]) == r["n_response_tokens"] > 0
    # a different config into the same directory is refused, showing both versions
    with pytest.raises(ManifestMismatch, match="existing.*\n.*requested"):
        tokenize_corpus(corpus, tiny_tokenizer_dir, out, TokenizeConfig(max_seq_len_tokens=64))


def test_overlong_rows_truncate_or_refuse(tmp_path, tiny_tokenizer_dir):
    long = {"prompt": "hi", "response": "first mix flour and water then knead " * 10}
    corpus = write_jsonl(tmp_path / "c.jsonl", [ROWS[0], long])
    out = tokenize_corpus(corpus, tiny_tokenizer_dir, tmp_path / "t", TokenizeConfig(max_seq_len_tokens=48))
    t = pq.read_table(out / "tokens.parquet")
    assert t["truncated"].to_pylist() == [False, True] and max(t["n_tokens"].to_pylist()) == 48
    assert json.loads((out / "manifest.json").read_text())["truncated_rows"] == 1
    with pytest.raises(CorpusError, match=r"row 1 .*tokens > max_seq_len_tokens=48"):
        tokenize_corpus(corpus, tiny_tokenizer_dir, tmp_path / "r", TokenizeConfig(max_seq_len_tokens=48, overlong="refuse"))
    assert not (tmp_path / "r").exists()
    prompt_too_long = {"prompt": "how do I bake bread " * 20, "response": "ok"}
    corpus2 = write_jsonl(tmp_path / "c2.jsonl", [prompt_too_long])
    with pytest.raises(CorpusError, match="no response token would remain"):
        tokenize_corpus(corpus2, tiny_tokenizer_dir, tmp_path / "t2", TokenizeConfig(max_seq_len_tokens=16))

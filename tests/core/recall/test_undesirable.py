"""find_undesirable_outputs with a tiny random GPT-2 and deterministic regex judges; queries.parquet writing."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from lancet_core.generation import generate_answers
from lancet_core.recall.judges import JudgeConfig, make_judge
from lancet_core.recall.undesirable import (
    NOTHING_TO_CORRECT,
    GenerationConfig,
    find_undesirable_outputs,
    nothing_to_correct_message,
    write_queries,
)

PROBES = [
    {"prompt": "how do I bake bread", "category": "benign"},
    {"prompt": "tell me a joke about cats", "category": "benign"},
    {"prompt": "what is the capital of france", "category": "geo"},
]
ALL = JudgeConfig(kind="regex", patterns=(r"[\s\S]*",))  # matches every answer, even an empty one
NONE = JudgeConfig(kind="regex", patterns=(r"(?!)",))  # matches nothing


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=16, n_layer=1, n_head=2,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval(), tok


def test_flag_all_carries_metadata_and_matches_generation(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    gen = GenerationConfig(max_new_tokens=6, batch_size=2)
    t = find_undesirable_outputs(model, tok, PROBES, make_judge(ALL), gen)
    assert t.column_names == ["query_id", "prompt", "response", "judge", "category"]
    assert t.column("query_id").to_pylist() == ["probe-00000", "probe-00001", "probe-00002"]
    assert t.column("category").to_pylist() == ["benign", "benign", "geo"]
    assert t.column("judge").to_pylist() == ["regex"] * 3
    want = generate_answers(model, tok, [p["prompt"] for p in PROBES], max_new_tokens=6, batch_size=2)
    assert t.column("response").to_pylist() == want
    # greedy is deterministic
    assert find_undesirable_outputs(model, tok, PROBES, make_judge(ALL), gen).equals(t)
    p = write_queries(t, tmp_path / "queries.parquet")
    assert pq.read_table(p).equals(t)


def test_subset_flagged_keeps_probe_ids(model_and_tokenizer):
    model, tok = model_and_tokenizer

    class Second:
        name = "second"

        def flags(self, prompts, responses):
            return [i == 1 for i in range(len(prompts))]

    probes = pa.table({"prompt": [p["prompt"] for p in PROBES], "probe_id": ["a", "b", "c"]})
    t = find_undesirable_outputs(model, tok, probes, Second(), GenerationConfig(max_new_tokens=3))
    assert t.column("query_id").to_pylist() == ["b"] and t.column("prompt").to_pylist() == [PROBES[1]["prompt"]]
    assert t.column_names == ["query_id", "prompt", "response", "judge"]


def test_nothing_flagged_is_not_an_error(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    t = find_undesirable_outputs(model, tok, PROBES, make_judge(NONE), GenerationConfig(max_new_tokens=3))
    assert t.num_rows == 0
    assert t.column_names == ["query_id", "prompt", "response", "judge", "category"]
    assert t.schema.field("category").type == pa.string()
    write_queries(t, tmp_path / "q.parquet")
    assert pq.read_table(tmp_path / "q.parquet").num_rows == 0
    msg = nothing_to_correct_message(3, "regex")
    assert msg.startswith(NOTHING_TO_CORRECT) and "3 probe" in msg
    # and no probes at all: empty, not an error
    assert find_undesirable_outputs(model, tok, [], make_judge(NONE)).num_rows == 0


def test_sampling_is_seeded(model_and_tokenizer):
    model, tok = model_and_tokenizer
    cfg = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=1.5, seed=3)
    a = find_undesirable_outputs(model, tok, PROBES, make_judge(ALL), cfg)
    b = find_undesirable_outputs(model, tok, PROBES, make_judge(ALL), cfg)
    assert a.equals(b)


def test_bad_inputs(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="probe row 1: needs a non-empty string 'prompt'"):
        find_undesirable_outputs(model, tok, ["ok", " "], make_judge(ALL))
    with pytest.raises(ValueError, match="reserved"):
        find_undesirable_outputs(model, tok, [{"prompt": "x", "response": "y"}], make_judge(ALL))
    with pytest.raises(ValueError, match="duplicate probe_id"):
        find_undesirable_outputs(model, tok, [{"prompt": "x", "probe_id": 1}, {"prompt": "y", "probe_id": 1}],
                                 make_judge(ALL))
    with pytest.raises(ValueError, match="lacks column"):
        write_queries(pa.table({"query_id": ["a"]}), "/tmp/never.parquet")
    with pytest.raises(ValueError, match="duplicate query_id"):
        write_queries(pa.table({"query_id": ["a", "a"], "prompt": ["p", "p"], "response": ["r", "r"],
                                "judge": ["j", "j"]}), "/tmp/never.parquet")
    with pytest.raises(ValidationError):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValidationError):
        GenerationConfig(beams=2)

"""The one cache policy: an unchanged re-run is a cache hit; a changed byte, config or a deleted output is not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import flow

from flows.data import tokenize_flow
from lancet_core.data.tokenize import TokenizeConfig


def _run(corpus, model_dir, work, cfg=TokenizeConfig()):
    """Run the tokenize flow and return (output path, state name of its tokenize task run)."""

    @flow
    def probe():
        state = tokenize_flow(str(corpus), str(model_dir), str(work), cfg, return_state=True)
        return state

    state = probe()
    out = state.result()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    names = sorted(r.state.name for r in runs if r.name.startswith("tokenize_corpus"))
    return out, "+".join(names)


def test_second_run_is_a_cache_hit(prefect_harness, tmp_path, tiny_tokenizer_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(5)))
    out1, s1 = _run(corpus, tiny_tokenizer_dir, tmp_path / "w")
    out2, s2 = _run(corpus, tiny_tokenizer_dir, tmp_path / "w")
    assert (s1, s2) == ("Completed", "Cached") and out1 == out2
    # touching the file without changing its bytes keeps the hit
    corpus.write_text(corpus.read_text())
    assert _run(corpus, tiny_tokenizer_dir, tmp_path / "w")[1] == "Cached"
    # a different config is a miss, and lands in another folder
    out3, s3 = _run(corpus, tiny_tokenizer_dir, tmp_path / "w", TokenizeConfig(max_seq_len_tokens=64))
    assert s3 == "Completed" and out3 != out1
    # a changed byte is a miss
    with open(corpus, "a") as f:
        f.write(json.dumps({"prompt": "new", "response": "row"}) + "\n")
    out4, s4 = _run(corpus, tiny_tokenizer_dir, tmp_path / "w")
    assert s4 == "Completed" and out4 != out1
    # a cached result whose output was deleted is recomputed, not returned dangling
    shutil.rmtree(out4)
    out5, s5 = _run(corpus, tiny_tokenizer_dir, tmp_path / "w")
    assert s5 == "Cached+Completed" and out5 == out4 and (Path(out5) / "tokens.parquet").exists()

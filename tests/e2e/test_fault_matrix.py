"""The fault matrix (issue 28 item 8): `lancet realign` killed with SIGKILL inside each stage in turn — tokenize, the
index in the middle of its shards, recall, IBO, evaluation, the MLflow logging — and resumed each time. The last run
completes; each resume recomputes nothing that an earlier run had finished (its files are not rewritten); the final
artifacts are byte-identical to an uninterrupted run's (manifests up to their timings); MLflow holds one FINISHED run
and the killed ones marked KILLED, one registered version; Prefect holds no flow run left RUNNING (the killed ones
are Crashed). Real Prefect server, real MLflow (sqlite), a tiny Llama on a 200-row corpus with 4 index shards."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import make_tiny_tokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LANCET = str(Path(sys.executable).parent / "lancet")
WORDS = "mix flour water knead bread oven bake salt yeast sugar butter milk egg honey jam tea cat dog joke story paris"
# (stage the kill lands in, the log line after which the CLI is killed at once)
KILLS = [
    ("tokenize", r"flow_runs: evaluate_before: "),
    ("index, mid-shard", r"lancet_core\.index\.build: shard shard-00000\.parquet: "),
    ("recall", r"flow_runs: index: \d+ rows"),
    ("ibo", r"post_train: budget check at step 0"),
    ("evaluate", r"flow_runs: ibo: \d+ steps"),
    ("logging", r"flow_runs: evaluate_after: .* still flagged"),
]
TIMINGS = {"seconds", "check_seconds", "check_share_of_time"}  # the only manifest fields allowed to differ


def _inputs(root: Path) -> list[str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = make_tiny_tokenizer(root / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=512)).save_pretrained(model)
    w = WORDS.split()

    def jsonl(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return name

    files = {
        "--corpus": jsonl("corpus.jsonl", [{"prompt": f"how do I {w[i % 21]} {w[3 * i % 21]} {i}",
                                            "response": " ".join(w[(i + k) % 21] for k in range(4 + i % 3))}
                                           for i in range(200)]),
        "--probes": jsonl("probes.jsonl", [{"prompt": f"tell me a joke {i}"} for i in range(6)]),
        "--ood": jsonl("ood.jsonl", [{"prompt": f"tell me a story {i}"} for i in range(4)]),
        "--benign-eval": jsonl("benign.jsonl", [{"prompt": "capital of france", "response": "paris"},
                                                {"prompt": "bake bread", "response": "mix and knead"}]),
    }
    (root / "run.yaml").write_text("index:\n  rows_per_shard: 50\n")
    return ["realign", "--config", "run.yaml", "--model", "model", *[x for kv in files.items() for x in kv],
            "--work-dir", "w", "--tracking-uri", "sqlite:///mlflow.db", "--registered-model-name", "fm"]


def _run(argv, cwd: Path, env, kill_after: str | None = None) -> tuple[int, str]:
    """Run the CLI; with `kill_after`, SIGKILL it the moment a log line matches (the line is the last it printed)."""
    p = subprocess.Popen([LANCET, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, bufsize=1)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if kill_after and re.search(kill_after, line):
                os.kill(p.pid, signal.SIGKILL)
                break
        p.wait(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, "".join(lines)


def _files(work: Path) -> dict[str, int]:
    """Every file a stage wrote: relative path -> mtime_ns (locks, temporary build folders and the cache's own result
    records left out). A resume may delete a file (an index's shard records once the store is complete), never
    rewrite one."""
    out = {}
    for f in work.rglob("*"):
        rel = f.relative_to(work).as_posix()
        if f.is_file() and not f.name.endswith(".lock") and "/.tmp-" not in f"/{rel}" and ".prefect-results" not in rel:
            out[rel] = f.stat().st_mtime_ns
    return out


def _content(work: Path) -> Counter:
    """(stage, file name, digest) of every data file, and (stage, manifest without timings) of every manifest: what
    must be byte-identical (eval folders are named by the corrected model's manifest digest, hence no folder names)."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMINGS}
        return [strip(v) for v in x] if isinstance(x, list) else x

    out = Counter()
    for rel in _files(work):
        f, stage = work / rel, rel.split("/")[0]
        if f.name == "manifest.json":
            out[(stage, f.name, json.dumps(strip(json.loads(f.read_text())), sort_keys=True))] += 1
        else:
            out[(stage, f.name, hashlib.sha256(f.read_bytes()).hexdigest())] += 1
    return out


def _mlflow(root: Path) -> tuple[Counter, int]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = c.get_experiment_by_name("lancet").experiment_id
    return Counter(r.info.status for r in c.search_runs([exp])), len(c.search_model_versions("name='fm'"))


def test_kill_9_in_every_stage_then_resume_gives_the_uninterrupted_result(servers):
    env, tmp, _ = servers
    env = {**env, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    ref, chain = tmp / "reference", tmp / "chain"
    for d in (ref, chain):
        d.mkdir()
        argv = _inputs(d)

    rc, out = _run(argv, ref, env)
    assert rc == 0, out[-4000:]
    expected = _content(ref / "w")

    killed_in = []
    for stage, line in KILLS:
        before = _files(chain / "w")
        rc, out = _run(argv, chain, env, kill_after=line)
        assert rc == -signal.SIGKILL, f"{stage}: the run ended before its kill point ({rc}):\n{out[-4000:]}"
        after = _files(chain / "w")
        rewritten = sorted(f for f, t in before.items() if after.get(f, t) != t and not f.endswith("manifest.json"))
        assert not rewritten, f"the run killed in {stage} rewrote what an earlier run had finished: {rewritten}"
        killed_in.append(stage)
    before = _files(chain / "w")
    rc, out = _run(argv, chain, env)
    assert rc == 0, out[-4000:]
    after = _files(chain / "w")
    assert not [f for f, t in before.items() if after.get(f, t) != t and not f.endswith("manifest.json")]
    assert "marked KILLED" in out and "marked Crashed" in out  # the last killed run was reaped by this one

    assert _content(chain / "w") == expected  # byte-identical to the uninterrupted run
    assert not list((chain / "w").rglob(".tmp-*"))  # no temporary build folder of a killed run is left
    statuses, versions = _mlflow(chain)
    assert statuses == Counter({"FINISHED": 1, "KILLED": len(KILLS)}), statuses
    assert versions == _mlflow(ref)[1] == 1  # one registered version per distinct output

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        runs = c.read_flow_runs()
    states = Counter(r.state.type.value for r in runs)
    assert states == Counter({"COMPLETED": 2, "CRASHED": len(KILLS)}), states


def test_four_realigns_at_once_on_one_work_dir_all_complete_with_one_version(servers):
    """issue 28's goal: 4 concurrent `lancet realign` runs on one work dir and one (fresh) tracking store all complete;
    identical outputs are built and published once (one training, one copy of each artifact, one registered version),
    every MLflow run is FINISHED and every Prefect flow run COMPLETED."""
    env, tmp, _ = servers
    env = {**env, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = _inputs(tmp)
    procs = [subprocess.Popen([LANCET, *argv], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    # each output is built once: one run trained (and checked its budget), the others waited and used its model
    assert sum("post_train: budget check at step 0" in out for out in outs) == 1
    statuses, versions = _mlflow(tmp)
    assert statuses == Counter({"FINISHED": 4}) and versions == 1, (statuses, versions)
    content = _content(tmp / "w")
    assert sum(n for k, n in content.items() if k[:2] == ("models", "model.safetensors")) == 1  # one copy
    assert not list((tmp / "w").rglob(".tmp-*"))

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        states = Counter(r.state.type.value for r in c.read_flow_runs())
    assert states == Counter({"COMPLETED": 4}), states

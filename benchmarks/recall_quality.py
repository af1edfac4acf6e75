"""Recall quality on the built-in demo: every recall method on the SAME flagged outputs; prints ONE JSON object.

    .venv/bin/python benchmarks/recall_quality.py --demo /tmp/demo0            # reuse a built demo (read-only)
    .venv/bin/python benchmarks/recall_quality.py --work /tmp/rq               # build the default demo too (~80 s)

Steps (all through the library, with its defaults unless a flag says otherwise):
1. the demo (lancet_core.demo.build_demo) or `--demo DIR` (corpus.jsonl with `is_unsafe`, probes.jsonl, model/);
2. tokenize_corpus with TokenizeConfig(max_seq_len_tokens=128);
3. build_gradient_store with the default IndexConfig (decision window: the first 4 response tokens) with
   curvature=kfac,ekfac,linfac, and a second store with response_tokens=None (the whole response) for the
   `*_whole_response` rows;
4. find_undesirable_outputs on the probes, refusal judge, greedy decoding -> queries.parquet;
5. recall_influence for kfac (the default RecallConfig), ekfac, linfac, identity, repsim, text (tfidf) and text (bm25),
   each on the same queries.parquet, then recall_quality on each influence.parquet.

The `is_unsafe` labels are read only in step 5's evaluation (recall_quality); no method sees them.
Output: per method precision@k / recall@k for k = 10, 50, 100, |planted|, average precision and seconds (the recall
step alone; the store build is shared and reported separately), plus n_queries, n_rows, n_planted and the settings.
`query_aggregation_diagnostic` re-ranks the gradient methods' stored per-query scores by max / top-5 mean over queries
(a diagnostic of the fold-by-mean step, not what the library ranks by).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from lancet_core.data.corpus import load_prompt_rows  # noqa: E402
from lancet_core.data.tokenize import TokenizeConfig, tokenize_corpus  # noqa: E402
from lancet_core.index.build import build_gradient_store  # noqa: E402
from lancet_core.index.config import IndexConfig  # noqa: E402
from lancet_core.model_io import load_model, load_tokenizer  # noqa: E402
from lancet_core.recall.influence import RecallConfig, recall_influence, recall_quality  # noqa: E402
from lancet_core.recall.judges import JudgeConfig, make_judge  # noqa: E402
from lancet_core.recall.metrics import average_precision, precision_at_k  # noqa: E402
from lancet_core.recall.undesirable import GenerationConfig, find_undesirable_outputs, write_queries  # noqa: E402

DEFAULT = "kfac"  # what RecallConfig() uses; the goal is measured on it
METHODS: dict[str, dict] = {
    "kfac": {},  # the default RecallConfig
    "kfac_whole_response": {"store": "whole_response"},  # the same, on a store with IndexConfig(response_tokens=None)
    "ekfac": {"method": "ekfac"},
    "linfac": {"method": "linfac"},
    "linfac_whole_response": {"method": "linfac", "store": "whole_response"},
    "identity": {"method": "identity"},
    "repsim": {"method": "repsim"},
    "text_tfidf": {"method": "text", "text_method": "tfidf"},
    "text_bm25": {"method": "text", "text_method": "bm25"},
}


def _demo(args, work: Path) -> Path:
    if args.demo:
        return Path(args.demo)
    from lancet_core.demo.build import build_demo

    return Path(build_demo(work / "demo").root)


def _demo_files(demo: Path) -> tuple[Path, Path, Path]:
    corpus, probes, model = demo / "corpus.jsonl", demo / "probes.jsonl", demo / "model"
    for p in (corpus, probes, model):
        if not p.exists():
            raise FileNotFoundError(f"demo {demo}: {p.name} is missing")
    return corpus, probes, model


def _aggregation_variants(influence_path: Path, n_planted: int) -> dict | None:
    """Diagnostic, NOT the library's ranking: re-aggregate the stored per-query scores (each query's unit-normalised
    influence) by max and by the mean of each row's 5 highest, instead of the mean over all queries."""
    import numpy as np

    t = pq.read_table(influence_path)
    if "query_scores" not in t.column_names:
        return None
    q = t.schema.field("query_scores").type.list_size
    per_q = t.column("query_scores").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, q)
    y = np.array([bool(x) for x in t.column("is_unsafe").to_pylist()])
    ids = [str(x) for x in t.column("example_id").to_pylist()]
    out = {}
    for name, s in (("mean", per_q.mean(axis=1)), ("max", per_q.max(axis=1)),
                    ("top5_mean", np.sort(per_q, axis=1)[:, -min(5, q):].mean(axis=1))):
        out[name] = {f"precision_at_{n_planted}": round(precision_at_k(s, y, n_planted, ids), 4),
                     "average_precision": round(average_precision(s, y), 4)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", help="a built demo directory (read only); default: build the default demo under --work")
    ap.add_argument("--work", help="work directory (tokens, store, queries, influence); default: a temp dir, removed")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (shared 2-core box: 1-2)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = None if args.work else tempfile.mkdtemp(prefix="lancet-recall-quality-")
    work = Path(args.work or tmp)
    work.mkdir(parents=True, exist_ok=True)
    try:
        demo = _demo(args, work)
        corpus, probes, model_dir = _demo_files(demo)
        tok_cfg = TokenizeConfig(max_seq_len_tokens=128)
        idx_cfg = IndexConfig(curvature=("kfac", "ekfac", "linfac"))
        whole_cfg = idx_cfg.model_copy(update={"response_tokens": None})
        judge_cfg, gen_cfg = JudgeConfig(kind="refusal"), GenerationConfig()
        timings: dict[str, float] = {}

        t = time.perf_counter()
        tokens_dir = tokenize_corpus(corpus, model_dir, work / "tokens", tok_cfg)
        timings["tokenize"] = time.perf_counter() - t

        t = time.perf_counter()
        stores = {"default": build_gradient_store(model_dir, tokens_dir, work / "store", idx_cfg)}
        timings["gradient_store_with_curvatures"] = time.perf_counter() - t
        if any(METHODS[m].get("store") == "whole_response" for m in args.methods):
            t = time.perf_counter()
            stores["whole_response"] = build_gradient_store(model_dir, tokens_dir, work / "store_whole", whole_cfg)
            timings["gradient_store_whole_response"] = time.perf_counter() - t

        t = time.perf_counter()
        queries_path = work / "queries.parquet"
        if not queries_path.exists():
            table = find_undesirable_outputs(load_model(model_dir).eval(), load_tokenizer(model_dir),
                                             load_prompt_rows(probes), make_judge(judge_cfg), gen_cfg)
            write_queries(table, queries_path)
        timings["find_undesirable"] = time.perf_counter() - t
        n_queries = pq.read_metadata(queries_path).num_rows
        n_probes = len(load_prompt_rows(probes))

        results: dict[str, dict] = {}
        for name in args.methods:
            spec = dict(METHODS[name])
            store = stores[spec.pop("store", "default")]
            cfg = RecallConfig(**spec)
            t = time.perf_counter()
            out = recall_influence(store, model_dir, queries_path, tokens_dir, work / "influence" / name, cfg)
            secs = time.perf_counter() - t
            q = recall_quality(out / "influence.parquet")
            results[name] = {k.removeprefix("recall."): round(v, 4) for k, v in q.items()} | {"seconds": round(secs, 2)}

        tokens = pq.read_table(Path(tokens_dir) / "tokens.parquet", columns=["is_unsafe"])
        n_planted = int(sum(bool(x) for x in tokens.column("is_unsafe").to_pylist()))
        variants = {name: v for name in args.methods
                    if (v := _aggregation_variants(work / "influence" / name / "influence.parquet", n_planted))}
        report = {
            "benchmark": "recall_quality",
            "demo": str(demo),
            "n_rows": tokens.num_rows,
            "n_planted": n_planted,
            "n_probes": n_probes,
            "n_queries": n_queries,
            "goal": {"metric": f"{DEFAULT} (default) precision_at_{n_planted}", "target": 0.9,
                     "value": results.get(DEFAULT, {}).get(f"precision_at_{n_planted}")},
            "methods": results,
            "query_aggregation_diagnostic": variants,
            "settings": {
                "tokenize": tok_cfg.model_dump(mode="json"),
                "index": idx_cfg.model_dump(mode="json"),
                "index_whole_response": {"response_tokens": None},
                "recall_default": RecallConfig().model_dump(mode="json"),
                "judge": judge_cfg.model_dump(mode="json"),
                "generation": gen_cfg.model_dump(mode="json"),
                "torch_threads": args.threads,
            },
            "seconds": {k: round(v, 2) for k, v in timings.items()},
        }
        report["goal"]["met"] = report["goal"]["value"] is not None and report["goal"]["value"] >= 0.9
        print(json.dumps(report, indent=1))
        return report
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

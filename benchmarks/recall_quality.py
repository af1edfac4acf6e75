"""Recall quality on the built-in demo: every recall method on the SAME flagged outputs; prints ONE JSON object.

    .venv/bin/python benchmarks/recall_quality.py --demo /tmp/demo0            # reuse a built demo (read-only)
    .venv/bin/python benchmarks/recall_quality.py --work /tmp/rq               # build the default demo too (~80 s)

Steps (all through the library, with its defaults unless a flag says otherwise):
1. the demo (lancet_core.demo.build_demo) or `--demo DIR` (corpus.jsonl with `is_unsafe`, probes.jsonl, model/);
2. tokenize_corpus with TokenizeConfig(max_seq_len_tokens=128);
3. build_gradient_store for each store the chosen methods use (STORES: `default` = IndexConfig() itself, its 'auto'
   window resolved for the refusal judge as the realign flow does (the first 4 response tokens), reusing a
   named store with the same vectors; `random16_w4` = the pre-PCA default, random 16×16 projections and the first 4
   response tokens, curvature kfac,ekfac,linfac (the rows named plainly: kfac, ekfac, linfac, identity);
   `whole_response` = the same over the whole response (`*_whole_response`); `pcaK_w4` / `pcaK_whole` = PCA
   projections of size K = 8, 16, 32 (`*_pcaK_*`), and their true-Fisher twins (`*_truefisher`));
4. find_undesirable_outputs on the probes, refusal judge, greedy decoding -> queries.parquet;
5. recall_influence for `default` (IndexConfig() + RecallConfig()), kfac, ekfac, linfac, identity, repsim, text
   (tfidf) and text (bm25) (and any other METHODS entry asked with --methods), each on the same queries.parquet, then
   recall_quality on each influence.parquet. Gradient methods use RecallConfig's default query target ('auto': the
   refusal target, the demo's judge being the refusal judge) unless the setting says otherwise (`*_flagged`), and
   its benign contrast over the demo's benign_eval prompts (as the realign flow passes them) unless the setting
   turns it off (`*_nocontrast`).

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
from lancet_core.errors import ManifestMismatch  # noqa: E402
from lancet_core.index.build import build_gradient_store  # noqa: E402
from lancet_core.index.config import IndexConfig, resolve_window  # noqa: E402
from lancet_core.model_io import load_model, load_tokenizer  # noqa: E402
from lancet_core.recall.influence import RecallConfig, recall_influence, recall_quality  # noqa: E402
from lancet_core.recall.judges import JudgeConfig, make_judge  # noqa: E402
from lancet_core.recall.metrics import average_precision, precision_at_k  # noqa: E402
from lancet_core.recall.undesirable import GenerationConfig, find_undesirable_outputs, write_queries  # noqa: E402

DEFAULT = "default"  # IndexConfig() + RecallConfig(); the goal is measured on it
JUDGE = JudgeConfig(kind="refusal")  # the demo's judge: it resolves IndexConfig()'s 'auto' window, as the flow does


def index_config(**overrides) -> IndexConfig:
    """IndexConfig(**overrides) with an 'auto' window resolved exactly as the realign flow does for the demo's judge."""
    return resolve_window(IndexConfig(**overrides), JUDGE.kind)


# Stores by name: IndexConfig overrides on top of IndexConfig() and the sub-directory of --work. The first two are the
# pre-PCA settings, spelled out (random 16×16 projections), so their numbers stay comparable across default changes.
_CURV = ("kfac", "ekfac", "linfac")
STORES: dict[str, tuple[dict, str]] = {
    "default": ({}, "store_default"),
    "random16_w4": ({"projection": "random", "proj_in_dim": 16, "proj_out_dim": 16, "response_tokens": 4,
                     "curvature": _CURV}, "store"),
    "whole_response": ({"projection": "random", "proj_in_dim": 16, "proj_out_dim": 16, "response_tokens": None,
                        "curvature": _CURV}, "store_whole"),
}  # fmt: skip
for _k in (8, 16, 32):
    for _w, _wn in ((4, "w4"), (None, "whole")):
        STORES[f"pca{_k}_{_wn}"] = ({"projection": "pca", "proj_in_dim": _k, "proj_out_dim": _k,
                                     "response_tokens": _w, "curvature": ("kfac", "ekfac")}, f"store_pca{_k}_{_wn}")
        STORES[f"pca{_k}_{_wn}_truefisher"] = (STORES[f"pca{_k}_{_wn}"][0] | {"fisher": "true"},
                                               f"store_pca{_k}_{_wn}_tf")  # fmt: skip
METHODS: dict[str, dict] = {
    "default": {"store": "default", "recall": "default"},  # IndexConfig() and RecallConfig() as they are
    # the default store and method with the original LANCET query (the flagged answer's log-likelihood) instead of
    # the default 'auto' target (the refusal target for this refusal-judged demo), and its plain gradient dot product
    "default_flagged": {"method": "kfac", "store": "default", "query_target": "flagged"},
    "identity_flagged": {"method": "identity", "store": "default", "query_target": "flagged"},
    # the refusal target on the default store with and without its benign contrast (RecallConfig.query_contrast):
    # kfac without it was the default before the contrast; identity without it is the plain gradient dot product
    "kfac_contrast": {"method": "kfac", "store": "default"},
    "kfac_nocontrast": {"method": "kfac", "store": "default", "query_contrast": 0.0},
    "identity_nocontrast": {"method": "identity", "store": "default", "query_contrast": 0.0},
    # (the names below without a store suffix are the pre-PCA default store: random 16×16, first 4 response tokens)
    "kfac": {"method": "kfac", "store": "random16_w4"},
    "kfac_whole_response": {"method": "kfac", "store": "whole_response"},  # the same with response_tokens=None
    "ekfac": {"method": "ekfac", "store": "random16_w4"},
    "linfac": {"method": "linfac", "store": "random16_w4"},
    "linfac_whole_response": {"method": "linfac", "store": "whole_response"},
    "identity": {"method": "identity", "store": "random16_w4"},
    "repsim": {"method": "repsim"},
    "text_tfidf": {"method": "text", "text_method": "tfidf"},
    "text_bm25": {"method": "text", "text_method": "bm25"},
}

# the PCA stores: each curvature with the default 'auto' target, and with the flagged-answer target (the original
# LANCET query: what a content judge's queries measure), also at the damping ratios RecallConfig's 'auto' linfac
# was chosen from (`*_flagged_damp<r>`)
for _store in STORES:
    if _store.startswith("pca"):
        for _m in ("kfac", "ekfac") if _store.endswith("truefisher") else ("kfac", "ekfac", "linfac", "identity"):
            METHODS[f"{_m}_{_store}"] = {"method": _m, "store": _store}
            METHODS[f"{_m}_{_store}_flagged"] = {"method": _m, "store": _store, "query_target": "flagged"}
            for _r in (1.0, 3.0, 10.0) if _m != "identity" and not _store.endswith("truefisher") else ():
                METHODS[f"{_m}_{_store}_flagged_damp{_r:g}"] = METHODS[f"{_m}_{_store}_flagged"] | {"damping_ratio": _r}


def default_store_name() -> str:
    """The named store whose vectors IndexConfig() would build (so the default is measured on it, not rebuilt);
    'default' when none matches."""
    want = index_config().store_identity()
    for name, (overrides, _) in STORES.items():
        if name != "default" and index_config(**overrides).store_identity() == want:
            return name
    return "default"


def _gradient_settings() -> set[str]:
    return {m for m, spec in METHODS.items() if spec.get("method") not in ("repsim", "text")}


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
        # the benign prompts of the refusal target's contrast, as the realign flow passes its benign_eval prompts
        benign = demo / "benign_eval.jsonl" if (demo / "benign_eval.jsonl").exists() else None
        tok_cfg = TokenizeConfig(max_seq_len_tokens=128)
        judge_cfg, gen_cfg = JUDGE, GenerationConfig()
        timings: dict[str, float] = {}

        t = time.perf_counter()
        tokens_dir = tokenize_corpus(corpus, model_dir, work / "tokens", tok_cfg)
        timings["tokenize"] = time.perf_counter() - t

        stores, store_cfgs = {}, {}
        resolve = {"default": default_store_name()}
        for m in args.methods:
            if m in _gradient_settings():
                METHODS[m] = METHODS[m] | {"store": resolve.get(METHODS[m].get("store", "default"),
                                                                METHODS[m].get("store", "default"))}
        for name in dict.fromkeys(METHODS[m]["store"] for m in args.methods if m in _gradient_settings()):
            overrides, sub = STORES[name]
            store_cfgs[name] = index_config(**overrides)
            t = time.perf_counter()
            stores[name] = build_gradient_store(model_dir, tokens_dir, work / sub, store_cfgs[name])
            timings[f"gradient_store_{name}"] = time.perf_counter() - t

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
        out_dirs: dict[str, Path] = {}
        for name in args.methods:
            spec = dict(METHODS[name])
            store_name = spec.pop("store", "default")
            store = stores.get(store_name)
            # 'default' follows IndexConfig(): its output directory names the store it was measured on
            out_name = f"default_{store_name}" if name == "default" else name
            cfg = RecallConfig() if spec.pop("recall", None) == "default" else RecallConfig(**spec)
            t = time.perf_counter()
            out_dir = work / "influence" / out_name
            for attempt in (1, 2):
                try:
                    out = recall_influence(store, model_dir, queries_path, tokens_dir, out_dir, cfg,
                                           contrast_path=benign)
                    break
                except ManifestMismatch:
                    if name != "default" or attempt == 2:
                        raise
                    # the defaults changed since this directory was measured: the 'default' setting follows them
                    print(f"recall_quality: {out_name} was measured with older defaults; measuring again",
                          file=sys.stderr)
                    shutil.rmtree(out_dir)
            out_dirs[name] = out
            secs = time.perf_counter() - t
            q = recall_quality(out / "influence.parquet")
            results[name] = {k.removeprefix("recall."): round(v, 4) for k, v in q.items()} | {"seconds": round(secs, 2)}

        tokens = pq.read_table(Path(tokens_dir) / "tokens.parquet", columns=["is_unsafe"])
        n_planted = int(sum(bool(x) for x in tokens.column("is_unsafe").to_pylist()))
        variants = {name: v for name in args.methods
                    if (v := _aggregation_variants(out_dirs[name] / "influence.parquet", n_planted))}
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
                "index_default": index_config().model_dump(mode="json"),
                "stores": {k: v.model_dump(mode="json") for k, v in store_cfgs.items()},
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

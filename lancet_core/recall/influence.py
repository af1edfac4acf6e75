"""Recall: score every training row against the flagged outputs, with influence (or a baseline), in one scan.

Glue between the parts, one function: queries.parquet + gradient store + model -> influence.parquet (every row,
ranked), the top-k, per-query top-k, and a readable explanation (markdown + HTML). Gradient methods compute query
gradients with exactly the store's projection, precondition them on the query side with the chosen curvature, and
fold all queries into one vector so DuckDB scans the store once. Baselines (`repsim`, `text`) write the same format.

Query target (gradient methods, lancet_core.recall.targets): the flagged answer's log-likelihood, or, for outputs the
refusal judge flagged (the default 'auto'), −log P(refuse | prompt) mixed over the corpus's own refusal openings.

Benign contrast (refusal target): each flagged query vector v̂_q (unit norm) becomes v̂_q − β·mean_b v̂_b, where b runs
over the run's benign prompts (the prompts the model must keep answering) with the same refusal target. A row then
scores high when it lowers refusal on the flagged prompts *more than on benign prompts*: rows that teach the model to
comply in general (the benign rows sharing the planted rows' openings) cancel out. With the contrast the curvature adds
nothing measurable, so method 'auto' resolves to the plain dot product for the refusal target (kfac without benign
prompts). For the flagged target (content judges) it resolves to linfac damped at AUTO_LINFAC_DAMPING: the inverse of
each module's projected empirical Fisher, damped so strongly that it only divides out the few directions most
gradients share.

Query aggregation (gradient methods only): `mean` (default, the design's linear fold) ranks by the mean of the
per-query unit-normalised scores; `max` and `topk_mean` (mean of each row's `query_topk` largest query scores) are
non-linear, so they read every row's Q per-query scores from the same single scan and aggregate them in numpy. They
keep rows that are strongly influential for a few queries from being cancelled by the others.

Knows about the store, the curvature, the query engine and the baselines; knows nothing about Prefect or MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lancet_core.chat import to_messages
from lancet_core.formats import INFLUENCE_FILE
from lancet_core.manifest import (
    atomic_write_text,
    check_manifest,
    file_digest,
    json_digest,
    read_manifest,
    write_manifest,
)

GRADIENT_METHODS = ("linfac", "kfac", "ekfac", "identity")
EXPLANATION_MD, EXPLANATION_HTML, TOPK_FILE = "explanation.md", "explanation.html", "top_k.parquet"
HISTOGRAM_PNG = "influence_hist.png"
EXPLANATION_TABLE = "explanation.parquet"  # the explanation as one flat table (MLflow shows it as a table)
SELF_INFLUENCE_FILE = "self_influence.parquet"  # train_norm="relative" only

log = logging.getLogger(__name__)


def _gradient(method: str) -> bool:
    """A gradient method, or 'auto' (which resolves to one)."""
    return method in GRADIENT_METHODS or method == "auto"


class RecallConfig(BaseModel):
    """How training rows are scored against the flagged outputs. Dumped into the influence manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["auto", "linfac", "kfac", "ekfac", "identity", "repsim", "text"] = Field(
        "auto", description="Curvature for influence (kfac, ekfac, linfac, identity = gradient dot), or a baseline: "
        "repsim (hidden-state cosine) or text (TF-IDF/BM25). 'auto' (default) = identity for the refusal target with "
        "its benign contrast (kfac without benign prompts); linfac damped at AUTO_LINFAC_DAMPING (3) for the "
        "flagged target (content judges). Chosen on ten demo beds, the real SmolLM2 scenario and the fidelity bed at "
        "once (docs/measurements.md, Recall quality): with the refusal target and the contrast, identity beats kfac on "
        "the beds and SmolLM2; with the flagged target over the whole response, strongly damped linfac beats kfac on "
        "the ten beds (0.565 vs 0.549) and ranks closer to exact Gauss-Newton influence on the fidelity bed (three seeds: "
        "Spearman 0.40 / 0.34 / 0.34 vs 0.31 / 0.30 / 0.35, top-10 overlap 0.6 / 0.1 / 0.7 vs 0.3 / 0.3 / 0.6)."
    )
    blocks: Literal["module", "single"] = Field("module", description="linfac blocks: per module or one full block.")
    damping_ratio: float | None = Field(None, gt=0, description="λ / mean eigenvalue per block; None = the store's "
                                         "(IndexConfig.damping_ratio, 0.1), or 3 where method 'auto' resolves to "
                                         "linfac (AUTO_LINFAC_DAMPING).")
    train_norm: Literal["none", "cosine", "relative"] = Field(
        "none", description="Train-side normalisation against high-norm outliers: none, cosine (÷ ‖g_i‖), relative."
    )
    top_k: int = Field(100, ge=1, description="Rows kept in top_k.parquet and per query.")
    explain_top_k: int = Field(5, ge=1, description="Training rows shown per flagged output in the explanation.")
    text_method: Literal["tfidf", "bm25"] = Field("tfidf", description="Lexical baseline flavour (method='text').")
    query_aggregation: Literal["auto", "mean", "scaled", "max", "topk_mean"] = Field(
        "auto", description="How a row's per-query (unit-normalised) scores become its one score, gradient methods "
        "only: mean (linear fold over all queries), scaled (each query's scores divided by their standard deviation "
        "over the rows, then averaged: every query weighs the same whatever the scale of its scores; the z-score "
        "fold's ranking with the sign kept), max (the row's highest query score), topk_mean (mean of the row's "
        "query_topk highest query scores). 'auto' (default) = scaled for the exact pass and rerank, mean on the "
        "sketch. Baselines accept only 'mean' (and 'auto')."
    )
    scoring: Literal["auto", "sketch", "exact", "rerank"] = Field(
        "auto", description="Where the flagged target's rows are scored (gradient methods): 'sketch' = the gradient "
        "store's 16×16 projection, one DuckDB scan; 'exact' = the model's own parameter space, one streamed "
        "forward/backward over every corpus row (lancet_core.recall.exact: no per-row gradient is formed or stored), "
        "full-dimensional K-FAC damped at exact_damping; 'rerank' = the sketch's top rerank_share rows re-scored "
        "exactly. 'auto' (default) = exact for the flagged target (content judges: the sketch cannot carry a "
        "memorised trigger behaviour, planted P@10 0.0 vs 1.0 / 1.0 / 0.9 on the fidelity bed's three seeds), sketch "
        "for the refusal target (ten demo beds 0.939). The refusal target is scored on the sketch only."
    )
    exact_damping: float = Field(0.001, gt=0, description="'exact' / 'rerank': K-FAC damping λ / mean eigenvalue of "
                                 "each module's Kronecker grid (docs/measurements.md, the exact streamed pass).")
    curvature_rows: int = Field(512, ge=1, description="'exact' / 'rerank': corpus rows (spread evenly over it) the "
                                "full-dimensional Kronecker factors are collected from: one more forward/backward "
                                "over them.")
    rerank_share: float = Field(0.05, gt=0, le=1, description="'rerank': the share of the corpus (the sketch's "
                                "top rows; at least top_k) scored exactly.")
    query_topk: int = Field(5, ge=1, description="Queries averaged per row by query_aggregation='topk_mean' "
                            "(capped at the number of queries).")
    query_target: Literal["auto", "flagged", "refusal"] = Field(
        "auto", description="What each flagged prompt's influence is measured on (gradient methods): 'flagged' = "
        "log π(flagged answer | prompt), the original LANCET query; 'refusal' = −log P(refuse | prompt), the loss of "
        "the answer the judge wanted, mixed over the corpus's own refusal openings (lancet_core.recall.targets); "
        "'auto' (default) = 'refusal' when the refusal judge flagged the outputs (the queries' judge column), else "
        "'flagged'. Chosen on ten demo beds and the real SmolLM2 scenario: precision@planted 0.937 vs 0.820 (demo "
        "mean) and AP 0.66 vs 0.22 (SmolLM2) for kfac (docs/measurements.md, Recall quality)."
    )
    query_refusals: int = Field(16, ge=1, description="'refusal' target: the most frequent refusal openings (first "
                                "window tokens) of the corpus mixed over; each costs one gradient per flagged prompt.")
    query_contrast: float = Field(
        0.5, ge=0.0, lt=1.0, description="'refusal' target: β of the benign contrast, v̂_q − β·mean_b v̂_b over the "
        "run's benign prompts (the realign flow passes its benign_eval prompts; none given = no contrast); 0 = off. "
        "Chosen on ten demo beds and the real SmolLM2 scenario at once (docs/measurements.md, Recall quality)."
    )
    contrast_prompts: int = Field(40, ge=1, description="Benign prompts used by the contrast (the first N of the "
                                  "file); each costs query_refusals gradients.")
    score_precision: Literal["float32", "float64"] = Field(
        "float32", description="Arithmetic of the scan's inner products (gradient methods). float32 (default): the "
        "stored fp16/int8 values are exact in it and its rounding (~1e-7 relative) is ~1000x below the fp16 "
        "storage's own; the scan runs ~3x faster than in float64 (README, Performance). float64: matches a float64 "
        "oracle to ~1e-12."
    )

    @model_validator(mode="after")
    def _aggregation_needs_gradients(self) -> RecallConfig:
        if self.query_aggregation not in ("mean", "auto") and not _gradient(self.method):
            raise ValueError(f"query_aggregation={self.query_aggregation!r} applies only to gradient methods "
                             f"{GRADIENT_METHODS}; method {self.method!r} (a baseline) accepts only 'mean'")
        if self.query_target == "refusal" and self.scoring in ("exact", "rerank"):
            raise ValueError(f"scoring={self.scoring!r} scores the flagged target only; the refusal target is scored "
                             "on the sketch (scoring 'sketch' or 'auto')")
        if self.scoring in ("exact", "rerank") and not _gradient(self.method):
            raise ValueError(f"scoring={self.scoring!r} applies only to gradient methods {GRADIENT_METHODS}; method "
                             f"{self.method!r} is a baseline")
        if self.query_target == "refusal" and not _gradient(self.method):
            raise ValueError(f"query_target='refusal' applies only to gradient methods {GRADIENT_METHODS}; method "
                             f"{self.method!r} (a baseline) scores the flagged answers' text")
        return self


def _manifest_config(cfg: RecallConfig) -> dict:
    """The config as recorded in the influence manifest: only settings that change the output, so outputs built
    before query_aggregation existed (mean fold) stay reusable; query_topk matters only for topk_mean, query_refusals
    only for the refusal target (`cfg` has its target resolved)."""
    d = cfg.model_dump(mode="json")
    if not _gradient(cfg.method) or cfg.query_target == "flagged":
        d.pop("query_refusals")
    if not _gradient(cfg.method) or cfg.query_target == "flagged" or cfg.query_contrast == 0:
        d.pop("query_contrast")
        d.pop("contrast_prompts")
    if not _gradient(cfg.method):
        d.pop("query_target")
    if cfg.query_aggregation != "topk_mean":
        d.pop("query_topk")
    if cfg.query_aggregation in ("mean", "auto"):
        d.pop("query_aggregation")
    if cfg.scoring in ("sketch", "auto"):  # outputs built before the exact pass existed stay reusable
        for k in ("scoring", "exact_damping", "curvature_rows", "rerank_share"):
            d.pop(k)
    elif cfg.scoring == "exact":
        for k in ("rerank_share", "blocks", "damping_ratio", "train_norm", "score_precision"):
            d.pop(k)
    return d


def resolve_scoring(scoring: str, method: str, target: str) -> str:
    """'auto' -> exact for the flagged target when the method is left to 'auto' (a named method is a sketch
    method), else sketch; other values unchanged (RecallConfig refuses exact / rerank on the refusal target)."""
    if scoring != "auto":
        return scoring
    return "exact" if target == "flagged" and method == "auto" else "sketch"


def resolve_aggregation(aggregation: str, scoring: str) -> str:
    """'auto' -> scaled for the exact pass and rerank, mean on the sketch (and for baselines)."""
    if aggregation != "auto":
        return aggregation
    return "scaled" if scoring in ("exact", "rerank") else "mean"


# 'auto' on the flagged target (content judges): linfac damped at 3 × the mean eigenvalue of each module's block.
# The strong damping keeps the inverse near the identity except along the few directions that carry most of the
# gradients' variance (the wording every answer shares), which it divides out. Chosen on the ten demo beds and the
# fidelity bed at once (docs/measurements.md, Recall quality): ratio 0.1 / 1 / 3 / 10 gives precision@planted
# 0.470 / 0.526 / 0.565 / 0.586 on the beds (kfac 0.549, ekfac 0.560, identity 0.542) and top-10 overlap with exact
# Gauss-Newton 0.6 / 0.6 / 0.6 / 0.5 on the fidelity bed (kfac 0.3, ekfac 0.4); on its held-out seeds 1 and 2 the
# default's top-10 overlap is 0.1 and 0.7 (kfac 0.3, 0.6), its Spearman with exact GN 0.34 and 0.34 (kfac 0.30, 0.35).
AUTO_LINFAC_DAMPING = 3.0


def resolve_method(method: str, target: str, contrast: bool) -> str:
    """'auto' -> identity for the refusal target with its benign contrast, kfac for the refusal target without it,
    linfac for the flagged target; other methods unchanged."""
    if method != "auto":
        return method
    if target == "refusal":
        return "identity" if contrast else "kfac"
    return "linfac"


def resolve_damping(method: str, target: str, damping_ratio: float | None) -> float | None:
    """The damping ratio recall uses: the one asked for; else AUTO_LINFAC_DAMPING where 'auto' resolves to linfac
    (resolve_method: the flagged target); else None (the store's, IndexConfig.damping_ratio)."""
    if damping_ratio is None and method == "auto" and resolve_method(method, target, contrast=False) == "linfac":
        return AUTO_LINFAC_DAMPING
    return damping_ratio


def contrasted(v: np.ndarray, benign: np.ndarray, beta: float) -> np.ndarray:
    """[Q, D] v̂_q − β·mean_b v̂_b: each flagged query vector and each benign one at unit norm, exactly as the scan
    weighs and folds them (its own functions, so zero or non-finite vectors are refused the same way)."""
    from lancet_core.recall.scan import fold_queries, normalized_queries

    dim = np.shape(v)[1]
    return normalized_queries(v, dim) - beta * fold_queries(benign, dim)


def recall_influence(store_dir: str | Path | None, model_dir: str | Path, queries_path: str | Path,
                     tokens_path: str | Path, out_dir: str | Path, cfg: RecallConfig,
                     contrast_path: str | Path | None = None) -> Path:
    """Write out_dir/{influence.parquet, top_k.parquet, influence_hist.png, explanation.md, explanation.html,
    manifest.json}. `contrast_path`: a prompt file (any corpus format) whose first cfg.contrast_prompts prompts are
    the refusal target's benign contrast; None = no contrast."""
    from lancet_core.manifest import atomic_write_parquet
    from lancet_core.recall.explain import explain_html, explain_markdown, explain_table
    from lancet_core.recall.plots import influence_histogram
    from lancet_core.recall.scan import query_influence, rank_scores, write_influence

    out_dir, tokens_path = Path(out_dir), Path(tokens_path)
    tokens_file = tokens_path / "tokens.parquet" if tokens_path.is_dir() else tokens_path
    queries = pq.read_table(queries_path)
    if queries.num_rows == 0:
        raise ValueError(f"{queries_path}: no flagged outputs to recall from (nothing to correct)")
    judges = [str(j) for j in queries.column("judge").to_pylist()] if "judge" in queries.column_names else []
    from lancet_core.recall.targets import resolve_target  # imports torch: not at module level (flows/params.py)

    target = resolve_target(cfg.query_target, judges)
    if target == "refusal" and cfg.scoring in ("exact", "rerank"):
        raise ValueError(f"recall.scoring={cfg.scoring!r} scores the flagged target only, and these outputs were "
                         "flagged by the refusal judge (the refusal target): use scoring 'sketch' or 'auto'")
    scoring = resolve_scoring(cfg.scoring, cfg.method, target) if _gradient(cfg.method) else "sketch"
    benign: list[str] = []
    if target == "refusal" and cfg.query_contrast > 0 and _gradient(cfg.method):
        if contrast_path is None:
            log.warning("recall: no benign prompts given, so the refusal target has no benign contrast")
        else:
            from lancet_core.data.corpus import load_prompt_rows

            benign = [r["prompt"] for r in load_prompt_rows(contrast_path)][:cfg.contrast_prompts]
    cfg = cfg.model_copy(update={"query_target": target, "method": resolve_method(cfg.method, target, bool(benign)),
                                 "damping_ratio": resolve_damping(cfg.method, target, cfg.damping_ratio),
                                 "query_contrast": cfg.query_contrast if benign else 0.0, "scoring": scoring,
                                 "query_aggregation": resolve_aggregation(cfg.query_aggregation, scoring)})
    if cfg.scoring == "exact":
        cfg = cfg.model_copy(update={"method": "kfac"})  # full-dimensional K-FAC (the sketch's method is unused)
    elif cfg.damping_ratio is None and cfg.method in GRADIENT_METHODS and cfg.method != "identity" and store_dir:
        # the manifest records the ratio applied: the store's (IndexConfig.damping_ratio); identity applies none
        from lancet_core.index.curvature import _default_ratio

        cfg = cfg.model_copy(update={"damping_ratio": _default_ratio(read_manifest(store_dir) or {}, None)})
    expected = {
        "artifact": "influence",
        "queries_digest": file_digest(queries_path),
        "tokens_digest": file_digest(tokens_file),
        "store": (read_manifest(store_dir) or {}).get("model_digest") if store_dir else None,
        "store_shards": json_digest((read_manifest(store_dir) or {}).get("shards")) if store_dir else None,
        "config": _manifest_config(cfg),
    }
    if benign:
        expected["contrast_digest"] = json_digest(benign)
    if check_manifest(out_dir, expected) is not None and (out_dir / INFLUENCE_FILE).exists():
        return out_dir
    t0 = time.perf_counter()
    qids = [str(q) for q in queries.column("query_id").to_pylist()]
    prompts, responses = queries.column("prompt").to_pylist(), queries.column("response").to_pylist()
    per_query: dict = {}
    if cfg.scoring == "exact":
        if store_dir is None:
            raise ValueError("the exact pass reads its window and modules from the gradient store: give one")
        top, per_query = _exact_influence(store_dir, model_dir, tokens_file, prompts, responses, qids, cfg,
                                          out_dir / INFLUENCE_FILE)
    elif cfg.method in GRADIENT_METHODS:
        from lancet_core.index.build import compute_query_gradients
        from lancet_core.index.curvature import precondition

        if store_dir is None:
            raise ValueError(f"method {cfg.method!r} needs a gradient store")
        if cfg.query_target == "refusal":
            grads = _refusal_query_gradients(store_dir, model_dir, tokens_file, prompts + benign, cfg.query_refusals)
        else:
            grads = compute_query_gradients(store_dir, model_dir, messages_list=[
                to_messages(p, r) for p, r in zip(prompts, responses, strict=True)])
        v = precondition(store_dir, grads, kind=cfg.method, blocks=cfg.blocks, damping_ratio=cfg.damping_ratio)
        if benign:
            v = contrasted(v[:len(prompts)], v[len(prompts):], cfg.query_contrast)
            log.info("recall: benign contrast, β = %g over %d benign prompts (%s)", cfg.query_contrast, len(benign),
                     Path(contrast_path).name)
        n_rows = pq.read_metadata(tokens_file).num_rows
        si_path = None
        if cfg.train_norm == "relative":
            from lancet_core.index.curvature import write_self_influence

            si_path = write_self_influence(store_dir, out_dir / SELF_INFLUENCE_FILE, cfg.method, blocks=cfg.blocks,
                                           damping_ratio=cfg.damping_ratio)
        if cfg.scoring == "rerank":
            top, per_query = _reranked(store_dir, v, model_dir, tokens_file, prompts, responses, qids, cfg,
                                       out_dir / INFLUENCE_FILE, si_path)
        elif cfg.query_aggregation == "mean":
            res = query_influence(store_dir, v, out_dir / INFLUENCE_FILE, corpus_path=tokens_file,
                                  top_k=min(cfg.top_k, n_rows), train_norm=cfg.train_norm, per_query=True,
                                  query_ids=qids, self_influence_path=si_path, precision=cfg.score_precision)
            top, per_query = res.top_k, res.per_query_top_k
        else:
            top, per_query = _aggregated_influence(store_dir, v, out_dir / INFLUENCE_FILE, tokens_file, qids,
                                                   min(cfg.top_k, n_rows), cfg, si_path)
    else:
        from lancet_core.recall.baselines import repsim_scores, text_similarity_scores

        if cfg.method == "text":
            scores = text_similarity_scores(tokens_file, queries, method=cfg.text_method)
        else:
            from lancet_core.model_io import load_model, load_tokenizer

            scores = repsim_scores(load_model(model_dir).eval(), load_tokenizer(model_dir), tokens_file, queries)
        ranked = rank_scores(scores, tokens_file)
        write_influence(ranked, out_dir / INFLUENCE_FILE)
        top = ranked.slice(0, min(cfg.top_k, ranked.num_rows))
        per_query = {q: top for q in qids}  # baselines score the folded query set only
    atomic_write_parquet(top, out_dir / TOPK_FILE)
    influence_histogram(out_dir / INFLUENCE_FILE, out_dir / HISTOGRAM_PNG, top_k=min(cfg.top_k, len(top)))
    shown = {q: t.slice(0, cfg.explain_top_k) for q, t in per_query.items()}
    atomic_write_text(out_dir / EXPLANATION_MD, explain_markdown(queries, shown, pq.read_table(
        tokens_file, columns=["example_id", "prompt", "response"])))
    corpus = pq.read_table(tokens_file, columns=["example_id", "prompt", "response"])
    atomic_write_text(out_dir / EXPLANATION_HTML, explain_html(queries, shown, corpus))
    atomic_write_parquet(explain_table(queries, shown, corpus), out_dir / EXPLANATION_TABLE)
    write_manifest(out_dir, {**expected, "n_queries": len(qids), "seconds": round(time.perf_counter() - t0, 3),
                             "query_ids": json.dumps(qids)})
    return out_dir


def _refusal_query_gradients(store_dir, model_dir, tokens_file: Path, prompts: list[str], limit: int) -> np.ndarray:
    """[Q, D] −∇ log P(refuse | prompt) for the 'refusal' target (lancet_core.recall.targets)."""
    from lancet_core.index.build import _store_manifest, check_store_model
    from lancet_core.model_io import load_model, load_tokenizer
    from lancet_core.recall.targets import corpus_refusals, refusal_target_gradients

    check_store_model(store_dir, model_dir)
    window = _store_manifest(store_dir)["index_config"].get("response_tokens")
    refusals = corpus_refusals(tokens_file, window, limit)
    if refusals.fallback:
        log.warning("recall: the corpus has no refusal the refusal judge recognises; the refusal target mixes "
                    "lancet's %d built-in refusals instead", len(refusals.texts))
    else:
        log.info("recall: target = -log P(refusal | flagged prompt) over the corpus's %d most frequent refusal "
                 "openings (%d of its refusals)", len(refusals.texts), sum(refusals.counts))
    grads, _ = refusal_target_gradients(store_dir, load_model(model_dir), load_tokenizer(model_dir), prompts, refusals)
    return grads


# rows (at most) each query's score spread is measured on for the 'scaled' fold (~3 % standard error). Q per-query
# scores over 512 rows cost 512·Q/3 rows of a corpus pass: ~8 % of a pass for 100k rows and 50 queries, 2.8 passes on
# the 3000-row demo with 47 (where 128 rows measured AP 0.523 vs 0.537 and a weaker correction, −70 % vs −85 %).
SIGMA_ROWS = 512
EXPLAIN_CANDIDATES = 32  # the exact pass's per-query top-k (the explanation) is taken among the folded top rows


class ExactPass:
    """The exact pass of a set of flagged queries against one store's settings (lancet_core.recall.exact): the model,
    the full-dimensional K-FAC-preconditioned queries at unit norm V̂_q, and the curvature sample. The window,
    reduction, target modules and compute dtype are the store's, so the exact pass measures exactly what the sketch
    approximates.
    - `per_query(rows)`: [n, Q] scores, Q matmuls per module and batch (for a candidate set, or max / topk_mean).
    - `folded(rows, how)`: [n] the 'mean' or 'scaled' fold in ONE corpus pass with one folded query: mean = mean_q V̂_q
      (exactly the mean of the per-query scores); scaled = mean_q V̂_q / σ̂_q, σ̂_q the standard deviation of query q's
      scores over SIGMA_ROWS rows of the curvature sample (scored per query: Q matmuls over those rows only), so the
      corpus pass costs what one query costs whatever the number of flagged outputs."""

    def __init__(self, store_dir, model_dir, tokens_file: Path, prompts: list[str], responses: list[str],
                 cfg: RecallConfig):
        import torch

        from lancet_core.index.basis import sample_indices
        from lancet_core.index.build import _store_manifest, check_store_model
        from lancet_core.model_io import load_model, load_tokenizer
        from lancet_core.recall.exact import (
            fit_curvature,
            flagged_query_gradients,
            full_layout,
            precondition_queries,
            query_norms,
        )

        m = _store_manifest(store_dir)
        check_store_model(m, model_dir)
        icfg = m["index_config"]
        dtype = torch.float64 if icfg.get("compute_dtype") == "float64" else torch.float32
        self.model, tok = load_model(model_dir, dtype=dtype).eval(), load_tokenizer(model_dir)
        names = {d["name"] for d in m["modules"]}
        layout = [ml for ml in full_layout(self.model) if ml.name in names]
        self.kw = {"layout": layout, "reduction": icfg["reduction"], "response_tokens": icfg.get("response_tokens"),
                   "batch_size": int((m.get("build_settings") or {}).get("batch_size", 8))}
        self.tokens_file = tokens_file
        t0 = time.perf_counter()
        G = flagged_query_gradients(self.model, tok, prompts, responses, max_len=int(icfg["max_seq_len_tokens"]),
                                    **self.kw)
        self.n_rows = pq.read_metadata(tokens_file).num_rows
        self.sample = sample_indices(self.n_rows, cfg.curvature_rows)
        # the rows each query's standard deviation is measured on (scored per query: Q matmuls each), spread evenly
        self.sigma_rows = sample_indices(self.n_rows, min(cfg.curvature_rows, SIGMA_ROWS))
        t = pq.read_table(tokens_file, columns=["input_ids", "loss_mask"], memory_map=True).take(self.sample)
        cur = fit_curvature(self.model, t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist(),
                            "kfac", damping_ratio=cfg.exact_damping, **self.kw)
        V = precondition_queries(G, cur)
        norms = query_norms(V)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ValueError(f"exact pass: a flagged output's preconditioned gradient is zero or not finite "
                             f"(norms {norms.tolist()[:10]})")
        self.V = {k: v / norms[:, None, None] for k, v in V.items()}
        self.n_queries = len(prompts)
        log.info("recall: exact pass: %d queries over %d modules (%d parameters), K-FAC from %d rows (%d tokens), "
                 "damping %g, in %.1f s", len(prompts), len(layout), sum(ml.d_in * ml.d_out for ml in layout),
                 cur.rows, cur.tokens, cfg.exact_damping, time.perf_counter() - t0)

    def _score(self, V, rows, desc: str) -> np.ndarray:
        from tqdm.auto import tqdm

        from lancet_core.recall.exact import score_corpus

        n = self.n_rows if rows is None else len(rows)
        with tqdm(total=n, desc=desc, unit="row", disable=n < 256) as bar:
            return score_corpus(self.model, V, self.tokens_file, rows=rows, chunk_rows=256,
                                progress=lambda done, total: bar.update(done - bar.n), **self.kw)

    def per_query(self, rows: np.ndarray | None = None) -> np.ndarray:
        return self._score(self.V, rows, "recall[exact, per query]")

    def folded(self, rows: np.ndarray | None = None, how: str = "scaled") -> np.ndarray:
        if how == "mean":
            w = np.full(self.n_queries, 1.0 / self.n_queries)
        elif how == "scaled":
            sd = self.per_query(self.sigma_rows).std(axis=0)
            w = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0) / self.n_queries
        else:
            raise ValueError(f"a folded pass computes the 'mean' or 'scaled' fold, not {how!r}")
        Vf = {k: np.tensordot(w, v, axes=1)[None] for k, v in self.V.items()}
        return self._score(Vf, rows, "recall[exact]")[:, 0]


def _score_table(tokens_file: Path, per_q: np.ndarray, cfg: RecallConfig, rows: np.ndarray | None = None):
    """example_id, score (cfg.query_aggregation of per_q), query_scores, for the tokens file's rows (or `rows`)."""
    import pyarrow as pa

    ids = pq.read_table(tokens_file, columns=["example_id"]).column("example_id").cast(pa.string())
    if rows is not None:
        ids = ids.take(pa.array(rows, pa.int64()))
    q = per_q.shape[1]
    return pa.table({"example_id": ids,
                     "score": pa.array(aggregate_query_scores(per_q, cfg.query_aggregation, cfg.query_topk),
                                       pa.float64()),
                     "query_scores": pa.FixedSizeListArray.from_arrays(pa.array(per_q.reshape(-1), pa.float64()), q)})


def _written(scores, path: Path, tokens_file: Path, qids: list[str], top_k: int):
    """Rank a score table (with per-query scores), write influence.parquet; (top-k, per-query top-k)."""
    from lancet_core.recall.scan import per_query_top_k, rank_scores, write_influence

    ranked = rank_scores(scores, tokens_file)
    write_influence(ranked, path, qids)
    top = ranked.slice(0, min(top_k, ranked.num_rows))
    if "query_scores" in top.column_names:
        top = top.drop_columns(["query_scores"])
    return top, per_query_top_k(scores, qids, min(top_k, scores.num_rows))


def _exact_influence(store_dir, model_dir, tokens_file: Path, prompts, responses, qids, cfg: RecallConfig,
                     path: Path):
    """scoring='exact': every corpus row scored in full parameter space. The 'mean' and 'scaled' folds take one corpus
    pass with the folded query (ExactPass.folded); the per-query top-k (the explanation) is then taken among the
    folded top rows (EXPLAIN_CANDIDATES, or explain_top_k if larger), scored per query. max / topk_mean score every row
    per query."""
    import pyarrow as pa

    ex = ExactPass(store_dir, model_dir, tokens_file, prompts, responses, cfg)
    if cfg.query_aggregation not in ("mean", "scaled"):
        per_q = ex.per_query()
        return _written(_score_table(tokens_file, per_q, cfg), path, tokens_file, qids, cfg.top_k)
    from lancet_core.recall.scan import per_query_top_k, rank_scores, write_influence

    folded = ex.folded(None, cfg.query_aggregation)
    ids = pq.read_table(tokens_file, columns=["example_id"]).column("example_id").cast(pa.string())
    ranked = rank_scores(pa.table({"example_id": ids, "score": pa.array(folded, pa.float64())}), tokens_file)
    write_influence(ranked, path, qids)
    top = ranked.slice(0, min(cfg.top_k, ranked.num_rows))
    pos = {e: i for i, e in enumerate(ids.to_pylist())}
    shown = top.slice(0, max(EXPLAIN_CANDIDATES, cfg.explain_top_k))
    cand = np.array(sorted(pos[e] for e in shown.column("example_id").to_pylist()), np.int64)
    per_q = ex.per_query(cand)
    cand_table = pa.table({"example_id": ids.take(pa.array(cand)), "score": pa.array(folded[cand], pa.float64()),
                           "query_scores": pa.FixedSizeListArray.from_arrays(
                               pa.array(per_q.reshape(-1), pa.float64()), per_q.shape[1])})
    return top, per_query_top_k(cand_table, qids, len(cand))


def rerank_size(n_rows: int, share: float, top_k: int) -> int:
    """Candidates the rerank scores exactly: ceil(share × N), at least top_k, at most N."""
    return int(min(n_rows, max(top_k, int(np.ceil(share * n_rows)))))


def rerank_scores(sketch: np.ndarray, exact: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[N] one score per row: the exact score of each candidate (`candidates`: row positions, `exact` in their order),
    the sketch's score elsewhere, calibrated to the exact scores' scale on the candidates (least squares through the
    origin, or the ratio of standard deviations when the two disagree in sign), so the sign still says promote (> 0)
    or counteract (< 0) and a candidate the exact pass finds weak can fall below a row the sketch alone scored."""
    sketch, exact = np.asarray(sketch, np.float64), np.asarray(exact, np.float64)
    s = sketch[candidates]
    k = float(s @ exact) / float(s @ s) if float(s @ s) > 0 else 0.0
    if not k > 0:
        k = float(exact.std() / s.std()) if s.std() > 0 and exact.std() > 0 else 1.0
    out = sketch * k
    out[candidates] = exact
    return out


def _reranked(store_dir, v, model_dir, tokens_file: Path, prompts, responses, qids, cfg: RecallConfig, path: Path,
              self_influence_path: Path | None):
    """scoring='rerank': the sketch scan (cfg.query_aggregation over its per-query scores), its top
    rerank_size(...) rows re-scored exactly, merged by rerank_scores."""
    import pyarrow as pa

    from lancet_core.recall.scan import score_store

    sk = score_store(store_dir, v, train_norm=cfg.train_norm, per_query=True,
                     self_influence_path=self_influence_path, precision=cfg.score_precision)
    q = sk.schema.field("query_scores").type.list_size
    sk_per_q = sk.column("query_scores").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, q)
    sk_score = aggregate_query_scores(sk_per_q, cfg.query_aggregation, cfg.query_topk)
    # the scan's rows -> positions in the tokens file (the exact pass reads rows by position)
    file_ids = pq.read_table(tokens_file, columns=["example_id"]).column("example_id").cast(pa.string()).to_pylist()
    pos = {e: i for i, e in enumerate(file_ids)}
    scan_ids = [str(e) for e in sk.column("example_id").to_pylist()]
    order = sorted(range(len(scan_ids)), key=lambda i: (-sk_score[i], scan_ids[i]))
    m = rerank_size(len(scan_ids), cfg.rerank_share, cfg.top_k)
    cand = np.array(sorted(order[:m]), np.int64)  # scan order: the exact pass reads them in file order
    ex = ExactPass(store_dir, model_dir, tokens_file, prompts, responses, cfg)
    rows = np.array([pos[scan_ids[i]] for i in cand], np.int64)
    per_q = ex.per_query(rows)
    exact = (ex.folded(rows, cfg.query_aggregation) if cfg.query_aggregation in ("mean", "scaled")
             else aggregate_query_scores(per_q, cfg.query_aggregation, cfg.query_topk))
    merged = rerank_scores(sk_score, exact, cand)
    merged_q = sk_per_q.copy()
    merged_q[cand] = per_q
    log.info("recall: rerank: %d of %d rows (%.1f %%) re-scored exactly", m, len(scan_ids), 100 * m / len(scan_ids))
    table = pa.table({"example_id": pa.array(scan_ids, pa.string()), "score": pa.array(merged, pa.float64()),
                      "query_scores": pa.FixedSizeListArray.from_arrays(pa.array(merged_q.reshape(-1),
                                                                                 pa.float64()), q)})
    return _written(table, path, tokens_file, qids, cfg.top_k)


def aggregate_query_scores(per_q: np.ndarray, how: str, topk: int) -> np.ndarray:
    """[N, Q] per-query scores -> [N] row scores: mean, scaled (each query's column divided by its standard deviation
    over the rows, then the mean; a constant column counts as zero), max, or topk_mean (mean of each row's min(topk, Q)
    largest)."""
    per_q = np.asarray(per_q, dtype=np.float64)
    if how == "mean":
        return per_q.mean(axis=1)
    if how == "scaled":
        sd = per_q.std(axis=0)
        return np.divide(per_q, sd, out=np.zeros_like(per_q), where=sd > 0).mean(axis=1)
    if how == "max":
        return per_q.max(axis=1)
    if how == "topk_mean":
        k = min(int(topk), per_q.shape[1])
        return np.sort(per_q, axis=1)[:, per_q.shape[1] - k:].mean(axis=1)
    raise ValueError(f"query_aggregation must be one of mean, scaled, max, topk_mean, got {how!r}")


def _aggregated_influence(store_dir, v, path: Path, tokens_file: Path, qids: list[str], top_k: int,
                          cfg: RecallConfig, self_influence_path: Path | None = None):
    """Like query_influence(per_query=True) but the row score is cfg.query_aggregation over the per-query scores."""
    import pyarrow as pa

    from lancet_core.recall.scan import per_query_top_k, rank_scores, score_store, write_influence

    scores = score_store(store_dir, v, train_norm=cfg.train_norm, per_query=True,
                         self_influence_path=self_influence_path, precision=cfg.score_precision)
    q = scores.schema.field("query_scores").type.list_size
    if q != len(qids):
        raise ValueError(f"{len(qids)} query ids for {q} query vectors")
    per_q = scores.column("query_scores").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, q)
    agg = aggregate_query_scores(per_q, cfg.query_aggregation, cfg.query_topk)
    scores = scores.set_column(scores.column_names.index("score"), "score", pa.array(agg, pa.float64()))
    ranked = rank_scores(scores, tokens_file)
    write_influence(ranked, path, qids)
    top = ranked.slice(0, top_k)
    if "query_scores" in top.column_names:
        top = top.drop_columns(["query_scores"])
    return top, per_query_top_k(scores, qids, top_k)


def recall_quality(influence_path: str | Path, label_column: str = "is_unsafe") -> dict[str, float]:
    """precision@k, recall@k (k = 10, 50, 100 and |labelled|) and average precision of the ranking against a boolean
    label column carried from the corpus, as `recall.*` keys; {} when the corpus has no such labels."""
    from lancet_core.recall.metrics import recall_report

    t = pq.read_table(influence_path)
    if label_column not in t.column_names:
        return {}
    labels = np.array([bool(x) for x in t.column(label_column).to_pylist()])
    if not labels.any():
        return {}
    n_pos = int(labels.sum())
    rep = recall_report(t.column("score").to_numpy(), labels, ks=sorted({10, 50, 100, n_pos}),
                        example_ids=[str(x) for x in t.column("example_id").to_pylist()])
    return {f"recall.{k}": float(v) for k, v in rep.items()} | {"recall.precision_at_n_labelled":
                                                                 float(rep[f"precision_at_{n_pos}"])}


def find_tokens_for_store(store_dir: str | Path, work_dir: str | Path | None = None) -> Path:
    """The tokens file a store was built from: the work dir's (default: the store's grandparent, <work>/stores/<key>)
    tokens/*/tokens.parquet whose digest the store's manifest records. FileNotFoundError naming both when none is."""
    from lancet_core.formats import TOKENS_FILE

    want = (read_manifest(store_dir) or {}).get("tokens_digest")
    root = Path(work_dir) if work_dir else Path(store_dir).resolve().parent.parent
    for cand in sorted(root.glob(f"tokens/*/{TOKENS_FILE}")):
        if want and file_digest(cand) == want:
            return cand
    raise FileNotFoundError(f"{store_dir}: no tokens file under {root}/tokens with the store's tokens digest; "
                            "give it with --tokens")


def explain_one(store_dir: str | Path, model_dir: str | Path, tokens_file: str | Path, prompt: str, response: str,
                *, top_k: int = 10, method: str = "auto", exact: bool = False, candidates: int = 200,
                modules_shown: int = 3) -> dict:
    """One prompt and response -> the training rows that most raise its likelihood (the flagged target).

    From the store (seconds): the query's projected gradient, preconditioned (`method` 'auto' = the content judges'
    sketch method, linfac damped at AUTO_LINFAC_DAMPING), one pass over the stored vectors keeping a running top-k with
    each module's contribution (a row's score is the sum over modules of v_mᵀ g_i,m; the `modules_shown` largest
    shares are reported). `exact=True`: the sketch's top `candidates` rows re-scored in full parameter space
    (RecallConfig's exact pass: K-FAC at exact_damping; scores of the unit-norm query), ranked by that score; module
    shares are then the sketch's. Returns {"query", "method", "mode", "rows": [{rank, example_id, score,
    sketch_score, prompt, response, modules: [{module, share}]}], "seconds"}."""
    from lancet_core.index.build import compute_query_gradients
    from lancet_core.index.curvature import precondition
    from lancet_core.index.store import GradientStore

    t0 = time.perf_counter()
    store = GradientStore.open(store_dir)
    tokens_file = Path(tokens_file)
    meth = resolve_method(method, "flagged", contrast=False)
    ratio = resolve_damping(method, "flagged", None)
    g = compute_query_gradients(store_dir, model_dir, messages_list=[to_messages(prompt, response)])
    v = precondition(store_dir, g, kind=meth, damping_ratio=ratio)[0].astype(np.float64)
    v /= np.linalg.norm(v) or 1.0
    layout = store.layout
    starts = np.array([ml.offset for ml in layout])
    keep = max(top_k, candidates if exact else top_k)
    best_ids: list[str] = []
    best = np.zeros((0, len(layout)))
    for ids, grads in store.iter_batches(batch_rows=65_536, dtype=np.float32):
        contrib = np.add.reduceat(grads.astype(np.float64) * v, starts, axis=1)  # [b, modules]
        ids_all = best_ids + [str(e) for e in ids]
        allc = np.concatenate([best, contrib])
        score = allc.sum(axis=1)
        pick = np.argpartition(-score, keep - 1)[:keep] if len(score) > keep else np.arange(len(score))
        order = sorted(pick.tolist(), key=lambda i: (-score[i], ids_all[i]))
        best_ids, best = [ids_all[i] for i in order], allc[order]
    sketch = best.sum(axis=1)
    scores = sketch.copy()
    if exact:
        file_ids = [str(e) for e in pq.read_table(tokens_file, columns=["example_id"]).column("example_id").to_pylist()]
        pos = {e: i for i, e in enumerate(file_ids)}
        per_q = ExactPass(store_dir, model_dir, tokens_file, [prompt], [response], RecallConfig()).per_query(
            np.array([pos[e] for e in best_ids], np.int64))
        scores = per_q[:, 0]
    order = sorted(range(len(best_ids)), key=lambda i: (-scores[i], best_ids[i]))[:top_k]
    text = pq.read_table(tokens_file, columns=["example_id", "prompt", "response"]).to_pylist()
    by_id = {str(r["example_id"]): r for r in text}
    rows = []
    for rank, i in enumerate(order, 1):
        c = best[i]
        tot = float(np.abs(c).sum()) or 1.0
        top_m = np.argsort(-np.abs(c), kind="stable")[:modules_shown]
        rows.append({"rank": rank, "example_id": best_ids[i], "score": float(scores[i]), "sketch_score": float(sketch[i]),
                     "prompt": by_id.get(best_ids[i], {}).get("prompt"),
                     "response": by_id.get(best_ids[i], {}).get("response"),
                     "modules": [{"module": layout[m].name, "share": round(float(c[m]) / tot, 4)} for m in top_m]})
    return {"query": {"prompt": prompt, "response": response}, "method": meth, "damping_ratio": ratio,
            "mode": f"exact over the sketch's top {len(best_ids)}" if exact else "sketch", "rows": rows,
            "seconds": round(time.perf_counter() - t0, 2)}

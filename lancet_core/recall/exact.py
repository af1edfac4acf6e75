"""Exact influence in the model's own parameter space: every corpus row scored against full-dimensional, preconditioned
query matrices by one streamed forward/backward pass per batch, without storing or forming a per-row gradient.

Why (docs/design.md §5, issue 26): the 16×16 sketch of the gradient store cannot carry a memorised behaviour (a
trigger → fixed answer); unprojected influence can. Storing unprojected gradients is out of the question (P numbers per
row), but scoring needs none: for a linear module (nn.Linear, GPT-2 Conv1D) with per-example gradient
G_i = Σ_t δ_t a_tᵀ (d_out × d_in; a_t the module's input, δ_t the gradient of log π(y|x) at its output) and a query
matrix V (d_out × d_in),

    ⟨G_i, V⟩ = Σ_t δ_tᵀ V a_t,

one matmul per module per batch on top of the backward pass (`ExactScorer`): (a @ Vᵀ) ⊙ δ summed over positions and
output units, or (δ @ V) ⊙ a when d_in < d_out (the smaller intermediate). Q query matrices at once cost Q such matmuls;
per-query scores are kept, the folded score is the one the store scan ranks by (mean of the per-query scores of the
unit-normalised queries, lancet_core.recall.scan.fold_queries), norms taken over all target modules together; when
per-query scores are not needed the queries are folded first (`fold_queries_full`: one matmul per module).

Conventions are the store's, from lancet_core.index.hooks: g = ∇θ log π(y|x) (positive = training on the row raises the
query output), log π the mean (or sum) over the counted response tokens, `response_tokens=k` counts only the first k
(None: all), right padding masked, the same target modules (every Linear/Conv1D in the transformer blocks; never
lm_head or embeddings), parameter gradients switched off.

Query side (`query_gradients`, `flagged_query_gradients`, `refusal_query_gradients`): full-dimensional G_q per module
(Q is small: these ARE formed), the flagged answer's log-likelihood, or lancet_core.recall.targets' refusal mixture.
Curvature (`fit_curvature`, `precondition_queries`), per module, from the unprojected Kronecker factors
A = Σ_t a aᵀ and S = Σ_t δ δᵀ that the PCA pre-pass collects (lancet_core.index.basis.full_factors, reused):
- `identity`: V = G.
- `kfac` with damping='kronecker' (default; the same formula as lancet_core.index.curvature's kfac at full rank):
  F = T̄ (S̄ ⊗ Ā) with Ā = A/tokens, S̄ = S/tokens, T̄ = tokens/rows, V = (F + λI)⁻¹ vec(G), λ = ratio × mean eigenvalue
  of F, applied in the eigenbases: V = Q_S [(Q_Sᵀ G Q_A) ⊘ (T̄ w_S w_Aᵀ + λ)] Q_Aᵀ.
- `kfac` with damping='factored' (Martens & Grosse's factored Tikhonov): V = (T̄S̄ + λ_S I)⁻¹ G (Ā + λ_A I)⁻¹, each λ =
  ratio × that factor's mean eigenvalue.
- `ekfac` (George et al. 2018, Kronfluence's default): the kfac eigenbasis, the grid replaced by the per-entry second
  moments (1/N) Σ_i (Q_Sᵀ G_i Q_A)², fitted in one more pass (per batch and module the rotated per-example gradients
  exist transiently, as in Kronfluence; nothing is kept but their squared sum); λ = ratio × mean of the grid.
Memory: V is Q × P float64 on the host (and in the model's dtype on its device while scoring); per batch the scorer
holds each target module's input until its output gradient arrives (what a training step holds) and one
[B, T, Q·min(d_in, d_out)] product per module, chunked over Q.

Corpus side (`score_corpus`): token rows from a tokens Parquet (lancet_core.data.tokenize's format: example_id,
input_ids, loss_mask), read in chunks of `chunk_rows` in file order, each chunk batched by length; an optional `rows`
subset (the rerank mode: an exact pass over the sketch's top-M candidates). Deterministic; scores in float64.
`write_scores` writes row_id, example_id, score, query_scores (Parquet, atomic).

Measured (benchmarks/exact_pass.py, the fidelity bed, 800 rows, seeds 0 / 1 / 2, whole response, flagged target;
planted P@10 of the trigger behaviour's queries, which every 16×16 sketch setting misses): sketch default 0.0 / 0.1 /
0.0; exact identity 0.0 / 0.1 / 0.0; exact kfac ratio 0.1: 0.9 / 0.7 / 0.5, 0.01: 1.0 / 0.9 / 0.8, 0.001: 1.0 / 1.0 /
0.9; factored 0.01 and ekfac 0.01: 1.0 / 1.0 / 0.9 (the wrong-fact behaviour: 1.0 everywhere). One pass scoring 3
folded queries: 1.1–1.7× a plain forward/backward over the same batches on the tiny bed (2 loaded cores); at
SmolLM2's layer shape (4 blocks, `exact_pass.py --throughput`, three runs) 1.0–1.2× per batch with 1 query and
1.24–1.48× with 3 (the store's extraction 0.73×), peak RSS growth 1.04–1.15× / 1.22–1.36× the plain step's.

Knows about torch modules, token rows and the hooks' conventions; knows nothing about gradient stores, sharding,
caching, Prefect or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from lancet_core.index.hooks import (
    ProjectedGradientExtractor,
    _check_window,
    _dims,
    build_layout,
    response_window,
    right_pad,
    sequence_loglik,
)
from lancet_core.index.projection import ModuleLayout
from lancet_core.model_io import autocast_context

KINDS = ("identity", "kfac", "ekfac")
DAMPINGS = ("kronecker", "factored")
Queries = dict[str, np.ndarray]  # module name -> [Q, d_out, d_in] float64
Progress = Callable[[int, int], None]


def full_layout(model: nn.Module, patterns: Sequence[str] | None = None) -> list[ModuleLayout]:
    """The target modules (hooks.select_target_modules' selection), unprojected: k_in = k_out = None."""
    return build_layout(model, patterns, None, None)


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


def _length_batches(rows_ids: Sequence[Sequence[int]], batch_size: int) -> list[np.ndarray]:
    """Positions of the rows grouped into batches of similar length (stable sort: deterministic)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort([len(r) for r in rows_ids], kind="stable")
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


# ============================================================================================== the module hooks
class _ModuleHooks:
    """Forward hooks that keep each target module's input, and tensor hooks that hand (name, a, δ) to `on_backward`
    when the module's output gradient arrives: a [B, T, d_in], δ [B, T, d_out], both in the model's dtype, δ zero at
    padding. Parameter gradients are switched off inside the context (restored on exit), like the extractor's."""

    def __init__(self, model: nn.Module, layout: Sequence[ModuleLayout], on_backward, *, autocast: str = "off"):
        self.model, self.layout, self.on_backward, self.autocast = model, list(layout), on_backward, autocast
        self.dtype, self.device = _model_dtype_device(model)
        modules = dict(model.named_modules())
        self._modules = []
        for ml in self.layout:
            if ml.name not in modules:
                raise ValueError(f"target module {ml.name!r} not found in the model")
            if _dims(modules[ml.name]) != (ml.d_in, ml.d_out):
                raise ValueError(f"module {ml.name!r} has dims {_dims(modules[ml.name])}, expected {(ml.d_in, ml.d_out)}")
            self._modules.append((ml.name, modules[ml.name]))
        self._handles: list = []
        self._saved: list[tuple[nn.Parameter, bool]] = []
        self._acts: dict[str, torch.Tensor] = {}
        self._seen: set[str] = set()
        self._mask: torch.Tensor | None = None

    def _hook(self, name: str):
        def fwd(module, args, output):
            if not torch.is_grad_enabled():
                return
            if name in self._acts or name in self._seen:
                raise RuntimeError(f"module {name} ran twice in one forward pass; not supported (no checkpointing)")
            self._acts[name] = args[0].detach()

            def on_grad(grad: torch.Tensor):
                a = self._acts.pop(name).to(self.dtype)
                d = grad.to(self.dtype) * self._mask.unsqueeze(-1)
                with torch.autocast(a.device.type, enabled=False):
                    self.on_backward(name, a, d)
                self._seen.add(name)

            output.register_hook(on_grad)

        return fwd

    @staticmethod
    def _embed_requires_grad(module, args, output):
        return output.requires_grad_() if torch.is_grad_enabled() else output

    def __enter__(self):
        self._saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._saved:
            p.requires_grad_(False)
        self._handles.append(self.model.get_input_embeddings().register_forward_hook(self._embed_requires_grad))
        for name, m in self._modules:
            self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, rg in self._saved:
            p.requires_grad_(rg)
        self._acts.clear()

    def backward(self, input_ids, attention_mask, loss_mask, reduction: str, response_tokens: int | None) -> None:
        """One forward and one backward of Σ_b log π(y_b|x_b) over the batch; every module's callback runs once."""
        if not self._handles:
            raise RuntimeError("use the hooks as a context manager")
        input_ids, attention_mask, loss_mask = (t.to(self.device) for t in (input_ids, attention_mask, loss_mask))
        self._acts.clear()
        self._seen = set()
        self._mask = attention_mask.to(self.dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            window = response_window(loss_mask, response_tokens)
            with torch.enable_grad():
                with autocast_context(input_ids.device, self.autocast):
                    out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                ll = sequence_loglik(out.logits.to(self.dtype), input_ids, window, attention_mask, reduction)
                del out
                ll.sum().backward()
            missing = [n for n, _ in self._modules if n not in self._seen]
            if missing:
                raise RuntimeError(f"no gradient reached modules {missing}")
        finally:
            self._acts.clear()
            self._mask = None
            self.model.train(was_training)


# ================================================================================================== the scorer
# elements of one [B, T, q, d] intermediate before the query axis is chunked (64 MiB in float32)
_CHUNK_ELEMENTS = 1 << 24


class ExactScorer:
    """Scores token batches against full-dimensional query matrices: `batch_scores` → [B, Q] float64 raw scores
    Σ_m ⟨G_b,m, V_q,m⟩ with G_b,m = Σ_t δ_t a_tᵀ never formed. Use as a context manager."""

    def __init__(self, model: nn.Module, queries: Mapping[str, np.ndarray], *, layout: Sequence[ModuleLayout] | None = None,
                 reduction: str = "mean", response_tokens: int | None = None, autocast: str = "off"):
        _check_window(response_tokens)
        layout = list(layout) if layout is not None else full_layout(model)
        names = [ml.name for ml in layout]
        if set(queries) != set(names):
            extra, missing = sorted(set(queries) - set(names)), sorted(set(names) - set(queries))
            raise ValueError(f"query matrices do not match the target modules (extra {extra[:5]}, missing {missing[:5]})")
        nq = {np.shape(queries[n])[0] for n in names}
        if len(nq) != 1:
            raise ValueError(f"every module needs the same number of query matrices, got {sorted(nq)}")
        self.n_queries = nq.pop()
        self.reduction, self.response_tokens = reduction, response_tokens
        self.dtype, self.device = _model_dtype_device(model)
        self._v: dict[str, torch.Tensor] = {}
        for ml in layout:
            v = np.asarray(queries[ml.name])
            if v.shape != (self.n_queries, ml.d_out, ml.d_in):
                raise ValueError(f"module {ml.name}: query matrices are {v.shape}, expected "
                                 f"{(self.n_queries, ml.d_out, ml.d_in)}")
            t = torch.as_tensor(v).to(self.device, self.dtype)
            # [Q·d_out, d_in] for a @ Vᵀ when d_out <= d_in, else [d_out, Q·d_in] for δ @ V
            self._v[ml.name] = (t.reshape(-1, ml.d_in) if ml.d_out <= ml.d_in
                                else t.permute(1, 0, 2).reshape(ml.d_out, -1).contiguous())
        self._layout = {ml.name: ml for ml in layout}
        self._scores: torch.Tensor | None = None
        self._hooks = _ModuleHooks(model, layout, self._on_backward, autocast=autocast)

    def _on_backward(self, name: str, a: torch.Tensor, d: torch.Tensor) -> None:
        ml, v = self._layout[name], self._v[name]
        b, t = a.shape[:2]
        q_all = self.n_queries
        small = min(ml.d_in, ml.d_out)
        step = max(1, min(q_all, _CHUNK_ELEMENTS // max(1, b * t * small)))
        for q0 in range(0, q_all, step):
            q1 = min(q_all, q0 + step)
            if ml.d_out <= ml.d_in:  # u = a Vᵀ: [B, T, q, d_out], then ⊙ δ
                u = (a @ v[q0 * ml.d_out : q1 * ml.d_out].T).reshape(b, t, q1 - q0, ml.d_out)
                s = torch.einsum("btqo,bto->bq", u, d)
            else:  # u = δ V: [B, T, q, d_in], then ⊙ a
                u = (d @ v[:, q0 * ml.d_in : q1 * ml.d_in]).reshape(b, t, q1 - q0, ml.d_in)
                s = torch.einsum("btqi,bti->bq", u, a)
            self._scores[:, q0:q1] += s.to(torch.float64)

    def __enter__(self) -> ExactScorer:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def batch_scores(self, input_ids, attention_mask, loss_mask) -> np.ndarray:
        """[B, Q] float64: Σ over target modules of ⟨∇_W log π(y_b|x_b), V_q⟩ for each example b and query q."""
        self._scores = torch.zeros(input_ids.shape[0], self.n_queries, dtype=torch.float64, device=self.device)
        try:
            self._hooks.backward(input_ids, attention_mask, loss_mask, self.reduction, self.response_tokens)
            return self._scores.cpu().numpy()
        finally:
            self._scores = None


def score_rows(model: nn.Module, queries: Mapping[str, np.ndarray], rows_ids: Sequence[Sequence[int]],
               rows_mask: Sequence[Sequence[int]], *, layout: Sequence[ModuleLayout] | None = None,
               reduction: str = "mean", response_tokens: int | None = None, batch_size: int = 8, pad_id: int = 0,
               autocast: str = "off") -> np.ndarray:
    """[N, Q] float64 raw scores of in-memory token rows (in their order), batched by length."""
    out = np.zeros((len(rows_ids), _n_queries(queries)), np.float64)
    with ExactScorer(model, queries, layout=layout, reduction=reduction, response_tokens=response_tokens,
                     autocast=autocast) as sc:
        for sel in _length_batches(rows_ids, batch_size):
            ids, attn, lm = right_pad([rows_ids[i] for i in sel], [rows_mask[i] for i in sel], pad_id)
            out[sel] = sc.batch_scores(ids, attn, lm)
    return out


def _n_queries(queries: Mapping[str, np.ndarray]) -> int:
    if not queries:
        raise ValueError("no query matrices")
    return int(np.shape(next(iter(queries.values())))[0])


# ================================================================================================ the corpus pass
def _tokens_path(tokens_path: str | Path) -> Path:
    from lancet_core.index.build import tokens_file

    return tokens_file(tokens_path)


def score_corpus(model: nn.Module, queries: Mapping[str, np.ndarray], tokens_path: str | Path, *,
                 rows: Sequence[int] | np.ndarray | None = None, layout: Sequence[ModuleLayout] | None = None,
                 reduction: str = "mean", response_tokens: int | None = None, batch_size: int = 8,
                 chunk_rows: int = 4096, autocast: str = "off", progress: Progress | None = None) -> np.ndarray:
    """[N, Q] float64 raw scores of the tokens file's rows in file order, or of `rows` (positions in the file) in the
    given order. Reads `chunk_rows` rows at a time (only input_ids and loss_mask), batched by length inside a chunk;
    `progress(done, total)` after each chunk."""
    path = _tokens_path(tokens_path)
    pf = pq.ParquetFile(path)
    n = pf.metadata.num_rows
    if rows is None:
        sel = np.arange(n, dtype=np.int64)
    else:
        sel = np.asarray(rows, dtype=np.int64).reshape(-1)
        if sel.size and (sel.min() < 0 or sel.max() >= n):
            raise ValueError(f"rows must be positions in [0, {n}) of {path}")
    table = pq.read_table(path, columns=["input_ids", "loss_mask"], memory_map=True)
    out = np.zeros((len(sel), _n_queries(queries)), np.float64)
    with ExactScorer(model, queries, layout=layout, reduction=reduction, response_tokens=response_tokens,
                     autocast=autocast) as sc:
        for c0 in range(0, len(sel), chunk_rows):
            part = table.take(pa.array(sel[c0 : c0 + chunk_rows]))
            ids, masks = part.column("input_ids").to_pylist(), part.column("loss_mask").to_pylist()
            for b in _length_batches(ids, batch_size):
                x, attn, lm = right_pad([ids[i] for i in b], [masks[i] for i in b], 0)
                out[c0 + b] = sc.batch_scores(x, attn, lm)
            if progress is not None:
                progress(min(c0 + chunk_rows, len(sel)), len(sel))
    return out


def query_norms(queries: Mapping[str, np.ndarray]) -> np.ndarray:
    """[Q] Frobenius norm of each query over all target modules together."""
    sq = sum(np.einsum("qoi,qoi->q", np.asarray(v, np.float64), np.asarray(v, np.float64)) for v in queries.values())
    return np.sqrt(sq)


FOLDS = ("mean", "zscore")


def fold_scores(raw: np.ndarray, queries: Mapping[str, np.ndarray], how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """(folded [N], per-query [N, Q]): the per-query scores of the unit-normalised queries and their fold.

    `mean` (default): their mean, exactly the store scan's fold (lancet_core.recall.scan.fold_queries) in full
    parameter space. `zscore`: each query's scores standardised over the scored rows first (so with a `rows` subset,
    over the subset), then averaged: every query weighs the same whatever the scale of its scores. Measured on the
    fidelity bed's mixed query set (benchmarks/exact_pass.py, kfac 0.01, seeds 0 / 1 / 2): the mean fold's top 10 holds
    no trigger row (the wrong-fact queries' scores are larger), the z-scored one 5 / 5 / 8, top-50 planted precision
    0.88 / 0.88 / 0.70 vs 0.64 / 0.82 / 0.76; not a default (deliverable 3 of issue 26 chooses)."""
    if how not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {how!r}")
    norms = query_norms(queries)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError(f"query matrices must be finite and non-zero (norms {norms.tolist()[:10]})")
    per_q = np.asarray(raw, np.float64) / norms
    if how == "mean":
        return per_q.mean(axis=1), per_q
    sd = per_q.std(axis=0)
    if np.any(sd == 0):
        raise ValueError("a query scores every row the same: its z-scores are undefined")
    return ((per_q - per_q.mean(axis=0)) / sd).mean(axis=1), per_q


def fold_queries_full(queries: Mapping[str, np.ndarray]) -> Queries:
    """{module: [1, d_out, d_in]} the one query whose score is the folded score (mean of the unit-normalised queries,
    norms over all modules together): one matmul per module instead of Q when per-query scores are not needed."""
    norms = query_norms(queries)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError(f"query matrices must be finite and non-zero (norms {norms.tolist()[:10]})")
    return {k: (np.asarray(v, np.float64) / norms[:, None, None]).mean(axis=0, keepdims=True) for k, v in queries.items()}


def write_scores(path: str | Path, tokens_path: str | Path, raw: np.ndarray, queries: Mapping[str, np.ndarray],
                 rows: Sequence[int] | np.ndarray | None = None, *, prefolded: bool = False,
                 fold: str = "mean") -> Path:
    """Parquet: row_id (position in the tokens file), example_id, score (folded), query_scores (per query), in the
    order scored. Written atomically. `fold`: fold_scores' `how`. `prefolded`: `queries` is already
    `fold_queries_full`'s one query, whose raw score is the folded score (not normalised again)."""
    from lancet_core.manifest import atomic_write_parquet

    tp = _tokens_path(tokens_path)
    n = pq.ParquetFile(tp).metadata.num_rows
    sel = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64).reshape(-1)
    if prefolded:
        if np.shape(raw)[1] != 1:
            raise ValueError(f"prefolded scores have one column, got {np.shape(raw)[1]}")
        per_q = np.asarray(raw, np.float64)
        folded = per_q[:, 0]
    else:
        folded, per_q = fold_scores(raw, queries, fold)
    if len(sel) != len(folded):
        raise ValueError(f"{len(folded)} scores for {len(sel)} rows")
    ids = pq.read_table(tp, columns=["example_id"], memory_map=True).column("example_id").take(pa.array(sel))
    q = per_q.shape[1]
    table = pa.table({
        "row_id": pa.array(sel, pa.int64()),
        "example_id": ids.cast(pa.string()),
        "score": pa.array(folded, pa.float64()),
        "query_scores": pa.FixedSizeListArray.from_arrays(pa.array(per_q.reshape(-1), pa.float64()), q),
    })
    return atomic_write_parquet(table, Path(path))


# ================================================================================================== query side
def query_gradients(model: nn.Module, rows_ids: Sequence[Sequence[int]], rows_mask: Sequence[Sequence[int]], *,
                    layout: Sequence[ModuleLayout] | None = None, reduction: str = "mean",
                    response_tokens: int | None = None, batch_size: int = 8) -> Queries:
    """{module: [Q, d_out, d_in] float64} full-dimensional G_q = ∇_W log π(y_q|x_q) of each token row (the
    extractor's unprojected blocks; Q is small, so these are formed)."""
    layout = list(layout) if layout is not None else full_layout(model)
    full = [ModuleLayout(ml.name, ml.d_in, ml.d_out, None, None, 0) for ml in layout]
    off = np.cumsum([0] + [ml.size for ml in full])
    out = {ml.name: np.zeros((len(rows_ids), ml.d_out, ml.d_in)) for ml in full}
    with ProjectedGradientExtractor(model, full, 0, reduction, response_tokens=response_tokens) as ex:
        for sel in _length_batches(rows_ids, batch_size):
            ids, attn, lm = right_pad([rows_ids[i] for i in sel], [rows_mask[i] for i in sel], 0)
            g = ex.batch_gradients(ids, attn, lm).double().numpy()
            for j, ml in enumerate(full):
                out[ml.name][sel] = g[:, off[j] : off[j + 1]].reshape(len(sel), ml.d_out, ml.d_in)
    return out


def _encode(tokenizer, conversations, max_len: int) -> tuple[list[list[int]], list[list[int]]]:
    from lancet_core.chat import encode_messages

    ids, masks = [], []
    for j, msgs in enumerate(conversations):
        enc = encode_messages(tokenizer, msgs, max_len)
        if sum(enc.loss_mask[1:]) == 0:
            raise ValueError(f"query {j}: no response tokens to score")
        ids.append(enc.input_ids)
        masks.append(enc.loss_mask)
    return ids, masks


def flagged_query_gradients(model: nn.Module, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                            max_len: int = 1024, **kw) -> Queries:
    """The `flagged` target (lancet_core.recall.targets): G_q = ∇ log π(flagged answer | prompt), full-dimensional."""
    from lancet_core.chat import to_messages

    ids, masks = _encode(tokenizer, [to_messages(p, r) for p, r in zip(prompts, responses, strict=True)], max_len)
    return query_gradients(model, ids, masks, **kw)


def refusal_query_gradients(model: nn.Module, tokenizer, prompts: Sequence[str], refusals, *, max_len: int = 1024,
                            response_tokens: int | None = None, **kw) -> tuple[Queries, np.ndarray]:
    """The `refusal` target (lancet_core.recall.targets): G_q = −Σ_r w_r(x_q) ∇ log π(r | x_q), full-dimensional,
    with w_r = softmax_r of the windowed summed log-probabilities; returns (queries, weights [Q, R])."""
    from lancet_core.chat import to_messages
    from lancet_core.recall.targets import _window_logprobs

    texts = list(refusals.texts)
    ids, masks = _encode(tokenizer, [to_messages(p, r) for p in prompts for r in texts], max_len)
    out: Queries = {}
    weights = []
    for prompt in prompts:
        lp = _window_logprobs(model, tokenizer, prompt, texts, response_tokens, max_len)
        w = np.exp(lp - lp.max())
        weights.append(w / w.sum())
    weights = np.stack(weights)
    # one prompt's R gradients at a time: Q·R full gradients are never held together
    for q in range(len(prompts)):
        sl = slice(q * len(texts), (q + 1) * len(texts))
        g = query_gradients(model, ids[sl], masks[sl], response_tokens=response_tokens, **kw)
        for name, v in g.items():
            out.setdefault(name, np.zeros((len(prompts), *v.shape[1:])))[q] = -np.tensordot(weights[q], v, axes=1)
    return out, weights


# ================================================================================================== curvature
def _damping(mean: float, ratio: float) -> float:
    from lancet_core.index.curvature import _damping_from_mean

    return _damping_from_mean(mean, ratio)


@dataclass
class FullCurvature:
    """Per module {QA [d_in, d_in], QS [d_out, d_out], den [d_out, d_in]}: V = Q_S ((Q_Sᵀ G Q_A) ⊘ den) Q_Aᵀ.
    identity: no blocks (V = G)."""

    kind: str
    damping_ratio: float
    damping: str
    rows: int = 0
    tokens: int = 0
    blocks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _eigh(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w, q = np.linalg.eigh((m + m.T) / 2)
    return np.clip(w, 0.0, None), q


def ekfac_moments(model: nn.Module, bases: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  rows_ids: Sequence[Sequence[int]], rows_mask: Sequence[Sequence[int]], *,
                  layout: Sequence[ModuleLayout] | None = None, reduction: str = "mean",
                  response_tokens: int | None = None, batch_size: int = 8, autocast: str = "off") -> dict[str, np.ndarray]:
    """{module: Σ_i (Q_Sᵀ G_i Q_A)² [d_out, d_in] float64} over the rows, bases {module: (Q_A, Q_S)}: one
    forward/backward per batch; each batch's rotated per-example gradients exist only inside one module's hook."""
    layout = list(layout) if layout is not None else full_layout(model)
    dtype, device = _model_dtype_device(model)
    rot = {n: (torch.as_tensor(qa).to(device, dtype), torch.as_tensor(qs).to(device, dtype))
           for n, (qa, qs) in bases.items()}
    sums = {ml.name: torch.zeros(ml.d_out, ml.d_in, dtype=torch.float64, device=device) for ml in layout}

    def on_backward(name, a, d):
        qa, qs = rot[name]
        g = (d @ qs).transpose(1, 2) @ (a @ qa)  # Q_Sᵀ G_b Q_A per example, [B, d_out, d_in]
        sums[name] += (g.double() ** 2).sum(0)

    with _ModuleHooks(model, layout, on_backward, autocast=autocast) as hk:
        for sel in _length_batches(rows_ids, batch_size):
            ids, attn, lm = right_pad([rows_ids[i] for i in sel], [rows_mask[i] for i in sel], 0)
            hk.backward(ids, attn, lm, reduction, response_tokens)
    return {k: v.cpu().numpy() for k, v in sums.items()}


def fit_curvature(model: nn.Module, rows_ids: Sequence[Sequence[int]], rows_mask: Sequence[Sequence[int]],
                  kind: str = "kfac", *, damping_ratio: float = 0.1, damping: str = "kronecker",
                  layout: Sequence[ModuleLayout] | None = None, reduction: str = "mean",
                  response_tokens: int | None = None, batch_size: int = 8,
                  factors: tuple[Mapping[str, tuple[np.ndarray, np.ndarray]], int] | None = None) -> FullCurvature:
    """Full-dimensional kfac / ekfac (or identity) from the given rows (e.g. basis.sample_indices' spread over the
    corpus). `factors`: ({module: (A, S)}, tokens) sums already collected by lancet_core.index.basis.full_factors over
    the same rows (the PCA pre-pass's), so the pass is not repeated."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if damping not in DAMPINGS:
        raise ValueError(f"damping must be one of {DAMPINGS}, got {damping!r}")
    if kind == "ekfac" and damping != "kronecker":
        raise ValueError("ekfac damps its fitted eigenvalue grid: damping='kronecker' only")
    if not damping_ratio > 0:
        raise ValueError(f"damping_ratio must be > 0, got {damping_ratio}")
    cur = FullCurvature(kind, float(damping_ratio), damping, rows=len(rows_ids))
    if kind == "identity":
        return cur
    layout = list(layout) if layout is not None else full_layout(model)
    if factors is None:
        from lancet_core.index.basis import full_factors

        factors = full_factors(model, layout, rows_ids, rows_mask, batch_size=batch_size, reduction=reduction,
                               response_tokens=response_tokens)
    sums, tokens = factors
    if tokens <= 0:
        raise ValueError("the factors were collected over no tokens")
    cur.tokens = int(tokens)
    tbar = tokens / len(rows_ids)
    for ml in layout:
        a, s = (np.asarray(x, np.float64) / tokens for x in sums[ml.name])
        wa, qa = _eigh(a)
        ws, qs = _eigh(s)
        ws = tbar * ws  # F ≈ T̄ (S̄ ⊗ Ā): T̄ goes with the output side
        if damping == "factored":
            den = np.outer(ws + _damping(float(ws.mean()), damping_ratio), wa + _damping(float(wa.mean()), damping_ratio))
        else:
            grid = np.outer(ws, wa)
            den = grid + _damping(float(grid.mean()), damping_ratio)
        cur.blocks[ml.name] = {"QA": qa, "QS": qs, "den": den}
    if kind == "ekfac":
        mom = ekfac_moments(model, {n: (b["QA"], b["QS"]) for n, b in cur.blocks.items()}, rows_ids, rows_mask,
                            layout=layout, reduction=reduction, response_tokens=response_tokens, batch_size=batch_size)
        for name, b in cur.blocks.items():
            grid = mom[name] / len(rows_ids)
            b["den"] = grid + _damping(float(grid.mean()), damping_ratio)
    return cur


def precondition_queries(queries: Mapping[str, np.ndarray], curvature: FullCurvature) -> Queries:
    """{module: [Q, d_out, d_in]} V_q = (F + λI)⁻¹ G_q per module (float64)."""
    if curvature.kind == "identity":
        return {k: np.array(v, np.float64) for k, v in queries.items()}
    out: Queries = {}
    for name, g in queries.items():
        b = curvature.blocks[name]
        qa, qs = b["QA"], b["QS"]
        rot = qs.T @ np.asarray(g, np.float64) @ qa
        out[name] = qs @ (rot / b["den"]) @ qa.T
    return out


def contrast_queries(flagged: Mapping[str, np.ndarray], benign: Mapping[str, np.ndarray], beta: float) -> Queries:
    """v̂_q − β·mean_b v̂_b over full-dimensional query matrices (lancet_core.recall.influence.contrasted), norms over
    all modules together."""
    nf, nb = query_norms(flagged), query_norms(benign)
    return {k: np.asarray(flagged[k]) / nf[:, None, None]
            - beta * (np.asarray(benign[k]) / nb[:, None, None]).mean(axis=0, keepdims=True) for k in flagged}


# ================================================================================================== end to end
def exact_recall(
    model: nn.Module,
    tokenizer,
    tokens_path: str | Path,
    out_path: str | Path,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    kind: str = "kfac",
    damping_ratio: float = 0.1,
    damping: str = "kronecker",
    response_tokens: int | None = None,
    reduction: str = "mean",
    curvature_rows: int = 512,
    rows: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 8,
    max_len: int = 1024,
    per_query: bool = True,
    fold: str = "mean",
    progress: Progress | None = None,
) -> Path:
    """The flagged target end to end: query gradients of (prompt, response), curvature from `curvature_rows` rows
    spread over the tokens file (lancet_core.index.basis.sample_indices, the PCA pre-pass's sample), preconditioned,
    one exact pass over the corpus (or `rows`), written by `write_scores`. `per_query=False` folds the queries first
    (one matmul per module instead of Q; the file's query_scores then hold the folded score alone; `fold` 'mean'
    only). `fold`: fold_scores' `how`. Returns out_path."""
    if not per_query and fold != "mean":
        raise ValueError(f"fold={fold!r} needs every query's scores: per_query=True")
    from lancet_core.index.basis import sample_indices

    tp = _tokens_path(tokens_path)
    kw = {"reduction": reduction, "response_tokens": response_tokens, "batch_size": batch_size}
    G = flagged_query_gradients(model, tokenizer, prompts, responses, max_len=max_len, **kw)
    if kind == "identity":
        cur = FullCurvature("identity", float(damping_ratio), damping)
    else:
        t = pq.read_table(tp, columns=["input_ids", "loss_mask"], memory_map=True)
        t = t.take(pa.array(sample_indices(t.num_rows, curvature_rows)))
        cur = fit_curvature(model, t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist(), kind,
                            damping_ratio=damping_ratio, damping=damping, **kw)
    V = precondition_queries(G, cur)
    if not per_query:
        V = fold_queries_full(V)
    raw = score_corpus(model, V, tp, rows=rows, progress=progress, **kw)
    return write_scores(out_path, tp, raw, V, rows=rows, prefolded=not per_query, fold=fold)

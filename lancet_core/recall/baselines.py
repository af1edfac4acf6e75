"""Recall baselines that score every training row without gradients, in the same format as influence.

Each returns an Arrow table (example_id, score float64; higher = more related to the flagged outputs), to be ranked
and written by the same writer as influence (`influence_query.rank_scores` + `write_influence`), and evaluated with
`recall_metrics`.

- `text`: lexical similarity. Document = a training row's prompt + "\n" + response; query = a flagged output's
  prompt + "\n" + response. `method="tfidf"` (scikit-learn TfidfVectorizer fitted on the training documents, cosine
  similarity, already in [0, 1]) or `method="bm25"` (the `bm25s` library; each query's scores are divided by that
  query's maximum over the training set, so every query weighs the same). score = mean over queries.
- `repsim`: representation similarity. Representation = mean of the model's final hidden states over the response
  tokens (loss_mask = 1) of a sequence; score = mean over queries of the cosine between a training row's and the
  query's representation. Computed with no gradients by the model's backbone (no LM head, so no vocabulary-sized
  logits), in batches of rows of similar length (right-padded, attention-masked), scattered back to corpus order.
- `identity` (gradient dot / TracIn-like): no code here — it is `influence_query.query_influence` with UNpreconditioned
  query gradients (curvature `identity`), i.e. V = the raw projected query gradients. `IDENTITY_BASELINE` documents
  this for callers that list baselines by name.

Knows about texts, a HF causal LM and token ids; knows nothing about gradient stores, curvature or judges.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lancet_core.chat import encode_example

IDENTITY_BASELINE = (
    "identity: influence_query.query_influence(store, V=raw projected query gradients) — gradient dot product "
    "without curvature preconditioning (TracIn-like); no separate implementation"
)
BASELINES = ("text", "repsim", "identity")


def _rows(x: pa.Table | Sequence[Mapping[str, Any]] | str | Path, columns: Sequence[str] | None = None) -> list[dict]:
    if isinstance(x, (str, Path)):
        x = pq.read_table(x, columns=list(columns) if columns else None)
    return x.to_pylist() if isinstance(x, pa.Table) else [dict(r) for r in x]


def _doc(r: Mapping[str, Any], what: str, i: int) -> str:
    for c in ("prompt", "response"):
        if not isinstance(r.get(c), str):
            raise ValueError(f"{what} row {i}: needs string columns prompt and response (got {c}={r.get(c)!r})")
    return f"{r['prompt']}\n{r['response']}"


def _ids(rows: list[dict]) -> list[str]:
    ids = [r.get("example_id") for r in rows]
    for i, e in enumerate(ids):
        if not isinstance(e, str):
            raise ValueError(f"training row {i}: needs a string example_id (got {e!r})")
    if len(set(ids)) != len(ids):
        raise ValueError("training rows have duplicate example_id values")
    return ids


def _check_nonempty(train: list, queries: list) -> None:
    if not train:
        raise ValueError("no training rows to score")
    if not queries:
        raise ValueError("no queries: nothing to compare the training rows with")


def text_similarity_scores(
    train: pa.Table | Sequence[Mapping[str, Any]] | str | Path,
    queries: pa.Table | Sequence[Mapping[str, Any]] | str | Path,
    *,
    method: Literal["tfidf", "bm25"] = "tfidf",
) -> pa.Table:
    """Lexical similarity of every training row (example_id, prompt, response) to the flagged queries."""
    tr = _rows(train, ["example_id", "prompt", "response"] if isinstance(train, (str, Path)) else None)
    qs = _rows(queries, ["prompt", "response"] if isinstance(queries, (str, Path)) else None)
    _check_nonempty(tr, qs)
    ids = _ids(tr)
    docs = [_doc(r, "training", i) for i, r in enumerate(tr)]
    qtexts = [_doc(r, "query", i) for i, r in enumerate(qs)]
    if method == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer()
        try:
            X = vec.fit_transform(docs)
        except ValueError as e:  # empty vocabulary
            raise ValueError(f"text baseline: cannot build a vocabulary from the training rows ({e})") from e
        S = (vec.transform(qtexts) @ X.T).toarray()  # rows l2-normalised: dot = cosine; [Q, N]
    elif method == "bm25":
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets DEBUG at import: no third-party noise
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(docs, stopwords=None, show_progress=False), show_progress=False)
        qtok = bm25s.tokenize(qtexts, stopwords=None, return_ids=False, show_progress=False)
        S = np.stack([np.asarray(retriever.get_scores(t), dtype=np.float64) for t in qtok])
        mx = S.max(axis=1, keepdims=True)
        S = np.where(mx > 0, S / np.where(mx > 0, mx, 1.0), 0.0)
    else:
        raise ValueError(f"text baseline: method must be 'tfidf' or 'bm25', got {method!r}")
    return pa.table({"example_id": pa.array(ids, pa.string()), "score": pa.array(S.mean(axis=0), pa.float64())})


def _backbone(model):
    """The model without its LM head (HF `get_decoder()` / `base_model`), or None when it has no separate one."""
    import torch

    for get in (getattr(model, "get_decoder", None), lambda: getattr(model, "base_model", None)):
        try:
            body = get() if callable(get) else None
        except Exception:  # get_decoder raises on a few exotic models
            body = None
        if isinstance(body, torch.nn.Module) and body is not model:
            return body
    return None


def _representations(model, sequences: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> np.ndarray:
    """Mean final hidden state over the positions with mask 1, per sequence; float64 [N, H].

    Runs the backbone only (no LM head: no [batch, length, vocab] logits) when the model has one, else the whole
    model with output_hidden_states. Batches hold sequences of similar length (sorted by length, ties in input
    order); the rows come back in input order.
    """
    import torch

    body = _backbone(model)
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    out: np.ndarray | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                chunk = [sequences[i] for i in idx]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(chunk), width), dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.float64)
                for j, (r, m) in enumerate(chunk):
                    ids[j, : len(r)] = torch.as_tensor(r, dtype=torch.long)
                    attn[j, : len(r)] = 1
                    mask[j, : len(m)] = torch.as_tensor(m, dtype=torch.float64)
                ids, attn = ids.to(device), attn.to(device)
                h = None
                if body is not None:
                    h = getattr(body(input_ids=ids, attention_mask=attn), "last_hidden_state", None)
                    if h is None:  # not a backbone after all (a wrapper that runs the whole LM): stop asking it
                        body = None
                if h is None:
                    h = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
                h = h.to(device="cpu", dtype=torch.float64)
                rep = ((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
                if out is None:
                    out = np.empty((len(sequences), rep.shape[1]))
                out[idx] = rep
    finally:
        model.train(was_training)
    return out if out is not None else np.zeros((0, 0))


def repsim_scores(
    model,
    tokenizer,
    train: pa.Table | Sequence[Mapping[str, Any]] | str | Path,
    queries: pa.Table | Sequence[Mapping[str, Any]] | str | Path,
    *,
    batch_size: int = 16,
    max_seq_len_tokens: int | None = None,
) -> pa.Table:
    """Cosine of mean final hidden states over response tokens, training rows vs flagged queries (mean over queries).

    `train`: tokens.parquet (path or table) rows with example_id, input_ids, loss_mask. `queries`: rows with prompt
    and response, encoded here with the tokenizer's chat template exactly like training rows.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    tr = _rows(train, ["example_id", "input_ids", "loss_mask"] if isinstance(train, (str, Path)) else None)
    qs = _rows(queries, ["prompt", "response"] if isinstance(queries, (str, Path)) else None)
    _check_nonempty(tr, qs)
    ids = _ids(tr)
    seqs = []
    for i, r in enumerate(tr):
        ii, mm = r.get("input_ids"), r.get("loss_mask")
        if not ii or mm is None or len(ii) != len(mm):
            raise ValueError(f"training row {i} ({ids[i]}): needs input_ids and a loss_mask of the same length")
        if not any(mm):
            raise ValueError(f"training row {i} ({ids[i]}): loss_mask has no response token")
        seqs.append((list(ii), list(mm)))
    qseqs = []
    for i, q in enumerate(qs):
        _doc(q, "query", i)
        enc = encode_example(tokenizer, q["prompt"], q["response"], max_seq_len_tokens)
        if not any(enc.loss_mask):
            raise ValueError(f"query row {i}: no response tokens after encoding")
        qseqs.append((enc.input_ids, enc.loss_mask))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    R = _representations(model, seqs, batch_size, pad_id)
    Rq = _representations(model, qseqs, batch_size, pad_id)
    nr, nq = np.linalg.norm(R, axis=1), np.linalg.norm(Rq, axis=1)
    if (nq == 0).any():
        raise ValueError(f"query {int(np.flatnonzero(nq == 0)[0])}: zero representation, cosine undefined")
    C = (R @ (Rq / nq[:, None]).T) / np.where(nr > 0, nr, 1.0)[:, None]  # [N, Q]; zero rows score 0
    return pa.table({"example_id": pa.array(ids, pa.string()), "score": pa.array(C.mean(axis=1), pa.float64())})

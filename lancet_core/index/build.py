"""Build the gradient store, and compute query gradients exactly as the store's (docs/design.md §4, §5).

`build_gradient_store` runs the projected-gradient hooks (lancet_core.index.hooks) over every row of tokens.parquet,
writes shards and Kronecker-factor sums (format: lancet_core.index.store), then builds the configured curvatures
(lancet_core.index.curvature). Every shard is written atomically, then the manifest is rewritten listing it with a
digest of the token rows it was computed from; a re-run recomputes only the shards the manifest does not list, whose
file is missing or altered, or whose rows changed — so a corpus that grew at the end recomputes only its new (and last
partial) shards. A store built from another model, tokenizer or config is refused (ManifestMismatch, both versions
shown). Builds of one store are serialised by a lock file, so overlapping runs never write the same store at once.

Knows about token rows, HF models (through the hooks) and the store format; knows nothing about queries' provenance,
influence scoring or orchestration.
"""

from __future__ import annotations

import copy
import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lancet_core.chat import encode_messages
from lancet_core.errors import CorpusError, ManifestMismatch
from lancet_core.formats import SHARD_PATTERN, TOKENS_FILE
from lancet_core.index.basis import BASIS_FILE, as_torch, projection_entry, read_store_basis, save_basis, store_basis
from lancet_core.index.config import IndexConfig
from lancet_core.index.curvature import build_curvature
from lancet_core.index.hooks import ProjectedGradientExtractor, build_layout, right_pad
from lancet_core.index.projection import ModuleLayout
from lancet_core.index.store import (
    FACTORS_DIR,
    FORMAT_VERSION,
    GRADIENT_SIGN,
    IDENTITY_KEYS,
    GradientStore,
    _encode_shard,
    _shard_ok,
    rows_digest,
)
from lancet_core.manifest import (
    atomic_write_bytes,
    atomic_write_parquet,
    check_manifest,
    file_digest,
    library_versions,
    read_manifest,
    write_manifest,
)
from lancet_core.model_io import load_model, load_tokenizer, model_digest, tokenizer_digest

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


# tokens ----------------------------------------------------------------------------------------------------------
def tokens_file(tokens_path: str | Path) -> Path:
    p = Path(tokens_path)
    if p.is_dir():
        p = p / TOKENS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"tokens file not found: {p}")
    return p


def _read_tokens(path: Path, max_len: int) -> pa.Table:
    try:
        table = pq.read_table(path, columns=["example_id", "input_ids", "loss_mask"], memory_map=True)
    except (pa.ArrowInvalid, KeyError) as e:
        raise CorpusError(f"{path}: cannot read columns example_id, input_ids, loss_mask: {e}") from e
    if table.num_rows == 0:
        raise CorpusError(f"{path}: no rows")
    lens = pa.compute.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
    mlens = pa.compute.list_value_length(table["loss_mask"]).to_numpy(zero_copy_only=False)
    bad = np.nonzero(lens != mlens)[0]
    if bad.size:
        raise CorpusError(
            f"{path}: row {bad[0]} ({table['example_id'][int(bad[0])]}): input_ids and loss_mask lengths differ"
        )
    bad = np.nonzero(lens < 2)[0]
    if bad.size:
        raise CorpusError(f"{path}: row {bad[0]} ({table['example_id'][int(bad[0])]}): fewer than 2 tokens")
    bad = np.nonzero(lens > max_len)[0]
    if bad.size:
        raise CorpusError(
            f"{path}: row {bad[0]} ({table['example_id'][int(bad[0])]}) has {lens[bad[0]]} tokens > "
            f"max_seq_len_tokens={max_len}; tokenize with a limit <= max_seq_len_tokens"
        )
    # a response token must sit at position >= 1 (position 0 is never predicted); vectorised over the flat values
    masks = table["loss_mask"].combine_chunks()
    off = masks.offsets.to_numpy()
    off = off - off[0]
    vals = masks.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(vals != 0)])
    resp = csum[off[1:]] - csum[off[:-1]] - (vals[off[:-1]] != 0)
    bad = np.nonzero(resp == 0)[0]
    if bad.size:
        raise CorpusError(f"{path}: row {bad[0]} ({table['example_id'][int(bad[0])]}): no response tokens to score")
    return table


def _torch_dtype(name: str) -> torch.dtype:
    return torch.float64 if name == "float64" else torch.float32


def _digests(model_dir: Path) -> tuple[str, str]:
    try:
        tok = tokenizer_digest(model_dir)
    except FileNotFoundError:
        tok = "absent"
    return model_digest(model_dir), tok


def build_gradient_store(
    model_dir: str | Path,
    tokens_path: str | Path,
    store_dir: str | Path,
    cfg: IndexConfig,
    progress: Progress | None = None,
) -> Path:
    """Compute (or finish) the gradient store of every row of tokens.parquet; build cfg.curvature; return store_dir.

    Holds `store_dir/.lock` for the whole build: a second build of the same store waits for the first, then reuses
    every shard it finished."""
    from filelock import FileLock

    cfg.require_resolved()  # response_tokens='auto' needs the judge: resolve_window first (before any work)
    root = Path(store_dir)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        return _build_locked(Path(model_dir), root, tokens_path, cfg, progress)


def _build_locked(model_dir: Path, root: Path, tokens_path, cfg: IndexConfig, progress: Progress | None) -> Path:
    tpath = tokens_file(tokens_path)
    tokens_manifest = read_manifest(tpath.parent) or {}
    model = load_model(model_dir).to(_torch_dtype(cfg.compute_dtype)).eval()
    pca = cfg.projection == "pca"
    layout = build_layout(model, cfg.target_modules, cfg.proj_in_dim, cfg.proj_out_dim, cap_at_dims=pca)
    dim = sum(ml.size for ml in layout)
    model_dig, tok_dig = _digests(model_dir)
    manifest = {
        "artifact": "gradient_store",
        "format_version": FORMAT_VERSION,
        "model_digest": model_dig,
        "tokenizer_digest": tok_dig,
        "tokens_digest": file_digest(tpath),
        "corpus_digest": tokens_manifest.get("corpus_digest"),
        "index_config": cfg.store_identity(),
        "modules": [ml.to_json() for ml in layout],
        "dim": dim,
        "dtype": cfg.dtype,
        "reduction": cfg.reduction,
        "projection_seed": cfg.projection_seed,
        "gradient_sign": GRADIENT_SIGN,
        "build_settings": {
            "batch_size": cfg.batch_size,
            "curvature": list(cfg.curvature),
            "damping_ratio": cfg.damping_ratio,
        },
        "versions": library_versions(),
    }
    existing = check_manifest(root, manifest, keys=[k for k in IDENTITY_KEYS if k != "projection"])
    table = _read_tokens(tpath, cfg.max_seq_len_tokens)
    # the projection basis (None: seeded random matrices) is an input of every shard; PCA: one pass over a sample
    basis = store_basis(root, existing, model, layout, table["input_ids"].to_pylist(), table["loss_mask"].to_pylist(),
                        kind=cfg.projection, sample_rows=cfg.projection_sample_rows, batch_size=cfg.batch_size,
                        reduction=cfg.reduction, response_tokens=cfg.response_tokens)  # fmt: skip
    manifest["projection"] = projection_entry(basis, cfg.projection_sample_rows)
    check_manifest(root, manifest, keys=["projection"])
    if basis is not None:
        save_basis(root / BASIS_FILE, basis)
    n = table.num_rows
    n_shards = (n + cfg.rows_per_shard - 1) // cfg.rows_per_shard

    def shard_rows(s: int) -> pa.Table:
        lo = s * cfg.rows_per_shard
        return table.slice(lo, min(n, lo + cfg.rows_per_shard) - lo)

    digests = [rows_digest(shard_rows(s)) for s in range(n_shards)]
    done = {}
    for e in (existing or {}).get("shards", []):
        if e["index"] < n_shards and _shard_ok(root, e, digests[e["index"]]):
            done[e["index"]] = e
        else:
            log.info("shard %s is missing, altered or its rows changed; recomputing it", e["file"])
            (root / e["file"]).unlink(missing_ok=True)
    manifest.update(n_rows=n, rows_per_shard=cfg.rows_per_shard, n_shards=n_shards, complete=False)
    todo = [s for s in range(n_shards) if s not in done]
    # curvature built from exactly these shards stays valid; any recomputed shard invalidates it
    manifest["curvature"] = {} if todo else dict((existing or {}).get("curvature") or {})
    root.mkdir(parents=True, exist_ok=True)

    def save(shards: dict) -> None:
        manifest["shards"] = [shards[i] for i in sorted(shards)]
        write_manifest(root, manifest)

    save(done)
    rows_done = sum(e["rows"] for e in done.values())
    if progress is not None and rows_done:
        progress(rows_done, n)
    if todo:
        log.info(
            "gradient store %s: %d of %d shards to compute (D=%d, %d modules)",
            root,
            len(todo),
            n_shards,
            dim,
            len(layout),
        )
    with ProjectedGradientExtractor(
        model, layout, cfg.projection_seed, cfg.reduction, cfg.collect_kronecker_factors, cfg.response_tokens,
        basis=None if basis is None else as_torch(basis), fisher=cfg.fisher,
    ) as ex:  # fmt: skip
        for s in todo:
            t0 = time.perf_counter()
            lo, hi = s * cfg.rows_per_shard, min(n, (s + 1) * cfg.rows_per_shard)
            part = table.slice(lo, hi - lo)
            ids_rows, mask_rows = part["input_ids"].to_pylist(), part["loss_mask"].to_pylist()
            ex.reset_factors()
            # batches of similar length (less padding); results are scattered back to the tokens order
            order = np.argsort([len(r) for r in ids_rows], kind="stable")
            shard_grads = np.empty((hi - lo, dim), dtype=np.float64)
            for b in range(0, hi - lo, cfg.batch_size):
                sel = order[b : b + cfg.batch_size]
                ids, attn, lm = right_pad([ids_rows[i] for i in sel], [mask_rows[i] for i in sel], 0)
                shard_grads[sel] = ex.batch_gradients(ids, attn, lm).double().numpy()
                if progress is not None and lo + b + len(sel) < hi:
                    progress(rows_done + b + len(sel), n)
            eids = part["example_id"].to_pylist()
            fname = SHARD_PATTERN.format(s)
            atomic_write_parquet(_encode_shard(eids, shard_grads, cfg.dtype), root / fname, use_dictionary=False)
            entry = {
                "index": s,
                "file": fname,
                "rows": hi - lo,
                "first_example_id": eids[0],
                "last_example_id": eids[-1],
                "digest": file_digest(root / fname),
                "rows_digest": digests[s],
            }
            if cfg.collect_kronecker_factors:
                ffile = f"{FACTORS_DIR}/{fname.replace('.parquet', '.npz')}"
                arrays = {"tokens": np.array(ex.factor_tokens)}
                for name, (a, b) in ex.factor_sums.items():
                    arrays[f"A:{name}"], arrays[f"S:{name}"] = a.numpy(), b.numpy()
                buf = io.BytesIO()
                np.savez(buf, **arrays)
                atomic_write_bytes(root / ffile, buf.getvalue())
                entry.update(factors_file=ffile, factors_digest=file_digest(root / ffile))
            done[s] = entry
            save(done)
            rows_done += hi - lo
            dt = time.perf_counter() - t0
            log.info(
                "shard %s: %d rows in %.1f s (%.1f rows/s); %d/%d rows",
                fname,
                hi - lo,
                dt,
                (hi - lo) / dt,
                rows_done,
                n,
            )
            if progress is not None:
                progress(rows_done, n)
    manifest["complete"] = True
    save(done)
    for kind in cfg.curvature:
        build_curvature(root, kind, damping_ratio=cfg.damping_ratio)
    return root


# queries ---------------------------------------------------------------------------------------------------------
def _store_manifest(store_or_manifest) -> dict:
    if isinstance(store_or_manifest, GradientStore):
        return store_or_manifest.manifest
    if isinstance(store_or_manifest, Mapping):
        return dict(store_or_manifest)
    return GradientStore.open(store_or_manifest).manifest


def compute_query_gradients(
    store_or_manifest,
    model,
    tokenizer=None,
    messages_list: Sequence[Sequence[dict]] = (),
    *,
    model_dir: str | Path | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """[Q, D] float32 projected gradients of log π(response | prompt) for query conversations, exactly as the store's.

    `model` is a loaded causal LM or a model directory (then the tokenizer defaults to that directory's). When a
    model directory is known, its digest must equal the store's (ManifestMismatch otherwise).
    """
    m = _store_manifest(store_or_manifest)
    cfg = m["index_config"]
    if isinstance(model, str | Path):
        model_dir = Path(model)
        model = load_model(model_dir)
        if tokenizer is None:
            tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to encode the query conversations")
    if model_dir is not None:
        got = model_digest(model_dir)
        if got != m["model_digest"]:
            raise ManifestMismatch(
                f"model {model_dir} is not the model the gradient store was built with:\n"
                f"  model_digest:\n    store: {m['model_digest']!r}\n    given: {got!r}"
            )
    layout = [ModuleLayout.from_json(d) for d in m["modules"]]
    basis = None
    if (m.get("projection") or {}).get("kind", "random") != "random":
        if isinstance(store_or_manifest, Mapping):
            raise ValueError("a store with a PCA projection: pass the store (or its directory), not its manifest")
        root = store_or_manifest.root if isinstance(store_or_manifest, GradientStore) else Path(store_or_manifest)
        basis = as_torch(read_store_basis(root, m))
    dtype = _torch_dtype(cfg["compute_dtype"])
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    if not messages_list:
        return np.zeros((0, int(m["dim"])), np.float32)
    rows_ids, rows_mask = [], []
    for j, msgs in enumerate(messages_list):
        enc = encode_messages(tokenizer, msgs, cfg["max_seq_len_tokens"])
        if enc.truncated:
            log.warning("query %d truncated to max_seq_len_tokens=%d", j, cfg["max_seq_len_tokens"])
        if sum(enc.loss_mask[1:]) == 0:
            raise ValueError(f"query {j}: no response tokens to score")
        rows_ids.append(enc.input_ids)
        rows_mask.append(enc.loss_mask)
    bs = batch_size or int((m.get("build_settings") or {}).get("batch_size", 8))
    outs = []
    try:
        ex = ProjectedGradientExtractor(
            model, layout, cfg.get("projection_seed", 0), cfg["reduction"], response_tokens=cfg.get("response_tokens"),
            basis=basis,
        )  # fmt: skip
    except ValueError as e:
        raise ManifestMismatch(f"the model does not match the store's projection layout: {e}") from e
    with ex:
        for i in range(0, len(rows_ids), bs):
            ids, attn, lm = right_pad(rows_ids[i : i + bs], rows_mask[i : i + bs], 0)
            outs.append(ex.batch_gradients(ids, attn, lm).double().numpy())
    return np.concatenate(outs).astype(np.float32)

"""The gradient store: projected per-example gradients of every training row, as sharded Parquet (DESIGN.md §4, §5).

Layout of `store_dir`:
    shard-NNNNN.parquet   example_id string, grad fixed_size_list<float16|float32|int8>[D], grad_norm float32
                          (norm of the unquantised vector), grad_scale float32 (int8 only; value = int8 × scale).
                          Rows in tokens.parquet order, `rows_per_shard` rows per shard (the last may be shorter).
    curvature/            factors/shard-NNNNN.npz (per-token Kronecker factor sums, when kfac/ekfac are configured)
                          and the built curvatures (see lancet_core.curvature).
    manifest.json         model / tokenizer / tokens digests, the IndexConfig, per-module projection layout, the list
                          of finished shards (rows, first/last example_id, file digest), curvature entries.

Every shard is written atomically, then the manifest is rewritten listing it with a digest of the token rows it was
computed from; a re-run recomputes only the shards the manifest does not list, whose file is missing or altered, or
whose rows changed — so a corpus that grew at the end recomputes only its new (and last partial) shards. A store built
from another model, tokenizer or config is refused (ManifestMismatch, both versions shown). Builds of one store are
serialised by a lock file, so overlapping runs never write the same store at once. The vectors are g = ∇θ log π(y|x) (see grad_hooks).

Knows about token rows, models (through grad_hooks) and Parquet; knows nothing about queries' provenance, influence
scoring or orchestration.
"""

from __future__ import annotations

import copy
import io
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .chat import encode_messages
from .errors import CorpusError, LancetError, ManifestMismatch
from .formats import SHARD_PATTERN, TOKENS_FILE
from .grad_hooks import ProjectedGradientExtractor, build_layout, right_pad
from .index_config import IndexConfig
from .manifest import (
    atomic_write_bytes,
    atomic_write_parquet,
    check_manifest,
    file_digest,
    library_versions,
    read_manifest,
    write_manifest,
)
from .projection import ModuleLayout

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GRADIENT_SIGN = "grad = d/dtheta log pi(y|x) (log-likelihood, not loss); influence I(i,q) = v_q . g_i, v_q = (F+lambda I)^-1 g_q; > 0 = training on i raises log pi(q)"
# Manifest keys that must agree for a store to be resumed or reused.
IDENTITY_KEYS = (
    "format_version",
    "model_digest",
    "tokenizer_digest",
    "index_config",
    "modules",
    "dim",
)
FACTORS_DIR = "curvature/factors"

Progress = Callable[[int, int], None]


class StoreIncomplete(LancetError):
    """A gradient store directory is missing shards (an interrupted build): re-run build_gradient_store."""


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


# encoding of vectors -----------------------------------------------------------------------------------------------
def _encode_shard(example_ids: Sequence[str], grads: np.ndarray, dtype: str) -> pa.Table:
    grads = np.asarray(grads, dtype=np.float64)
    n, d = grads.shape
    norms = np.linalg.norm(grads, axis=1).astype(np.float32)
    cols = {"example_id": pa.array(list(example_ids), pa.string())}
    scale = None
    if dtype == "float32":
        flat = grads.astype(np.float32)
    elif dtype == "float16":
        flat = grads.astype(np.float16)
        if not np.isfinite(flat).all():
            raise OverflowError("a gradient exceeds the float16 range; use dtype='float32' or 'int8'")
    else:
        absmax = np.abs(grads).max(axis=1)
        scale = (absmax / 127.0).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
        flat = np.clip(np.rint(grads / safe[:, None]), -127, 127).astype(np.int8)
    cols["grad"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), d)
    cols["grad_norm"] = pa.array(norms, pa.float32())
    if scale is not None:
        cols["grad_scale"] = pa.array(scale, pa.float32())
    return pa.table(cols)


def _decode_grads(table: pa.Table, dim: int, dtype=np.float32) -> np.ndarray:
    col = table["grad"].combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    out = flat.reshape(-1, dim).astype(dtype)
    if "grad_scale" in table.column_names:
        out *= table["grad_scale"].to_numpy(zero_copy_only=False).astype(dtype)[:, None]
    return out


# the store -------------------------------------------------------------------------------------------------------
class GradientStore:
    """A finished gradient store, read-only."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, store_dir: str | Path) -> GradientStore:
        root = Path(store_dir)
        m = read_manifest(root)
        if m is None or m.get("artifact") != "gradient_store":
            raise FileNotFoundError(f"{root}: not a gradient store (no gradient-store manifest.json)")
        if not m.get("complete"):
            raise StoreIncomplete(
                f"{root}: {len(m['shards'])} of {m['n_shards']} shards finished; re-run build_gradient_store to finish it"
            )
        return cls(root, m)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def layout(self) -> list[ModuleLayout]:
        return [ModuleLayout.from_json(d) for d in self.manifest["modules"]]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / s["file"] for s in self.manifest["shards"]]

    def iter_batches(self, batch_rows: int | None = None, dtype=np.float32) -> Iterator[tuple[list[str], np.ndarray]]:
        """(example_ids, grads [n, D] dequantised) in store order; one shard per batch unless batch_rows is given."""
        for p in self.shard_paths:
            f = pq.ParquetFile(p)
            if batch_rows is None:
                t = f.read()
                yield t["example_id"].to_pylist(), _decode_grads(t, self.dim, dtype)
                continue
            for rb in f.iter_batches(batch_size=batch_rows):
                t = pa.Table.from_batches([rb])
                yield t["example_id"].to_pylist(), _decode_grads(t, self.dim, dtype)

    def read_all(self, dtype=np.float32) -> np.ndarray:
        """All vectors [N, D] (dequantised); for tests and small stores."""
        parts = [g for _, g in self.iter_batches(dtype=dtype)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype)

    def example_ids(self) -> list[str]:
        out: list[str] = []
        for p in self.shard_paths:
            out += pq.read_table(p, columns=["example_id"])["example_id"].to_pylist()
        return out

    def read_kronecker_factors(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
        """Per-module (A_sum, S_sum) over all non-padding tokens, and the token count (None entries → absent)."""
        total: dict[str, list[np.ndarray]] = {}
        tokens = 0
        for s in self.manifest["shards"]:
            if not s.get("factors_file"):
                raise LancetError(
                    f"{self.root}: built without per-token Kronecker factors; rebuild with 'kfac' or 'ekfac' in "
                    "IndexConfig.curvature"
                )
            with np.load(self.root / s["factors_file"]) as z:
                tokens += int(z["tokens"])
                for ml in self.layout:
                    a, b = z[f"A:{ml.name}"], z[f"S:{ml.name}"]
                    if ml.name in total:
                        total[ml.name][0] += a
                        total[ml.name][1] += b
                    else:
                        total[ml.name] = [a.copy(), b.copy()]
        return {k: (v[0], v[1]) for k, v in total.items()}, tokens


def _torch_dtype(name: str) -> torch.dtype:
    return torch.float64 if name == "float64" else torch.float32


def _digests(model_dir: Path) -> tuple[str, str]:
    from .model_io import model_digest, tokenizer_digest

    try:
        tok = tokenizer_digest(model_dir)
    except FileNotFoundError:
        tok = "absent"
    return model_digest(model_dir), tok


def rows_digest(part: pa.Table) -> str:
    """Digest of the token rows a shard is computed from (ids, input_ids, loss_mask): equal digest, equal vectors."""
    import hashlib

    h = hashlib.sha256()
    for col in ("example_id", "input_ids", "loss_mask"):
        arr = part.column(col).combine_chunks()
        h.update(col.encode())
        for buf in (arr.flatten() if col != "example_id" else arr).buffers():
            if buf is not None:
                h.update(buf)
        if col != "example_id":
            h.update(np.diff(arr.offsets.to_numpy()).tobytes())
    return "sha256:" + h.hexdigest()


def _shard_ok(root: Path, entry: Mapping, expected_rows_digest: str | None = None) -> bool:
    if expected_rows_digest is not None and entry.get("rows_digest") != expected_rows_digest:
        return False
    files = [(entry["file"], entry["digest"])]
    if entry.get("factors_file"):
        files.append((entry["factors_file"], entry["factors_digest"]))
    return all((root / f).is_file() and file_digest(root / f) == d for f, d in files)


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

    root = Path(store_dir)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        return _build_locked(Path(model_dir), root, tokens_path, cfg, progress)


def _build_locked(model_dir: Path, root: Path, tokens_path, cfg: IndexConfig, progress: Progress | None) -> Path:
    from .model_io import load_model

    tpath = tokens_file(tokens_path)
    tokens_manifest = read_manifest(tpath.parent) or {}
    model = load_model(model_dir).to(_torch_dtype(cfg.compute_dtype)).eval()
    layout = build_layout(model, cfg.target_modules, cfg.proj_in_dim, cfg.proj_out_dim)
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
    existing = check_manifest(root, manifest, keys=IDENTITY_KEYS)
    table = _read_tokens(tpath, cfg.max_seq_len_tokens)
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
        model, layout, cfg.projection_seed, cfg.reduction, cfg.collect_kronecker_factors, cfg.response_tokens
    ) as ex:
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
    from .curvature import build_curvature

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
    from .model_io import load_model, load_tokenizer, model_digest

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
            model, layout, cfg["projection_seed"], cfg["reduction"], response_tokens=cfg.get("response_tokens")
        )
    except ValueError as e:
        raise ManifestMismatch(f"the model does not match the store's projection layout: {e}") from e
    with ex:
        for i in range(0, len(rows_ids), bs):
            ids, attn, lm = right_pad(rows_ids[i : i + bs], rows_mask[i : i + bs], 0)
            outs.append(ex.batch_gradients(ids, attn, lm).double().numpy())
    return np.concatenate(outs).astype(np.float32)

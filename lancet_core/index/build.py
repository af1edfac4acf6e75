"""Build the gradient store, and compute query gradients exactly as the store's (docs/design.md §4, §5).

A build is three pure steps, so shards can run anywhere (tasks/index.py maps them over a Prefect task runner, Ray
included): `plan_build` (coordinator: checks tokens and the store's identity, decides which shards are still valid
and which to compute, writes the manifest), `compute_shard` (any process: runs the projected-gradient hooks
(lancet_core.index.hooks) over one shard's token rows, writes its shard Parquet and Kronecker-factor sums (format:
lancet_core.index.store) atomically and RETURNS its manifest entry) and `finalize_build` (coordinator: the exact
reduction of the factor sums across shards, then the configured curvatures, lancet_core.index.curvature).
`build_gradient_store` composes them serially. Only the coordinator writes the manifest, listing each finished
shard with a digest of the token rows it was computed from; a finished shard also leaves its entry in
`.shard-records/` (so a shard that finished while its coordinator was killed, before recording it, is not lost; the
folder goes once the store is complete). A re-run recomputes only the shards neither lists, whose file is missing or
altered, or whose rows changed — so a corpus that grew at the end recomputes only its new (and last partial) shards.
A store built from another model, tokenizer or config is refused (ManifestMismatch, both versions shown). Builds of one store are serialised by a lock file, so overlapping runs never write the same store at once.

Knows about token rows, HF models (through the hooks) and the store format; knows nothing about queries' provenance,
influence scoring or orchestration.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
    StoreIncomplete,
    _encode_shard,
    _shard_ok,
    npz_bytes,
    rows_digest,
    write_shard,
)
from lancet_core.manifest import (
    atomic_write_bytes,
    atomic_write_json,
    check_manifest,
    file_digest,
    library_versions,
    read_manifest,
    write_manifest,
)
from lancet_core.model_io import load_model, load_tokenizer, model_digest, resolve_device, tokenizer_digest

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
RECORDS_DIR = ".shard-records"  # <shard file>.json per finished shard: {"plan": plan key, "entry": manifest entry}


def _plan_key(manifest: Mapping) -> str:
    """What a shard's bytes depend on besides its rows: the store's identity, projection basis included."""
    ident = {k: manifest.get(k) for k in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _recorded_shards(root: Path, plan_key: str) -> list[dict]:
    """Entries of shards a computation finished for this identity (whether or not a coordinator recorded them)."""
    out = []
    for f in sorted((root / RECORDS_DIR).glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("plan") == plan_key and isinstance(rec.get("entry"), dict):
            out.append(rec["entry"])
    return out


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


@dataclass(frozen=True)
class ShardJob:
    """One shard to compute: token rows [lo, hi) of the tokens file, whose rows must still have `rows_digest`."""

    index: int
    lo: int
    hi: int
    rows_digest: str

    @property
    def file(self) -> str:
        return SHARD_PATTERN.format(self.index)


@dataclass(frozen=True)
class BuildPlan:
    """Everything a shard computation needs, decided once by the coordinating process (picklable, sent to workers):
    the store's identity (`manifest`, without shards), the shards already finished (`done`, manifest entries) and
    the ones to compute (`todo`). `modules` is the projection layout (JSON): a shard computes with exactly it."""

    store_dir: str
    model_dir: str
    tokens_file: str
    cfg: IndexConfig
    manifest: dict
    done: tuple[dict, ...]
    todo: tuple[ShardJob, ...]

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def modules(self) -> list[dict]:
        return self.manifest["modules"]


def build_gradient_store(
    model_dir: str | Path,
    tokens_path: str | Path,
    store_dir: str | Path,
    cfg: IndexConfig,
    progress: Progress | None = None,
) -> Path:
    """Compute (or finish) the gradient store of every row of tokens.parquet; build cfg.curvature; return store_dir.

    The serial composition of `plan_build` -> `compute_shard` per shard -> `finalize_build` (tasks/index.py maps
    the same three over a Prefect task runner). Holds `store_dir/.lock` for the whole build: a second build of the
    same store waits for the first, then reuses every shard it finished."""
    cfg.require_resolved()  # response_tokens='auto' needs the judge: resolve_window first (before any work)
    with store_lock(store_dir):
        plan = plan_build(model_dir, tokens_path, store_dir, cfg)
        entries = {e["index"]: e for e in plan.done}
        rows_done = sum(e["rows"] for e in entries.values())
        if progress is not None and rows_done:
            progress(rows_done, plan.n_rows)
        for job in plan.todo:
            entry = compute_shard(
                plan, job, None if progress is None else lambda r, base=rows_done: progress(base + r, plan.n_rows)
            )
            entries[job.index] = entry
            record_shards(plan, entries.values())
            rows_done += entry["rows"]
            if progress is not None:
                progress(rows_done, plan.n_rows)
        return finalize_build(plan, entries.values())


@contextmanager
def store_lock(store_dir: str | Path):
    """Hold `store_dir/.lock` (the coordinating process only): overlapping builds of one store never interleave."""
    from filelock import FileLock

    root = Path(store_dir)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        yield root


def _layout(model: torch.nn.Module, cfg: IndexConfig) -> list[ModuleLayout]:
    pca = cfg.projection == "pca"  # a PCA side is capped at the module's own dimension
    return build_layout(model, cfg.target_modules, cfg.proj_in_dim, cfg.proj_out_dim, cap_at_dims=pca)


def plan_build(
    model_dir: str | Path, tokens_path: str | Path, store_dir: str | Path, cfg: IndexConfig, *,
    modules: list[dict] | None = None,
) -> BuildPlan:
    """Check the tokens and the store's identity, keep the finished shards that are still valid (file digests and
    token rows unchanged), delete the others' files and write the manifest listing only the kept ones. `modules`:
    the projection layout (JSON) when the caller computed it; by default it is built from the model and cfg.
    Coordinator only (writes the manifest); call under `store_lock`."""
    model_dir, root = Path(model_dir), Path(store_dir)
    tpath = tokens_file(tokens_path)
    table = _read_tokens(tpath, cfg.max_seq_len_tokens)
    tokens_manifest = read_manifest(tpath.parent) or {}
    model = None
    if modules is None or cfg.projection == "pca":
        model = _shard_model(str(model_dir), cfg.compute_dtype, cfg.device)
        modules = [ml.to_json() for ml in _layout(model, cfg)]
    dim = sum(ModuleLayout.from_json(d).size for d in modules)
    model_dig, tok_dig = _digests(model_dir)
    manifest = {
        "artifact": "gradient_store",
        "format_version": FORMAT_VERSION,
        "model_digest": model_dig,
        "tokenizer_digest": tok_dig,
        "tokens_digest": file_digest(tpath),
        "corpus_digest": tokens_manifest.get("corpus_digest"),
        "index_config": cfg.store_identity(),
        "modules": modules,
        "dim": dim,
        "dtype": cfg.dtype,
        "reduction": cfg.reduction,
        "projection_seed": cfg.projection_seed,
        "gradient_sign": GRADIENT_SIGN,
        "build_settings": {
            "batch_size": cfg.batch_size,
            "device": resolve_device(cfg.device).type,  # where it ran (auto resolved); fails early without CUDA
            "curvature": list(cfg.curvature),
            "damping_ratio": cfg.damping_ratio,
        },
        "versions": library_versions(),
    }
    existing = check_manifest(root, manifest, keys=[k for k in IDENTITY_KEYS if k != "projection"])
    # the projection basis (None: seeded random matrices) is an input of every shard; PCA: one pass over a sample
    basis = store_basis(root, existing, model, [ModuleLayout.from_json(d) for d in modules], table,
                        kind=cfg.projection, sample_rows=cfg.projection_sample_rows, batch_size=cfg.batch_size,
                        reduction=cfg.reduction, response_tokens=cfg.response_tokens)  # fmt: skip
    manifest["projection"] = projection_entry(basis, cfg.projection_sample_rows)
    check_manifest(root, manifest, keys=["projection"])
    if basis is not None:
        save_basis(root / BASIS_FILE, basis)
    n = table.num_rows
    n_shards = (n + cfg.rows_per_shard - 1) // cfg.rows_per_shard
    bounds = [(s * cfg.rows_per_shard, min(n, (s + 1) * cfg.rows_per_shard)) for s in range(n_shards)]
    digests = [rows_digest(table.slice(lo, hi - lo)) for lo, hi in bounds]
    done = {}
    for e in (existing or {}).get("shards", []):
        if e["index"] < n_shards and _shard_ok(root, e, digests[e["index"]]):
            done[e["index"]] = e
        else:
            log.info("shard %s is missing, altered or its rows changed; recomputing it", e["file"])
            (root / e["file"]).unlink(missing_ok=True)
    # shards that finished after the manifest's last record (their coordinator was killed before recording them)
    adopted = [e for e in _recorded_shards(root, _plan_key(manifest))
               if e["index"] not in done and e["index"] < n_shards and _shard_ok(root, e, digests[e["index"]])]
    done.update((e["index"], e) for e in adopted)
    if adopted:
        log.info("gradient store %s: %d finished shard(s) found unrecorded and kept: %s", root, len(adopted),
                 ", ".join(e["file"] for e in adopted[:5]))
    manifest.update(n_rows=n, rows_per_shard=cfg.rows_per_shard, n_shards=n_shards, complete=False)
    todo = tuple(ShardJob(s, lo, hi, digests[s]) for s, (lo, hi) in enumerate(bounds) if s not in done)
    # curvature built from exactly these shards stays valid; any recomputed shard invalidates it
    manifest["curvature"] = {} if todo else dict((existing or {}).get("curvature") or {})
    plan = BuildPlan(str(root), str(model_dir), str(tpath), cfg, manifest, tuple(done[i] for i in sorted(done)), todo)
    record_shards(plan, plan.done)
    if todo:
        log.info("gradient store %s: %d of %d shards to compute (D=%d, %d modules)", root, len(todo), n_shards, dim,
                 len(modules))
    return plan


def record_shards(plan: BuildPlan, entries) -> None:
    """Rewrite the manifest listing these finished shards (coordinator only: shard computations return entries)."""
    m = dict(plan.manifest)
    m["shards"] = sorted(entries, key=lambda e: e["index"])
    write_manifest(plan.store_dir, m)


_MODEL_CACHE: dict[tuple[str, str], torch.nn.Module] = {}


def _shard_model(model_dir: str, compute_dtype: str, device: str = "cpu") -> torch.nn.Module:
    """The model on its device (IndexConfig.device; auto = CUDA when present), loaded once per process (a worker
    computing several shards loads it once)."""
    dev = resolve_device(device)
    key = (str(Path(model_dir).resolve()), compute_dtype, str(dev))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_model(model_dir).to(dev, _torch_dtype(compute_dtype)).eval()
    return _MODEL_CACHE[key]


def compute_shard(plan: BuildPlan, job: ShardJob, progress: Callable[[int], None] | None = None) -> dict:
    """Compute one shard: its token rows' projected gradients -> shard-NNNNN.parquet (+ its Kronecker factor sums ->
    curvature/factors/shard-NNNNN.npz), each written atomically; returns its manifest entry and never touches the
    manifest, so shards may run in parallel, in any process or machine that sees store_dir. The same rows, model and
    layout give byte-identical files wherever they are computed. `progress(rows)`: rows of this shard done (called
    before the last batch only; the caller reports the finished shard)."""
    cfg, root = plan.cfg, Path(plan.store_dir)
    t0 = time.perf_counter()
    part = _read_tokens(Path(plan.tokens_file), cfg.max_seq_len_tokens).slice(job.lo, job.hi - job.lo)
    if rows_digest(part) != job.rows_digest:
        raise CorpusError(f"{plan.tokens_file}: rows {job.lo}..{job.hi - 1} changed since the build was planned")
    model = _shard_model(plan.model_dir, cfg.compute_dtype, cfg.device)
    layout = [ModuleLayout.from_json(d) for d in plan.modules]
    dim = int(plan.manifest["dim"])
    n = job.hi - job.lo
    ids_rows, mask_rows = part["input_ids"].to_pylist(), part["loss_mask"].to_pylist()
    # batches of similar length (less padding); results are scattered back to the tokens order
    order = np.argsort([len(r) for r in ids_rows], kind="stable")
    shard_grads = np.empty((n, dim), dtype=np.float64)
    basis = read_store_basis(root, plan.manifest)
    with ProjectedGradientExtractor(
        model, layout, cfg.projection_seed, cfg.reduction, cfg.collect_kronecker_factors, cfg.response_tokens,
        basis=None if basis is None else as_torch(basis), fisher=cfg.fisher,
    ) as ex:  # fmt: skip
        ex.reset_factors()
        for b in range(0, n, cfg.batch_size):
            sel = order[b : b + cfg.batch_size]
            ids, attn, lm = right_pad([ids_rows[i] for i in sel], [mask_rows[i] for i in sel], 0)
            shard_grads[sel] = ex.batch_gradients(ids, attn, lm).double().numpy()
            if progress is not None and b + len(sel) < n:  # the last batch is reported once the shard is written
                progress(b + len(sel))
        factors = None
        if cfg.collect_kronecker_factors:
            factors = {"tokens": np.array(ex.factor_tokens)}
            for name, (a, s) in ex.factor_sums.items():
                factors[f"A:{name}"], factors[f"S:{name}"] = a.numpy(), s.numpy()
    eids = part["example_id"].to_pylist()
    write_shard(_encode_shard(eids, shard_grads, cfg.dtype), root / job.file)
    entry = {
        "index": job.index,
        "file": job.file,
        "rows": n,
        "first_example_id": eids[0],
        "last_example_id": eids[-1],
        "digest": file_digest(root / job.file),
        "rows_digest": job.rows_digest,
    }
    if factors is not None:
        ffile = f"{FACTORS_DIR}/{job.file.replace('.parquet', '.npz')}"
        atomic_write_bytes(root / ffile, npz_bytes(factors))
        entry.update(factors_file=ffile, factors_digest=file_digest(root / ffile))
    atomic_write_json(root / RECORDS_DIR / f"{job.file}.json", {"plan": _plan_key(plan.manifest), "entry": entry})
    dt = time.perf_counter() - t0
    log.info("shard %s: %d rows in %.1f s (%.1f rows/s)", job.file, n, dt, n / dt)
    return entry


def finalize_build(plan: BuildPlan, entries) -> Path:
    """Check that every shard is finished and its files are intact, mark the store complete, then build the
    configured curvatures; Kronecker factors are reduced exactly across shards (float64 sums in shard order,
    store.reduce_factor_sums). Coordinator only. Returns store_dir."""
    root = Path(plan.store_dir)
    by_index = {e["index"]: e for e in entries}
    missing = [s for s in range(int(plan.manifest["n_shards"])) if s not in by_index]
    if missing:
        raise StoreIncomplete(f"{root}: shard(s) {missing[:10]} not computed; re-run the build to compute them")
    for e in by_index.values():
        if not _shard_ok(root, e):
            raise StoreIncomplete(f"{root}: {e['file']} does not match the digest its computation returned")
    m = dict(plan.manifest)
    m["shards"] = [by_index[i] for i in sorted(by_index)]
    m["complete"] = True
    write_manifest(root, m)
    shutil.rmtree(root / RECORDS_DIR, ignore_errors=True)  # the manifest lists every shard now
    for kind in plan.cfg.curvature:
        build_curvature(root, kind, damping_ratio=plan.cfg.damping_ratio)
    return root


# queries ---------------------------------------------------------------------------------------------------------
def _store_manifest(store_or_manifest) -> dict:
    if isinstance(store_or_manifest, GradientStore):
        return store_or_manifest.manifest
    if isinstance(store_or_manifest, Mapping):
        return dict(store_or_manifest)
    return GradientStore.open(store_or_manifest).manifest


def check_store_model(store_or_manifest, model_dir: str | Path) -> None:
    """ManifestMismatch unless `model_dir` holds the model the store was built with (by digest)."""
    m = _store_manifest(store_or_manifest)
    got = model_digest(model_dir)
    if got != m["model_digest"]:
        raise ManifestMismatch(
            f"model {model_dir} is not the model the gradient store was built with:\n"
            f"  model_digest:\n    store: {m['model_digest']!r}\n    given: {got!r}"
        )


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
        check_store_model(m, model_dir)
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

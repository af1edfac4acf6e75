"""Influence-query latency on synthetic gradient stores; prints ONE JSON object.

    .venv/bin/python benchmarks/query_latency.py --rows 100000            # quick
    .venv/bin/python benchmarks/query_latency.py --rows 100000 1000000    # full (1M x 1024: ~7 GB of temp files)

For each row count N it writes, shard by shard (one shard of fp32 rows in memory at a time), three stores of the
SAME random rows (D = --dim): fp32, fp16 and int8 (+ per-row scale), then measures:

- cold: the first influence scan (lancet_core.recall.scan.score_store: validation + DuckDB scan + fetch of the
  scores) in a FRESH PROCESS and a fresh DuckDB connection, vs the time to just read the `grad` column with
  pyarrow.parquet.read_table in another fresh process. The OS page cache cannot be dropped here (no root), so both
  read files the OS has probably cached: "cold" means cold process/connection, not cold disk. Goal ratio <= 1.3.
  Each is repeated --repeats times (alternating) and the median is reported.
- warm: the same scan repeated on one open connection (median of --repeats) vs numpy in RAM: the fp32 matrix
  resident in memory times one vector (sgemv), and — the like-for-like comparison with a 2-byte store — the fp16
  matrix resident in memory, upcast in chunks and multiplied. Goal ratio <= 2 (reported against both).
- Q = 32 queries: one folded scan vs 32 single-query scans (and one per-query scan computing 32 dot products).
- bytes per dim on disk for fp32 / fp16 / int8 (file bytes / (N * D), so ids, norms and Parquet overhead count).
- top-100 overlap of the int8 (and fp16) store's ranking vs the fp32 store's, for one random query. Goal >= 0.95.
The rows are iid Gaussian with row norms spread over a decade; real gradients are more structured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lancet_core.recall.scan import open_store, score_store  # noqa: E402

_PA = {"float16": pa.float16(), "float32": pa.float32(), "int8": pa.int8()}


def _write_stores(root: Path, n: int, d: int, shard_rows: int, seed: int) -> dict[str, Path]:
    dirs = {dt: root / f"store-{dt}" for dt in _PA}
    manifests = {dt: {"dim": d, "dtype": dt, "shards": []} for dt in _PA}
    for p in dirs.values():
        p.mkdir(parents=True, exist_ok=True)
    for s, a in enumerate(range(0, n, shard_rows)):
        b = min(n, a + shard_rows)
        rng = np.random.default_rng([seed, s])
        x = rng.standard_normal((b - a, d), dtype=np.float32)
        x *= rng.uniform(0.3, 3.0, size=(b - a, 1)).astype(np.float32)
        ids = pa.array([f"ex-{i:08d}" for i in range(a, b)], pa.string())
        norms = pa.array(np.linalg.norm(x, axis=1).astype(np.float32))
        for dt in _PA:
            cols = {"example_id": ids}
            if dt == "int8":
                scale = (np.abs(x).max(axis=1) / 127.0).astype(np.float32)
                q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
                cols["grad"] = pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1)), d)
                cols["grad_norm"] = norms
                cols["grad_scale"] = pa.array(scale)
                del q
            else:
                cols["grad"] = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(dt, copy=False).reshape(-1)), d)
                cols["grad_norm"] = norms
            name = f"shard-{s:05d}.parquet"
            pq.write_table(pa.table(cols), dirs[dt] / name)
            manifests[dt]["shards"].append({"file": name, "rows": b - a})
            del cols
        del x
    for dt, p in dirs.items():
        (p / "manifest.json").write_text(json.dumps(manifests[dt]))
    return dirs


def _child(mode: str, store: str, seed: int) -> None:
    """Runs in a fresh process: time one cold operation, print seconds."""
    info = open_store(store) if mode == "pyarrow" else None
    if mode == "pyarrow":
        t0 = time.perf_counter()
        t = pq.read_table(list(info.files), columns=["grad"])
        dt = time.perf_counter() - t0
        assert t.num_rows == info.n_rows
    else:
        d = json.loads((Path(store) / "manifest.json").read_text())["dim"]
        v = np.random.default_rng(seed).standard_normal(d)
        t0 = time.perf_counter()
        s = score_store(store, v)  # fresh connection inside
        dt = time.perf_counter() - t0
        assert s.num_rows > 0
    print(json.dumps({"seconds": dt}))


def _fresh(mode: str, store: Path, seed: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--_child", mode, "--_store", str(store), "--seed", str(seed)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def _timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _load_numpy(store: Path, dtype) -> np.ndarray:
    """The store's matrix in RAM as `dtype`, filled shard by shard into one preallocated array (one copy)."""
    info = open_store(store)
    m = np.empty((info.n_rows, info.dim), dtype=dtype)
    i = 0
    for f in info.files:
        col = pq.read_table(f, columns=["grad"]).column("grad").combine_chunks()
        blk = col.values.to_numpy(zero_copy_only=False).reshape(-1, info.dim)
        m[i : i + len(blk)] = blk
        i += len(blk)
        del col, blk
    return m


def _topk(scores: np.ndarray, ids: list[str] | None, k: int) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


def bench(n: int, d: int, shard_rows: int, repeats: int, n_queries: int, seed: int, workdir: Path) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"lancet-bench-{n}-", dir=workdir))
    try:
        t0 = time.perf_counter()
        stores = _write_stores(root, n, d, shard_rows, seed)
        gen_s = time.perf_counter() - t0
        res: dict = {"rows": n, "dim": d, "shard_rows": shard_rows, "generate_seconds": round(gen_s, 2)}
        res["bytes_per_dim"] = {
            dt: round(sum(f.stat().st_size for f in p.glob("shard-*.parquet")) / (n * d), 4) for dt, p in stores.items()
        }
        main = stores["float16"]

        # cold: fresh processes, alternating, median
        cold_db, cold_pa = [], []
        for r in range(repeats):
            cold_pa.append(_fresh("pyarrow", main, seed + r))
            cold_db.append(_fresh("duckdb", main, seed + r))
        res["cold"] = {
            "definition": "first scan in a fresh process + fresh DuckDB connection; OS page cache NOT dropped",
            "duckdb_scan_seconds": round(statistics.median(cold_db), 4),
            "pyarrow_read_grad_seconds": round(statistics.median(cold_pa), 4),
            "ratio": round(statistics.median(cold_db) / statistics.median(cold_pa), 3),
            "goal_ratio_max": 1.3,
        }

        # warm: repeated scans on one connection vs numpy in RAM
        import duckdb

        rng = np.random.default_rng(seed)
        v = rng.standard_normal(d)
        con = duckdb.connect()
        score_store(main, v, con=con)  # warm-up
        warm_db = _timed(lambda: score_store(main, v, con=con), repeats)
        m32 = _load_numpy(main, np.float32)
        v32 = (v / np.linalg.norm(v)).astype(np.float32)
        np_f32 = _timed(lambda m=m32: m @ v32, max(repeats, 5))
        del m32
        m16 = _load_numpy(main, np.float16)

        def f16_pass(m=m16):
            out = np.empty(len(m), np.float32)
            for a in range(0, len(m), 16384):
                out[a : a + 16384] = m[a : a + 16384].astype(np.float32) @ v32
            return out

        np_f16 = _timed(f16_pass, max(repeats, 3))
        del m16
        res["warm"] = {
            "duckdb_scan_seconds": round(warm_db, 4),
            "numpy_fp32_in_ram_seconds": round(np_f32, 4),
            "numpy_fp16_in_ram_upcast_seconds": round(np_f16, 4),
            "ratio_vs_numpy_fp32": round(warm_db / np_f32, 2),
            "ratio_vs_numpy_fp16": round(warm_db / np_f16, 2),
            "goal_ratio_max": 2.0,
        }

        # Q queries: one folded scan vs Q scans
        V = rng.standard_normal((n_queries, d))
        one = _timed(lambda: score_store(main, V, con=con), 1)
        per_q = _timed(lambda: score_store(main, V, con=con, per_query=True), 1)
        t0 = time.perf_counter()
        for q in range(n_queries):
            score_store(main, V[q], con=con)
        many = time.perf_counter() - t0
        res["multi_query"] = {
            "queries": n_queries,
            "one_folded_scan_seconds": round(one, 4),
            "one_per_query_scan_seconds": round(per_q, 4),
            "separate_scans_seconds": round(many, 4),
            "speedup_folded": round(many / one, 2),
        }

        # quantisation: top-100 overlap vs fp32
        ref = score_store(stores["float32"], v, con=con).column("score").to_numpy()
        top_ref = _topk(ref, None, 100)
        res["top100_overlap_vs_fp32"] = {}
        for dt in ("float16", "int8"):
            s = score_store(stores[dt], v, con=con).column("score").to_numpy()
            res["top100_overlap_vs_fp32"][dt] = len(_topk(s, None, 100) & top_ref) / 100
        res["top100_overlap_vs_fp32"]["goal_int8_min"] = 0.95
        con.close()
        return res
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="store sizes (rows)")
    ap.add_argument("--dim", type=int, default=1024, help="projected gradient dim D")
    ap.add_argument("--shard-rows", type=int, default=65_536, help="rows per Parquet shard")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions per timing (median)")
    ap.add_argument("--queries", type=int, default=32, help="Q for the multi-query comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="where temp stores go")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_store", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        _child(a._child, a._store, a.seed)
        return
    import duckdb

    out = {
        "benchmark": "influence_query_latency",
        "cpu_count": os.cpu_count(),
        "duckdb": duckdb.__version__,
        "pyarrow": pa.__version__,
        "storage_default": "float16",
        "results": [bench(n, a.dim, a.shard_rows, a.repeats, a.queries, a.seed, a.workdir) for n in a.rows],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

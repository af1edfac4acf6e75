"""Curvature build and query-side preconditioning time on a synthetic gradient store; prints ONE JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curvature_build.py           # kfac, ekfac, linfac; one 64x64 module
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curvature_build.py --kinds linfac --dim-in 128 --repeats 1  # D=8192

The store (fp32 rows, iid Gaussian, one module with k_in x k_out projected entries, random Kronecker factor sums) is
written straight in the store's on-disk format (lancet_core.index.store), so no model is involved. For each kind it
reports the median wall time of build_curvature (the .npz deleted before each repeat), of preconditioning --queries
query vectors, the .npz size, and a checksum of the preconditioned vectors (compare implementations with it). With
N = 3000 rows and D = 4096 or 8192, linfac takes its dual (N × N Gram) form.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lancet_core.index.curvature import build_curvature, curvature_file, preconditioner  # noqa: E402
from lancet_core.index.projection import ModuleLayout  # noqa: E402
from lancet_core.index.store import FORMAT_VERSION, _encode_shard  # noqa: E402
from lancet_core.manifest import atomic_write_bytes, atomic_write_parquet, write_manifest  # noqa: E402


def write_store(root: Path, n: int, k_in: int, k_out: int, shard_rows: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    ml = ModuleLayout("m0", 4 * k_in, 4 * k_out, k_in, k_out, 0)
    shards, tokens_per_shard = [], 50
    for s, a in enumerate(range(0, n, shard_rows)):
        b = min(n, a + shard_rows)
        g = rng.standard_normal((b - a, ml.size)) * rng.uniform(0.3, 3.0, size=(b - a, 1))
        f = f"shard-{s:05d}.parquet"
        atomic_write_parquet(_encode_shard([f"ex-{i:08d}" for i in range(a, b)], g, "float32"), root / f)
        xa, xs = rng.standard_normal((tokens_per_shard, k_in)), rng.standard_normal((tokens_per_shard, k_out))
        buf = io.BytesIO()
        np.savez(buf, tokens=np.array(tokens_per_shard), **{f"A:{ml.name}": xa.T @ xa, f"S:{ml.name}": xs.T @ xs})
        ff = f"curvature/factors/shard-{s:05d}.npz"
        atomic_write_bytes(root / ff, buf.getvalue())
        shards.append({"file": f, "rows": b - a, "factors_file": ff})
    write_manifest(
        root,
        {
            "artifact": "gradient_store",
            "format_version": FORMAT_VERSION,
            "complete": True,
            "dim": ml.size,
            "n_rows": n,
            "n_shards": len(shards),
            "modules": [ml.to_json()],
            "shards": shards,
            "build_settings": {"damping_ratio": 0.1},
            "curvature": {},
        },
    )
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--dim-in", type=int, default=64)
    ap.add_argument("--dim-out", type=int, default=64)
    ap.add_argument("--kinds", nargs="+", default=["kfac", "ekfac", "linfac"], choices=["linfac", "kfac", "ekfac"])
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-rows", type=int, default=1000)
    args = ap.parse_args()
    out: dict = {
        "rows": args.rows,
        "k_in": args.dim_in,
        "k_out": args.dim_out,
        "dim": args.dim_in * args.dim_out,
        "repeats": args.repeats,
        "queries": args.queries,
        "kinds": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = write_store(Path(tmp) / "store", args.rows, args.dim_in, args.dim_out, args.shard_rows, seed=0)
        q = np.random.default_rng(1).standard_normal((args.queries, args.dim_in * args.dim_out))
        for kind in args.kinds:
            builds, applies = [], []
            for _ in range(args.repeats):
                (root / curvature_file(kind, "module", 0.1)).unlink(missing_ok=True)
                t0 = time.perf_counter()
                path = build_curvature(root, kind)
                builds.append(time.perf_counter() - t0)
                apply = preconditioner(root, kind)
                t0 = time.perf_counter()
                v = apply(q)
                applies.append(time.perf_counter() - t0)
            out["kinds"][kind] = {
                "build_s": statistics.median(builds),
                "precondition_s": statistics.median(applies),
                "npz_bytes": path.stat().st_size,
                "checksum": float(np.abs(v).sum()),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

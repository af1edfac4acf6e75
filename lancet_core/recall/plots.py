"""Pictures of an influence distribution, for people (MLflow artifacts). Knows about influence.parquet only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def influence_histogram(influence_path: str | Path, out_png: str | Path, top_k: int = 50) -> Path:
    """Histogram of every training row's influence score, the top-k threshold marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lancet_core.manifest import atomic_write_bytes

    t = pq.read_table(influence_path, columns=["score", "rank"])
    scores = t["score"].to_numpy()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.hist(scores, bins=80, color="#4C72B0")
    ax.set_yscale("log")
    if 0 < top_k <= len(scores):
        thr = np.sort(scores)[-top_k]
        ax.axvline(thr, color="#C44E52", linestyle="--", label=f"top-{top_k} threshold")
        ax.legend()
    ax.set_xlabel("influence score (> 0: raises the undesirable outputs)")
    ax.set_ylabel("training rows")
    ax.set_title(f"Influence distribution over {len(scores):,} training rows")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(out_png, buf.getvalue())

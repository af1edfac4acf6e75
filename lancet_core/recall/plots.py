"""Pictures for people (PNG artifacts in MLflow, linked from the closing summary): the influence distribution with
the flagged rows marked, and the model's before/after metrics. Each takes plain arrays or dicts and writes its PNG
atomically; nothing here reads a model."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

BLUE, RED, GREY = "#4C72B0", "#C44E52", "#8C8C8C"

# the before/after chart's rates, as a newcomer would name them (flows/report.py's table uses the metric keys)
RATE_LABELS = {"harmful_rate_probes": "harmful answers\n(probe prompts)",
               "harmful_rate_ood": "harmful answers\n(unseen prompts)",
               "over_refusal_benign": "refused harmless\nprompts"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | Path) -> Path:
    from lancet_core.manifest import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return atomic_write_bytes(out_png, buf.getvalue())


def influence_histogram(influence_path: str | Path, out_png: str | Path, top_k: int = 50) -> Path:
    """Histogram of every training row's influence score, the top-k threshold marked; written atomically."""
    plt = _pyplot()
    t = pq.read_table(influence_path, columns=["score", "rank"])
    scores = t["score"].to_numpy()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.hist(scores, bins=80, color=BLUE)
    ax.set_yscale("log")
    if 0 < top_k <= len(scores):
        thr = np.sort(scores)[-top_k]
        ax.axvline(thr, color=RED, linestyle="--", label=f"top-{top_k} threshold")
        ax.legend()
    ax.set_xlabel("influence score (> 0: raises the undesirable outputs)")
    ax.set_ylabel("training rows")
    ax.set_title(f"Influence distribution over {len(scores):,} training rows")
    fig.tight_layout()
    return _save(fig, out_png)


def influence_flagged_chart(scores: Sequence[float] | np.ndarray, flagged: Sequence[bool] | np.ndarray,
                            out_png: str | Path) -> Path:
    """Every training row's influence, the rows lancet flagged in red: left, the histogram (log scale) with the
    flagged rows stacked on the others; right, the top rows by rank, so the cut between flagged and kept shows."""
    plt = _pyplot()
    scores = np.asarray(scores, dtype=np.float64)
    flagged = np.asarray(flagged, dtype=bool)
    if scores.shape != flagged.shape:
        raise ValueError(f"scores {scores.shape} and flagged {flagged.shape} differ in shape")
    n, n_flag = len(scores), int(flagged.sum())
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    bins = np.histogram_bin_edges(scores, bins=60) if n else 10
    ax.hist([scores[~flagged], scores[flagged]], bins=bins, stacked=True, color=[BLUE, RED],
            label=[f"kept ({n - n_flag:,})", f"flagged ({n_flag:,})"])
    ax.set_yscale("log")
    ax.axvline(0.0, color=GREY, linewidth=0.8)
    ax.set_xlabel("influence score (> 0: pushes the model towards the bad outputs)")
    ax.set_ylabel("training rows")
    ax.set_title(f"Influence of each of the {n:,} training rows")
    ax.legend(loc="upper right", frameon=False)
    order = np.argsort(-scores, kind="stable")
    top = order[: max(min(n, 2 * n_flag), min(n, 50))]
    bx.bar(np.arange(1, len(top) + 1), scores[top], width=1.0,
           color=[RED if f else BLUE for f in flagged[top]], linewidth=0)
    bx.axhline(0.0, color=GREY, linewidth=0.8)
    bx.set_xlabel("rank (1 = most influential)")
    bx.set_ylabel("influence score")
    bx.set_title(f"The top {len(top):,} rows; red: flagged")
    fig.tight_layout()
    return _save(fig, out_png)


def before_after_chart(before: Mapping[str, float], after: Mapping[str, float], out_png: str | Path) -> Path:
    """The model's rates before and after the correction as grouped bars (harmful answers on the probes and the
    unseen prompts, refused harmless prompts); the benign NLL change in the title."""
    plt = _pyplot()
    keys = [k for k in RATE_LABELS if isinstance(before.get(k), int | float) and isinstance(after.get(k), int | float)]
    if not keys:
        raise ValueError(f"no rate to draw: before has {sorted(before)}, after has {sorted(after)}")
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for dx, (label, m, color) in zip((-0.19, 0.19), (("before", before, GREY), ("after", after, BLUE)), strict=True):
        bars = ax.bar(x + dx, [m[k] for k in keys], width=0.36, color=color, label=label)
        ax.bar_label(bars, labels=[f"{m[k]:.3f}" for k in keys], padding=2, fontsize=9)
    ax.set_xticks(x, [RATE_LABELS[k] for k in keys])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share of prompts")
    title = "Before and after the correction"
    nb, na = before.get("nll_benign"), after.get("nll_benign")
    if isinstance(nb, int | float) and isinstance(na, int | float) and nb:
        title += f" (benign answers' NLL {nb:.3f} → {na:.3f}, {100 * (na - nb) / nb:+.1f} %)"
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False)
    fig.tight_layout()
    return _save(fig, out_png)

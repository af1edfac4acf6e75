"""The oracle baseline of the correction phase: retrain the impure model's own recipe without a set of training rows.

`retrain_without(corpus_path, tokenizer_dir, exclude_ids, out_dir, demo_cfg)` reads the corpus, drops the rows whose
example_id is in `exclude_ids`, and trains a fresh model with exactly the recipe that made the impure model
(`lancet_core.demo.build.train_demo_model`: same DemoConfig, so the same architecture, seed and SFT schedule) and the
impure model's tokenizer (loaded from `tokenizer_dir`, normally the demo model directory). Two oracles come from it:

  * recalled-rows oracle — exclude the top-|R⁺| rows of the influence ranking (what retraining on recall would give);
  * label oracle — exclude the rows a label column marks as bad (the best any correction could hope for).

`ids_from_influence(influence_path, n)` and `ids_from_label(corpus_path, column)` build those two id sets. The output is
a plain HF model directory (weights + tokenizer) with manifest.json (corpus digest, tokenizer digest, config, digest
of the excluded ids, counts, seconds), published with `manifest.publishing_dir` like every artifact; an existing directory
built from the same inputs is reused, one built from other inputs is refused (ManifestMismatch).

Knows about the corpus reader, the demo recipe and HF save/load; knows nothing about influence computation, losses,
judges or orchestration. Label columns are read only by `ids_from_label` — the oracle exists to bound, not to correct.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from lancet_core.data.corpus import corpus_digest, load_corpus
from lancet_core.demo.config import DemoConfig
from lancet_core.errors import CorpusError
from lancet_core.manifest import (
    MANIFEST_NAME,
    check_manifest,
    json_digest,
    library_versions,
    publishing_dir,
    write_manifest,
)
from lancet_core.model_io import load_tokenizer, tokenizer_digest

log = logging.getLogger(__name__)

ORACLE_KIND = "oracle_retrain"


def ids_from_influence(influence_path: str | Path, n: int) -> list[str]:
    """example_ids of the n rows with the highest influence score (ties by example_id), positive scores only."""
    import pyarrow.parquet as pq

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    t = pq.read_table(influence_path, columns=["example_id", "score"])
    rows = [(float(s), str(e)) for e, s in zip(t.column("example_id").to_pylist(), t.column("score").to_pylist(),
                                               strict=True) if s is not None and s > 0]
    rows.sort(key=lambda r: (-r[0], r[1]))
    return [e for _, e in rows[:n]]


def ids_from_label(corpus_path: str | Path, column: str = "is_unsafe") -> list[str]:
    """example_ids of the corpus rows whose `column` label is true (the label oracle's exclusion set)."""
    rows = load_corpus(corpus_path)
    if not any(column in r.labels for r in rows):
        raise CorpusError(f"{corpus_path}: no row has the label column {column!r}; cannot build a label oracle")
    return [r.example_id for r in rows if bool(r.labels.get(column))]


def retrain_without(
    corpus_path: str | Path,
    tokenizer_dir: str | Path,
    exclude_ids: Iterable[str],
    out_dir: str | Path,
    demo_cfg: DemoConfig,
    *,
    name: str = "oracle",
) -> Path:
    """Train the impure model's recipe (`demo_cfg`) on the corpus minus `exclude_ids`; save an HF dir at out_dir.

    Every id in `exclude_ids` must be in the corpus (a stale id means the ranking came from another corpus).
    """
    from lancet_core.demo.build import train_demo_model

    t0 = time.perf_counter()
    corpus_path, tokenizer_dir, out_dir = Path(corpus_path), Path(tokenizer_dir), Path(out_dir)
    exclude = sorted(set(str(x) for x in exclude_ids))
    rows = load_corpus(corpus_path)
    known = {r.example_id for r in rows}
    unknown = [e for e in exclude if e not in known]
    if unknown:
        raise CorpusError(
            f"{corpus_path}: {len(unknown)} id(s) to exclude are not in the corpus (first: {unknown[:3]}); "
            "was the ranking computed on another corpus?"
        )
    expected = {
        "kind": ORACLE_KIND,
        "name": name,
        "corpus_digest": corpus_digest(corpus_path),
        "tokenizer_digest": tokenizer_digest(tokenizer_dir),
        "excluded_ids_digest": json_digest(exclude),
        "config": demo_cfg.model_dump(mode="json"),
    }
    if check_manifest(out_dir, expected) is not None:
        log.info("oracle %s: %s already built from the same inputs; reusing it", name, out_dir)
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists, is not empty and has no {MANIFEST_NAME}; refusing to overwrite it")

    drop = set(exclude)
    kept = [{"example_id": r.example_id, "prompt": r.prompt, "response": r.response} for r in rows
            if r.example_id not in drop]
    if not kept:
        raise CorpusError(f"{corpus_path}: excluding {len(drop)} ids leaves no row to train on")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = train_demo_model(kept, tokenizer, demo_cfg)
    train_s = time.perf_counter() - t0

    with publishing_dir(out_dir, expected) as tmp:  # one copy when two runs train the same oracle at once
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, {**expected, "n_corpus_rows": len(rows), "n_excluded": len(drop),
                             "n_trained_rows": len(kept), "seconds": round(train_s, 3),
                             "versions": library_versions()})
    return out_dir

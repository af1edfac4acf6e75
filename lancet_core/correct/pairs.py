"""Build the pairs IBO trains on from an influence distribution, and write them where a person can read them.

From influence.parquet (one row per training example, score > 0 = promotes the undesirable outputs):
  * R⁺ = the `n_positive` highest-scoring rows among score > 0 (ties by example_id), but never more than
    `positive_fraction` of the scored rows (a small corpus does not hand IBO a quarter of its rows);
  * R⁻ = the `n_negative` lowest-scoring rows among score < 0 (they counteract the undesirable outputs);
  * pairs (w ∈ R⁻ "chosen", l ∈ R⁺ "rejected"): for each l, R⁻ rows with the same normalised prompt first (most
    negative score first), then — when `match_nearest` — the nearest prompts by TF-IDF cosine (scikit-learn); the first
    `pairs_per_positive` candidates are kept. A nearest-prompt pair keeps each row's own prompt (Δ(w) on x_w, Δ(l) on
    x_l), as docs/design.md §7 prescribes;
  * weights ω = n_pairs · softmax(gap / τ) over pairs, gap = score_l − score_w (> 0), so mean(ω) = 1;
  * retain rows drawn (seeded) from the rows outside R⁺ ∪ R⁻ with the smallest |score|.

Files (written atomically, with manifest.json): pairs.parquet (PAIR_COLUMNS) and retain.parquet (RETAIN_COLUMNS).
`pairs_from_preference_columns` builds the same pairs.parquet from a dataset's own chosen/rejected columns (the DPO
"human preference" baseline).

Knows about the influence file's columns, pyarrow and scikit-learn; knows nothing about models, tokens or losses.
Label columns (is_unsafe, category, ...) are never read here: pairing must not peek at ground truth.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lancet_core.correct.config import PairConfig
from lancet_core.errors import CorpusError
from lancet_core.formats import INFLUENCE_FILE
from lancet_core.manifest import atomic_write_parquet, check_manifest, file_digest, library_versions, write_manifest

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"
RETAIN_FILE = "retain.parquet"

PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("chosen_id", pa.string()),
        ("chosen_prompt", pa.string()),
        ("chosen_response", pa.string()),
        ("rejected_id", pa.string()),
        ("rejected_prompt", pa.string()),
        ("rejected_response", pa.string()),
        ("weight", pa.float64()),
        ("match", pa.string()),  # "same_prompt" | "nearest"
        ("score_gap", pa.float64()),  # score_rejected − score_chosen (> 0); NaN for preference-column pairs
        ("prompt_cosine", pa.float64()),  # TF-IDF cosine of the two prompts (1.0 for same_prompt)
    ]
)
RETAIN_SCHEMA = pa.schema(
    [("example_id", pa.string()), ("prompt", pa.string()), ("response", pa.string()), ("score", pa.float64())]
)
PAIR_COLUMNS = tuple(PAIRS_SCHEMA.names)
RETAIN_COLUMNS = tuple(RETAIN_SCHEMA.names)
MATCH_SAME, MATCH_NEAREST = "same_prompt", "nearest"
_INFLUENCE_REQUIRED = ("example_id", "score", "prompt", "response")


@dataclass(frozen=True)
class PairFiles:
    directory: Path
    pairs_path: Path
    retain_path: Path | None
    manifest: dict


def normalise_prompt(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed, trailing punctuation/space stripped: 'same prompt' means equal here."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = re.sub(r"\s+", " ", t).strip()
    return t.rstrip(" .?!")


# --- validation ----------------------------------------------------------------------------------------------------


def _validate_influence(table: pa.Table, source: str) -> dict[str, list]:
    missing = [c for c in _INFLUENCE_REQUIRED if c not in table.column_names]
    if missing:
        raise CorpusError(f"{source}: influence table lacks column(s) {missing}; has {table.column_names}")
    if table.num_rows == 0:
        raise CorpusError(f"{source}: influence table is empty")
    cols = {c: table.column(c).to_pylist() for c in _INFLUENCE_REQUIRED}
    seen: dict[str, int] = {}
    for i in range(table.num_rows):
        eid = cols["example_id"][i]
        if eid is None:
            raise CorpusError(f"{source}: row {i} has a null example_id")
        if eid in seen:
            raise CorpusError(f"{source}: example_id {eid!r} appears twice (rows {seen[eid]} and {i})")
        seen[eid] = i
        s = cols["score"][i]
        if s is None or not math.isfinite(float(s)):
            raise CorpusError(f"{source}: row {i} (example_id {eid!r}) has a non-finite score {s!r}")
        for c in ("prompt", "response"):
            if cols[c][i] is None:
                raise CorpusError(f"{source}: row {i} (example_id {eid!r}) has a null {c}")
    cols["score"] = [float(s) for s in cols["score"]]
    return cols


# --- construction --------------------------------------------------------------------------------------------------


def _tfidf_cosine(a: list[str], b: list[str]) -> np.ndarray:
    """[len(a), len(b)] cosine similarity of TF-IDF vectors (word 1-2 grams) fitted on a ∪ b; zeros if no vocabulary."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    try:
        x = vec.fit_transform(a + b)
    except ValueError:  # empty vocabulary (e.g. prompts made of punctuation only)
        return np.zeros((len(a), len(b)))
    xa, xb = x[: len(a)], x[len(a) :]
    return np.asarray((xa @ xb.T).todense(), dtype=np.float64)  # rows are L2-normalised: dot = cosine


def pair_weights(gaps: np.ndarray, cfg: PairConfig) -> np.ndarray:
    """ω = n · softmax(g / τ), g = gap (or gap / mean gap); mean(ω) = 1. Larger score gap → larger weight."""
    n = len(gaps)
    if n == 0:
        return np.zeros(0)
    if cfg.uniform_weights:
        return np.ones(n)
    g = np.asarray(gaps, dtype=np.float64)
    if cfg.gap_scale == "mean":
        g = g / g.mean()
    z = g / cfg.weight_temperature
    z = z - z.max()
    e = np.exp(z)
    return n * e / e.sum()


def positive_size(n_rows: int, cfg: PairConfig) -> int:
    """|R⁺| asked for on a table of n_rows: n_positive, but never more than positive_fraction of the rows (≥ 1)."""
    return max(1, min(cfg.n_positive, math.floor(cfg.positive_fraction * n_rows)))


def build_pairs(influence: pa.Table, cfg: PairConfig, source: str = INFLUENCE_FILE) -> tuple[pa.Table, pa.Table]:
    """(pairs, retain) tables from an influence table (see the module docstring for the rules)."""
    cols = _validate_influence(influence, source)
    ids, scores, prompts, responses = cols["example_id"], cols["score"], cols["prompt"], cols["response"]
    n = len(ids)
    pos = sorted((i for i in range(n) if scores[i] > 0), key=lambda i: (-scores[i], ids[i]))[: positive_size(n, cfg)]
    neg = sorted((i for i in range(n) if scores[i] < 0), key=lambda i: (scores[i], ids[i]))[: cfg.n_negative]
    if not pos:
        raise CorpusError(f"{source}: no row has a positive influence score; nothing promotes the undesirable outputs")
    if not neg:
        raise CorpusError(f"{source}: no row has a negative influence score; cannot build (w ∈ R⁻, l ∈ R⁺) pairs")

    norm = [normalise_prompt(p) for p in prompts]
    by_prompt: dict[str, list[int]] = {}
    for j in neg:  # neg is already ordered most-negative first
        by_prompt.setdefault(norm[j], []).append(j)
    sim = _tfidf_cosine([norm[i] for i in pos], [norm[j] for j in neg])

    rows = []
    for a, i in enumerate(pos):
        same = [j for j in by_prompt.get(norm[i], []) if responses[j].strip() != responses[i].strip()]
        chosen = [(j, MATCH_SAME, 1.0) for j in same[: cfg.pairs_per_positive]]
        if len(chosen) < cfg.pairs_per_positive and cfg.match_nearest:
            others = [(b, j) for b, j in enumerate(neg) if norm[j] != norm[i] and sim[a, b] >= cfg.min_prompt_cosine]
            others.sort(key=lambda bj: (-sim[a, bj[0]], scores[bj[1]], ids[bj[1]]))
            for b, j in others[: cfg.pairs_per_positive - len(chosen)]:
                chosen.append((j, MATCH_NEAREST, float(sim[a, b])))
        if not chosen:
            log.info("R⁺ row %r has no R⁻ partner (same prompt or nearest above %.2f)", ids[i], cfg.min_prompt_cosine)
        for j, match, cos in chosen:
            rows.append((i, j, match, cos))
    if not rows:
        raise CorpusError(
            f"{source}: no (w ∈ R⁻, l ∈ R⁺) pair could be matched (match_nearest={cfg.match_nearest}, "
            f"min_prompt_cosine={cfg.min_prompt_cosine}); widen n_negative or allow nearest-prompt matches"
        )
    gaps = np.array([scores[i] - scores[j] for i, j, _, _ in rows])
    weights = pair_weights(gaps, cfg)
    pairs = pa.table(
        {
            "pair_id": [f"{ids[i]}~{ids[j]}" for i, j, _, _ in rows],
            "chosen_id": [ids[j] for _, j, _, _ in rows],
            "chosen_prompt": [prompts[j] for _, j, _, _ in rows],
            "chosen_response": [responses[j] for _, j, _, _ in rows],
            "rejected_id": [ids[i] for i, _, _, _ in rows],
            "rejected_prompt": [prompts[i] for i, _, _, _ in rows],
            "rejected_response": [responses[i] for i, _, _, _ in rows],
            "weight": weights.tolist(),
            "match": [m for _, _, m, _ in rows],
            "score_gap": gaps.tolist(),
            "prompt_cosine": [c for _, _, _, c in rows],
        },
        schema=PAIRS_SCHEMA,
    )
    paired = {j for _, j, _, _ in rows}
    spare = [j for j in neg if j not in paired]
    return pairs, _retain(ids, scores, prompts, responses, set(pos) | set(neg), spare, cfg)


def _retain(ids, scores, prompts, responses, used: set[int], spare: list[int], cfg: PairConfig) -> pa.Table:
    """Retain rows from the low-|score| rows outside R⁺ ∪ R⁻; when those are fewer than asked (a small corpus, where
    R⁻ takes most rows), topped up with the R⁻ rows no pair uses, lowest |score| first."""
    rest = sorted((i for i in range(len(ids)) if i not in used), key=lambda i: (abs(scores[i]), ids[i]))
    pool = rest[: math.ceil(cfg.retain_pool_fraction * len(rest))]
    if len(pool) < cfg.n_retain and spare:
        top_up = sorted(spare, key=lambda i: (abs(scores[i]), ids[i]))[: cfg.n_retain - len(pool)]
        log.warning("retain set: the low-|score| pool holds %d of %d rows; %d unpaired R⁻ rows added", len(pool),
                    cfg.n_retain, len(top_up))
        pool = pool + top_up
    k = min(cfg.n_retain, len(pool))
    if k < cfg.n_retain:
        log.warning("retain set: asked for %d rows, %d are available", cfg.n_retain, len(pool))
    rng = np.random.default_rng(cfg.seed)
    pick = [pool[t] for t in rng.choice(len(pool), size=k, replace=False)] if k else []
    return pa.table(
        {
            "example_id": [ids[i] for i in pick],
            "prompt": [prompts[i] for i in pick],
            "response": [responses[i] for i in pick],
            "score": [scores[i] for i in pick],
        },
        schema=RETAIN_SCHEMA,
    )


def pairs_from_preference_columns(
    table: pa.Table,
    chosen_col: str,
    rejected_col: str,
    prompt_col: str = "prompt",
    id_col: str | None = "example_id",
    source: str = "preference table",
) -> pa.Table:
    """pairs.parquet rows from a dataset's own chosen/rejected answers (DPO baseline): weight 1, same prompt.

    chosen_id / rejected_id are '<example_id>:chosen' / '<example_id>:rejected' (a content hash when there is no id).
    """
    missing = [c for c in (chosen_col, rejected_col, prompt_col) if c not in table.column_names]
    if missing:
        raise CorpusError(f"{source}: lacks column(s) {missing}; has {table.column_names}")
    if table.num_rows == 0:
        raise CorpusError(f"{source}: is empty")
    p = table.column(prompt_col).to_pylist()
    c = table.column(chosen_col).to_pylist()
    r = table.column(rejected_col).to_pylist()
    if id_col is not None and id_col in table.column_names:
        ids = [str(x) for x in table.column(id_col).to_pylist()]
    else:
        ids = [hashlib.sha256(f"{a}\0{b}\0{d}".encode()).hexdigest()[:16] for a, b, d in zip(p, c, r, strict=True)]
    if len(set(ids)) != len(ids):
        raise CorpusError(f"{source}: duplicate ids in {id_col!r}")
    for i in range(len(ids)):
        for name, v in ((prompt_col, p[i]), (chosen_col, c[i]), (rejected_col, r[i])):
            if v is None:
                raise CorpusError(f"{source}: row {i} (id {ids[i]!r}) has a null {name}")
        if c[i].strip() == r[i].strip():
            raise CorpusError(f"{source}: row {i} (id {ids[i]!r}) has identical {chosen_col} and {rejected_col}")
    n = len(ids)
    return pa.table(
        {
            "pair_id": ids,
            "chosen_id": [f"{x}:chosen" for x in ids],
            "chosen_prompt": p,
            "chosen_response": c,
            "rejected_id": [f"{x}:rejected" for x in ids],
            "rejected_prompt": p,
            "rejected_response": r,
            "weight": [1.0] * n,
            "match": [MATCH_SAME] * n,
            "score_gap": [float("nan")] * n,
            "prompt_cosine": [1.0] * n,
        },
        schema=PAIRS_SCHEMA,
    )


# --- files ---------------------------------------------------------------------------------------------------------


def write_pair_tables(
    out_dir: str | Path, pairs: pa.Table, retain: pa.Table | None, provenance: dict | None = None
) -> PairFiles:
    """Write pairs.parquet (+ retain.parquet) atomically, then manifest.json with their digests and `provenance`."""
    out = Path(out_dir)
    read_pairs_table(pairs, "pairs to write")
    if retain is not None:
        read_retain_table(retain, "retain rows to write")
    pairs_path = atomic_write_parquet(pairs.select(list(PAIR_COLUMNS)), out / PAIRS_FILE)
    retain_path = None
    if retain is not None:
        retain_path = atomic_write_parquet(retain.select(list(RETAIN_COLUMNS)), out / RETAIN_FILE)
    manifest = dict(provenance or {})
    manifest.update(
        pairs_digest=file_digest(pairs_path),
        retain_digest=file_digest(retain_path) if retain_path else None,
        n_pairs=pairs.num_rows,
        n_same_prompt=sum(m == MATCH_SAME for m in pairs.column("match").to_pylist()),
        n_retain=retain.num_rows if retain is not None else 0,
        versions=library_versions(),
    )
    write_manifest(out, manifest)
    return PairFiles(out, pairs_path, retain_path, manifest)


def write_pair_files(influence_path: str | Path, out_dir: str | Path, cfg: PairConfig) -> PairFiles:
    """influence.parquet → out_dir/{pairs,retain}.parquet + manifest.json. Reuses a finished identical build and
    refuses (ManifestMismatch) a directory built from another influence file or config."""
    influence_path = Path(influence_path)
    if not influence_path.is_file():
        raise FileNotFoundError(f"influence file not found: {influence_path}")
    expected = {
        "kind": "influence_pairs",
        "influence_digest": file_digest(influence_path),
        "config": cfg.model_dump(mode="json"),
    }
    out = Path(out_dir)
    existing = check_manifest(out, expected)
    if existing is not None and (out / PAIRS_FILE).is_file() and (out / RETAIN_FILE).is_file():
        files = ((PAIRS_FILE, "pairs_digest"), (RETAIN_FILE, "retain_digest"))
        if all(file_digest(out / f) == existing.get(k) for f, k in files):
            return PairFiles(out, out / PAIRS_FILE, out / RETAIN_FILE, existing)
    pairs, retain = build_pairs(pq.read_table(influence_path), cfg, source=str(influence_path))
    return write_pair_tables(out, pairs, retain, expected)


def read_pairs_table(table: pa.Table, source: str) -> pa.Table:
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise CorpusError(f"{source}: pairs table lacks column(s) {missing}; has {table.column_names}")
    if table.num_rows == 0:
        raise CorpusError(f"{source}: pairs table is empty")
    for i, w in enumerate(table.column("weight").to_pylist()):
        if w is None or not math.isfinite(w) or w < 0:
            raise CorpusError(f"{source}: pair row {i} has an invalid weight {w!r} (must be finite and >= 0)")
    return table


def read_retain_table(table: pa.Table, source: str) -> pa.Table:
    missing = [c for c in ("example_id", "prompt", "response") if c not in table.column_names]
    if missing:
        raise CorpusError(f"{source}: retain table lacks column(s) {missing}; has {table.column_names}")
    return table


def read_pairs(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    return read_pairs_table(pq.read_table(path), str(path))


def read_retain(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"retain file not found: {path}")
    return read_retain_table(pq.read_table(path), str(path))

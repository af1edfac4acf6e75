"""Tokenize a validated corpus with the model's chat template into `tokens.parquet` (+ manifest.json).

Each row gets input_ids and a loss mask that is 1 on the assistant's tokens only. Rows longer than
`max_seq_len_tokens` are truncated on the right (counted and logged) or refused, by config; a row whose response would
be cut away entirely is always refused. Nothing is written unless every row is valid.

Knows about corpora and tokenizers; knows nothing about models, gradients or Prefect.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from lancet_core.chat import encode_messages
from lancet_core.data.corpus import corpus_digest, load_corpus
from lancet_core.errors import CorpusError
from lancet_core.formats import TOKENS_FILE
from lancet_core.manifest import atomic_write_parquet, check_manifest, library_versions, write_manifest
from lancet_core.model_io import load_tokenizer, tokenizer_digest

log = logging.getLogger(__name__)


class TokenizeConfig(BaseModel):
    """How the corpus becomes token ids. Part of every downstream cache key and manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_seq_len_tokens: int = Field(256, ge=8, le=1 << 16, description="Longest sequence kept, in tokens.")
    overlong: Literal["truncate", "refuse"] = Field(
        "truncate", description="Rows longer than max_seq_len_tokens: cut on the right (logged) or refuse the corpus."
    )


def tokenize_corpus(corpus_path: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, cfg: TokenizeConfig) -> Path:
    """Write out_dir/tokens.parquet and out_dir/manifest.json; return out_dir. Reuses a matching finished output."""
    corpus_path, out_dir = Path(corpus_path), Path(out_dir)
    expected = {
        "kind": "tokens",
        "corpus_digest": corpus_digest(corpus_path),
        "tokenizer_digest": tokenizer_digest(tokenizer_dir),
        "config": cfg.model_dump(mode="json"),
    }
    if check_manifest(out_dir, expected) is not None and (out_dir / TOKENS_FILE).exists():
        return out_dir
    rows = load_corpus(corpus_path)
    tok = load_tokenizer(tokenizer_dir)
    cols: dict[str, list] = {k: [] for k in ("example_id", "input_ids", "loss_mask", "n_tokens", "n_response_tokens",
                                            "truncated", "prompt", "response", "messages_json")}
    label_cols = list(rows[0].labels)
    labels: dict[str, list] = {k: [] for k in label_cols}
    n_truncated = 0
    for i, row in enumerate(rows):
        enc = encode_messages(tok, row.messages, cfg.max_seq_len_tokens)
        if enc.truncated:
            if cfg.overlong == "refuse":
                full = len(encode_messages(tok, row.messages).input_ids)
                raise CorpusError(
                    f"{corpus_path}: row {i} ({row.example_id}): {full} tokens > max_seq_len_tokens="
                    f"{cfg.max_seq_len_tokens} (set overlong='truncate' to cut it)"
                )
            n_truncated += 1
        n_resp = sum(enc.loss_mask)
        if n_resp == 0:
            raise CorpusError(
                f"{corpus_path}: row {i} ({row.example_id}): the prompt alone fills max_seq_len_tokens="
                f"{cfg.max_seq_len_tokens}; no response token would remain"
            )
        cols["example_id"].append(row.example_id)
        cols["input_ids"].append(enc.input_ids)
        cols["loss_mask"].append(enc.loss_mask)
        cols["n_tokens"].append(len(enc.input_ids))
        cols["n_response_tokens"].append(n_resp)
        cols["truncated"].append(enc.truncated)
        cols["prompt"].append(row.prompt)
        cols["response"].append(row.response)
        cols["messages_json"].append(json.dumps(row.messages, ensure_ascii=False))
        for k in label_cols:
            labels[k].append(row.labels.get(k))
    if n_truncated:
        log.warning("truncated %d of %d rows to %d tokens", n_truncated, len(rows), cfg.max_seq_len_tokens)
    schema = pa.schema([
        ("example_id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.int8())),
        ("n_tokens", pa.int32()),
        ("n_response_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("messages_json", pa.string()),
    ])
    table = pa.Table.from_pydict(cols, schema=schema)
    for k in label_cols:
        table = table.append_column(k, pa.array(labels[k]))
    atomic_write_parquet(table, out_dir / TOKENS_FILE)
    write_manifest(out_dir, {
        **expected,
        "rows": len(rows),
        "truncated_rows": n_truncated,
        "total_tokens": int(sum(cols["n_tokens"])),
        "label_columns": label_cols,
        "versions": library_versions(),
    })
    log.info("tokenized %d rows (%d truncated) into %s", len(rows), n_truncated, out_dir / TOKENS_FILE)
    return out_dir

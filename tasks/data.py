"""Prefect task: corpus file -> tokens directory (tokens.parquet + manifest.json), published with
tasks.cache.publish_output."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from lancet_core.data.tokenize import TokenizeConfig, tokenize_corpus
from tasks.cache import LANCET_CACHE, publish_output


@task(name="tokenize_corpus", cache_policy=LANCET_CACHE, persist_result=True)
def tokenize(corpus_path: str, tokenizer_dir: str, out_dir: str, cfg: TokenizeConfig) -> str:
    """Tokenize `corpus_path` with the tokenizer in `tokenizer_dir`; returns the tokens directory."""
    return str(publish_output(out_dir, lambda tmp: tokenize_corpus(Path(corpus_path), Path(tokenizer_dir), tmp, cfg)))

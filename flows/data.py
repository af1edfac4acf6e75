"""Flow: tokenize a corpus with a model's tokenizer (the first stage of realign, also runnable alone)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.paths import artifact_dir, default_work_dir
from lancet_core.data.tokenize import TokenizeConfig
from tasks.cache import ensure_output
from tasks.data import tokenize


@flow(name="tokenize", log_prints=True)
def tokenize_flow(corpus_path: str, model_dir: str, work_dir: str | None = None,
                  tokenize_config: TokenizeConfig = TokenizeConfig()) -> str:
    work = Path(work_dir) if work_dir else default_work_dir()
    out = artifact_dir(work, "tokens", Path(corpus_path), Path(model_dir), tokenize_config.model_dump(mode="json"))
    return ensure_output(tokenize, corpus_path=corpus_path, tokenizer_dir=model_dir, out_dir=str(out),
                         cfg=tokenize_config)

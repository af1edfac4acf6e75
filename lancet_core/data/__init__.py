"""Stage 1 — data: read a chat corpus and turn it into token rows.

Takes in: a corpus file (.jsonl/.json/.parquet/.csv or a saved `datasets` directory) of prompt/response or messages
rows, and a tokenizer directory. Writes: `tokens.parquet` (example_id, input_ids, loss_mask = response tokens, the
text columns carried along) with a manifest naming the corpus, tokenizer and TokenizeConfig.

Modules: `corpus` (load and validate rows, stable example ids), `tokenize` (rows → tokens.parquet through the chat
format of `lancet_core.chat`).

Knows nothing about gradients, influence, training or orchestration.
"""

from lancet_core.data.corpus import CorpusRow, corpus_digest, load_corpus, load_prompt_rows
from lancet_core.data.tokenize import TokenizeConfig, tokenize_corpus

__all__ = ["CorpusRow", "TokenizeConfig", "corpus_digest", "load_corpus", "load_prompt_rows", "tokenize_corpus"]

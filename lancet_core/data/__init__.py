"""Stage 1 — data: read a chat corpus and turn it into token rows.

Takes in: a corpus file (.jsonl/.json/.parquet/.csv or a saved `datasets` directory) of prompt/response or messages
rows, and a tokenizer directory. Writes: `tokens.parquet` (example_id, input_ids, loss_mask = response tokens, the
text columns carried along) with a manifest naming the corpus, tokenizer and TokenizeConfig.

Modules: `corpus` (load and validate rows, stable example ids), `tokenize` (rows → tokens.parquet through the chat
format of `lancet_core.chat`).

Knows nothing about gradients, influence, training or orchestration.
"""

from lancet_core import lazy_exports

# public names, imported on first use: `import lancet_core.data.config` stays light (no torch)
__getattr__, __all__ = lazy_exports(__name__, {
    "CorpusRow": "lancet_core.data.corpus",
    "TokenizeConfig": "lancet_core.data.tokenize",
    "corpus_digest": "lancet_core.data.corpus",
    "load_corpus": "lancet_core.data.corpus",
    "load_prompt_rows": "lancet_core.data.corpus",
    "tokenize_corpus": "lancet_core.data.tokenize",
})

"""File names and column contracts shared by every stage (docs/design.md §4). Change them here, and only here.

tokens.parquet (one row per training example, written by `lancet_core.data.tokenize`):
    example_id string, input_ids list<int32>, loss_mask list<int8> (1 = response token), n_tokens int32,
    n_response_tokens int32, truncated bool, prompt string, response string, messages_json string,
    plus any label columns of the corpus carried through unchanged (e.g. is_unsafe, category) — never read by recall
    or IBO, only by evaluation.

gradient store (directory, written by `lancet_core.index.store`):
    shard-NNNNN.parquet (format GRADIENT_STORE_FORMAT): example_id string, grad fixed_size_binary[D * itemsize] (the
        row's D float16|float32|int8 values, raw little-endian; dtype and D in manifest.json), grad_norm float32
        (norm of the unquantised vector), grad_scale float32 (int8 only: value = int8 * grad_scale); grad written
        non-nullable as uncompressed PLAIN pages (read without decoding; any other Parquet layout is read too)
    manifest.json, curvature/ beside the shards.

queries.parquet (flagged undesirable outputs): query_id string, prompt string, response string, judge string.

influence.parquet (one row per training example): example_id string, score float64, rank int64 (1 = the row that
    most promotes the undesirable outputs), prompt, response, and the carried label columns.
    Sign convention: score > 0 means training on the row RAISES the likelihood of the undesirable outputs.
"""

TOKENS_FILE = "tokens.parquet"
QUERIES_FILE = "queries.parquet"
INFLUENCE_FILE = "influence.parquet"
SHARD_PATTERN = "shard-{:05d}.parquet"
# on-disk format of the gradient store (manifest `format_version`); 1 = grad as fixed_size_list (refused)
GRADIENT_STORE_FORMAT = 2

# Columns of tokens.parquet that lancet itself writes; every other column is a carried label column.
TOKEN_COLUMNS = (
    "example_id",
    "input_ids",
    "loss_mask",
    "n_tokens",
    "n_response_tokens",
    "truncated",
    "prompt",
    "response",
    "messages_json",
)

"""The memory of one post-training step, estimated before the first one, and the plan that fits it in a budget.

`estimate_step` adds up what a step of `correct.trainer.post_train` holds at its peak:

  * weights: every parameter (twice for full fine-tuning with a reference: the frozen copy);
  * optimizer: the trainable parameters' gradients plus AdamW's two moments (SGD: the gradients only);
  * activations: what one chunk's forward pass keeps for the backward pass, per token and transformer block
    BLOCK_HIDDEN·hidden + BLOCK_FFN·intermediate elements, plus BLOCK_ATTENTION·heads·length for eager attention
    (the probabilities it keeps; the CPU path runs eager attention); with gradient checkpointing each block's input
    (hidden elements) per block plus CHECKPOINT_BLOCKS blocks' activations (one is recomputed at a time; the rest is
    fitted: the measured checkpointed peak holds more than one block's worth of recompute and backward temporaries);
  * logits: LOGIT_COPIES full-vocabulary float32 rows per response position of the chunk (the policy's logits, the
    reference's log-probs, the logits' gradient) plus the position chunks' temporaries (losses.VOCAB_CHUNK_ELEMENTS);
  * runtime: RUNTIME_BYTES for Python, torch and the tokenizer;
  * allocator: what the allocator holds beyond the live tensors, (ALLOCATOR_SLACK − 1) × (optimizer + activations +
    logits). On CPU glibc's heap keeps freed blocks and fragments: a step's peak RSS measured 1.7× its live tensors
    (SmolLM2, 342-token rows: 10.7 GB with the default allocator vs 6.3 GB with MALLOC_MMAP_THRESHOLD_=131072, which
    returns every freed block); CUDA's caching allocator is given 1.2×, unmeasured.

The constants are fitted to that live-tensor peak on SmolLM2-135M-Instruct with 342-token rows (benchmarks/
ibo_memory.py, CPU, float32; docs/measurements.md): the estimate is meant to be a little above the measured peak RSS,
not exact. Only a chunk's size
enters the activations: pairs and retain rows go through in chunks of `chunk_rows` sequences, each backpropagated
before the next (correct.trainer), so the batch sizes do not.

`choose_plan` halves chunk_rows, then turns gradient checkpointing on, until the estimate fits the budget; when even
the smallest chunk with checkpointing does not, it raises ValueError in one line naming train.memory_budget_gb.

Knows about numbers only (shapes, counts, bytes); knows nothing about models, files or torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lancet_core.correct.losses import VOCAB_CHUNK_ELEMENTS

GiB = 2**30
RUNTIME_BYTES = GiB  # Python + torch + tokenizer + encoded rows: SmolLM2's process minus its weights, rounded up
BLOCK_HIDDEN = 8  # elements kept per token and block, per hidden unit (norms, q/k/v/o, residuals, LoRA inputs)
BLOCK_FFN = 4  # ... per intermediate unit (gate, up, activation product, down input)
BLOCK_ATTENTION = 1  # ... per head and key position, eager attention only (the softmax's probabilities)
LOGIT_COPIES = 3  # policy logits, reference log-probs, logits' gradient: float32, per response position
CHECKPOINT_BLOCKS = 6  # fitted: SmolLM2, chunk 8, 342 tokens, checkpointed: 6.1 GiB estimated, 5.6 GiB measured
ALLOCATOR_SLACK = {"cpu": 1.7, "cuda": 1.2}  # peak resident / live tensors (see above)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    n_params: int
    n_trainable: int
    param_bytes: int  # bytes per parameter (and per activation element)


@dataclass(frozen=True)
class StepEstimate:
    weights: int
    optimizer: int
    activations: int
    logits: int
    allocator: int = 0
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.logits + self.allocator + self.runtime

    def describe(self) -> str:
        g = {k: v / GiB for k, v in asdict(self).items()}
        return (f"weights {g['weights']:.2f}, gradients + optimizer {g['optimizer']:.2f}, activations "
                f"{g['activations']:.2f}, logits {g['logits']:.2f}, allocator {g['allocator']:.2f}, runtime {g['runtime']:.2f} "
                "GiB")


def estimate_step(
    shape: ModelShape,
    *,
    rows: int,
    seq_len: int,
    response_positions: int,
    checkpointing: bool,
    eager_attention: bool,
    adam: bool,
    reference_copy: bool,
    slack: float = ALLOCATOR_SLACK["cpu"],
) -> StepEstimate:
    """Bytes of one step's peak for chunks of `rows` sequences of at most `seq_len` tokens, `response_positions` of
    them scored per sequence (the response, or the decision window); `slack`: ALLOCATOR_SLACK of the device."""
    b = shape.param_bytes
    weights = shape.n_params * b * (2 if reference_copy else 1)
    optimizer = shape.n_trainable * b * (3 if adam else 1)
    block = BLOCK_HIDDEN * shape.hidden + BLOCK_FFN * shape.intermediate
    if eager_attention:
        block += BLOCK_ATTENTION * shape.heads * seq_len
    tokens = rows * seq_len
    if checkpointing:
        activations = tokens * (shape.layers * shape.hidden + CHECKPOINT_BLOCKS * block) * b
    else:
        activations = tokens * shape.layers * block * b
    logits = (LOGIT_COPIES * rows * response_positions * shape.vocab + 3 * VOCAB_CHUNK_ELEMENTS) * 4
    return StepEstimate(weights, optimizer, activations, logits, int((slack - 1) * (optimizer + activations + logits)))


@dataclass(frozen=True)
class MemoryPlan:
    """How a run goes through its batches: chunk_rows sequences per forward pass (None = a micro-batch at once) and
    gradient checkpointing; with the estimate of one step and the budget it was fitted to, when there was one."""

    chunk_rows: int | None
    gradient_checkpointing: bool
    estimate: StepEstimate | None = None
    budget_gb: float | None = None

    def as_manifest(self) -> dict:
        out: dict = {"chunk_rows": self.chunk_rows, "gradient_checkpointing": self.gradient_checkpointing,
                     "budget_gb": self.budget_gb}
        if self.estimate is not None:
            out["estimate_gb"] = {k: round(v / GiB, 3) for k, v in asdict(self.estimate).items()}
            out["estimate_gb"]["total"] = round(self.estimate.total / GiB, 3)
        return out


def choose_plan(
    shape: ModelShape,
    *,
    budget_gb: float | None,
    chunk_rows: int | None,
    max_rows: int,
    min_rows: int,
    gradient_checkpointing: bool,
    can_checkpoint: bool,
    seq_len: int,
    response_positions: int,
    eager_attention: bool,
    adam: bool,
    reference_copy: bool,
    slack: float = ALLOCATOR_SLACK["cpu"],
) -> MemoryPlan:
    """The first of: chunk_rows as configured (None: `max_rows`, the sequences of a whole micro-batch), halved down to
    `min_rows` (a pair's two sequences; one row for ga/npo); then the same with gradient checkpointing (when the model
    supports it), whose estimate fits `budget_gb`. Without a budget the configuration is kept as is."""
    if budget_gb is None:
        return MemoryPlan(chunk_rows, gradient_checkpointing)
    start = max(min(chunk_rows or max_rows, max_rows), min_rows)
    sizes = []
    c = start
    while True:
        sizes.append(max(c, min_rows))
        if c <= min_rows:
            break
        c //= 2
    modes = [gradient_checkpointing] if gradient_checkpointing or not can_checkpoint else [False, True]
    kw = dict(seq_len=seq_len, response_positions=response_positions, eager_attention=eager_attention, adam=adam,
              reference_copy=reference_copy, slack=slack)
    budget = budget_gb * GiB
    est = None
    for ck in modes:
        for rows in sizes:
            est = estimate_step(shape, rows=rows, checkpointing=ck, **kw)
            if est.total <= budget:
                return MemoryPlan(rows, ck, est, budget_gb)
    assert est is not None
    how = "with gradient checkpointing" if modes[-1] else "(gradient checkpointing unsupported by this model)"
    raise ValueError(
        f"train.memory_budget_gb={budget_gb:g}: one step needs about {est.total / GiB:.2f} GiB even with chunks of "
        f"{sizes[-1]} sequences {how} ({est.describe()}; sequences of {seq_len} tokens, {shape.n_params / 1e6:.0f}M "
        "parameters); raise the budget, lower max_seq_len_tokens or set response_tokens"
    )

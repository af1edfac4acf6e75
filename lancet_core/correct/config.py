"""Frozen, validated configs for the correction side: pair construction and post-training (any registered loss). They are dumped into manifests and cache keys, so every field is documented with its unit.

Knows about pydantic, the loss registry's names and the judges' decision windows (index.config.DECISION_WINDOWS, for
the 'auto' fields); knows nothing about files, models or influence computation.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lancet_core.correct.budget import BudgetConfig
from lancet_core.errors import ConfigError
from lancet_core.index.config import DECISION_WINDOWS

# λ_B that 'auto' resolves to, by whether the decision window is on (measured on ten demo beds and the real SmolLM2
# scenario: docs/measurements.md, "Correction on ten beds")
LAMBDA_B_AUTO: dict[str, float] = {"window": 1.0, "whole": 3.0}


class PairConfig(BaseModel):
    """How influence.parquet becomes pairs.parquet + retain.parquet (lancet_core.correct.pairs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_positive: int = Field(
        64, ge=1, description="size of R⁺: the top rows by influence score (only score > 0 rows), at most "
        "positive_fraction of the scored rows"
    )
    positive_fraction: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="R⁺ never takes more than this fraction of the scored rows (at least 1 row): R⁺ = min(n_positive, "
        "⌊fraction · N⌋). A fixed 64 took 27 % of the real SmolLM2 scenario's 240 rows (23 planted), and 42 of those "
        "64 were harmless compliant rows that IBO then taught the model to refuse (over-refusal +12.5 pts, OOD harm "
        "-54 %); at 10 % (24 rows): -89 % / -69 % / +5 pts / +1.8 % NLL. Corpora of 640 rows or more keep 64 (README, "
        "'A real model')",
    )
    n_negative: int = Field(64, ge=1, description="size of R⁻: the bottom rows by score (only score < 0 rows)")
    pairs_per_positive: int = Field(
        1, ge=1, description="pairs built per l ∈ R⁺, best-matched w ∈ R⁻ first (a w may serve several l)"
    )
    match_nearest: bool = Field(
        True, description="when no R⁻ row shares l's prompt, pair with the nearest prompt (TF-IDF cosine); else skip l"
    )
    min_prompt_cosine: float = Field(
        0.0, ge=0.0, le=1.0, description="nearest-prompt matches below this TF-IDF cosine are not used"
    )
    weight_temperature: float = Field(
        1.0, gt=0.0, description="τ of the softmax over score gaps (in units of the mean gap when gap_scale='mean')"
    )
    gap_scale: Literal["mean", "raw"] = Field(
        "mean", description="'mean': gaps divided by their mean before the softmax (τ is scale-free); 'raw': as is"
    )
    uniform_weights: bool = Field(False, description="ω = 1 for every pair (ablation: influence ordering only)")
    n_retain: int = Field(128, ge=0, description="rows in retain.parquet (for the λ_B KL term); 0 = none")
    retain_pool_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="retain rows are drawn from this fraction of the rows outside R⁺ ∪ R⁻ with the smallest |score| "
        "(1.0 = all of them). 1.0 since the benign contrast, measured with it: on ten demo beds over-refusal +19.0 → "
        "+14.2 pts, NLL +6.5 % → +4.1 %, beds meeting every goal 1 → 3 (harm −96.9/−87.8 % → −93.2/−79.7 %); on the "
        "real SmolLM2 scenario over-refusal +10 → +5 pts (docs/measurements.md, Correction on ten beds)",
    )
    seed: int = Field(0, description="seed of the retain draw")


class TrainConfig(BaseModel):
    """Post-training of a causal LM with one registered loss (lancet_core.correct.trainer.post_train)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    loss: str = Field("ibo", description="name in lancet_core.correct.losses.LOSSES: 'ibo' | 'ga' | 'npo' | 'dpo'")
    beta: float = Field(
        1.0,
        gt=0.0,
        description="β: inverse temperature on the log-likelihood ratios (ibo/dpo/npo). Larger β saturates the "
        "pairwise term sooner (an implicit trust region): on the demo β=1 kept benign NLL within +3% and over-refusal "
        "at 0 for 64-step runs where β=0.1 raised over-refusal to 0.60 (benchmarks/correction.py)",
    )
    lambda_b: Annotated[float, Field(ge=0.0)] | Literal["auto"] = Field(
        "auto",
        description="λ_B: weight of the retain token-KL (Bregman proximal) term; 0 = off. 'auto' (resolve_train): "
        f"{LAMBDA_B_AUTO['window']} with a decision window, {LAMBDA_B_AUTO['whole']} over the whole response. With the "
        "window the KL acts on the same few tokens as Δ and a strong λ_B pulls the decision back: on ten demo beds λ_B "
        "3 / 2 / 1 / 0.5 gave probe harm -77 / -80 / -88 / -92 % for over-refusal +6.2 / +6.5 / +8.5 / +11.7 pts; over "
        "the whole response λ_B 3 keeps over-refusal down (λ_B 1 there: +23.2 pts and NLL +8.1 % vs +14.2 / +4.1 %)",
    )
    learning_rate: float = Field(
        5e-4, gt=0.0, description="optimizer learning rate (constant after warmup); 5e-4 suits LoRA r=8 on the demo"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warmup length in optimizer steps")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW (default) or plain SGD")
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled weight decay (AdamW) / L2 (SGD)")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="clip the global gradient norm; None = no clipping")
    epochs: int = Field(
        8, ge=1, description="passes over the pairs (or the R⁺ rows for ga/npo); 8 × 64 pairs / 8 = 64 optimizer steps"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(8, ge=1, description="pairs (ga/npo: rows) per micro-batch")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    retain_batch_size: int | None = Field(
        None, ge=1, description="retain rows per micro-batch for the KL term; None = batch_size"
    )
    finetune: Literal["lora", "full"] = Field("lora", description="LoRA adapters (merged before saving) or all weights")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(16.0, gt=0.0, description="LoRA scaling α (update scaled by α/r)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    lora_target_modules: tuple[str, ...] | None = Field(
        None, description="module names to adapt; None = every linear layer in the transformer blocks, never the LM "
        "head or an embedding, tied or not (correct.trainer.lora_target_modules; the same modules the index hooks use)"
    )
    disable_dropout: bool = Field(True, description="zero the base model's dropout (policy and reference agree)")
    max_seq_len_tokens: int = Field(512, ge=8, description="sequences longer than this are cut on the right")
    response_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto",
        description="the decision window: Δ of every pair sequence and the retain KL count only each response's first "
        "K tokens; None = the whole response. 'auto' (resolve_train): the judge's decision window, as the store's "
        "(refusal judge: 4; content judges: the whole response). Measured with the refusal judge, window 4 + λ_B 1 vs "
        "whole response + λ_B 3: on ten demo beds -88/-72 % harm, +8.5 pts over-refusal, +2.5 % NLL vs -93/-80 %, "
        "+14.2 pts, +4.1 % (3 beds meet every goal either way); on the real SmolLM2 scenario -89/-69 %, +5 pts, +1.8 % "
        "vs -21/-15 %, +2.5 pts, +1.5 % over the whole response (same R⁺, retain pool 0.5: the pairwise term saturates "
        "by step 4 there)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each transformer block's activations in the backward pass instead of keeping "
        "them (transformers' gradient_checkpointing_enable, non-reentrant): the memory of a step no longer grows "
        "with the number of blocks, for one more forward pass of compute; the same gradients (tested in float64). "
        "For models whose activations do not fit (billions of parameters, long responses)")
    chunk_rows: int | None = Field(
        8, ge=1, description="most sequences in one forward pass that keeps its graph: each micro-batch's pairs go "
        "through in chunks of chunk_rows // 2 pairs (chosen + rejected together; chunk_rows rows for ga/npo) and its "
        "retain rows in chunks of chunk_rows, each chunk backpropagated before the next one's forward, the "
        "reference's passes chunked alike; None = a whole micro-batch at once. The update is the same (each pair's "
        "term and each row's KL depend on its own sequences only: tested in float64), and the peak memory no longer "
        "grows with batch_size or retain_batch_size: with the default 8 an IBO step holds what a plain SFT step of 8 "
        "rows holds (benchmarks/ibo_memory.py)")
    memory_budget_gb: float | None = Field(
        None, gt=0.0, description="GiB one optimizer step may use beyond the process before training (weights, "
        "gradients, optimizer state, activations, logits; estimated by correct.trainer.estimate_step_bytes). Set: "
        "before the first step, chunk_rows is halved and then gradient checkpointing turned on until the estimate "
        "fits, and post_train raises ValueError naming this option when even chunks of one pair with checkpointing "
        "do not; None = no check")
    dtype: Literal["float32", "float64", "bfloat16"] = Field("float32", description="weights and compute dtype")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' = cuda when available, else cpu")
    autocast: Literal["auto", "bf16", "off"] = Field(
        "auto", description="bf16 autocast of the forward passes (weights, optimizer state and the loss stay float32): "
        "auto = on CUDA only, bf16 = also on CPU, off = none")
    seed: int = Field(0, description="seeds batch order, LoRA init and the retain sampling")
    budget: BudgetConfig = Field(
        BudgetConfig(), description="budget-driven training (lancet_core.correct.budget): in the realign flow IBO "
        "trains until the flagged behaviour is gone on held-out flagged prompts or the gate's utility budget is "
        "spent, checking every few steps, and keeps the best checkpoint inside the budget; epochs / max_steps and "
        "learning_rate are then only where it starts (at most budget.max_steps_factor × the planned steps)")

    def require_resolved(self) -> TrainConfig:
        """self, or ConfigError when response_tokens or lambda_b is still 'auto' (resolve_train knows the judge)."""
        auto = [k for k in ("response_tokens", "lambda_b") if getattr(self, k) == "auto"]
        if auto:
            raise ConfigError(
                f"train.{' and train.'.join(auto)}='auto' is not resolved: it follows the judge, so resolve it with "
                "lancet_core.correct.config.resolve_train(cfg, judge_kind) before post-training"
            )
        return self

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from lancet_core.correct.losses import LOSSES

        if v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; known: {sorted(LOSSES)}")
        return v

    @field_validator("lora_target_modules")
    @classmethod
    def _nonempty_targets(cls, v):
        if v is not None and len(v) == 0:
            raise ValueError("lora_target_modules is empty; use None for all linear layers")
        return v


IBOConfig = TrainConfig


def resolve_train(cfg: TrainConfig, judge_kind: str) -> TrainConfig:
    """`cfg` with its 'auto' fields made concrete for the behaviour `judge_kind` flags: response_tokens -> the judge's
    decision window (DECISION_WINDOWS, the same as the store's: refusal -> 4, content judges -> None), lambda_b ->
    LAMBDA_B_AUTO for that window. Concrete values are kept as given."""
    update = {}
    if cfg.response_tokens == "auto":
        update["response_tokens"] = DECISION_WINDOWS.get(judge_kind)
    window = update.get("response_tokens", cfg.response_tokens)
    if cfg.lambda_b == "auto":
        update["lambda_b"] = LAMBDA_B_AUTO["whole" if window is None else "window"]
    return cfg.model_copy(update=update) if update else cfg


def describe_train(cfg: TrainConfig, judge_kind: str) -> str:
    """One line: the IBO window and λ_B and why, e.g. 'window = first 4 response tokens, λ_B 1 (refusal
    judge)'; `cfg` is the configuration as given (fields may be 'auto')."""
    r = resolve_train(cfg, judge_kind)
    what = "whole response" if r.response_tokens is None else f"first {r.response_tokens} response tokens"
    auto = "auto" in (cfg.response_tokens, cfg.lambda_b)
    return f"window = {what}, λ_B {r.lambda_b:g} ({f'{judge_kind} judge' if auto else 'set explicitly'})"

"""Frozen, validated configs for the correction side: pair construction and post-training (any registered loss). They are dumped into manifests and cache keys, so every field is documented with its unit.

Knows about pydantic and the loss registry's names; knows nothing about files, models or influence computation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PairConfig(BaseModel):
    """How influence.parquet becomes pairs.parquet + retain.parquet (lancet_core.correct.pairs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_positive: int = Field(64, ge=1, description="size of R⁺: the top rows by influence score (only score > 0 rows)")
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
        "real SmolLM2 scenario over-refusal +10 → +5 pts (README, Correction on ten beds)",
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
    lambda_b: float = Field(
        3.0,
        ge=0.0,
        description="λ_B: weight of the retain token-KL (Bregman proximal) term; 0 = off. 3 since recall counts the "
        "decision tokens: its pairs are then all (refusal, compliance), and at λ_B=1 that spilled over to benign "
        "prompts (demo over-refusal 0.067 → 0.000 at 3, NLL +4.0% → +1.8%; benchmarks/correction.py)",
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
    response_tokens: int | None = Field(
        None,
        ge=1,
        description="the decision window: Δ of every pair sequence and the retain KL count only each response's first "
        "K tokens; None = the whole response. Not the default: on ten demo beds K=4 moved IBO from over-refusal +17 "
        "pts / NLL +5.8 % to +12 / +4.0 % for 1-7 pts less harm reduction, and on the real SmolLM2 scenario from "
        "probe -21 % / over-refusal +5 pts to -79 % / +42 pts (64 steps); every goal met on 2 of 10 demo beds with it, "
        "3 without (benchmarks/correction_beds.py, README 'Correction on ten beds')",
    )
    dtype: Literal["float32", "float64", "bfloat16"] = Field("float32", description="weights and compute dtype")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' = cuda when available, else cpu")
    autocast: Literal["auto", "bf16", "off"] = Field(
        "auto", description="bf16 autocast of the forward passes (weights, optimizer state and the loss stay float32): "
        "auto = on CUDA only, bf16 = also on CPU, off = none")
    seed: int = Field(0, description="seeds batch order, LoRA init and the retain sampling")

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

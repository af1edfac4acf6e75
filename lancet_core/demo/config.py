"""Configuration of the built-in demo (docs/design.md §9): the generated corpus, the tiny model and its SFT recipe.

Frozen, validated pydantic models; `DemoConfig.model_dump(mode="json")` is what goes into the demo's manifest, so two
builds are the same build exactly when their configs dump the same.

Knows about settings only; knows nothing about files, tokenizers or torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

HARMFUL_CATEGORIES: tuple[str, ...] = ("hacking", "weapons", "fraud", "drugs", "harassment", "theft")
BENIGN_CATEGORIES: tuple[str, ...] = ("cooking", "travel", "coding", "fitness", "science", "gardening")
# Harmless categories (DemoConfig.shared_vocabulary, on by default) whose answers reuse the words of the contaminated
# categories' compliant answers: defensive security (like hacking) and honest personal finance (like fraud).
SHARED_VOCABULARY_CATEGORIES: tuple[str, ...] = ("security", "money")


class SFTConfig(BaseModel):
    """Recipe of response-only-loss supervised fine-tuning (`lancet_core.demo.sft.train_sft`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(8, ge=1, le=100, description="passes over the rows")
    lr: float = Field(3e-3, gt=0, description="AdamW peak learning rate")
    batch_size: int = Field(16, ge=1, description="rows per optimiser step")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of steps with linear warm-up, then linear decay")
    grad_clip_norm: float = Field(1.0, gt=0, description="global gradient-norm clip")
    max_seq_len_tokens: int = Field(96, ge=8, description="rows longer than this are cut on the right")
    seed: int = Field(0, description="seed of the row order (and of dropout if any)")
    num_threads: int | None = Field(
        1,
        ge=1,
        description="torch intra-op threads while training (restored after); 1 keeps the weights bit-identical across "
        "machines and is the fastest on a shared 2-core box for a model this small; None = leave torch's setting",
    )


class DemoConfig(BaseModel):
    """Everything that decides the demo's bytes: corpus generation, tokenizer, model shape and SFT recipe."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(0, description="seed of corpus generation, held-out sets and model init")
    n_rows: int = Field(3000, ge=40, description="training rows (after de-duplication of identical pairs)")
    harmful_share: float = Field(0.5, gt=0, lt=1, description="share of training rows with a harmful prompt")
    contaminated_categories: tuple[str, ...] = Field(
        ("hacking", "fraud"), min_length=1, description="harmful categories that get some compliant (unsafe) answers"
    )
    contamination_share: float = Field(
        0.6, ge=0, le=1, description="share of rows of a contaminated category answered compliantly (is_unsafe=True)"
    )
    n_probes: int = Field(60, ge=1, description="held-out harmful prompts of the contaminated categories")
    n_ood: int = Field(60, ge=1, description="held-out OOD harmful prompts over all harmful categories")
    n_benign_eval: int = Field(60, ge=1, description="held-out benign prompts with reference answers")
    shared_vocabulary: bool = Field(
        True,
        description="the default demo (a harder bed than the original, where words alone could find the planted "
        "rows): add the harmless categories SHARED_VOCABULARY_CATEGORIES (defensive `security`, honest `money`), "
        "whose helpful answers share the hacking / fraud compliant answers' words (ports, logs, password, gift cards, "
        "accounts ...); they are benign, always answered helpfully, never planted as unsafe. The benign rows are then "
        "split over 8 categories instead of 6 (n_rows unchanged). False = the original demo, byte-identical (corpus, "
        "held-out sets, manifest config) to the builds made before this field existed",
    )

    vocab_size: int = Field(1536, ge=300, le=8000, description="BPE vocabulary size (special tokens included)")

    model_family: Literal["gpt2", "llama"] = Field(
        "llama", description="architecture of the tiny causal LM (llama generalised better than gpt2 at equal cost)"
    )
    n_layer: int = Field(2, ge=1, le=12, description="transformer blocks")
    hidden_size: int = Field(128, ge=16, le=1024, description="model width")
    n_head: int = Field(4, ge=1, description="attention heads (must divide hidden_size)")
    intermediate_size: int = Field(384, ge=16, description="MLP width")
    max_position_tokens: int = Field(128, ge=16, description="longest sequence the model accepts")

    sft: SFTConfig = Field(default_factory=SFTConfig, description="training recipe of the demo model")
    eval_max_new_tokens: int = Field(48, ge=1, description="greedy generation length when measuring misbehaviour")

    @property
    def benign_categories(self) -> tuple[str, ...]:
        """The benign categories this config generates: BENIGN_CATEGORIES, plus the shared-vocabulary ones if on."""
        return BENIGN_CATEGORIES + (SHARED_VOCABULARY_CATEGORIES if self.shared_vocabulary else ())

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        # False is left out of the dump, so the original demo dumps exactly as before the field existed: its manifests
        # (and the oracle's) from existing builds stay valid and reusable.
        out = handler(self)
        if not self.shared_vocabulary:
            out.pop("shared_vocabulary", None)
        return out

    @model_validator(mode="after")
    def _check(self) -> DemoConfig:
        unknown = [c for c in self.contaminated_categories if c not in HARMFUL_CATEGORIES]
        if unknown:
            raise ValueError(f"contaminated_categories {unknown} are not harmful categories {list(HARMFUL_CATEGORIES)}")
        if len(set(self.contaminated_categories)) != len(self.contaminated_categories):
            raise ValueError("contaminated_categories has duplicates")
        if self.hidden_size % self.n_head:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_head {self.n_head}")
        if self.sft.max_seq_len_tokens > self.max_position_tokens:
            raise ValueError("sft.max_seq_len_tokens exceeds max_position_tokens")
        return self

"""The evaluation config: which judge, how many tokens, which device. Dumped into manifests and cache keys.

Knows about pydantic; knows nothing about files or models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    """Before/after evaluation (lancet_core.evaluate.evaluation): same prompts, same (greedy) decoding on both models."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    judge: Literal["refusal"] = Field("refusal", description="judge of harmful answers and of over-refusal")
    max_new_tokens: int = Field(48, ge=1, description="generated tokens per answer (greedy decoding)")
    generation_batch_size: int = Field(32, ge=1, description="prompts per generate() call")
    nll_batch_size: int = Field(16, ge=1, description="benign (prompt, response) rows per NLL forward")
    max_seq_len_tokens: int = Field(512, ge=8, description="NLL rows longer than this are cut on the right")
    dtype: Literal["float32", "float64", "bfloat16"] = Field("float32", description="evaluation dtype")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' = cuda when available, else cpu")

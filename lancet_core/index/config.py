"""IndexConfig: every setting of the influence index (projected per-example gradients + curvature), frozen.

The config is dumped into the gradient store's manifest and into task cache keys. `store_identity()` is the part that
determines the stored vectors (a store is refused when it differs); the batch size and the curvature settings are not
part of it, because they do not change the stored gradients.

`response_tokens='auto'` (the default) is resolved by `resolve_window(cfg, judge_kind)` before a store is built: the
window follows the behaviour being traced (refusal judge -> the first 4 tokens; others -> the whole response). A
store, its manifest and every artifact key hold the resolved value; `store_identity()` refuses an unresolved 'auto'.

Knows nothing about models, files or tensors; knows judges only by their kind's name.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lancet_core.errors import ConfigError

CurvatureKind = Literal["linfac", "kfac", "ekfac", "identity"]

# judge kinds whose verdict is decided in the first response tokens -> the window 'auto' resolves to for them; every
# other judge kind (content judges: regex, classifier, registered ones) -> None, the whole response
DECISION_WINDOWS: dict[str, int] = {"refusal": 4}


class IndexConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target_modules: tuple[str, ...] | None = Field(
        None,
        description="fnmatch patterns on module names (e.g. '*.mlp.c_fc'); None = every nn.Linear / GPT-2 Conv1D "
        "inside the transformer blocks (lm_head and embeddings are never targets).",
    )
    proj_in_dim: int | None = Field(
        16,
        ge=1,
        description="k_in: projected size of each module's input activations; None = no projection (full d_in). 16 "
        "(with PCA) chosen on ten demo beds: 8 loses, 32 does not gain and costs 4x the bytes (docs/measurements.md, "
        "Recall quality).",
    )
    proj_out_dim: int | None = Field(
        16,
        ge=1,
        description="k_out: projected size of each module's output gradients; None = no projection (full d_out).",
    )
    projection: Literal["random", "pca"] = Field(
        "pca",
        description="Projection of each side: 'pca' (default) = the top-k eigenvectors of the module's Kronecker "
        "factors A (inputs) and S (output gradients), from one pass over `projection_sample_rows` rows spread over "
        "the corpus (LoGra; lancet_core.index.basis), saved as basis.npz in the store and digested in its manifest; "
        "k is capped at the module's size. 'random' = seeded Gaussian matrices (Johnson-Lindenstrauss; the previous "
        "default). PCA was chosen on ten demo beds: kfac precision@planted 0.820 vs 0.782, better on 9 of 10, same "
        "bytes per row (docs/measurements.md, Recall quality).",
    )
    projection_sample_rows: int = Field(
        512, ge=1, description="Rows (evenly spaced over tokens.parquet) whose factors give the 'pca' basis."
    )
    projection_seed: int = Field(0, ge=0, description="Seed of the Gaussian projection matrices (per module and side).")
    dtype: Literal["float16", "float32", "int8"] = Field(
        "float16", description="Storage type of the gradient vectors; int8 stores a per-row scale = absmax/127."
    )
    reduction: Literal["mean", "sum"] = Field(
        "mean", description="log π(y|x) as the mean (default) or the sum of the response tokens' log-probabilities."
    )
    response_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto",
        description="log π(y|x) counts only the first k response tokens; None = every response token. 'auto' "
        "(default) = the window follows the judge of the behaviour being traced (resolve_window, before any store "
        "is built; a store always records the resolved value): the refusal judge -> 4, the decision tokens where a "
        "chat model commits to complying or refusing, so rows are matched on that decision rather than on answer "
        "wording shared with harmless rows (ten demo beds: 0.82 vs 0.47 mean precision@planted over the whole "
        "response); any other judge (regex, classifier, registered kinds) -> None, because such behaviours are "
        "content that can sit anywhere in the answer (a fixed odd answer, a wrong fact: on the fidelity bed the "
        "4-token window drops planted P@10 from 1.0 to 0.3; docs/measurements.md, Fidelity).",
    )
    batch_size: int = Field(8, ge=1, description="Examples per batched forward/backward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where the gradients are extracted: auto = CUDA when present, else CPU. Not part of the store "
        "identity (like the batch size it changes float32 rounding, not what is stored); recorded in the manifest's "
        "build_settings. A Ray shard task requests one GPU when the cluster has one.",
    )
    max_seq_len_tokens: int = Field(
        1024, ge=2, description="Longer token rows are refused (tokenize with the same or a smaller limit)."
    )
    rows_per_shard: int = Field(4096, ge=1, description="Rows per shard-NNNNN.parquet file (the last may be shorter).")
    compute_dtype: Literal["float32", "float64"] = Field(
        "float32", description="Dtype of the model and projections during extraction (float64 for oracle tests)."
    )
    curvature: tuple[CurvatureKind, ...] = Field(
        ("kfac",),
        description="Curvature kinds built with the store (kfac: what recall's method 'auto' uses for the refusal "
        "target without benign prompts; 'auto' otherwise resolves to identity or linfac, which need no factors). "
        "kfac/ekfac need per-token factors collected during the build, so they must be listed here; linfac and "
        "identity can also be built later from the store.",
    )
    fisher: Literal["empirical", "true"] = Field(
        "empirical",
        description="Output-gradient factor S of kfac/ekfac: 'empirical' = from the training labels' gradients; "
        "'true' = from labels sampled from the model's own distribution (true Fisher / Gauss-Newton; one more "
        "forward/backward pass per batch during the build). The stored gradients are the same either way. Empirical "
        "stays the default: the true Fisher was within ±0.007 on the demo beds measured and no closer to exact "
        "Gauss-Newton influence on the fidelity bed.",
    )
    damping_ratio: float = Field(
        0.1, gt=0, description="Damping λ = damping_ratio × mean eigenvalue of each curvature block."
    )

    @model_validator(mode="after")
    def _check(self) -> IndexConfig:
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise ValueError("target_modules must be None (default selection) or a non-empty tuple of patterns")
        if len(set(self.curvature)) != len(self.curvature):
            raise ValueError(f"curvature lists a kind twice: {self.curvature}")
        return self

    @property
    def collect_kronecker_factors(self) -> bool:
        return "kfac" in self.curvature or "ekfac" in self.curvature

    def require_resolved(self) -> IndexConfig:
        """self, or ConfigError when response_tokens is still 'auto' (a store needs the concrete window)."""
        if self.response_tokens == "auto":
            raise ConfigError(
                "index.response_tokens='auto' is not resolved: the window follows the judge, so resolve it with "
                "resolve_window(cfg, judge_kind) (the realign flow and `lancet index --judge` do) or set an integer "
                "or None"
            )
        return self

    def store_identity(self) -> dict:
        """The settings that determine the stored vectors; a store built with other values is refused. Needs a
        resolved window (never 'auto': the identity, the manifest and artifact keys hold the concrete value)."""
        d = self.require_resolved().model_dump(mode="json")
        for k in ("batch_size", "curvature", "damping_ratio", "device"):
            d.pop(k)
        d["collect_kronecker_factors"] = self.collect_kronecker_factors
        # settings added later appear only when they change the stored data, so existing stores stay valid
        if not self.collect_kronecker_factors or self.fisher == "empirical":
            d.pop("fisher")  # only the collected factors depend on it
        if self.projection == "random":
            d.pop("projection")
            d.pop("projection_sample_rows")
        else:
            d.pop("projection_seed")
        return d


def resolve_window(cfg: IndexConfig, judge_kind: str) -> IndexConfig:
    """`cfg` with response_tokens='auto' replaced by the window of the behaviour `judge_kind` traces (DECISION_WINDOWS:
    refusal -> 4; any other kind -> None, the whole response); a concrete window is kept as given."""
    if cfg.response_tokens != "auto":
        return cfg
    return cfg.model_copy(update={"response_tokens": DECISION_WINDOWS.get(judge_kind)})


def describe_window(cfg: IndexConfig, judge_kind: str) -> str:
    """One line saying which window a store is built with and why, e.g. 'window = first 4 response tokens (refusal
    judge)'; `cfg` is the configuration as given (the window may be 'auto')."""
    k = resolve_window(cfg, judge_kind).response_tokens
    what = "whole response" if k is None else f"first {k} response tokens"
    why = f"{judge_kind} judge" if cfg.response_tokens == "auto" else "set explicitly"
    return f"window = {what} ({why})"

"""Per-example projected gradients of the response log-likelihood from ONE batched forward/backward pass.

Sign convention (stated once, here): the stored vector is g = ∇θ log π(y|x), the gradient of the response
LOG-LIKELIHOOD (not of the loss). With I(i, q) = v_qᵀ g_i and v_q = (F + λI)⁻¹ g_q, a positive influence means a
gradient step on training row i raises log π of the (undesirable) query output.

log π(y|x) = Σ_t m_t log p(x_t | x_<t) over response tokens (loss_mask m_t = 1), divided by Σ_t m_t for
reduction="mean" (default). With `response_tokens=k` only the first k response tokens count (the "decision" tokens
where a chat model commits to complying or refusing; see IndexConfig.response_tokens); None counts them all. Prompt
tokens contribute no log-probability terms; their activations still carry gradient because the response depends on
them through attention, exactly as in a single-example backward() (the oracle).
Right padding: padded positions have zero output-gradient (causal attention, no loss there) and are also masked.

For every target module (nn.Linear or GPT-2 Conv1D), a forward hook projects the input activations ã_t = P_inᵀ a_t and a
tensor hook on the module output projects the output gradient δ̃_t = P_outᵀ δ_t; the per-example block is
Σ_t δ̃_t ã_tᵀ (one batched matmul), = P_outᵀ G P_in with G = Σ_t δ_t a_tᵀ, never forming G. The batched objective is
the SUM over examples of their log-likelihoods, so each example's δ is its own gradient. Parameter gradients are
switched off during extraction (only activation gradients are needed), and bias parameters are not part of the
vector. Optionally accumulates the per-token Kronecker factors A = Σ_t ã ãᵀ and S = Σ_t δ̃ δ̃ᵀ for kfac/ekfac
(fisher='true': S from a second backward pass with labels sampled from the model, `sample_labels`). The projection
matrices are the seeded Gaussian ones (lancet_core.index.projection) or a given basis (PCA, lancet_core.index.basis).

Knows about torch modules and token tensors; knows nothing about files, stores or curvature.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lancet_core.index.projection import ModuleLayout
from lancet_core.model_io import autocast_context

_BLOCK_RE = re.compile(r"(^|\.)(h|layers|layer|blocks|block)\.\d+\.")
_NEVER = ("lm_head", "embed", "wte", "wpe")


def _is_linear_like(m: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, nn.Linear | Conv1D)


def _dims(m: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear (weight d_out × d_in) or a Conv1D (weight d_in × d_out)."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return m.weight.shape[0], m.weight.shape[1]


def weight_grad_out_in(m: nn.Module) -> torch.Tensor:
    """A module's weight .grad in d_out × d_in orientation (transposes GPT-2 Conv1D). Used by oracles."""
    g = m.weight.grad
    return g if isinstance(m, nn.Linear) else g.T


def select_target_modules(model: nn.Module, patterns: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Target modules in model order. Default: every Linear/Conv1D inside the transformer blocks."""
    out = []
    for name, m in model.named_modules():
        if not _is_linear_like(m) or any(x in name for x in _NEVER):
            continue
        if patterns is None:
            ok = bool(_BLOCK_RE.search(name))
        else:
            ok = any(fnmatch.fnmatchcase(name, p) for p in patterns)
        if ok:
            out.append((name, m))
    if not out:
        raise ValueError(f"no target modules matched {list(patterns) if patterns else 'the default selection'}")
    return out


def build_layout(
    model: nn.Module,
    patterns: Sequence[str] | None,
    k_in: int | None,
    k_out: int | None,
    cap_at_dims: bool = False,
) -> list[ModuleLayout]:
    """Per-module layout; `cap_at_dims` caps k at the module's size (a PCA basis has at most d directions)."""
    layout, off = [], 0
    for name, m in select_target_modules(model, patterns):
        d_in, d_out = _dims(m)
        ki, ko = k_in, k_out
        if cap_at_dims:
            ki = None if ki is None else min(ki, d_in)
            ko = None if ko is None else min(ko, d_out)
        ml = ModuleLayout(name, d_in, d_out, ki, ko, off)
        layout.append(ml)
        off += ml.size
    return layout


def right_pad(
    rows_ids: Sequence[Sequence[int]], rows_mask: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, loss_mask) tensors [B, T], right-padded to the longest row."""
    width = max(len(r) for r in rows_ids)
    b = len(rows_ids)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    lm = torch.zeros((b, width), dtype=torch.long)
    for j, (r, m) in enumerate(zip(rows_ids, rows_mask, strict=True)):
        n = len(r)
        ids[j, :n] = torch.as_tensor(r, dtype=torch.long)
        attn[j, :n] = 1
        lm[j, :n] = torch.as_tensor(m, dtype=torch.long)
    return ids, attn, lm


def sequence_loglik(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, attention_mask: torch.Tensor, reduction: str
) -> torch.Tensor:
    """[B] response log-likelihood per example (position t predicts token t+1; counted where loss_mask[t+1] = 1)."""
    m = (loss_mask[:, 1:] * attention_mask[:, 1:]).to(logits.dtype)
    lp = -nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, T-1]
    ll = (lp * m).sum(1)
    if reduction == "mean":
        n = m.sum(1)
        if bool((n == 0).any()):
            raise ValueError("an example has no response tokens: its mean log-likelihood is undefined")
        ll = ll / n
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return ll


def sample_labels(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """input_ids with every position t >= 1 replaced by a label drawn from the model's p(· | x_<t) (the true Fisher's
    labels; Martens & Grosse 2015). Position 0 and padding keep their ids. Seeded by the rows' own tokens, so a batch
    draws the same labels on any run."""
    seed = int.from_bytes(hashlib.sha256(input_ids.numpy().tobytes()).digest()[:8], "little") & ((1 << 63) - 1)
    gen = torch.Generator().manual_seed(seed)
    b, t, v = logits.shape
    probs = torch.softmax(logits[:, :-1].double(), dim=-1).reshape(-1, v)
    draws = torch.multinomial(probs, 1, generator=gen).reshape(b, t - 1)
    out = input_ids.clone()
    keep = attention_mask[:, 1:] != 0
    out[:, 1:] = torch.where(keep, draws, input_ids[:, 1:])
    return out


def _check_window(response_tokens: int | None) -> None:
    if response_tokens is not None and response_tokens < 1:
        raise ValueError(f"response_tokens must be >= 1 or None, got {response_tokens}")


def response_window(loss_mask: torch.Tensor, response_tokens: int | None) -> torch.Tensor:
    """[B, T] loss mask keeping only each row's first `response_tokens` response tokens (None: the mask unchanged)."""
    _check_window(response_tokens)
    if response_tokens is None:
        return loss_mask
    m = loss_mask != 0
    return (m & (m.cumsum(dim=1) <= response_tokens)).to(loss_mask.dtype)


class ProjectedGradientExtractor:
    """Hooks a model's target modules and returns per-example projected gradients for token batches.

    Use as a context manager (hooks and requires_grad are restored on exit), then call `batch_gradients`.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: Sequence[ModuleLayout],
        seed: int,
        reduction: str = "mean",
        collect_kronecker_factors: bool = False,
        response_tokens: int | None = None,
        basis: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
        fisher: str = "empirical",
        per_example: bool = True,
        autocast: str = "off",
    ):
        _check_window(response_tokens)  # at construction, not at the first batch
        if fisher not in ("empirical", "true"):
            raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
        if not per_example and not collect_kronecker_factors:
            raise ValueError("per_example=False only makes sense when collecting the Kronecker factors")
        self.autocast = autocast  # bf16 autocast of the forward pass (lancet_core.model_io.autocast_context)
        self.model = model
        self.fisher = fisher
        self.per_example = per_example
        self._phase = "empirical"
        self.response_tokens = response_tokens
        self.layout = list(layout)
        self.dim = sum(ml.size for ml in self.layout)
        self.reduction = reduction
        self.collect = collect_kronecker_factors
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device  # inputs and projections follow the model (CPU or CUDA)
        modules = dict(model.named_modules())
        self._modules = []
        for ml in self.layout:
            if ml.name not in modules:
                raise ValueError(f"target module {ml.name!r} not found in the model")
            m = modules[ml.name]
            if _dims(m) != (ml.d_in, ml.d_out):
                raise ValueError(f"module {ml.name!r} has dims {_dims(m)}, layout expects {(ml.d_in, ml.d_out)}")
            if basis is None:
                p_in, p_out = (None if p is None else p.to(self.device) for p in ml.matrices(seed, self.dtype))
            else:
                if ml.name not in basis:
                    raise ValueError(f"the projection basis has no matrices for module {ml.name!r}")
                p_in, p_out = (None if p is None else torch.as_tensor(p).to(self.device, self.dtype)
                               for p in basis[ml.name])  # fmt: skip
                for side, p, d, k in (("in", p_in, ml.d_in, ml.k_in), ("out", p_out, ml.d_out, ml.k_out)):
                    if (p is None) != (k is None) or (p is not None and tuple(p.shape) != (d, k)):
                        got = None if p is None else tuple(p.shape)
                        raise ValueError(f"module {ml.name!r}: basis '{side}' matrix is {got}, layout expects {(d, k)}")
            self._modules.append((ml, m, p_in, p_out))
        # Kronecker factor sums over non-padding tokens, in float64: name -> (A [k_in,k_in], S [k_out,k_out]).
        self.factor_sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.factor_tokens = 0
        self._handles: list = []
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._acts: dict[str, torch.Tensor] = {}
        self._blocks: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self.reset_factors()

    def reset_factors(self) -> None:
        self.factor_tokens = 0
        self.factor_sums = {}
        if self.collect:
            for ml, *_ in self._modules:
                self.factor_sums[ml.name] = (
                    torch.zeros(ml.eff_in, ml.eff_in, dtype=torch.float64),
                    torch.zeros(ml.eff_out, ml.eff_out, dtype=torch.float64),
                )

    # hooks -------------------------------------------------------------------------------------------------------
    def _make_hook(self, ml: ModuleLayout, p_in: torch.Tensor | None, p_out: torch.Tensor | None):
        name = ml.name

        def fwd(module, args, output):
            if not torch.is_grad_enabled():
                return
            if name in self._acts:
                raise RuntimeError(f"module {name} ran twice in one forward pass; not supported (no checkpointing)")
            phase = self._phase
            if phase == "empirical":
                # under bf16 autocast activations and output gradients arrive in bf16: projections, per-example
                # blocks and Kronecker factors are computed in the model's dtype (float32), never in bf16
                a = args[0].detach().to(self.dtype)
                with torch.autocast(a.device.type, enabled=False):
                    at = a @ p_in if p_in is not None else a  # [B, T, k_in]
                    at = at * self._mask.unsqueeze(-1)
                self._acts[name] = at
            else:
                self._acts[name] = None  # the sampled-label pass only needs δ (for S)

            def on_grad(grad: torch.Tensor):
                grad = grad.to(self.dtype)
                dt = grad @ p_out if p_out is not None else grad  # [B, T, k_out]
                act = self._acts.pop(name)
                if phase == "empirical" and self.per_example:
                    self._blocks[name] = dt.transpose(1, 2) @ act  # Σ_t δ̃_t ã_tᵀ per example, [B, k_out, k_in]
                elif phase == "empirical":
                    self._blocks[name] = None
                if self.collect:
                    A, S = self.factor_sums[name]
                    if phase == "empirical":
                        flat = act.reshape(-1, act.shape[-1])
                        A += (flat.T @ flat).double().cpu()  # [k, k]: the sums stay on the host, in float64
                    if phase == ("true" if self.fisher == "true" else "empirical"):
                        mdt = (dt * self._mask.unsqueeze(-1)).reshape(-1, dt.shape[-1])
                        S += (mdt.T @ mdt).double().cpu()

            output.register_hook(on_grad)

        return fwd

    def _embed_requires_grad(self, module, args, output):
        if torch.is_grad_enabled():
            return output.requires_grad_()
        return output

    def __enter__(self) -> ProjectedGradientExtractor:
        self._saved_requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._saved_requires_grad:
            p.requires_grad_(False)
        emb = self.model.get_input_embeddings()
        self._handles.append(emb.register_forward_hook(self._embed_requires_grad))
        for ml, m, p_in, p_out in self._modules:
            self._handles.append(m.register_forward_hook(self._make_hook(ml, p_in, p_out)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, rg in self._saved_requires_grad:
            p.requires_grad_(rg)
        self._acts.clear()
        self._blocks.clear()

    # extraction --------------------------------------------------------------------------------------------------
    def batch_gradients(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """[B, D] projected per-example gradients of log π(y|x) (model dtype), in layout order (None when the
        extractor only collects factors, per_example=False). With fisher='true' the S factor comes from a second
        backward pass whose labels are sampled from the model (`sample_labels`); the returned gradients stay the
        empirical ones."""
        if not self._handles:
            raise RuntimeError("use ProjectedGradientExtractor as a context manager")
        self._acts.clear()
        self._blocks.clear()
        input_ids, attention_mask, loss_mask = (t.to(self.device) for t in (input_ids, attention_mask, loss_mask))
        self._mask = attention_mask.to(self.dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            window = response_window(loss_mask, self.response_tokens)
            self._phase = "empirical"
            with torch.enable_grad():
                with autocast_context(input_ids.device, self.autocast):
                    out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                ll = sequence_loglik(out.logits.to(self.dtype), input_ids, window, attention_mask, self.reduction)
                del out
                ll.sum().backward()
            missing = [ml.name for ml, *_ in self._modules if ml.name not in self._blocks]
            if missing:
                raise RuntimeError(f"no gradient reached modules {missing}")
            if self.collect and self.fisher == "true":
                self._phase = "true"
                with torch.enable_grad():
                    with autocast_context(input_ids.device, self.autocast):
                        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                    logits = out.logits.to(self.dtype)
                    sampled = sample_labels(logits.detach(), input_ids, attention_mask)
                    ll = sequence_loglik(logits, sampled, window, attention_mask, self.reduction)
                    del out, logits
                    ll.sum().backward()
            if self.collect:
                self.factor_tokens += int(attention_mask.sum())
            if not self.per_example:
                return None
            b = input_ids.shape[0]
            return torch.cat([self._blocks[ml.name].reshape(b, -1) for ml, *_ in self._modules], dim=1).cpu()
        finally:
            self._acts.clear()
            self._blocks.clear()
            self._mask = None
            self._phase = "empirical"
            self.model.train(was_training)


def extract_contextless(
    model: nn.Module,
    layout: Sequence[ModuleLayout],
    seed: int,
    reduction: str,
    rows_ids: Sequence[Sequence[int]],
    rows_mask: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    response_tokens: int | None = None,
) -> torch.Tensor:
    """Convenience: [N, D] gradients for token rows, batched (hooks installed and removed here)."""
    outs = []
    with ProjectedGradientExtractor(model, layout, seed, reduction, response_tokens=response_tokens) as ex:
        for i in range(0, len(rows_ids), batch_size):
            ids, attn, lm = right_pad(rows_ids[i : i + batch_size], rows_mask[i : i + batch_size], pad_id)
            outs.append(ex.batch_gradients(ids, attn, lm))
    return torch.cat(outs) if outs else torch.zeros(0, sum(ml.size for ml in layout))

"""Post-train a causal LM with any loss of the registry (ibo, ga, npo, dpo): one trainer, the loss chosen by config.

`post_train(model_dir, pairs_path, retain_path, out_dir, cfg)` loads the model and a frozen reference θ_s (a copy for
full fine-tuning; the same weights with the LoRA adapter disabled for LoRA), encodes pairs.parquet / retain.parquet
with `lancet_core.chat.encode_example` (loss mask = response tokens), and runs seeded micro-batches with gradient
accumulation. Each optimizer step takes the next `batch_size × grad_accum_steps` examples of a seeded per-epoch
permutation and `retain_batch_size × (micro-batches)` retain rows from a seeded cycling stream, and divides every sum by
the step's counts, so the split into micro-batches does not change the update. Within a micro-batch, pairs (chosen +
rejected together) and retain rows go through in chunks of `chunk_rows` sequences, each backpropagated before the next
chunk's forward pass, so a step's peak memory is one chunk's, whatever the batch sizes; `memory_budget_gb` picks the
chunk and gradient checkpointing before the first step (`correct.memory`; `preflight_memory` checks it from the config
alone). LoRA weights are merged before saving, so the output is a plain HF model directory (weights + tokenizer + manifest.json), published with
`manifest.publishing_dir` like every artifact (a concurrent identical run's copy is kept, never a collision).

What each loss trains on: ibo/dpo — every pair (chosen = w, rejected = l, each on its own prompt) with its weight;
ga/npo — the distinct rejected rows (R⁺) with weight 1, as in their papers.
With `response_tokens = K` (the decision window: K = 4 for the refusal judge by default, resolved with the judge by
`correct.config.resolve_train`) the loss mask of every pair sequence and of every retain row keeps only its first K
response tokens (the index's `response_window`), so Δ and the retain KL both act where the answer decides to refuse
or comply. `cfg` must be resolved (no 'auto' left).

Knows about HF causal LMs, PEFT, torch optimisers and the pairs/retain file formats; knows nothing about influence
computation, judges or orchestration. Deterministic on CPU for a given seed.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lancet_core.chat import encode_example
from lancet_core.correct.budget import BudgetChecks, BudgetController
from lancet_core.correct.config import TrainConfig
from lancet_core.correct.losses import (
    LossSpec,
    get_loss,
    retain_accumulation_loss,
    retain_kl_from_models,
    sequence_logprobs,
)
from lancet_core.correct.memory import ALLOCATOR_SLACK, MemoryPlan, ModelShape, choose_plan
from lancet_core.correct.pairs import read_pairs, read_retain
from lancet_core.errors import ConfigError, CorpusError
from lancet_core.manifest import (
    MANIFEST_NAME,
    artifact_problems,
    check_manifest,
    file_digest,
    library_versions,
    publishing_dir,
    read_manifest,
    write_manifest,
)
from lancet_core.model_io import (
    autocast_context,
    load_model,
    load_tokenizer,
    model_digest,
    resolve_device,
    tokenizer_digest,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class _Seq:
    input_ids: list[int]
    loss_mask: list[int]


@dataclass(frozen=True)
class _Example:
    rejected: _Seq
    chosen: _Seq | None
    weight: float


def _encode(tokenizer, prompt: str, response: str, max_len: int, what: str, window: int | None = None) -> _Seq:
    """Token ids and loss mask of one (prompt, response); with `window`, the mask keeps the first `window` response
    tokens only (the decision window)."""
    enc = encode_example(tokenizer, prompt, response, max_len)
    if sum(enc.loss_mask[1:]) == 0:
        raise CorpusError(
            f"{what}: no response token left after encoding (max_seq_len_tokens={max_len}); "
            "raise max_seq_len_tokens or shorten the prompt"
        )
    if window is None:
        return _Seq(enc.input_ids, enc.loss_mask)
    from lancet_core.index.hooks import response_window  # the store's window rule, reused

    return _Seq(enc.input_ids, response_window(torch.tensor([enc.loss_mask]), window)[0].tolist())


def _examples(pairs, spec: LossSpec, tokenizer, max_len: int, source: str, window: int | None = None) -> list[_Example]:
    rows = pairs.to_pylist()
    out: list[_Example] = []
    if spec.needs_chosen:
        for i, r in enumerate(rows):
            where = f"{source} row {i} (pair_id {r['pair_id']!r})"
            out.append(
                _Example(
                    rejected=_encode(tokenizer, r["rejected_prompt"], r["rejected_response"], max_len, where, window),
                    chosen=_encode(tokenizer, r["chosen_prompt"], r["chosen_response"], max_len, where, window),
                    weight=float(r["weight"]),
                )
            )
        return out
    seen: set[str] = set()
    for i, r in enumerate(rows):
        if r["rejected_id"] in seen:
            continue
        seen.add(r["rejected_id"])
        where = f"{source} row {i} (rejected_id {r['rejected_id']!r})"
        out.append(
            _Example(_encode(tokenizer, r["rejected_prompt"], r["rejected_response"], max_len, where, window), None, 1.0)
        )
    return out


def _collate(seqs: list[_Seq], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(s.loss_mask)
    return ids.to(device), attn.to(device), mask.to(device)


class _AdapterDisabled:
    """Calls a PEFT model with its adapter disabled: the frozen reference θ_s without a second copy of the weights."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)

    def get_base_model(self):
        return self.peft_model.get_base_model()


def _zero_dropout(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # Llama-style functional attention dropout
            m.attention_dropout = 0.0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _step_plan(n_examples: int, cfg: TrainConfig, limit: int | None = None) -> list[list[int]]:
    """Example indices of every optimizer step: consecutive chunks of seeded per-epoch permutations. `limit` (budget
    training's step cap) replaces epochs / max_steps; the first steps are the same either way."""
    eff = cfg.batch_size * cfg.grad_accum_steps
    cap = limit if limit is not None else cfg.max_steps
    steps: list[list[int]] = []
    epoch = 0
    while True:
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n_examples).tolist()
        for a in range(0, n_examples, eff):
            steps.append(order[a : a + eff])
            if cap is not None and len(steps) == cap:
                return steps
        epoch += 1
        if cap is None and epoch == cfg.epochs:
            return steps


class _RetainStream:
    """Seeded cycling stream of retain-row indices (a fresh permutation each pass)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.cycle, self.buf = n, seed, 0, []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.buf:
                self.buf = np.random.default_rng([self.seed, 7919, self.cycle]).permutation(self.n).tolist()
                self.cycle += 1
            out.append(self.buf.pop(0))
        return out


def _tied_to_embeddings(model) -> set[int]:
    """Storage pointers of the input/output embedding weights (and anything tied to them)."""
    ptrs = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        emb = getattr(model, get, lambda: None)()
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor):
            ptrs.add(w.untyped_storage().data_ptr())
    return ptrs


def lora_target_modules(model) -> tuple[str, ...]:
    """The modules LoRA adapts when TrainConfig.lora_target_modules is None.

    The same set the influence gradients are taken on (`lancet_core.index.hooks.select_target_modules`): every
    nn.Linear / GPT-2 Conv1D inside the transformer blocks — q/k/v/o_proj + gate/up/down_proj on Llama and Qwen,
    c_attn/c_proj/c_fc on GPT-2, query_key_value/dense/dense_h_to_4h/dense_4h_to_h on GPT-NeoX — and never the LM
    head or an embedding: modules named so are skipped, and so is any module whose weight shares storage with the
    input or output embeddings, tied or not (merging an adapter into a tied head would rewrite the embeddings too).

    Returned as the short names PEFT matches by suffix ("q_proj", ...) when those match exactly the chosen modules,
    else as full module names. Raises ValueError when the model has no such layer (name them in lora_target_modules).
    """
    from lancet_core.index.hooks import select_target_modules

    try:
        chosen = select_target_modules(model)
    except ValueError:
        raise ValueError(
            f"{type(model).__name__}: no linear layer found inside numbered transformer blocks; "
            "name the modules to adapt in TrainConfig.lora_target_modules"
        ) from None
    embeddings = _tied_to_embeddings(model)
    full = [n for n, m in chosen if m.weight.untyped_storage().data_ptr() not in embeddings]
    if not full:
        raise ValueError(f"{type(model).__name__}: every candidate LoRA target shares weights with the embeddings")
    short = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in full))
    # PEFT adapts a module when its name equals a target or ends with "." + target: short names are safe only when
    # they catch exactly the chosen modules.
    caught = {n for n, _ in model.named_modules() if any(n == s or n.endswith("." + s) for s in short)}
    return tuple(short) if caught == set(full) else tuple(full)


def _config_int(cfg, *names: str, default: int | None = None) -> int | None:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def model_shape(model, cfg: TrainConfig) -> ModelShape:
    """The model's dimensions (from its config; Llama, GPT-2 and GPT-NeoX names) and parameter counts; the trainable
    count is LoRA's r·(in + out) per adapted module for finetune='lora', every parameter for 'full'."""
    mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    emb = model.get_input_embeddings().weight
    hidden = _config_int(mc, "hidden_size", "n_embd", "d_model", default=int(emb.shape[1]))
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.finetune == "lora":
        if cfg.lora_target_modules:
            targets = cfg.lora_target_modules
        elif emb.is_meta:  # no storages to tell tied weights apart: the block linears (the LM head is never one)
            from lancet_core.index.hooks import select_target_modules

            targets = tuple(n for n, _ in select_target_modules(model))
        else:
            targets = lora_target_modules(model)
        n_trainable = sum(cfg.lora_rank * sum(m.weight.shape) for n, m in model.named_modules()
                          if any(n == t or n.endswith("." + t) for t in targets) and hasattr(m, "weight"))
    else:
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = _config_int(mc, "num_hidden_layers", "n_layer", "num_layers")
    if layers is None:
        from lancet_core.index.hooks import select_target_modules

        layers = len({n.rsplit(".", 2)[0] for n, _ in select_target_modules(model)}) or 1
    return ModelShape(
        layers=layers, hidden=hidden,
        intermediate=_config_int(mc, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        heads=_config_int(mc, "num_attention_heads", "n_head", default=1),
        vocab=int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None
        else int(emb.shape[0]),
        n_params=n_params, n_trainable=n_trainable, param_bytes=emb.element_size())


def memory_plan(model, cfg: TrainConfig, spec: LossSpec, examples: list[_Example], retain_seqs: list[_Seq],
                device) -> MemoryPlan:
    """chunk_rows and gradient checkpointing for this run: as configured, or (train.memory_budget_gb) the largest
    chunk, without checkpointing first, whose estimated step fits the budget (correct.memory.choose_plan)."""
    if cfg.memory_budget_gb is None:
        return MemoryPlan(cfg.chunk_rows, cfg.gradient_checkpointing)
    seqs = [s for e in examples for s in (e.rejected, e.chosen) if s is not None] + list(retain_seqs)
    per_example = 2 if spec.needs_chosen else 1
    return choose_plan(
        model_shape(model, cfg),
        budget_gb=cfg.memory_budget_gb,
        chunk_rows=cfg.chunk_rows,
        max_rows=max(per_example * cfg.batch_size, (cfg.retain_batch_size or cfg.batch_size) if retain_seqs else 0),
        min_rows=per_example,
        gradient_checkpointing=cfg.gradient_checkpointing,
        can_checkpoint=bool(getattr(model, "supports_gradient_checkpointing", False)),
        seq_len=max(len(s.input_ids) for s in seqs),
        response_positions=max(sum(s.loss_mask[1:]) for s in seqs),
        eager_attention=device.type == "cpu",
        adam=cfg.optimizer == "adamw",
        reference_copy=cfg.finetune == "full" and (spec.needs_reference or cfg.lambda_b > 0),
        slack=ALLOCATOR_SLACK.get(device.type, ALLOCATOR_SLACK["cpu"]),
    )


def preflight_memory(model_dir: str | Path, cfg: TrainConfig) -> MemoryPlan:
    """train.memory_budget_gb checked before a run, from the model's config alone (no weights are read): the plan
    `post_train` would pick for rows of max_seq_len_tokens tokens (the longest it keeps; it plans again on the real
    rows), or the one-line ValueError it would raise. Without a budget, the configuration as is. `cfg` resolved."""
    cfg.require_resolved()
    if cfg.memory_budget_gb is None:
        return MemoryPlan(cfg.chunk_rows, cfg.gradient_checkpointing)
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = get_loss(cfg.loss)
    mc = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mc, dtype=_DTYPES[cfg.dtype])
    n = cfg.max_seq_len_tokens
    row = _Seq([0] * n, [0] + [1] * (n - 1) if cfg.response_tokens is None else [0] + [1] * min(cfg.response_tokens,
                                                                                               n - 1))
    retain = [row] if cfg.lambda_b > 0 else []
    return memory_plan(model, cfg, spec, [_Example(row, row if spec.needs_chosen else None, 1.0)], retain,
                       resolve_device(cfg.device))


def _expected_manifest(model_dir: Path, pairs_path: Path, retain_path: Path | None, cfg: TrainConfig,
                       checks: BudgetChecks | None = None) -> dict:
    pairs_manifest = read_manifest(pairs_path.parent) or {}
    return {
        "budget_checks": None if checks is None else {**checks.identity, "limits": vars(checks.limits)},
        "kind": "post_train",
        "input_model_digest": model_digest(model_dir),
        "input_tokenizer_digest": tokenizer_digest(model_dir),
        "pairs_digest": file_digest(pairs_path),
        "retain_digest": file_digest(retain_path) if retain_path is not None else None,
        "influence_digest": pairs_manifest.get("influence_digest"),
        "config": cfg.model_dump(mode="json"),
    }


def post_train(
    model_dir: str | Path,
    pairs_path: str | Path,
    retain_path: str | Path | None,
    out_dir: str | Path,
    cfg: TrainConfig,
    *,
    show_progress: bool = True,
    checks: BudgetChecks | None = None,
) -> Path:
    """Train `model_dir` with `cfg.loss` on pairs.parquet (+ retain.parquet for the λ_B KL term); return out_dir.

    With `checks` (and cfg.budget.enabled) training is budget-driven (lancet_core.correct.budget): it goes on until
    the check prompts' harmful rate reaches the target or the utility budget is spent, up to max_steps_factor × the
    planned steps, and the best checkpoint inside the budget is saved; the curve goes into the manifest ("budget").
    Without, the fixed schedule (epochs / max_steps) runs and the last step is saved.

    A finished out_dir built from the same inputs and config is reused as is; one built otherwise is refused
    (ManifestMismatch).
    """
    t0 = time.perf_counter()
    cfg.require_resolved()  # 'auto' window / λ_B follow the judge: correct.config.resolve_train first
    model_dir, pairs_path, out_dir = Path(model_dir), Path(pairs_path), Path(out_dir)
    retain_path = Path(retain_path) if retain_path is not None else None
    spec = get_loss(cfg.loss)
    pairs = read_pairs(pairs_path)
    retain = read_retain(retain_path) if retain_path is not None else None
    if cfg.lambda_b > 0 and (retain is None or retain.num_rows == 0):
        raise ValueError(
            f"lambda_b={cfg.lambda_b} > 0 needs a non-empty retain set (got retain_path={retain_path}); "
            "pass retain.parquet or set lambda_b=0"
        )
    if checks is not None and not cfg.budget.enabled:
        checks = None
    expected = _expected_manifest(model_dir, pairs_path, retain_path, cfg, checks)
    existing = check_manifest(out_dir, expected)
    if existing is not None:
        broken = artifact_problems(out_dir)
        if not broken:
            log.info("post_train: %s already built from the same inputs; reusing it", out_dir)
            return out_dir
        log.info("post_train: %s is incomplete or damaged (%s); training it again", out_dir, broken[0])
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists, is not empty and has no {MANIFEST_NAME}; refusing to overwrite it")

    device = resolve_device(cfg.device)
    dtype = _DTYPES[cfg.dtype]
    _seed_everything(cfg.seed)
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = _examples(pairs, spec, tokenizer, cfg.max_seq_len_tokens, str(pairs_path), cfg.response_tokens)
    retain_seqs = []
    if cfg.lambda_b > 0 and retain is not None:
        for i, r in enumerate(retain.to_pylist()):
            where = f"{retain_path} row {i} (example_id {r['example_id']!r})"
            retain_seqs.append(_encode(tokenizer, r["prompt"], r["response"], cfg.max_seq_len_tokens, where,
                                       cfg.response_tokens))
    model = load_model(model_dir, dtype=dtype, eager_attention=device.type == "cpu").to(device)
    if cfg.disable_dropout:
        _zero_dropout(model)
    mem = memory_plan(model, cfg, spec, examples, retain_seqs, device)  # may raise: the budget cannot be met
    if cfg.memory_budget_gb is not None:
        log.info("post_train: memory_budget_gb=%g -> chunk_rows %s, gradient checkpointing %s (estimated %s)",
                 cfg.memory_budget_gb, mem.chunk_rows, mem.gradient_checkpointing, mem.estimate.describe())
    if mem.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} ({model_dir}) does not support "
                              "gradient checkpointing; set it to false")
        # non-reentrant: gradients reach LoRA adapters inside a block without inputs that require grad.
        # transformers renamed the switch (activation_checkpointing_enable, 5.2x); older 5.x has only the first name
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    need_ref = spec.needs_reference or cfg.lambda_b > 0
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(cfg.seed)
        lcfg = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules or lora_target_modules(model)),
            task_type="CAUSAL_LM",
            fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),  # GPT-2 stores weights transposed
        )
        policy = get_peft_model(model, lcfg)
        ref = _AdapterDisabled(policy) if need_ref else None
    else:
        policy = model
        ref = None
        if need_ref:
            ref = copy.deepcopy(model).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
    policy.train()

    params = [p for p in policy.parameters() if p.requires_grad]

    def optimizer():
        kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.SGD
        return kind(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    opt = optimizer()
    plan = _step_plan(len(examples), cfg)
    budget = None
    if checks is not None:
        budget = BudgetController(checks, planned_steps=len(plan))
        plan = _step_plan(len(examples), cfg, limit=budget.max_steps)
        budget.start(policy, tokenizer, params)
        log.info("post_train: budget check at step 0: harmful rate %.3f on %s check prompts (%.1f s)",
                 budget.curve[0]["harmful_rate"], checks.identity.get("n_check_prompts", "?"),
                 budget.curve[0]["seconds"])
        if budget.stop_reason:
            plan = []
    stream = _RetainStream(len(retain_seqs), cfg.seed) if retain_seqs else None
    retain_bs = cfg.retain_batch_size or cfg.batch_size
    per_example = 2 if spec.needs_chosen else 1  # sequences a pair (or a ga/npo row) forwards
    pair_chunk = max(1, mem.chunk_rows // per_example) if mem.chunk_rows else cfg.batch_size
    retain_chunk = mem.chunk_rows or retain_bs
    ref_logps = _ReferenceLogps(ref, spec, pad_id, device, keep=cfg.disable_dropout)
    history: list[dict] = []

    from tqdm.auto import tqdm

    bar = tqdm(plan, desc=f"post_train[{cfg.loss}]", unit="step", disable=not show_progress)
    for step, idx in enumerate(bar, start=1):
        t_step = time.perf_counter()
        lr = cfg.learning_rate * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.learning_rate
        lr *= budget.lr_scale if budget is not None else 1.0
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        micro = [idx[a : a + cfg.batch_size] for a in range(0, len(idx), cfg.batch_size)]
        ridx = stream.take(retain_bs * len(micro)) if stream is not None else []
        n_step, m_step = len(idx), len(ridx)
        tot = pref = kl = 0.0
        for k, mb in enumerate(micro):
            # every chunk of pairs, then every chunk of retain rows, is backpropagated before the next one's forward
            # pass (their gradients add up to the step loss's: a pair's term and a row's KL depend on their own
            # sequences only), so the peak holds one chunk's graph (train.chunk_rows sequences), whatever the batch
            for a in range(0, len(mb), pair_chunk):
                batch = [examples[i] for i in mb[a : a + pair_chunk]]
                weight = torch.tensor([e.weight for e in batch], dtype=dtype, device=device)
                with autocast_context(device, cfg.autocast):  # log-probs and KL are upcast to float32 in losses.py
                    terms = _micro_terms(policy, ref, spec, batch, ref_logps, pad_id, device)
                terms = spec.fn(**terms, beta=cfg.beta, weight=weight, retain_kl_per_row=None, lambda_b=cfg.lambda_b)
                part = terms.accumulation_loss(n_step, max(m_step, 1))
                part.backward()
                tot += float(part.detach())
                pref += float(terms.per_example.detach().sum()) / n_step
                del terms, part
            if stream is not None:
                rk = ridx[k * retain_bs : (k + 1) * retain_bs]
                for a in range(0, len(rk), retain_chunk):
                    rseqs = [retain_seqs[i] for i in rk[a : a + retain_chunk]]
                    with autocast_context(device, cfg.autocast):
                        kl_rows = retain_kl_from_models(policy, ref, *_collate(rseqs, pad_id, device))
                    part = retain_accumulation_loss(kl_rows, cfg.lambda_b, m_step)
                    part.backward()
                    tot += float(part.detach())
                    kl += float(kl_rows.detach().sum()) / m_step
                    del kl_rows, part
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        opt.step()
        if not math.isfinite(tot):
            raise FloatingPointError(f"post_train: loss became {tot} at step {step}; lower learning_rate or beta")
        history.append(
            {"step": step, "loss": tot, "preference": pref, "retain_kl": kl, "lr": lr, "grad_norm": grad_norm,
             "seconds": round(time.perf_counter() - t_step, 4)}
        )
        bar.set_postfix(loss=f"{tot:.4f}")
        if budget is not None:
            if step == 1:
                budget.set_interval(history[-1]["seconds"])
            if budget.due(step):
                go = budget.check(step, policy, tokenizer, params)
                row = budget.curve[-1]
                bar.set_postfix(loss=f"{tot:.4f}", harm=f"{row['harmful_rate']:.2f}",
                                budget=f"{row['budget_used']:.2f}")
                if budget.reset_optimizer:
                    opt, budget.reset_optimizer = optimizer(), False
                if not go:
                    break
    bar.close()

    summary = None
    if budget is not None:
        budget.restore_best(params)
        summary = budget.summary(time.perf_counter() - t0)
        b, s0 = summary["best"], budget.curve[0]
        log.info("post_train: %s after %d steps; kept step %d: harmful rate %.3f -> %.3f on the check prompts, "
                 "NLL %+.1f%%, over-refusal %+.3f (budget used %.0f%%; checks %.0f%% of the time)",
                 budget.stop_reason or "finished", len(history), budget.best_step, s0["harmful_rate"],
                 b["harmful_rate"], 100 * b["nll_rel_change"], b["over_refusal_delta"], 100 * b["budget_used"],
                 100 * (summary["check_share_of_time"] or 0))
    final = policy.merge_and_unload() if cfg.finetune == "lora" else policy
    return _save_atomically(final, tokenizer, out_dir, expected, history, len(examples), len(retain_seqs), t0,
                            mem.as_manifest(), summary)


def _micro_terms(policy, ref, spec: LossSpec, batch, ref_logps, pad_id, device) -> dict:
    """Per-sequence log-likelihoods of one micro-batch: chosen and rejected in one forward pass when both are needed;
    the reference's come from `ref_logps` (each example's computed once, the reference being frozen)."""
    rej = [e.rejected for e in batch]
    seqs = ([e.chosen for e in batch] + rej) if spec.needs_chosen else rej
    pol = sequence_logprobs(policy, *_collate(seqs, pad_id, device))
    ref_chosen, ref_rejected = ref_logps(batch) if spec.needs_reference else (None, None)
    b = len(batch)
    return {
        "policy_chosen_logp": pol[:b] if spec.needs_chosen else None,
        "policy_rejected_logp": pol[b:] if spec.needs_chosen else pol,
        "ref_chosen_logp": ref_chosen,
        "ref_rejected_logp": ref_rejected,
    }


class _ReferenceLogps:
    """The frozen reference's sequence log-likelihoods of the pair examples, each computed once and kept.

    The reference does not change during training (a frozen copy, or the base under a disabled adapter, dropout
    zeroed), so recomputing its forward pass for an example on every visit is wasted work (TRL's DPOTrainer calls this
    `precompute_ref_log_probs`). With dropout left on (`disable_dropout=False`) nothing is kept: each visit draws anew.
    """

    def __init__(self, ref, spec: LossSpec, pad_id: int, device, keep: bool):
        self.ref, self.spec, self.pad_id, self.device, self.keep = ref, spec, pad_id, device, keep
        self.cache: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def __call__(self, batch: list[_Example]) -> tuple[torch.Tensor | None, torch.Tensor]:
        fresh = {}
        todo = list({id(e): e for e in batch if id(e) not in self.cache}.values())
        if todo:
            seqs = ([e.chosen for e in todo] if self.spec.needs_chosen else []) + [e.rejected for e in todo]
            with torch.no_grad():
                lp = sequence_logprobs(self.ref, *_collate(seqs, self.pad_id, self.device)).detach()
            n = len(todo)
            for k, e in enumerate(todo):
                fresh[id(e)] = (lp[k], lp[n + k]) if self.spec.needs_chosen else (None, lp[k])
            if self.keep:
                self.cache.update(fresh)
        got = [fresh.get(id(e)) or self.cache[id(e)] for e in batch]
        chosen = torch.stack([c for c, _ in got]) if self.spec.needs_chosen else None
        return chosen, torch.stack([r for _, r in got])


def _save_atomically(model, tokenizer, out_dir: Path, expected: dict, history, n_examples, n_retain, t0,
                     memory: dict | None = None, budget: dict | None = None) -> Path:
    """Publish the trained model with `manifest.publishing_dir` (built beside out_dir, sealed, renamed into place):
    when a concurrent run with the same inputs published it first, its complete copy is kept and used."""
    with publishing_dir(out_dir, expected) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = dict(expected)
        manifest.update(
            output_model_digest=model_digest(tmp),
            loss_history=history,
            n_examples=n_examples,
            n_retain=n_retain,
            steps=len(history),
            seconds=round(time.perf_counter() - t0, 3),
            memory=memory,
            budget=budget,
            versions=library_versions(),
        )
        write_manifest(tmp, manifest)
    return out_dir

"""Supervised fine-tuning of a causal LM on (prompt, response) rows with the loss on response tokens only.

`train_sft(model, tokenizer, rows, cfg)` is the one training recipe of the demo and of the "oracle retrain" baseline
(retrain the same recipe without some rows): rows are encoded with `lancet_core.chat.encode_example` (the tokenizer's
chat template, loss mask over the assistant turn and its end marker), right-padded per batch, and trained with AdamW,
linear warm-up then linear decay, and gradient clipping. Row order comes from a generator seeded by `cfg.seed` (rows
of similar length are batched together to save padding), and the global torch RNG is left untouched, so the same model, rows and cfg give the same weights on CPU.

Knows about torch, a HF causal LM and its tokenizer; knows nothing about files, judges or the demo scenario.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from lancet_core.chat import Encoded, encode_example
from lancet_core.demo.config import SFTConfig
from lancet_core.errors import CorpusError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # label value the HF causal-LM loss skips


def encode_rows(tokenizer, rows: Sequence[Mapping], max_seq_len_tokens: int) -> list[Encoded]:
    """Encode every row; a row without a string `prompt` and `response` is refused with its index and id."""
    out = []
    for i, row in enumerate(rows):
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            rid = row.get("example_id", "?")
            raise CorpusError(f"SFT rows: row {i} (example_id {rid}) needs string 'prompt' and 'response'")
        enc = encode_example(tokenizer, prompt, response, max_seq_len_tokens)
        if sum(enc.loss_mask) == 0:
            rid = row.get("example_id", "?")
            raise CorpusError(
                f"SFT rows: row {i} (example_id {rid}) has no response token within {max_seq_len_tokens} tokens"
            )
        out.append(enc)
    n_cut = sum(e.truncated for e in out)
    if n_cut:
        log.warning("SFT: %d of %d rows cut at %d tokens", n_cut, len(out), max_seq_len_tokens)
    return out


def collate(batch: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, and labels (= input ids on response tokens, IGNORE_INDEX else)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for j, e in enumerate(batch):
        n = len(e.input_ids)
        row = torch.tensor(e.input_ids, dtype=torch.long)
        ids[j, :n] = row
        attn[j, :n] = 1
        labels[j, :n] = torch.where(torch.tensor(e.loss_mask, dtype=torch.bool), row, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def batch_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator, pool_batches: int = 8):
    """One epoch of batches (lists of row indices): a seeded shuffle, then rows of similar length grouped inside
    pools of `pool_batches` batches (less padding), then the batches shuffled. Every row appears exactly once."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    pool = batch_size * pool_batches
    batches: list[list[int]] = []
    for p in range(0, len(perm), pool):
        chunk = sorted(perm[p : p + pool], key=lambda i: lengths[i])  # stable: ties keep the shuffled order
        batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return f


def train_sft(model, tokenizer, rows: Sequence[Mapping], cfg: SFTConfig):
    """Train `model` in place on `rows` ({prompt, response, ...}) with response-only loss; returns it in eval mode.

    Loss per batch is the mean negative log-likelihood over the batch's response tokens (HF's causal-LM loss with
    prompt and padding labels ignored).
    """
    if not rows:
        raise CorpusError("SFT rows: no rows to train on")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; cannot pad batches")
    encoded = encode_rows(tokenizer, rows, cfg.max_seq_len_tokens)
    lengths = [len(e.input_ids) for e in encoded]
    order_gen = torch.Generator().manual_seed(cfg.seed)
    epochs = [batch_order(lengths, cfg.batch_size, order_gen) for _ in range(cfg.epochs)]
    n_batches = len(epochs[0])
    total_steps = n_batches * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total_steps, int(cfg.warmup_ratio * total_steps)))
    threads_before = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    model.train()
    try:
        for epoch, batches in enumerate(epochs):
            total = 0.0
            for idx in batches:
                batch = collate([encoded[i] for i in idx], pad_id)
                loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
                opt.step()
                sched.step()
                total += float(loss.detach())
            log.info("SFT epoch %d/%d: mean loss %.4f", epoch + 1, cfg.epochs, total / n_batches)
    finally:
        model.eval()
        torch.set_num_threads(threads_before)
    return model

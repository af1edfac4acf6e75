"""Batched answer generation for prompts, through the model's chat template.

Prompts are rendered by `lancet_core.chat.render_prompt_ids`: the chat template's generation prompt, or, for a
tokenizer without one, the same fallback prompt prefix (prompt + "\n") that scoring and training encode before the
response, so generation and scoring see identical prefixes. Left-pads a batch of rendered prompts, decodes only the
new tokens, and stops at EOS (or the chat template's end marker when the tokenizer declares one as eos). Greedy by
default; sampling is opt-in and seeded.

Knows about a HF causal LM and its tokenizer; knows nothing about judges, corpora or files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lancet_core.chat import render_prompt_ids, to_messages
from lancet_core.model_io import autocast_context


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    desc: str = "generate",
    autocast: str = "auto",
) -> list[str]:
    """One answer per prompt, in order. Deterministic for greedy decoding; seeded for sampling. A progress bar
    (`desc`) appears when generation takes longer than 5 s. `autocast`: bf16 autocast of the forward passes
    ('auto' = on CUDA only, 'bf16' = also on CPU, 'off'; see `lancet_core.model_io.autocast_context`)."""
    from tqdm import tqdm

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=len(prompts), desc=desc, unit="answers", delay=5, leave=False)
    try:
        for i in range(0, len(prompts), batch_size):
            rows = [render_prompt_ids(tokenizer, to_messages(p)) for p in prompts[i : i + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, width - len(r) :] = torch.tensor(r)
                attn[j, width - len(r) :] = 1
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            if do_sample:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kwargs.update(do_sample=False)
            device = next(model.parameters()).device
            with autocast_context(device, autocast):
                seqs = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs).cpu()
            for j in range(len(rows)):
                out.append(tokenizer.decode(seqs[j, width:], skip_special_tokens=True).strip())
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return out

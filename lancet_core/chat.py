"""Turn (prompt, response) or chat `messages` into token ids with a loss mask over the response tokens only.

The model's own chat template is used when its tokenizer has one. The mask is found by rendering the conversation up
to each assistant turn with `add_generation_prompt=True` and checking that it is a token prefix of the full
conversation, so it is right for any template that renders prefixes consistently (and a clear error otherwise).

Fallback when the tokenizer has NO chat template (a warning is logged once per tokenizer):

    ids = tokenizer(P + "\n", add_special_tokens=True) + tokenizer(R, add_special_tokens=False) + [eos]

with P the contents of the non-assistant turns (system, user) joined by "\n" and R the contents of the assistant
turns joined by "\n"; eos is appended when the tokenizer has one. The loss mask is 1 on the R and eos tokens. The
prompt part `tokenizer(P + "\n", add_special_tokens=True)` is built by one function, `_fallback_prompt_ids`, for
both scoring (`encode_messages`) and generation (`render_prompt_ids`), so a model is prompted with exactly the
prefix its answers are scored (and were fine-tuned) after.

Knows about tokenizers and chat templates; knows nothing about files, corpora or models.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

Message = dict[str, str]
log = logging.getLogger(__name__)
_warned_fallback: weakref.WeakSet = weakref.WeakSet()  # tokenizers already warned about (once each)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on tokens whose log-likelihood counts (assistant turns), 0 elsewhere
    truncated: bool


def to_messages(prompt: str, response: str | None = None, system: str | None = None) -> list[Message]:
    msgs: list[Message] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(x) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list in some versions and a BatchEncoding in others."""
    if isinstance(x, Sequence) and not isinstance(x, str):
        return list(x)
    return list(x["input_ids"])


def _warn_fallback(tokenizer) -> None:
    try:
        if tokenizer in _warned_fallback:
            return
        _warned_fallback.add(tokenizer)
    except TypeError:  # not weak-referenceable: warn every time rather than never
        pass
    log.warning(
        "tokenizer %r has no chat template: using the plain fallback format "
        "(prompt turns joined by '\\n', then '\\n', then the response and eos; see lancet_core.chat)",
        getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
    )


def _fallback_prompt_ids(tokenizer, messages: Sequence[Message]) -> list[int]:
    """The fallback format's prompt part: the non-assistant turns joined by "\n", then "\n" (special tokens added)."""
    _warn_fallback(tokenizer)
    text = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
    return list(tokenizer(text + "\n", add_special_tokens=True)["input_ids"])


def render_prompt_ids(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids of a conversation ending where the assistant is about to answer (used for generation).

    For a single-turn conversation these are exactly the loss-masked-out prefix of `encode_messages` of the same
    conversation with its answer, with or without a chat template.
    """
    if has_chat_template(tokenizer):
        return _ids(tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True))
    return _fallback_prompt_ids(tokenizer, messages)


def encode_messages(tokenizer, messages: Sequence[Message], max_seq_len_tokens: int | None = None) -> Encoded:
    """Encode a conversation; loss_mask is 1 exactly on the tokens of every assistant turn (its end marker included).

    When longer than `max_seq_len_tokens`, the sequence is cut on the right and `truncated` is True; callers decide
    whether that is acceptable.
    """
    messages = list(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn: nothing to compute a response likelihood on")
    if has_chat_template(tokenizer):
        full = _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False))
        mask = [0] * len(full)
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = _ids(tokenizer.apply_chat_template(messages[:j], tokenize=True, add_generation_prompt=True))
            end = _ids(tokenizer.apply_chat_template(messages[: j + 1], tokenize=True, add_generation_prompt=False))
            if full[: len(start)] != start or full[: len(end)] != end:
                raise ValueError(
                    "the tokenizer's chat template does not render conversation prefixes consistently; "
                    "cannot locate the assistant tokens for the loss mask"
                )
            for t in range(len(start), len(end)):
                mask[t] = 1
    else:
        response_text = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
        prompt_ids = _fallback_prompt_ids(tokenizer, messages)
        resp_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            resp_ids = resp_ids + [tokenizer.eos_token_id]
        full = prompt_ids + resp_ids
        mask = [0] * len(prompt_ids) + [1] * len(resp_ids)
    truncated = max_seq_len_tokens is not None and len(full) > max_seq_len_tokens
    if truncated:
        full, mask = full[:max_seq_len_tokens], mask[:max_seq_len_tokens]
    return Encoded(input_ids=full, loss_mask=mask, truncated=truncated)


def encode_example(tokenizer, prompt: str, response: str, max_seq_len_tokens: int | None = None) -> Encoded:
    """Single-turn convenience wrapper around `encode_messages`."""
    return encode_messages(tokenizer, to_messages(prompt, response), max_seq_len_tokens)

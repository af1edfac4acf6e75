"""Check a realign run's inputs before any heavy work: files, columns, model and tokenizer, token limits.

`check_inputs(params, names)` reads every given file once (cheap: no model weights, no Prefect, no MLflow), and
either returns the parameters the run should use — the tokenize limit raised to the longest corpus row when needed,
capped by the model's context, with one note per change — or raises InputError: one line naming the option (`--corpus`
on the command line, `corpus_path` for a deployment), the file, the row and the problem. Nothing is written.

`write_mapped_inputs` applies a column mapping once the inputs are known to be good, writing renamed JSONL copies
(content-addressed, atomic) that every later stage reads as usual.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flows.params import RealignParams
from lancet_core.errors import LancetError

# how each parameter is named where the user typed it
CLI_NAMES = {
    "corpus_path": "--corpus",
    "model": "--model",
    "probes_path": "--probes",
    "ood_path": "--ood",
    "benign_eval_path": "--benign-eval",
    "work_dir": "--work-dir",
    "tracking_uri": "--tracking-uri",
    "columns": "--column",
    "judge": "judge",
}
PARAM_NAMES = {k: k for k in CLI_NAMES}
_USER_DATA = ("corpus_path", "probes_path", "benign_eval_path")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class InputError(LancetError, ValueError):
    """An input that cannot be used as given; the message is one line naming the option, the file and the row."""


@dataclass
class Checked:
    params: RealignParams
    notes: list[str] = field(default_factory=list)  # what was adjusted, one line each (logged by the caller)
    corpus_rows: int | None = None
    longest_row_tokens: int | None = None


def _model_context(cfg: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = cfg.get(key)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _check_model_dir(model: str, opt: str) -> dict | None:
    """config.json of a local model directory (checked without importing transformers: files only), or None for an
    MLflow URI (resolved later)."""
    if model.startswith(("models:/", "runs:/")):
        return None
    p = Path(model)
    if not p.exists():
        raise InputError(f"{opt} {p}: directory not found")
    if not p.is_dir():
        raise InputError(f"{opt} {p}: not a directory (expected a Hugging Face model directory with config.json)")
    if not (p / "config.json").is_file():
        raise InputError(f"{opt} {p}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{opt} {p}/config.json: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise InputError(f"{opt} {p}/config.json: no model_type (not a Hugging Face model config)")
    if not any((p / w).is_file() for w in _WEIGHTS):
        raise InputError(f"{opt} {p}: no weights ({' or '.join(_WEIGHTS[::2])})")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise InputError(f"{opt} {p}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return cfg


def _load_tokenizer(model: str, opt: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as e:  # transformers raises several types for a broken tokenizer
        raise InputError(f"{opt} {model}: the tokenizer does not load ({str(e).splitlines()[0][:200]})") from None


def _row_lengths(tok, rows) -> list[int]:
    """Token count of every corpus row as tokenize will encode it (chat template with its system prompt, if any)."""
    from lancet_core.chat import encode_messages, has_chat_template

    if not has_chat_template(tok):
        return [len(encode_messages(tok, r.messages).input_ids) for r in rows]
    texts = [tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=False) for r in rows]
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    return [len(x) for x in enc]


def check_inputs(params: RealignParams, names: dict[str, str] = CLI_NAMES) -> Checked:
    """Validate everything a realign run reads, before anything heavy runs or anything is written."""
    from lancet_core.data.corpus import load_corpus, load_prompt_rows

    p = params
    out = Checked(params=p)
    given = [k for k in _USER_DATA if getattr(p, k)]
    if given and len(given) < len(_USER_DATA):
        missing = [names.get(k, k) for k in _USER_DATA if not getattr(p, k)]
        raise InputError(f"{names[given[0]]} given without {', '.join(missing)}: give your corpus, probes and "
                         "benign eval set together (or none of them, for the built-in demo)")
    if given and not p.model:
        raise InputError(f"{names['model']} missing: say which model to correct (a HF directory or models:/ URI)")
    work = Path(p.work_dir)
    if work.exists() and not work.is_dir():
        raise InputError(f"{names['work_dir']} {work}: exists and is not a directory")
    if p.tracking_uri and p.tracking_uri.startswith("sqlite:///"):
        db = Path(p.tracking_uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise InputError(f"{names['tracking_uri']} {p.tracking_uri}: directory {db.parent} does not exist")
    if p.judge.kind == "classifier" and not (p.judge.model_dir and Path(p.judge.model_dir).is_dir()):
        raise InputError(f"{names['judge']}.model_dir {p.judge.model_dir}: classifier directory not found")

    def where(key: str, err: Exception) -> InputError:
        return InputError(f"{names.get(key, key)} {err}")

    cfg = _check_model_dir(p.model, names["model"]) if p.model else None
    if not given:
        return out  # the built-in demo: built and checked by the demo stage
    files = {"corpus_path": p.corpus_path, "probes_path": p.probes_path, "ood_path": p.ood_path,
             "benign_eval_path": p.benign_eval_path}
    for key, path in files.items():
        if path and not Path(path).exists():
            raise InputError(f"{names[key]} {path}: file not found")
    try:
        rows = load_corpus(p.corpus_path, p.columns)
    except LancetError as e:
        raise where("corpus_path", e) from None
    for key, need_response in (("probes_path", False), ("ood_path", False), ("benign_eval_path", True)):
        if files[key]:
            try:
                load_prompt_rows(files[key], need_response=need_response, columns=p.columns)
            except LancetError as e:
                raise where(key, e) from None
    out.corpus_rows = len(rows)
    if p.columns:  # a mapping that no file can use is a typo, not a no-op
        from lancet_core.data.corpus import read_records

        seen = set().union(*(set((read_records(Path(f)) or [{}])[0]) for f in files.values() if f))
        for dst, src in p.columns.items():
            if src not in seen:
                raise InputError(f"{names['columns']} {dst}={src}: no file has a column {src!r} "
                                 f"(columns found: {sorted(seen)})")
    if cfg is None:
        return out  # an MLflow URI: its tokenizer is checked when the model is resolved
    tok = _load_tokenizer(p.model, names["model"])  # the first transformers import: after every cheap check
    lengths = _row_lengths(tok, rows)
    longest = max(lengths)
    out.longest_row_tokens = longest
    limit = p.tokenize_config.max_seq_len_tokens
    context = _model_context(cfg)
    if longest > limit:
        new = min(longest, context) if context else longest
        if longest > new and p.tokenize_config.overlong == "refuse":
            i = max(range(len(lengths)), key=lengths.__getitem__)
            raise InputError(f"{names['corpus_path']} {p.corpus_path}: row {i} ({rows[i].example_id}) has {longest} "
                             f"tokens, more than the model's context ({context}); shorten it or set "
                             "tokenize_config.overlong=truncate")
        over = sum(n > new for n in lengths)
        out.notes.append(f"max_seq_len_tokens raised from {limit} to {new}: the longest corpus row has {longest} tokens"
                         + (f" (model context {context}; {over} longer rows will be cut)" if over else ""))
        updates = {"tokenize_config": p.tokenize_config.model_copy(update={"max_seq_len_tokens": new})}
        for key in ("index", "train", "evaluation"):
            sub = getattr(p, key)
            if sub.max_seq_len_tokens < new:
                updates[key] = sub.model_copy(update={"max_seq_len_tokens": new})
        out.params = p.model_copy(update=updates)
    return out


def check_monitor_inputs(model: str | None, probes_path: str | None, names: dict[str, str] | None = None) -> None:
    """Validate what a monitor run reads (the model directory, the probes), before any model loads; `names` maps the
    parameters to the names the user gave them (CLI flags; default: the flow's parameter names)."""
    from lancet_core.data.corpus import load_prompt_rows

    names = names or {"model": "model", "probes_path": "probes_path"}
    if model:
        _check_model_dir(model, names["model"])
    if probes_path:
        if not Path(probes_path).exists():
            raise InputError(f"{names['probes_path']} {probes_path}: file not found")
        try:
            load_prompt_rows(probes_path)
        except LancetError as e:  # the monitor maps no columns: drop the realign-only '--column' hint
            raise InputError(f"{names['probes_path']} {str(e).split('; map one with')[0]}") from None


def write_mapped_inputs(params: RealignParams, work_dir: str | Path) -> RealignParams:
    """With a column mapping, write each user file renamed to lancet's columns (JSONL, renamed with `datasets`) under
    work_dir/inputs/<digest>/ and return the parameters pointing at the copies; without one, `params` unchanged."""
    if not params.columns:
        return params
    from lancet_core.data.corpus import read_records, rename_columns
    from lancet_core.manifest import atomic_write_bytes, content_digest, json_digest

    updates = {}
    for key in ("corpus_path", "probes_path", "ood_path", "benign_eval_path"):
        src = getattr(params, key)
        if not src:
            continue
        digest = json_digest({"source": content_digest(src), "columns": params.columns}).split(":")[-1][:16]
        dst = Path(work_dir) / "inputs" / digest / f"{Path(src).stem}.jsonl"
        if not dst.exists():
            records = rename_columns(read_records(Path(src)), params.columns)
            text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
            atomic_write_bytes(dst, text.encode("utf-8"))
        updates[key] = str(dst)
    return params.model_copy(update=updates)

"""Load and validate a training corpus: jsonl, parquet, csv, or a saved HF dataset directory.

Each row is either `prompt` + `response` or chat `messages` (a list of {role, content}); any other column is a label
column carried through unchanged (used only to evaluate recall, never by recall or IBO). `example_id` is kept when
present, else derived from the content (so it is stable across runs and machines).

Every problem is found before anything is written and reported as one CorpusError naming the file, the row and the
problem. Knows about files and rows; knows nothing about tokenizers or models.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lancet_core.errors import CorpusError

SUPPORTED = ".jsonl, .json, .parquet, .csv, or a directory saved with datasets' save_to_disk"
_ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class CorpusRow:
    example_id: str
    messages: list[dict[str, str]]
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The last user turn before the final assistant turn."""
        users = [m["content"] for m in self.messages[:-1] if m["role"] == "user"]
        return users[-1] if users else ""

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


def derive_example_id(messages: list[dict[str, str]]) -> str:
    """Stable id from content: 'ex-' + the first 16 hex digits of sha256 over the canonical JSON of the messages."""
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return "ex-" + hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def _check_utf8(path: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk[: e.start].count(b"\n")
                raise CorpusError(f"{path}: line {line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise CorpusError(f"{path}: line {line}: not valid UTF-8 (truncated sequence at end of file)") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    """Raw records, in file order. JSON Lines / JSON are read directly (line numbers in errors); Parquet, CSV and saved
    datasets with `datasets`, so types match what users load elsewhere."""
    if not path.exists():
        raise CorpusError(f"{path}: corpus not found")
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a non-dataset directory
            raise CorpusError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise CorpusError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        return ds.to_list()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".csv"):
        _check_utf8(path)
        if path.stat().st_size == 0:
            raise CorpusError(f"{path}: the corpus is empty")
    if suffix in (".jsonl", ".json"):
        if suffix == ".jsonl":
            out = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise CorpusError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
                    if not isinstance(rec, dict):
                        raise CorpusError(f"{path}: line {n}: expected a JSON object, got {type(rec).__name__}")
                    out.append(rec)
            return out
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise CorpusError(f"{path}: a .json corpus must be a list of objects")
        return data
    import datasets

    if suffix == ".parquet":
        ds = datasets.Dataset.from_parquet(str(path))
    elif suffix == ".csv":
        ds = datasets.Dataset.from_csv(str(path), keep_default_na=False)
    else:
        raise CorpusError(f"{path}: unsupported corpus format '{suffix}' (supported: {SUPPORTED})")
    return ds.to_list()


def _row_messages(path: Path, i: int, rec: dict[str, Any]) -> list[dict[str, str]]:
    where = f"{path}: row {i}"
    if rec.get("messages") is not None:
        msgs = rec["messages"]
        if isinstance(msgs, str):
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError:
                raise CorpusError(f"{where}: 'messages' is a string that is not JSON") from None
        if not isinstance(msgs, list) or not msgs:
            raise CorpusError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        out = []
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise CorpusError(f"{where}: each message needs role in {sorted(_ROLES)} and string content; got {m!r}")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise CorpusError(f"{where}: the last message must be the assistant's response")
        if not any(m["role"] == "user" for m in out):
            raise CorpusError(f"{where}: no user message")
    else:
        prompt, response = rec.get("prompt"), rec.get("response")
        if not isinstance(prompt, str) or not prompt.strip():
            raise CorpusError(f"{where}: empty or missing prompt")
        if response is not None and not isinstance(response, str):
            raise CorpusError(f"{where}: response must be a string, got {type(response).__name__}")
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response or ""}]
    if not out[-1]["content"].strip():
        raise CorpusError(f"{where}: empty response")
    return out


def rename_columns(records: list[dict[str, Any]], columns: Mapping[str, str] | None) -> list[dict]:
    """Apply a column mapping {lancet's name: the file's column} with `datasets` (Dataset.rename_columns). One
    mapping serves every file: an entry applies to a file that has the mapped column and not lancet's own; a file
    still missing a column it needs is refused by the loader, which names the column."""
    if not columns or not records:
        return records
    import datasets

    found = set(records[0])
    renames = {src: dst for dst, src in columns.items() if src in found and src != dst and dst not in found}
    if not renames:
        return records
    # Both fingerprints given, so `datasets` hashes nothing: its hashing pickles functions with dill, which runs
    # dis.dis into a captured stdout, and inside a flow with log_prints=True Prefect's print hook sends every line of
    # that bytecode to the run's log (issue 29). Same rows as Dataset.from_list (pyarrow infers from the first row).
    import uuid

    import pyarrow as pa

    table = datasets.Dataset(pa.Table.from_pylist(records), fingerprint=uuid.uuid4().hex)
    return table.rename_columns(renames, new_fingerprint=uuid.uuid4().hex).to_list()


def load_corpus(path: str | Path, columns: Mapping[str, str] | None = None) -> list[CorpusRow]:
    """Read and validate a corpus; raises CorpusError on the first problem, naming file, row and problem.
    `columns` maps lancet's column names to the file's ({"response": "reference"})."""
    path = Path(path)
    records = rename_columns(read_records(path), columns)
    if not records:
        raise CorpusError(f"{path}: the corpus is empty")
    columns = set(records[0])
    if "messages" not in columns and not {"prompt", "response"} <= columns:
        raise CorpusError(
            f"{path}: missing columns: need 'prompt' and 'response', or 'messages'; found {sorted(columns)} "
            "(map yours with --column response=NAME)"
        )
    rows: list[CorpusRow] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        msgs = _row_messages(path, i, rec)
        eid = rec.get("example_id")
        if eid is None or (isinstance(eid, str) and not eid.strip()):
            eid = derive_example_id(msgs)
        eid = str(eid)
        if eid in seen:
            raise CorpusError(
                f"{path}: row {i}: duplicate example_id {eid!r} (first seen at row {seen[eid]}); "
                "ids must be unique (identical content gives identical derived ids)"
            )
        seen[eid] = i
        labels = {k: v for k, v in rec.items() if k not in ("example_id", "prompt", "response", "messages")}
        rows.append(CorpusRow(example_id=eid, messages=msgs, labels=labels))
    return rows


def corpus_digest(path: str | Path) -> str:
    from lancet_core.manifest import tree_digest

    return tree_digest(path)


def load_prompt_rows(path: str | Path, need_response: bool = False,
                     columns: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of a prompt file (probes, OOD prompts, benign eval): any corpus format, a non-empty `prompt` column
    (and `response` when `need_response`); other columns (e.g. category) are kept."""
    path = Path(path)
    records = rename_columns(read_records(path), columns)
    if not records:
        raise CorpusError(f"{path}: no prompts")
    for col in ("prompt", "response") if need_response else ("prompt",):
        if col not in records[0]:
            raise CorpusError(f"{path}: no {col!r} column (columns: {sorted(records[0])}); "
                              f"map one with --column {col}=NAME")
    for i, r in enumerate(records):
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise CorpusError(f"{path}: row {i}: empty or missing prompt")
        if need_response and (not isinstance(r.get("response"), str) or not r["response"].strip()):
            raise CorpusError(f"{path}: row {i}: empty or missing response")
    return records

"""Check a realign run's inputs before any heavy work: files, columns, model and tokenizer, token limits.

`check_inputs(params, names)` reads every given file once (cheap: no model weights, no Prefect, no MLflow), and
either returns the parameters the run should use — the tokenize limit raised to the longest corpus row when needed,
capped by the model's context, with one note per change — or raises InputError: one line naming the option (`--corpus`
on the command line, `corpus_path` for a deployment), the file, the row and the problem. Nothing is written.

Beyond the files, the places a run will write to or talk to are checked the same way, each in well under a second
or within one short network timeout (`NETWORK_TIMEOUT_S`), so a run that would fail minutes later fails now:
the work dir (and `lancet index --out`) writable, without creating anything there when it is not; the tracking
location (a sqlite database and its directory writable, a tracking server answering); the weights loadable (each
safetensors file's header parses and its tensors' byte sizes add up to the file's size, the shards of a sharded
checkpoint included; a `.bin` checkpoint's zip directory readable); a `models:/` or `runs:/` URI known to the
registry it names (looked up in the sqlite database, read-only, or with one REST call to the server: MLflow itself
is not imported here, it costs seconds); a deployment to start exists on the Prefect API, and that API is configured.
`lancet realign`, `lancet index` and `lancet monitor` (and the realign and monitor flows, for deployments) share them.

`write_mapped_inputs` applies a column mapping once the inputs are known to be good, writing renamed JSONL copies
(content-addressed, atomic) that every later stage reads as usual.
"""

from __future__ import annotations

import json
import os
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
NETWORK_TIMEOUT_S = 2.0  # one HTTP request to a tracking server, a registry or the Prefect API


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


# ------------------------------------------------------------------------------------------ places a run writes to
def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _unwritable(d: Path) -> str | None:
    """Why no file can be created in the existing directory `d` (None when one can). The probe is an unnamed file
    (O_TMPFILE on Linux), so nothing appears in `d` either way; it catches what permissions do not show (a read-only
    file system, a pseudo file system, a full disk's quota)."""
    import tempfile

    if not os.access(d, os.W_OK | os.X_OK):
        return f"{d} is not writable (permission denied)"
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        return f"{d} is not writable ({e.strerror or type(e).__name__})"
    return None


def check_writable_dir(path: str | Path, opt: str) -> None:
    """`path` is a directory this process can write in, or one it can create; creates nothing (InputError if not)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{opt} {p}: exists and is not a directory")
    base = p if p.exists() else _nearest_existing(p)
    if not base.is_dir():
        raise InputError(f"{opt} {p}: cannot be created: {base} is not a directory")
    problem = _unwritable(base)
    if problem:
        raise InputError(f"{opt} {p}: {problem}" if base == Path(os.path.abspath(p))
                         else f"{opt} {p}: cannot be created: {problem}")


def tracking_location(tracking_uri: str | None, opt: str) -> tuple[str, str]:
    """(the tracking URI a run will use, how to name it in a message): the given one, else $MLFLOW_TRACKING_URI, else
    sqlite:///<cwd>/mlflow.db (the rule of tasks.tracking.default_tracking_uri, which imports mlflow)."""
    if tracking_uri:
        return tracking_uri, opt
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}", f"{opt} (default)"


def _sqlite_file(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def check_tracking_location(uri: str, opt: str) -> None:
    """A local tracking store can be written (a sqlite database and the directory beside it, where its artifacts go;
    a file store's directory); a tracking server answers within NETWORK_TIMEOUT_S. Other schemes are not checked."""
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):
            raise InputError(f"{opt} {uri}: expected sqlite:///PATH (a file; sqlite:////abs/path for an absolute one)")
        db = _sqlite_file(uri)
        if not db.parent.is_dir():
            raise InputError(f"{opt} {uri}: directory {db.parent} does not exist")
        problem = _unwritable(db.parent)
        if problem:
            raise InputError(f"{opt} {uri}: {problem}; the database, its journal and the run artifacts go there")
        if db.exists():
            if not db.is_file():
                raise InputError(f"{opt} {uri}: {db} is not a file")
            if not os.access(db, os.R_OK | os.W_OK):
                raise InputError(f"{opt} {uri}: {db} is not writable")
            with db.open("rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\x00":
                raise InputError(f"{opt} {uri}: {db} is not an SQLite database")
        return
    if uri.startswith(("http://", "https://")):
        status, _, err = _http_get(uri.rstrip("/") + "/health", _mlflow_headers())
        if status is None or status >= 500:
            raise InputError(f"{opt} {uri}: the tracking server does not answer within {NETWORK_TIMEOUT_S:g} s "
                             f"({err or f'HTTP {status}'}); start it, or give another --tracking-uri")
        return
    if uri.startswith("file:") or "://" not in uri:
        check_writable_dir(uri.removeprefix("file://").removeprefix("file:"), opt)


# ------------------------------------------------------------------------------------------ servers a run talks to
def _http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int | None, bytes, str | None]:
    """One GET with NETWORK_TIMEOUT_S: (HTTP status, body, None), or (None, b"", why no answer came)."""
    import urllib.error
    import urllib.request

    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=NETWORK_TIMEOUT_S) as r:
            return r.status, r.read(1 << 16), None
    except urllib.error.HTTPError as e:
        return e.code, (e.read(1 << 16) if e.fp else b""), None
    except urllib.error.URLError as e:
        reason = e.reason
        return None, b"", str(getattr(reason, "strerror", None) or reason)
    except TimeoutError:
        return None, b"", "timed out"
    except (OSError, ValueError) as e:  # a reset connection, a malformed URL
        return None, b"", str(e) or type(e).__name__


def _mlflow_headers() -> dict[str, str]:
    import base64

    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    user, pw = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and pw:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}
    return {}


def _model_ref(uri: str) -> tuple[str, str, str]:
    """models:/NAME/VERSION -> ("version", NAME, VERSION); models:/NAME@ALIAS -> ("alias", ...); models:/NAME/STAGE
    or /latest -> ("stage", ...); runs:/RUN_ID/PATH -> ("run", RUN_ID, PATH). ValueError when malformed."""
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].strip("/").partition("/")
        if not run_id:
            raise ValueError("expected runs:/RUN_ID/PATH")
        return "run", run_id, path
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias and "/" not in alias:
            return "alias", name, alias
        raise ValueError("expected models:/NAME@ALIAS")
    name, _, suffix = rest.partition("/")
    if not name or not suffix or "/" in suffix:
        raise ValueError("expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return ("version" if suffix.isdigit() else "stage"), name, suffix


def _sqlite_registry_problem(db: Path, ref: tuple[str, str, str]) -> str | None:
    """Look the reference up in an MLflow sqlite database, read-only (its tables: runs, registered_models,
    model_versions, registered_model_aliases; tests/flows/test_inputs.py builds one with MLflow to hold us to it)."""
    import sqlite3

    if not db.is_file():
        return "no tracking database there yet (nothing is registered)"
    kind, name, what = ref
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=NETWORK_TIMEOUT_S)
    except sqlite3.Error as e:
        return f"cannot open the tracking database ({e})"
    try:
        q = con.execute
        if kind == "run":
            row = q("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (name,)).fetchone()
            return None if row and row[0] != "deleted" else f"no run {name}"
        if not q("SELECT 1 FROM registered_models WHERE name = ?", (name,)).fetchone():
            known = [r[0] for r in q("SELECT name FROM registered_models ORDER BY name LIMIT 6")]
            return f"no registered model {name!r} (registered: {', '.join(known[:5]) or 'none'}" + \
                   (", ...)" if len(known) > 5 else ")")
        deleted = "Deleted_Internal"  # MLflow's stage of a deleted version
        if kind == "alias":
            if q("SELECT 1 FROM registered_model_aliases WHERE name = ? AND alias = ?", (name, what)).fetchone():
                return None
            known = [r[0] for r in q("SELECT alias FROM registered_model_aliases WHERE name = ? ORDER BY alias",
                                     (name,))]
            return f"model {name!r} has no alias {what!r} (its aliases: {', '.join(known) or 'none'})"
        if kind == "version":
            if q("SELECT 1 FROM model_versions WHERE name = ? AND version = ? AND current_stage != ?",
                 (name, int(what), deleted)).fetchone():
                return None
            known = [str(r[0]) for r in q("SELECT version FROM model_versions WHERE name = ? AND current_stage != ? "
                                          "ORDER BY version", (name, deleted))]
            return f"model {name!r} has no version {what} (its versions: {', '.join(known[-10:]) or 'none'})"
        if what.lower() == "latest":
            found = q("SELECT 1 FROM model_versions WHERE name = ? AND current_stage != ?", (name, deleted)).fetchone()
        else:
            found = q("SELECT 1 FROM model_versions WHERE name = ? AND lower(current_stage) = lower(?)",
                      (name, what)).fetchone()
        return None if found else f"model {name!r} has no version in {what!r}"
    except sqlite3.Error as e:  # no such table: not an MLflow database; locked past the timeout
        return f"cannot read the registry in the tracking database ({e})"
    finally:
        con.close()


def _rest_registry_problem(base: str, ref: tuple[str, str, str]) -> str | None:
    """Look the reference up with one call of the tracking server's REST API (MLflow 2/3 `api/2.0/mlflow`)."""
    from urllib.parse import urlencode

    kind, name, what = ref
    path, query = {"run": ("runs/get", {"run_id": name}),
                   "alias": ("registered-models/alias", {"name": name, "alias": what}),
                   "version": ("model-versions/get", {"name": name, "version": what}),
                   "stage": ("registered-models/get", {"name": name})}[kind]
    status, body, err = _http_get(f"{base.rstrip('/')}/api/2.0/mlflow/{path}?{urlencode(query)}", _mlflow_headers())
    if status is None:
        return f"the tracking server does not answer within {NETWORK_TIMEOUT_S:g} s ({err})"
    if status == 200:
        return None
    try:
        message = json.loads(body).get("message") or ""
    except (ValueError, AttributeError):
        message = ""
    return (message.splitlines()[0][:200] if message else f"not found (HTTP {status})") if status in (400, 404) \
        else f"the tracking server answered HTTP {status}"


def check_model_uri(model: str, tracking_uri: str, opt: str) -> None:
    """A `models:/` or `runs:/` URI names a registered version / alias / run in the tracking store the run will use
    (a sqlite database read-only, or a tracking server's REST API); other stores are not checked."""
    try:
        ref = _model_ref(model)
    except ValueError as e:
        raise InputError(f"{opt} {model}: {e}") from None
    if tracking_uri.startswith("sqlite:///"):
        problem = _sqlite_registry_problem(_sqlite_file(tracking_uri), ref)
    elif tracking_uri.startswith(("http://", "https://")):
        problem = _rest_registry_problem(tracking_uri, ref)
    else:
        return
    if problem:
        raise InputError(f"{opt} {model}: {problem}, in the registry at {tracking_uri}")


def _prefect_settings_files() -> bool:
    """Whether a file Prefect reads its settings from may set the API URL (its profiles file or a .env naming
    PREFECT_API_URL, a prefect.toml, a pyproject.toml with [tool.prefect])."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    for f, needle in ((Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml"), "PREFECT_API_URL"),
                      (Path(".env"), "PREFECT_API_URL"), (Path("prefect.toml"), ""),
                      (Path("pyproject.toml"), "tool.prefect")):
        try:
            if needle in f.read_text(encoding="utf-8", errors="ignore"):
                return True
        except OSError:
            continue
    return False


def prefect_api_url() -> str | None:
    """The Prefect API this process would talk to: Prefect's settings (which see a profile, prefect.toml and a test
    harness) when Prefect is already imported, else $PREFECT_API_URL, else the settings when a settings file may set
    it (importing Prefect costs seconds on a loaded box, so it is skipped when no file could), else None."""
    import sys

    if "prefect" not in sys.modules:
        if os.environ.get("PREFECT_API_URL"):
            return os.environ["PREFECT_API_URL"]
        if not _prefect_settings_files():
            return None
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def _prefect_headers() -> dict[str, str]:
    import base64
    import sys

    key, auth = os.environ.get("PREFECT_API_KEY"), os.environ.get("PREFECT_API_AUTH_STRING")
    if "prefect" in sys.modules:
        from prefect.settings import get_current_settings

        api = get_current_settings().api
        key = api.key.get_secret_value() if api.key else key
        auth = api.auth_string.get_secret_value() if api.auth_string else auth
    if key:
        return {"Authorization": f"Bearer {key}"}
    if auth:
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    return {}


def check_deployment(name: str, opt: str) -> None:
    """`name` ('flow/deployment') exists on the configured Prefect API, asked with one short request; a missing API
    URL is an error too: a run created on this process's temporary server would never start."""
    from urllib.parse import quote

    flow_name, sep, dep = name.partition("/")
    if not (sep and flow_name.strip() and dep.strip()) or "/" in dep:
        raise InputError(f"{opt} {name!r}: expected FLOW/DEPLOYMENT, e.g. realign/demo")
    api = prefect_api_url()
    if not api:
        raise InputError(f"{opt} {name}: no Prefect API to start it on (PREFECT_API_URL is not set, and a run created "
                         "on this process's temporary server would never start): prefect server start, then export "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api")
    status, _, err = _http_get(f"{api.rstrip('/')}/deployments/name/{quote(flow_name, safe='')}/"
                               f"{quote(dep, safe='')}", _prefect_headers())
    if status is None:
        raise InputError(f"{opt} {name}: the Prefect API at {api} does not answer within {NETWORK_TIMEOUT_S:g} s "
                         f"({err})")
    if status == 404:
        raise InputError(f"{opt} {name}: no such deployment on the Prefect API at {api} "
                         "(`prefect deployment ls` lists them)")
    if status >= 400:
        raise InputError(f"{opt} {name}: the Prefect API at {api} answered HTTP {status}")


# ------------------------------------------------------------------------------------------ weights
_ST_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file would not load (None when its header parses and its tensors' byte sizes add up to the
    file's size): the 8-byte header length, the JSON header, each tensor's dtype × shape against its offsets, and the
    data's end against the file's end — what safetensors checks before reading a byte of data."""
    from math import prod

    size = path.stat().st_size
    if size < 8:
        return f"truncated ({size} bytes; a safetensors file starts with an 8-byte header length)"
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > 100_000_000:
            return f"truncated or not safetensors: the header claims {n} bytes, the file has {size}"
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"the header is not valid JSON ({e})"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    data, end_max = size - 8 - n, 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in t["data_offsets"])
            shape, dtype = [int(x) for x in t["shape"]], str(t["dtype"])
        except (TypeError, KeyError, ValueError):
            return f"tensor {name!r}: malformed header entry"
        width = _ST_BYTES.get(dtype)
        if end < begin or (width is not None and end - begin != prod(shape) * width):
            return f"tensor {name!r}: {end - begin} bytes for {dtype} {shape} (corrupt header)"
        end_max = max(end_max, end)
    if end_max > data:
        return (f"truncated: its tensors need {end_max} bytes of data, the file holds {data} "
                "(copy or save the model again)")
    if end_max < data:
        return f"corrupt: {data - end_max} bytes after the last tensor"
    return None


def _bin_problem(path: Path) -> str | None:
    """A torch .bin checkpoint in the zip format (torch >= 1.6) must have a readable zip directory (a truncated
    file loses it); older pickle checkpoints are not checked."""
    import zipfile

    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        return None
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError) as e:
        return f"truncated or corrupt checkpoint ({e})"


def check_weights(model_dir: Path, opt: str) -> None:
    """The weights transformers would load from `model_dir` (safetensors first, a sharded index's every file) can be
    read: see `safetensors_problem`. Reads headers only (milliseconds, whatever the model's size)."""
    d = Path(model_dir)
    for index_name, check in (("model.safetensors", safetensors_problem), ("pytorch_model.bin", _bin_problem)):
        single, index = d / index_name, d / f"{index_name}.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = [d / f for f in sorted(set(weight_map.values()))]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise InputError(f"{opt} {index}: not a valid checkpoint index ({type(e).__name__}: {e})") from None
        else:
            continue
        for f in files:
            if not f.is_file():
                raise InputError(f"{opt} {f}: missing (listed in {index.name})")
            problem = check(f)
            if problem:
                raise InputError(f"{opt} {f}: {problem}")
        return


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
    check_weights(p, opt)
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
    check_writable_dir(p.work_dir, names["work_dir"])
    tracking, tracking_opt = tracking_location(p.tracking_uri, names["tracking_uri"])
    if p.judge.kind == "classifier" and not (p.judge.model_dir and Path(p.judge.model_dir).is_dir()):
        raise InputError(f"{names['judge']}.model_dir {p.judge.model_dir}: classifier directory not found")

    def where(key: str, err: Exception) -> InputError:
        return InputError(f"{names.get(key, key)} {err}")

    cfg = _check_model_dir(p.model, names["model"]) if p.model else None
    check_tracking_location(tracking, tracking_opt)  # the local checks above first: this one may wait for a server
    if p.model and cfg is None:
        check_model_uri(p.model, tracking, names["model"])
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
    if p.train.memory_budget_gb is not None:  # before any stage: a run that cannot fit is refused now, not after recall
        from lancet_core.correct.config import resolve_train
        from lancet_core.correct.trainer import preflight_memory

        train = (out.params or p).train
        train = train.model_copy(update={"max_seq_len_tokens": min(longest, train.max_seq_len_tokens)})
        try:
            preflight_memory(p.model, resolve_train(train, p.judge.kind))
        except ValueError as e:
            raise InputError(str(e)) from None
    return out


MONITOR_PARAM_NAMES = {k: k for k in ("model", "probes_path", "work_dir", "tracking_uri", "realign_deployment")}
MONITOR_CLI_NAMES = {"model": "--model", "probes_path": "--probes", "work_dir": "--work-dir",
                     "tracking_uri": "--tracking-uri", "realign_deployment": "--realign-deployment"}


def check_monitor_inputs(model: str | None, probes_path: str | None, names: dict[str, str] | None = None, *,
                         work_dir: str | Path | None = None, tracking_uri: str | None = None,
                         realign_deployment: str | None = None) -> None:
    """Validate what a monitor run reads, writes and talks to (the model directory or registry URI, the probes, the
    work dir, the tracking store, the deployment it would start), before any model loads; `names` maps the
    parameters to the names the user gave them (MONITOR_CLI_NAMES; default: the flow's parameter names). A None
    work_dir / realign_deployment is not checked (the monitor's own default / no deployment to start)."""
    from lancet_core.data.corpus import load_prompt_rows

    names = {**MONITOR_PARAM_NAMES, **(names or {})}
    is_uri = bool(model) and model.startswith(("models:/", "runs:/"))
    if model and not is_uri:
        _check_model_dir(model, names["model"])
    if probes_path:
        if not Path(probes_path).exists():
            raise InputError(f"{names['probes_path']} {probes_path}: file not found")
        try:
            load_prompt_rows(probes_path)
        except LancetError as e:  # the monitor maps no columns: drop the realign-only '--column' hint
            raise InputError(f"{names['probes_path']} {str(e).split('; map one with')[0]}") from None
    if work_dir is not None:
        check_writable_dir(work_dir, names["work_dir"])
    tracking, tracking_opt = tracking_location(tracking_uri, names["tracking_uri"])
    check_tracking_location(tracking, tracking_opt)
    if is_uri:
        check_model_uri(model, tracking, names["model"])
    if realign_deployment:
        check_deployment(realign_deployment, names["realign_deployment"])


INDEX_CLI_NAMES = {"corpus_path": "corpus", "model": "model", "work_dir": "--work-dir", "out": "--out"}


def check_index_inputs(corpus_path: str, model: str, work_dir: str | Path, out: str | Path | None = None,
                       names: dict[str, str] = INDEX_CLI_NAMES) -> None:
    """`lancet index`'s share of realign's checks, before any model loads: the model directory (config, weights,
    tokenizer files), the corpus (every row readable), the work dir and --out writable."""
    from lancet_core.data.corpus import load_corpus

    if str(model).startswith(("models:/", "runs:/")):
        raise InputError(f"{names['model']} {model}: lancet index takes a local Hugging Face model directory "
                         "(realign resolves registry URIs)")
    _check_model_dir(str(model), names["model"])
    if not Path(corpus_path).exists():
        raise InputError(f"{names['corpus_path']} {corpus_path}: file not found")
    check_writable_dir(work_dir, names["work_dir"])
    if out is not None:
        check_writable_dir(out, names["out"])
    try:
        load_corpus(corpus_path)
    except LancetError as e:
        raise InputError(f"{names['corpus_path']} {str(e).split('; map one with')[0]}") from None


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

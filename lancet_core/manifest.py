"""Provenance and atomic writes for every artifact lancet produces.

An artifact is a directory holding `manifest.json` (what it was built from: input digests, config, versions) plus its
files. Files are written to a temporary name and renamed into place, so a reader never sees half a file and an
interrupted build leaves no artifact that looks finished. Reusing a directory built from different inputs is refused
with both manifests shown. A directory artifact is built in a temporary directory and published by one mechanism
(`publishing_dir` -> `seal` -> `publish`): its manifest then says `complete` and lists every file with its size (and
digest where cheap), `artifact_problems` checks exactly that, and of concurrent identical builds one copy is kept.

This module knows about files and hashes only; it knows nothing about models, tokens or gradients.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lancet_core.errors import LancetError, ManifestMismatch

if TYPE_CHECKING:
    import numpy as np

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, as 'sha256:<hex>'."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def tree_digest(path: str | Path, exclude: Iterable[str] = (MANIFEST_NAME,)) -> str:
    """sha256 over a file or a directory tree: relative paths and contents, in sorted order.

    `manifest.json` is excluded by default so that a directory's digest is about its content, not its provenance.
    """
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory")
    excluded = set(exclude)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p).as_posix()
        if f.name in excluded or any(part.startswith(".tmp-") for part in f.relative_to(p).parts):
            continue
        h.update(rel.encode() + b"\0")
        h.update(file_digest(f).encode() + b"\0")
    return "sha256:" + h.hexdigest()


_file_digest_memo: dict[tuple, str] = {}


def content_digest(path: str | Path) -> str:
    """The digest that stands for a path's content, cheaply: an artifact directory (one with manifest.json) is
    represented by its manifest, which already lists the digests of what it holds; a file by its bytes (memoised on
    path, mtime and size); any other directory by its whole tree."""
    p = Path(path)
    target = p / MANIFEST_NAME if p.is_dir() and (p / MANIFEST_NAME).is_file() else p
    if target.is_dir():
        return tree_digest(target)
    st = target.stat()
    stamp = (str(target.resolve()), st.st_mtime_ns, st.st_size)
    if stamp not in _file_digest_memo:
        _file_digest_memo[stamp] = file_digest(target)
    return _file_digest_memo[stamp]


def json_digest(obj: Any) -> str:
    """Digest of a JSON-serialisable object (keys sorted): used for configs."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(table, path: str | Path, **kwargs) -> Path:
    """Write a pyarrow Table to Parquet atomically (temp file + rename)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of an artifact directory, or None when it has none (not built, or interrupted)."""
    f = Path(directory) / MANIFEST_NAME
    if not f.exists():
        return None
    return json.loads(f.read_text())


def write_manifest(directory: str | Path, manifest: Mapping[str, Any]) -> Path:
    return atomic_write_json(Path(directory) / MANIFEST_NAME, dict(manifest))


def check_manifest(directory: str | Path, expected: Mapping[str, Any], keys: Iterable[str] | None = None) -> dict | None:
    """Refuse to reuse `directory` when its manifest disagrees with `expected` on `keys` (default: all of expected).

    Returns the existing manifest (None when there is none). Raises ManifestMismatch naming every differing key with
    both values.
    """
    existing = read_manifest(directory)
    if existing is None:
        return None
    keys = list(expected) if keys is None else list(keys)
    diffs = []
    for k in keys:
        a, b = existing.get(k), expected.get(k)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            diffs.append(f"  {k}:\n    existing: {a!r}\n    requested: {b!r}")
    if diffs:
        raise ManifestMismatch(
            f"{Path(directory) / MANIFEST_NAME} was built with other settings; refusing to mix them.\n"
            + "\n".join(diffs)
            + "\nUse a new output directory, or delete this one to rebuild it."
        )
    return existing


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo; else platform.processor()): benchmarks report it beside their figures."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes lancet's artifacts."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("lancet", "torch", "transformers", "tokenizers", "datasets", "pyarrow", "duckdb"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


# ------------------------------------------------------------------------------------------ sealing and checking
# A published artifact's manifest says `complete: true` and lists what it holds (`contents`: relative path -> bytes
# and sha256); a check re-reads the digests of files up to DIGEST_LIMIT and the sizes of the others. Manifests
# written by a builder in place (the gradient store) name their files as a `file` / `<x>_file` field beside its
# `digest` / `<x>_digest`, or as a mapping from a relative file path to an entry with a `digest` (the store's
# curvatures); such a file is checked by its digest within the limits below, else by its format's end marker.
CONTENTS_KEY = "contents"
DIGEST_LIMIT = 64 << 20  # a check re-digests files up to this size; larger ones are checked by size
DIGEST_BUDGET = 512 << 20  # and at most this many bytes per artifact (a big store's shards: size or end marker)
_NOT_CONTENT = (MANIFEST_NAME, ".lock")
_KIND_KEYS = ("kind", "artifact")


class ArtifactBroken(LancetError):
    """An artifact directory is not a complete, intact output (no manifest, not complete, a file missing or changed)."""


@contextmanager
def file_lock(path: str | Path, timeout: float = -1) -> Iterator[Path]:
    """Hold an exclusive lock on `path` (a lock file, created; filelock's flock): processes that take the same lock
    wait for each other. The lock goes with the process, so a killed holder never leaves it taken."""
    from filelock import FileLock

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(p), timeout=timeout):
        yield p


def _is_content(rel: Path) -> bool:
    return rel.name not in _NOT_CONTENT and not any(part.startswith((".tmp-", ".trash-")) for part in rel.parts)


def seal(directory: str | Path) -> dict:
    """Mark an artifact directory finished: its manifest (written by the builder, or a new one) gains
    `complete: true` and `contents` (every file but the manifest: bytes and sha256; every digest, so the manifest's
    own digest, which stands for the artifact in cache keys and folder names, changes with any byte).
    Returns the manifest written."""
    root = Path(directory)
    contents = {}
    for f in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = f.relative_to(root)
        if _is_content(rel):
            contents[rel.as_posix()] = {"bytes": f.stat().st_size, "digest": file_digest(f)}
    m = read_manifest(root) or {}
    m.update({CONTENTS_KEY: contents, "complete": True})
    write_manifest(root, m)
    return m


def _looks_like_file(key: str) -> bool:
    return "." in Path(key).name and not key.startswith("/") and ".." not in Path(key).parts


def listed_files(manifest: Mapping[str, Any]) -> dict[str, dict]:
    """Relative path -> {"bytes"?, "digest"?} of every file a manifest names (see the section comment above)."""
    out: dict[str, dict] = {rel: dict(info) for rel, info in (manifest.get(CONTENTS_KEY) or {}).items()}

    def walk(node, top=False):
        if isinstance(node, list):
            for v in node:
                walk(v)
        if not isinstance(node, Mapping):
            return
        if isinstance(node.get("file"), str):
            out.setdefault(node["file"], {}).update({k: node[k] for k in ("digest", "bytes") if k in node})
        for k, v in node.items():
            if k.endswith("_file") and isinstance(v, str) and f"{k[:-5]}_digest" in node:
                out.setdefault(v, {})["digest"] = node[f"{k[:-5]}_digest"]
            elif isinstance(v, Mapping) and "digest" in v and _looks_like_file(k) and not (top and k == CONTENTS_KEY):
                out.setdefault(k, {})["digest"] = v["digest"]
            if not (top and k == CONTENTS_KEY):
                walk(v)

    walk(manifest, top=True)
    return out


def artifact_problems(directory: str | Path, *, digests: bool = True) -> list[str]:
    """What stops `directory` from being a complete, intact artifact (empty list: nothing): no or unreadable
    manifest, `complete` not true, no file listed, a listed file missing, of another size, or (with `digests`, files
    up to DIGEST_LIMIT, DIGEST_BUDGET bytes in all) of other content; a file with neither its size recorded nor its
    digest re-read must at least end with its format's end marker (Parquet, npz)."""
    root = Path(directory)
    if not root.is_dir():
        return [f"{root}: no such directory"]
    try:
        m = read_manifest(root)
    except (OSError, ValueError) as e:
        return [f"{root / MANIFEST_NAME}: unreadable ({e})"]
    if m is None:
        return [f"{root}: no {MANIFEST_NAME}"]
    if m.get("complete") is not True:
        return [f"{root / MANIFEST_NAME}: not marked complete"]
    files = listed_files(m)
    if not files:
        return [f"{root / MANIFEST_NAME}: lists no file"]
    problems = []
    budget = DIGEST_BUDGET if digests else 0
    for rel, info in sorted(files.items()):
        f = root / rel
        try:
            size = f.stat().st_size
        except OSError:
            problems.append(f"{f}: missing")
            continue
        if "bytes" in info and size != info["bytes"]:
            problems.append(f"{f}: {size} bytes, the manifest says {info['bytes']}")
        elif info.get("digest") and size <= min(DIGEST_LIMIT, budget):
            budget -= size
            if file_digest(f) != info["digest"]:
                problems.append(f"{f}: content differs from the manifest's digest")
        elif "bytes" not in info and not _tail_ok(f):
            problems.append(f"{f}: truncated (no {f.suffix} end marker)")
    return problems


def _tail_ok(f: Path) -> bool:
    """The cheap check of a file whose size the manifest does not record and that is not re-digested: a Parquet
    file ends with its footer magic, an .npz (zip) with an end-of-central-directory record; others pass."""
    if f.suffix == ".parquet":
        with open(f, "rb") as fh:
            if f.stat().st_size < 12:
                return False
            fh.seek(-4, os.SEEK_END)
            return fh.read(4) == b"PAR1"
    if f.suffix == ".npz":
        import zipfile

        return zipfile.is_zipfile(f)
    return True


def verify_artifact(directory: str | Path, *, digests: bool = True) -> Path:
    """`directory` when it is a complete, intact artifact; else ArtifactBroken naming every problem."""
    problems = artifact_problems(directory, digests=digests)
    if problems:
        raise ArtifactBroken("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return Path(directory)


def _replaceable(out: Path, new: Path) -> bool:
    """An existing `out` may be replaced by the artifact in `new` when it is ours: empty, holding a manifest (a
    broken artifact), or holding only files the new artifact also has (an earlier build of it)."""
    if (out / MANIFEST_NAME).is_file():
        return True
    new_files = {q.relative_to(new) for q in new.rglob("*") if q.is_file()}
    return all(q.relative_to(out) in new_files for q in out.rglob("*") if q.is_file())


def publish(tmp: str | Path, out: str | Path, expected: Mapping[str, Any] | None = None,
            keys: Iterable[str] | None = None) -> Path:
    """Move the sealed artifact `tmp` to `out`, the one way every lancet artifact is published. Under a lock on
    `out` (`.<name>.lock` beside it): an intact `out` already there (published meanwhile by a concurrent run with the
    same inputs) is kept and `tmp` discarded — after checking its manifest agrees with `expected` on `keys`
    (default: with the new manifest on `kind` / `artifact`; ManifestMismatch otherwise); a broken or empty `out` is moved aside and replaced; a directory holding other
    files is refused (FileExistsError). Returns `out`."""
    tmp, out = Path(tmp), Path(out)
    aside = None
    with file_lock(out.parent / f".{out.name}.lock"):
        if out.exists():
            if not artifact_problems(out):
                if expected is None:  # at least the same kind of artifact
                    new = read_manifest(tmp) or {}
                    expected, keys = new, [k for k in _KIND_KEYS if k in new]
                check_manifest(out, expected, keys)
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            if not out.is_dir() or not _replaceable(out, tmp):
                raise FileExistsError(f"{out} exists, holds files that are not this artifact's and has no "
                                      f"{MANIFEST_NAME}; refusing to replace it (move it away or choose another output)")
            aside = out.parent / f".trash-{out.name}-{os.getpid()}-{os.urandom(4).hex()}"
            os.rename(out, aside)
        os.rename(tmp, out)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return out


def discard_broken(out: str | Path) -> bool:
    """Move aside and delete `out` when it is a broken artifact of ours (it has a manifest but `artifact_problems`
    finds something), under the same lock as `publish`, so a builder that reuses any directory whose manifest
    matches builds it again. Returns whether it did."""
    out = Path(out)
    if not (out / MANIFEST_NAME).is_file():
        return False
    with file_lock(out.parent / f".{out.name}.lock"):
        if not (out / MANIFEST_NAME).is_file() or not artifact_problems(out):
            return False
        aside = out.parent / f".trash-{out.name}-{os.getpid()}-{os.urandom(4).hex()}"
        os.rename(out, aside)
    shutil.rmtree(aside, ignore_errors=True)
    return True


@contextmanager
def publishing_dir(out: str | Path, expected: Mapping[str, Any] | None = None,
                   keys: Iterable[str] | None = None) -> Iterator[Path]:
    """Build a directory artifact atomically: yield a fresh temporary directory beside `out`; when the block ends
    without error (having written its manifest there, or none: one is made), `seal` it (complete + contents) and
    `publish` it to `out`. A concurrent run that published an intact `out` first wins: this run's copy is dropped
    and theirs used (one copy). On error the temporary directory is removed and nothing is published."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        yield tmp
        seal(tmp)
        publish(tmp, out, expected, keys)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz (np.load reads it) whose bytes depend only on the arrays: np.savez stamps each member with the
    current time, so two identical computations would not give identical files."""
    import io
    import zipfile

    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()

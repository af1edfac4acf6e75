"""Provenance and atomic writes for every artifact lancet produces.

An artifact is a directory holding `manifest.json` (what it was built from: input digests, config, versions) plus its
files. Files are written to a temporary name and renamed into place, so a reader never sees half a file and an
interrupted build leaves no artifact that looks finished. Reusing a directory built from different inputs is refused
with both manifests shown.

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

from lancet_core.errors import ManifestMismatch

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


@contextmanager
def publishing_dir(out: str | Path, expected: Mapping[str, Any], keys: Iterable[str] | None = None) -> Iterator[Path]:
    """Build a directory artifact atomically: yield a fresh temporary directory beside `out`; when the block ends
    without error (having written the manifest there), rename it into place. An empty `out` is replaced. If another
    process published `out` first, theirs is kept when its manifest agrees with `expected` on `keys` (else the
    rename error is raised). On error the temporary directory is removed and nothing is published."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        yield tmp
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.replace(tmp, out)
        except OSError:
            if check_manifest(out, expected, keys) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
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

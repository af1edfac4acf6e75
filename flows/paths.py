"""Where a flow puts its artifacts: content-addressed folders under one work directory.

An artifact built from different inputs lands in a different folder, so a re-run with a grown corpus or another model
never overwrites (or is refused by) an older artifact, and concurrent runs with different inputs never share one.
"""

from __future__ import annotations

from pathlib import Path

from lancet_core.manifest import content_digest, json_digest


def default_work_dir() -> Path:
    return Path.cwd() / ".lancet"


def artifact_dir(work_dir: str | Path, stage: str, *inputs) -> Path:
    """work_dir/stage/<12 hex of the digest of inputs>; inputs are paths (lancet_core.manifest.content_digest),
    digest strings or JSON values."""
    parts = [content_digest(x) if isinstance(x, Path) else x for x in inputs]
    return Path(work_dir) / stage / json_digest(parts).split(":")[1][:12]

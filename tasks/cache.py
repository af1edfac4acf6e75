"""The one cache policy every lancet task uses, defined once.

Key = task source code + task inputs, where
- an input that names an existing file or directory is replaced by its *content digest* (a directory with a
  manifest.json is represented by that manifest's digest, which already lists its content digests), so renaming or
  touching a file does not matter but changing a byte does;
- an input whose parameter name starts with `out_` is an output location: only its path string counts (its content
  is what the task produces, so it must not change the key);
- pydantic configs are keyed by their JSON dump.
Never keyed on tensors or DataFrames: tasks take paths.

`ensure_output` re-runs a task with refresh_cache when a cached result points at an output that was deleted since.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel

from lancet_core.manifest import content_digest


def _stable(name: str, value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {"__config__": type(value).__name__, **value.model_dump(mode="json")}
    if isinstance(value, str | Path) and not name.startswith("out_"):
        s = str(value)
        if s and len(s) < 4096 and "\n" not in s:
            p = Path(s)
            if p.exists():
                return {"__content__": content_digest(p)}
    if isinstance(value, list | tuple):
        return [_stable(name, v) for v in value]
    if isinstance(value, dict):
        return {k: _stable(name, v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


@dataclass
class ContentInputs(CachePolicy):
    """Inputs keyed by content digest for paths, JSON dump for configs, value otherwise."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        if not inputs:
            return None
        return hash_objects({k: _stable(k, v) for k, v in sorted(inputs.items())}, raise_on_failure=True)


LANCET_CACHE: CachePolicy = TASK_SOURCE + ContentInputs()


def _gone(result) -> bool:
    """A returned path (or any non-empty path in a returned tuple/list) that no longer exists."""
    if isinstance(result, tuple | list):
        return any(_gone(r) for r in result)
    return isinstance(result, str | Path) and str(result) != "" and not Path(result).exists()


def ensure_output(task, **kwargs):
    """Call `task(**kwargs)`; if it returned a cached path (or tuple of paths) that no longer exists, run it again
    without the cache."""
    result = task(**kwargs)
    if _gone(result):
        result = task.with_options(refresh_cache=True)(**kwargs)
    return result

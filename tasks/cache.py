"""The one cache policy every lancet task uses, defined once, and the check every cached answer passes.

Key = task source code + task inputs, where
- an input that names an existing file or directory is replaced by its *content digest* (a directory with a
  manifest.json is represented by that manifest's digest, which already lists its content digests), so renaming or
  touching a file does not matter but changing a byte does;
- an input whose parameter name starts with `out_` is an output location: only its absolute path counts (its content
  is what the task produces, so it must not change the key; the same relative path in two work dirs is two keys);
- pydantic configs are keyed by their JSON dump.
Never keyed on tensors or DataFrames: tasks take paths.

`ensure_output` is how flows call a cached task. Its results are stored beside the output location
(`<stage folder>/.prefect-results`, not Prefect's global ~/.prefect/storage), so a work dir holds its own cache and two
work dirs never answer for each other. A result, fresh or cached, is then checked: every output location must be a
complete artifact (`lancet_core.manifest.artifact_problems`: manifest says complete, each listed file present with its
size, digests re-read where cheap) and every returned path must exist inside one. A cached answer that fails is recomputed
(refresh_cache); a fresh one that fails is an error (ArtifactBroken), never a path handed on.

`publish_output` is the body of a task that writes a directory artifact: an intact output (an earlier or concurrent
run's) is used as is, else the artifact is built in a temporary directory and published by `manifest.publishing_dir`.
Builds of one output are serialised (`one_build`): of several runs at once, one computes and the others wait for it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel

from lancet_core.manifest import ArtifactBroken, artifact_problems, content_digest, file_lock, publishing_dir

log = logging.getLogger(__name__)
RESULTS_DIR = ".prefect-results"


def _stable(name: str, value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {"__config__": type(value).__name__, **value.model_dump(mode="json")}
    if isinstance(value, str | Path) and name.startswith("out_"):
        return {"__output__": str(Path(value).resolve())} if str(value) else ""
    if isinstance(value, str | Path):
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


def _outputs(kwargs: dict[str, Any]) -> list[Path]:
    return [Path(v).resolve() for k, v in sorted(kwargs.items()) if k.startswith("out_") and v]


def results_storage(kwargs: dict[str, Any]) -> Path | None:
    """Where a call's cache records live (a Prefect LocalFileSystem path): beside its (first) output location; None
    when it has none. A record torn by a concurrent writer reads as a cache miss (Prefect's ResultStore.exists)."""
    outs = _outputs(kwargs)
    return outs[0].parent / RESULTS_DIR if outs else None


def _paths(result) -> list[Path]:
    if isinstance(result, tuple | list):
        return [p for r in result for p in _paths(r)]
    return [Path(result)] if isinstance(result, str | Path) and str(result) != "" else []  # "" = an absent option


def output_problems(result, kwargs: dict[str, Any]) -> list[str]:
    """Why a task's result cannot be used: an output location that is not a complete artifact, a returned path that
    is missing or outside every output location. Empty: it can."""
    outs = _outputs(kwargs)
    problems = [p for out in outs for p in artifact_problems(out)]
    for p in _paths(result):
        q = p.resolve()
        if not q.exists():
            problems.append(f"{p}: missing")
        elif outs and not any(q == o or o in q.parents for o in outs):
            problems.append(f"{p}: not inside the output location {', '.join(map(str, outs))}")
    return problems


def ensure_output(task, **kwargs):
    """Call the cached `task(**kwargs)` with its results stored beside its output; if the answer's outputs are not
    complete and intact (see the module docstring), run it again without the cache; if a fresh run's are not either,
    raise ArtifactBroken."""
    storage = results_storage(kwargs)
    t = task.with_options(result_storage=storage) if storage is not None else task
    result = t(**kwargs)
    problems = output_problems(result, kwargs)
    if problems:
        log.info("cache: %s's cached output is not intact (%s); recomputing", task.name, problems[0])
        result = t.with_options(refresh_cache=True)(**kwargs)
        problems = output_problems(result, kwargs)
        if problems:
            raise ArtifactBroken(f"{task.name}: its output is not a complete artifact: {'; '.join(problems[:5])}")
    return result


@contextmanager
def one_build(out_dir: str | Path) -> Iterator[bool]:
    """Hold `out_dir`'s build lock (`.<name>.build.lock` beside it) and yield whether an intact artifact is there
    now: concurrent runs that would build the same output (flows name output folders by their inputs' digests) build
    it once; the others wait, then use it. A killed holder's lock goes with its process, and its temporary build
    folder (`.tmp-<name>-*`, manifest.publishing_dir) is removed by the next build of that output."""
    out = Path(out_dir)
    with file_lock(out.parent / f".{out.name}.build.lock"):
        # temporary folders of this output's earlier builds: no build of it runs but ours, so they are a killed run's
        for leftover in out.parent.glob(f".tmp-{out.name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        yield not artifact_problems(out)


def publish_output(out_dir: str | Path, build: Callable[[Path], Any]) -> Path:
    """A task's directory artifact at `out_dir`: when out_dir already holds a complete, intact one (an earlier or a
    concurrent run's) it is used as is; else, under `one_build`, `build(tmp)` writes the artifact into a fresh
    temporary directory, which is sealed and published (manifest.publishing_dir)."""
    out = Path(out_dir)
    if not artifact_problems(out):
        return out
    with one_build(out) as there:
        if not there:
            with publishing_dir(out) as tmp:
                build(tmp)
    return out

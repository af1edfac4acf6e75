"""Prefect tasks: model dir + tokens -> gradient store directory, one task per shard, over a chosen task runner.

`build_index` (cached on its inputs' content) is the coordinator: it plans the build (lancet_core.index.build
.plan_build), maps `index_shard` over the shards still to compute on a task runner — in this process by default
(Prefect's ThreadPoolTaskRunner, one shard at a time: torch already has the threads lancet_core.threads gives it), or
prefect-ray's RayTaskRunner on a Ray cluster (`runner="ray"`: `ray_address` None = a new local cluster, "auto" = the one this
machine is part of, "ray://host:10001" or "host:port" = a remote one), each shard asking Ray for one GPU when the
cluster has GPUs — then records every finished shard in the manifest as it arrives (only this process writes the
manifest) and finalises the store (exact reduction of the Kronecker factor sums, curvature). A shard task that fails
(a killed worker) loses only its shard: the others are recorded, the task fails naming the lost shards, and a re-run
computes only those. Ray does not retry a shard (max_retries=0), so a lost shard is reported, never silently redone.

Knows about Prefect, prefect-ray and the build's three steps; knows nothing about gradients or the store's format.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from tqdm import tqdm

from lancet_core.errors import LancetError
from lancet_core.index.build import (
    BuildPlan,
    ShardJob,
    compute_shard,
    finalize_build,
    plan_build,
    record_shards,
    store_lock,
)
from lancet_core.index.config import IndexConfig
from tasks.cache import LANCET_CACHE

RUNNERS = ("local", "ray")
log = logging.getLogger(__name__)


class ShardsLost(LancetError):
    """Some shard computations failed (e.g. their worker was killed); the store is resumable."""


class RayUnavailable(LancetError):
    """The Ray cluster asked for cannot be reached."""


@task(name="index_shard", cache_policy=NO_CACHE, persist_result=False, retries=0)
def index_shard(plan: BuildPlan, job: ShardJob, threads: int | None = None) -> dict:
    """Compute one shard of the store (files written atomically); returns its manifest entry with its timing.
    `threads`: torch threads for the computation (a Ray task: the CPUs it reserved; float32 reductions, so the
    bytes, depend on it); None = this process's setting."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        entry = compute_shard(plan, job)
        return {**entry, "_seconds": time.perf_counter() - t0, "_host": _host(), "_threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(before)


def _host() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def check_ray_reachable(ray_address: str | None, timeout_s: float = 3.0) -> None:
    """Fail in seconds (RayUnavailable) when a 'host:port' / 'ray://host:port' address does not accept a TCP
    connection: ray.init would retry for minutes. None (a new local instance) and 'auto' are not checked here."""
    import socket

    if ray_address in (None, "auto"):
        return
    hostport = ray_address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    host, port = (host, int(port)) if host else (hostport, 10001)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise RayUnavailable(f"runner 'ray': the Ray cluster at {ray_address} does not answer ({e})") from None


def _remote_options(options: dict):
    """prefect-ray's per-task resource requests (Ray only: the local runner never imports ray)."""
    if not options:
        return contextlib.nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(**options)


@contextlib.contextmanager
def task_runner(runner: str = "local", ray_address: str | None = None):
    """The task runner that shards are mapped over, started; the remote options each shard asks for; the torch
    threads a shard computes with (None: the process's own)."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    if runner == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        with ThreadPoolTaskRunner(max_workers=1) as tr:
            yield tr, {}, None
        return
    import ray
    from prefect_ray import RayTaskRunner

    check_ray_reachable(ray_address)
    init = {"logging_level": logging.WARNING, "log_to_driver": False}
    if ray_address is None:
        init["include_dashboard"] = False
    runner_cm = RayTaskRunner(address=ray_address, init_kwargs=init)
    try:
        tr = runner_cm.__enter__()
    except (ConnectionError, ray.exceptions.RayError) as e:
        where = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray instance"
        raise RayUnavailable(f"runner 'ray': cannot connect to {where}: {str(e).splitlines()[0]} (a cluster with "
                             "token auth needs RAY_AUTH_MODE=token here)") from e
    try:
        options = {"max_retries": 0, "num_cpus": 1}
        if ray.cluster_resources().get("GPU", 0) > 0:
            options["num_gpus"] = 1
        yield tr, options, options["num_cpus"]
    finally:
        runner_cm.__exit__(*sys.exc_info())


@task(name="build_index", cache_policy=LANCET_CACHE, persist_result=True)
def build_index(model_dir: str, tokens_path: str, out_store_dir: str, cfg: IndexConfig, runner: str = "local",
                ray_address: str | None = None) -> str:
    """Build (or finish) the gradient store in `out_store_dir` (an output location: `out_` keeps it out of the cache
    key), one `index_shard` task per shard on the chosen runner, with a progress bar over shards; returns its path."""
    return run_index_build(model_dir, tokens_path, out_store_dir, cfg, runner=runner, ray_address=ray_address)


def _up_to_date(store_dir: str, model_dir: str, tokens_path: str, cfg: IndexConfig) -> bool:
    """Whether `store_dir` holds a complete, intact store (manifest.artifact_problems) built from exactly this model,
    these tokens and this identity, with every curvature asked for: then there is nothing to plan."""
    import json

    from lancet_core.index.build import tokens_file
    from lancet_core.index.curvature import curvature_file
    from lancet_core.manifest import artifact_problems, file_digest, read_manifest
    from lancet_core.model_io import model_digest, tokenizer_digest

    if artifact_problems(store_dir):
        return False
    m = read_manifest(store_dir) or {}
    try:
        want = {"tokens_digest": file_digest(tokens_file(tokens_path)), "index_config": cfg.store_identity(),
                "model_digest": model_digest(model_dir), "tokenizer_digest": tokenizer_digest(model_dir)}
    except (OSError, ValueError):
        return False
    same = all(json.dumps(m.get(k), sort_keys=True) == json.dumps(v, sort_keys=True) for k, v in want.items())
    return same and all(curvature_file(k, "module", cfg.damping_ratio) in (m.get("curvature") or {})
                        for k in cfg.curvature)


def run_index_build(model_dir: str, tokens_path: str, store_dir: str, cfg: IndexConfig, *, runner: str = "local",
                    ray_address: str | None = None, timings: list | None = None) -> str:
    """The coordinator (inside a Prefect flow or task): plan, map the shards, record them as they finish,
    finalise. Returns store_dir; raises ShardsLost after recording every shard that did finish. `timings`: a list
    that gets {index, seconds, worker, finished_at} per computed shard (for benchmarks)."""
    t0 = time.perf_counter()
    cfg.require_resolved()  # response_tokens='auto' needs the judge: resolve_window first (before any work)
    with store_lock(store_dir):
        if _up_to_date(store_dir, model_dir, tokens_path, cfg):
            # built meanwhile by a concurrent run (we waited on its lock): planning again would rewrite the manifest
            # (complete=false for a moment) under the feet of the runs already reading the store
            log.info("index: %s is complete and built from these inputs; reusing it", store_dir)
            return str(store_dir)
        plan = plan_build(Path(model_dir), Path(tokens_path), Path(store_dir), cfg)
        entries = {e["index"]: e for e in plan.done}
        failed: list[tuple[int, str]] = []
        timings = [] if timings is None else timings
        if plan.todo:
            with task_runner(runner, ray_address) as (tr, options, threads), _remote_options(options):
                futures = tr.map(index_shard, {"plan": unmapped(plan), "job": list(plan.todo),
                                               "threads": unmapped(threads)})
                job_of = {f.task_run_id: j for f, j in zip(futures, plan.todo, strict=True)}
                with tqdm(total=len(plan.todo), desc=f"index: shards ({runner})", unit="shard", leave=False) as bar:
                    for f in as_completed(futures):
                        job = job_of[f.task_run_id]
                        try:
                            got = f.result()
                        except Exception as e:  # noqa: BLE001 - a lost shard is reported below, the others kept
                            failed.append((job.index, f"{type(e).__name__}: {e}".splitlines()[0][:300]))
                        else:
                            timings.append({"index": job.index, "seconds": round(got.pop("_seconds"), 3),
                                            "worker": got.pop("_host"), "threads": got.pop("_threads"),
                                            "finished_at": round(time.perf_counter() - t0, 3)})
                            entries[job.index] = got
                            record_shards(plan, entries.values())
                        bar.update(1)
        if failed:
            lost = sorted(i for i, _ in failed)
            raise ShardsLost(
                f"{store_dir}: {len(failed)} of {len(plan.todo)} shard(s) failed ({lost[:10]}; first: "
                f"{sorted(failed)[0][1]}); the {len(timings)} finished are recorded: re-run to compute only the lost"
            )
        out = finalize_build(plan, entries.values())
    if plan.todo:
        secs = [t["seconds"] for t in timings]
        # detail under the flow's one index line (`lancet -v` shows it): where the shards ran and how long each took
        log.debug("index: %d shard(s) on %s in %.1f s (shard %.2f-%.2f s, %d worker process(es))", len(timings),
                 runner, time.perf_counter() - t0, min(secs), max(secs), len({t["worker"] for t in timings}))
    return str(out)

"""MLflow: the only module in lancet that imports mlflow (plain functions, then the two Prefect tasks using them).

One MLflow run per realign flow run (tagged with the Prefect flow-run id): params (every config, flattened), metrics
before/after and per-phase timings, artifacts (influence.parquet, its histogram, the top-k explanation table, training
pairs, metrics.json), dataset inputs with their digests, and the corrected model logged with the transformers flavor,
registered under a name with alias `candidate`; alias `champion` moves to it only when the gate passes.

Also resolves `models:/...` URIs (e.g. `models:/lancet-demo@champion`) to a plain local HF model directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5,<6", "tokenizers", "safetensors"]


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def configure(tracking_uri: str | None, experiment: str) -> str:
    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    return uri


def flatten(prefix: str, obj: Any, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'prefix.a.b': 1}; lists become JSON strings (MLflow params are flat strings)."""
    out = {} if out is None else out
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list | tuple):
        out[prefix] = json.dumps(obj, default=str)[:6000]
    else:
        out[prefix] = obj
    return out


def _has_alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def resolve_model(model: str, cache_dir: str | Path) -> Path:
    """A local HF model directory for `model`: a path is returned as is; a `models:/` or `runs:/` URI is downloaded
    once into `cache_dir` and laid out as a normal HF directory (weights + tokenizer side by side)."""
    if not model.startswith(("models:/", "runs:/")):
        return Path(model)
    uri = model
    if model.startswith("models:/") and "@" in model:  # pin the alias to a version so the cache key is stable
        name, alias = model[len("models:/"):].split("@", 1)
        mv = MlflowClient().get_model_version_by_alias(name, alias)
        uri = f"models:/{name}/{mv.version}"
    dst = Path(cache_dir) / uri.replace(":/", "_").replace("/", "_")
    if (dst / "config.json").exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    raw = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp / "raw")))
    hf = tmp / "hf"
    shutil.copytree(raw / "model", hf)
    tok_dir = raw / "components" / "tokenizer"
    if tok_dir.exists():
        for f in tok_dir.iterdir():
            shutil.copy2(f, hf / f.name)
    if not dst.exists():  # another run may have finished the same download first
        hf.rename(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    return dst


def champion_or(initial_model: str, registered_name: str) -> str:
    """`models:/<name>@champion` when the registry has a champion, else the configured initial model."""
    client = MlflowClient()
    try:
        client.get_registered_model(registered_name)
    except mlflow.exceptions.MlflowException:
        return initial_model
    return f"models:/{registered_name}@champion" if _has_alias(client, registered_name, "champion") else initial_model


def start_run(flow_run_id: str | None, run_name: str | None, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    run = mlflow.start_run(run_name=run_name, tags={"prefect.flow_run_id": flow_run_id or "local", **tags})
    flat = flatten("", params)
    mlflow.log_params({k: ("" if v is None else v) for k, v in flat.items()})
    return run.info.run_id


def log_dataset(path: str | Path, name: str, digest: str, context: str) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    ds = MetaDataset(resolve_dataset_source(str(Path(path).resolve())), name=name, digest=digest.split(":")[-1][:32])
    mlflow.log_input(ds, context=context)


def log_metrics(metrics: Mapping[str, float], prefix: str = "") -> None:
    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)})


def log_artifacts(paths: Mapping[str, str | Path]) -> None:
    """{artifact subdirectory: local file} -> logged under that subdirectory."""
    for sub, p in paths.items():
        if p and Path(p).exists():
            mlflow.log_artifact(str(p), artifact_path=sub)


def log_and_register_model(model_dir: str | Path, registered_name: str) -> str:
    """Log the corrected model with the transformers flavor and register it; alias `candidate`. Returns the version."""
    from lancet_core.model_io import load_model, load_tokenizer, model_digest

    if not _NAME_RE.match(registered_name):
        raise ValueError(f"registered model name {registered_name!r}: use letters, digits, '.', '_' or '-'")
    client = MlflowClient()
    digest = model_digest(model_dir)
    try:  # a cached re-run produced the very same model: reuse its version instead of registering a duplicate
        same = client.search_model_versions(f"name = '{registered_name}' and tags.`lancet.model_digest` = '{digest}'")
    except mlflow.exceptions.MlflowException:
        same = []
    if same:
        version = str(max(int(v.version) for v in same))
        client.set_registered_model_alias(registered_name, "candidate", version)
        mlflow.set_tag("lancet.registered_version", f"{version} (reused: identical weights)")
        return version
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tok},
        name="model",
        task="text-generation",
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_name,
    )
    version = str(info.registered_model_version)
    client.set_model_version_tag(registered_name, version, "lancet.model_digest", digest)
    client.set_registered_model_alias(registered_name, "candidate", version)
    mlflow.set_tag("lancet.registered_version", version)
    return version


def promote(registered_name: str, version: str, decision_promote: bool, reasons: list[str]) -> None:
    """Move alias `champion` to `version` when the gate passed; record the decision either way."""
    client = MlflowClient()
    text = ("PROMOTED to champion: " if decision_promote else "NOT promoted: ") + "; ".join(reasons)
    client.set_model_version_tag(registered_name, version, "lancet.gate", "passed" if decision_promote else "failed")
    client.set_model_version_tag(registered_name, version, "lancet.gate_reasons", text[:5000])
    mlflow.set_tag("lancet.gate", "passed" if decision_promote else "failed")
    mlflow.set_tag("lancet.gate_reasons", text[:5000])
    if decision_promote:
        client.set_registered_model_alias(registered_name, "champion", version)
    log.info(text)


def end_run(status: str = "FINISHED") -> None:
    mlflow.end_run(status=status)


# ------------------------------------------------------------------------------------------------ Prefect tasks
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="resolve_start_model", cache_policy=NO_CACHE)
def resolve_start_model(model: str, registered_name: str, start_from_champion: bool, tracking_uri: str | None,
                        experiment: str, cache_dir: str) -> str:
    """The model this run corrects: the registry's champion when asked and present, else `model` (path or URI)."""
    configure(tracking_uri, experiment)
    chosen = champion_or(model, registered_name) if start_from_champion else model
    return str(resolve_model(chosen, cache_dir))


@task(name="track_realign", cache_policy=NO_CACHE)
def track_realign(*, flow_run_id: str | None, params: dict, tracking_uri: str | None, experiment: str,
                  registered_name: str, start_model: str, corrected_model: str | None, datasets: dict[str, tuple[str, str]],
                  metrics_before: dict, metrics_after: dict | None, extra_metrics: dict, artifacts: dict[str, str],
                  gate: dict | None) -> dict:
    """Log one realign flow run to MLflow; register and (if the gate passed) promote the corrected model.

    `datasets`: name -> (path, digest). `gate`: {"promote": bool, "reasons": [...]}, or None when nothing was
    corrected. Returns {"run_id", "version", "promoted", "reasons"}.
    """
    uri = configure(tracking_uri, experiment)
    out = {"run_id": None, "version": None, "promoted": False, "reasons": [], "tracking_uri": uri}
    start_run(flow_run_id, None, params, {"lancet.start_model": start_model})
    try:
        out["run_id"] = mlflow.active_run().info.run_id
        for name, (path, digest) in datasets.items():
            if path and Path(path).exists():
                log_dataset(path, name, digest, context=name)
        log_metrics(metrics_before, prefix="before.")
        if metrics_after:
            log_metrics(metrics_after, prefix="after.")
        log_metrics(extra_metrics)
        log_artifacts(artifacts)
        if corrected_model and gate is not None:
            version = log_and_register_model(corrected_model, registered_name)
            promote(registered_name, version, gate["promote"], gate["reasons"])
            out.update(version=version, promoted=gate["promote"], reasons=gate["reasons"])
        else:
            mlflow.set_tag("lancet.gate", "nothing to correct")
        end_run("FINISHED")
    except BaseException:
        end_run("FAILED")
        raise
    return out

"""MLflow: the only module in lancet that imports mlflow (plain functions, then the Prefect tasks using them).

One MLflow run per realign flow run (tagged with the Prefect flow-run id), opened when the flow starts (so its
duration is the job's, and a failing stage marks it FAILED with the error) and completed at the end: params (every
config, flattened), metrics before/after and per-phase timings, a before/after comparison table and the influence
top-k as MLflow tables (shown in the UI's artifact view), artifacts (influence.parquet, its histogram, the top-k
explanation, training pairs, metrics.json, and `charts/`: the influence distribution with the flagged rows marked and
the before/after rates as PNGs), dataset inputs with their digests, and the corrected model logged with the
transformers flavor, registered under a name with alias `candidate`; alias `champion` moves to it only when the gate
passes. With a sqlite tracking URI, artifacts go next to the database (`mlartifacts/`), never into the current
directory.

Also resolves `models:/...` URIs (e.g. `models:/lancet-demo@champion`) to a plain local HF model directory.

The monitor flow's tracking: ONE MLflow run per monitored model version (tag `lancet.monitor_model`: `name/version`
for a registered model, `digest:<...>` for a plain directory), found again on every check, where each check appends
one step to the metric series `harmful_rate`, `harmful_rate.<category>`, `threshold`, `drift` (0/1) and
`realign_held` (1: drifted, but a re-alignment was held back); each re-alignment it started is recorded as a tag
`lancet.realign_attempt.step<N>` (JSON: flow run id, inputs key, start time), which `realign_attempts` reads back with
the realign run's MLflow record (found by its tag `prefect.flow_run_id`: status, end time, tag `lancet.gate`) so the
monitor does not start the same refused re-alignment again (lancet_core.evaluate.drift.decide_realign).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# lancet runs offline with telemetry off (docs/design.md §10), however the process was started (CLI, a Prefect
# worker, a notebook): MLflow reads this at each call, and with it set never writes ~/.config/mlflow/telemetry.json.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5,<6", "tokenizers", "safetensors"]


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_STORES_READY: set[str] = set()


def ensure_tracking_store(uri: str) -> None:
    """Create a sqlite tracking store (tables, migrations, the registry's tables) under a file lock beside the
    database (`<db>.lock`), once per process and URI: two processes creating a brand-new store at once would both run
    MLflow's migrations and one would fail (alembic 'Online migration expected to match one row'); with the lock the
    second waits and finds the store made. Other URIs (servers, file stores) are left to MLflow."""
    if not uri.startswith("sqlite:///") or uri in _STORES_READY:
        return
    from lancet_core.manifest import file_lock

    db = Path(uri[len("sqlite:///"):]).resolve()
    with file_lock(db.with_name(db.name + ".lock")):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # creates the tracking tables and the default experiment
        client.search_registered_models(max_results=1)  # and the registry's
    _STORES_READY.add(uri)


def configure(tracking_uri: str | None, experiment: str) -> str:
    """Point MLflow at `tracking_uri` and `experiment` (created with its artifacts beside a sqlite database; a new
    sqlite store is created under a lock first: ensure_tracking_store)."""
    uri = tracking_uri or default_tracking_uri()
    ensure_tracking_store(uri)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment) is None:
        artifacts = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
        try:
            mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri())
        except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
            pass
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
    import tempfile

    from lancet_core.manifest import artifact_problems, publishing_dir, write_manifest

    dst = Path(cache_dir) / uri.replace(":/", "_").replace("/", "_")
    if not artifact_problems(dst):  # downloaded before, complete and intact
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    # published like every artifact (manifest.publishing_dir): concurrent runs downloading the same version keep one
    with tempfile.TemporaryDirectory(prefix=".tmp-download-", dir=dst.parent) as raw_dir, publishing_dir(dst) as hf:
        raw = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=raw_dir))
        shutil.copytree(raw / "model", hf, dirs_exist_ok=True)
        tok_dir = raw / "components" / "tokenizer"
        if tok_dir.exists():
            for f in tok_dir.iterdir():
                shutil.copy2(f, hf / f.name)
        write_manifest(hf, {"kind": "downloaded_model", "source": uri})
    return dst


def champion_or(initial_model: str, registered_name: str) -> str:
    """`models:/<name>@champion` when the registry has a champion, else the configured initial model."""
    client = MlflowClient()
    try:
        client.get_registered_model(registered_name)
    except mlflow.exceptions.MlflowException:
        return initial_model
    return f"models:/{registered_name}@champion" if _has_alias(client, registered_name, "champion") else initial_model


def start_run(experiment: str, flow_run_id: str | None, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """Create a RUNNING run (start time now) in `experiment` with every parameter logged; returns its id. Not made
    the active run: later steps resume it by id."""
    from mlflow.entities import Param

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(exp.experiment_id, tags={"prefect.flow_run_id": flow_run_id or "local", **tags})
    flat = [Param(k, str("" if v is None else v)[:6000]) for k, v in flatten("", params).items()]
    for i in range(0, len(flat), 100):
        client.log_batch(run.info.run_id, params=flat[i : i + 100])
    return run.info.run_id


def process_identity(pid: int | None = None) -> str | None:
    """'<boot id>:<pid>:<start time in clock ticks>' of a process (default: this one), or None where /proc is not
    there. Unique per process across pid reuse and reboots: what a run records so a later lancet can tell whether the
    process that opened it is still alive."""
    pid = os.getpid() if pid is None else pid
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}:{pid}:{stat.rsplit(')', 1)[1].split()[19]}"


def gone_pid(ident: str) -> int | None:
    """The pid of a recorded process identity ('<boot id>:<pid>:<start time>') whose process no longer exists on
    this machine, else None (still running, or not an identity)."""
    parts = ident.split(":")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    pid = int(parts[1])
    return None if process_identity(pid) == ident else pid


def reap_abandoned_runs(experiment: str) -> list[str]:
    """Mark KILLED every RUNNING run of `experiment` opened on this host by a process that is gone (its recorded
    `lancet.process` identity no longer exists: killed with -9, OOM, power loss), with tag `lancet.error` saying so.
    Runs of live processes and of other hosts are left alone. Returns the run ids marked."""
    import socket

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    host = socket.gethostname()
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    reaped = []
    for run in runs:
        tags = run.data.tags
        ident = tags.get("lancet.process")
        if tags.get("lancet.host") != host or not ident:
            continue
        pid = gone_pid(ident)
        if pid is None:
            continue  # still running
        client.set_tag(run.info.run_id, "lancet.error", f"the process that ran it (pid {pid} on {host}) ended without "
                       "closing the run (killed?); marked KILLED by the next lancet run on this tracking store")
        client.set_terminated(run.info.run_id, status="KILLED")
        reaped.append(run.info.run_id)
    if reaped:
        log.warning("tracking: %d run(s) left RUNNING by a killed lancet process marked KILLED: %s", len(reaped),
                    ", ".join(reaped))
    return reaped


def fail_run(run_id: str, error: str) -> None:
    """Mark a run FAILED with the error that stopped the flow (tag `lancet.error`)."""
    client = MlflowClient()
    client.set_tag(run_id, "lancet.error", error[:5000])
    client.set_terminated(run_id, status="FAILED")


def comparison_table(before: Mapping[str, Any], after: Mapping[str, Any] | None) -> dict[str, list]:
    """Before/after side by side, one row per metric (the MLflow table and the terminal table)."""
    rows: dict[str, list] = {"metric": [], "before": [], "after": [], "change": []}
    for k, b in before.items():
        if not isinstance(b, int | float) or isinstance(b, bool) or k.startswith(("n_", "eval_")):
            continue
        a = (after or {}).get(k)
        rows["metric"].append(k)
        rows["before"].append(round(float(b), 4))
        rows["after"].append(None if a is None else round(float(a), 4))
        rows["change"].append(None if a is None else round(float(a) - float(b), 4))
    return rows


def log_dataset(path: str | Path, name: str, digest: str, context: str, attempts: int = 3) -> None:
    """Log a dataset input of the active run. MLflow looks the (experiment, name, digest) row up, then inserts it:
    two runs logging the same dataset at once can both miss it, and the second insert fails on the table's unique
    key (seen with 4 concurrent realigns on one sqlite store). A retry finds the row the other run inserted."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException

    ds = MetaDataset(resolve_dataset_source(str(Path(path).resolve())), name=name, digest=digest.split(":")[-1][:32])
    for attempt in range(attempts):
        try:
            mlflow.log_input(ds, context=context)
            return
        except MlflowException as e:
            if attempt == attempts - 1 or not any(m in str(e) for m in ("UNIQUE constraint", "IntegrityError",
                                                                         "Duplicate entry", "duplicate key")):
                raise
            time.sleep(0.2 * (attempt + 1))


def log_metrics(metrics: Mapping[str, float], prefix: str = "") -> None:
    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)})


def log_artifacts(paths: Mapping[str, str | Path]) -> None:
    """{artifact subdirectory: local file} -> logged under that subdirectory."""
    for sub, p in paths.items():
        if p and Path(p).exists():
            mlflow.log_artifact(str(p), artifact_path=sub)


def log_and_register_model(model_dir: str | Path, registered_name: str) -> str:
    """Log the corrected model with the transformers flavor and register it; alias `candidate`. Returns the version.
    With a sqlite store the look-up of identical weights and the registration hold a file lock beside the database
    (`<db>.registry.lock`), so concurrent runs that corrected the model identically register one version."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return _log_and_register_model(model_dir, registered_name)
    from lancet_core.manifest import file_lock

    db = Path(uri[len("sqlite:///"):]).resolve()
    with file_lock(db.with_name(db.name + ".registry.lock")):
        return _log_and_register_model(model_dir, registered_name)


def _log_and_register_model(model_dir: str | Path, registered_name: str) -> str:
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
    said = io.StringIO()
    with contextlib.redirect_stderr(said):  # MLflow prints "Successfully registered ..." itself; we log the version
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tok},
            name="model",
            task="text-generation",
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=registered_name,
        )
    log.debug("mlflow: %s", said.getvalue().strip())
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


MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local (sqlite or file) store by default


def run_page_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's own page in the MLflow UI (not the experiment's GenAI "Overview", where MLflow 3 lands): the
    tracking server itself for an http(s) URI, else `mlflow ui`'s default address for a local store."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


CHARTS = {"influence": "charts/influence.png", "before_after": "charts/before_after.png",
          "budget": "charts/budget_curve.png"}


def _budget_of(model_dir: str | None) -> dict | None:
    """The budget-driven training record in a corrected model's manifest (lancet_core.correct.budget), or None."""
    from lancet_core.manifest import read_manifest

    return (read_manifest(Path(model_dir)) or {}).get("budget") if model_dir else None


def log_budget_curve(budget: dict | None) -> None:
    """The harm/utility curve of a budget-driven correction as metric series (x = optimizer step): budget.harmful_rate
    on the check prompts, budget.nll_rel_change, budget.over_refusal_delta, budget.used, budget.lr_scale; plus the kept
    step, the steps run, the checks' share of the training time, and why it stopped (tag lancet.budget_stop)."""
    if not budget:
        return
    for r in budget["curve"]:
        mlflow.log_metrics({"budget.harmful_rate": r["harmful_rate"], "budget.nll_rel_change": r["nll_rel_change"],
                            "budget.over_refusal_delta": r["over_refusal_delta"], "budget.used": r["budget_used"],
                            "budget.lr_scale": r["lr_scale"]}, step=int(r["step"]))
    mlflow.log_metrics({"budget.best_step": budget["best_step"], "budget.last_step": budget["curve"][-1]["step"],
                        **({"budget.check_share_of_time": budget["check_share_of_time"]}
                           if budget.get("check_share_of_time") is not None else {})})
    mlflow.set_tag("lancet.budget_stop", budget.get("stop_reason") or "finished")


def log_charts(metrics_before: Mapping[str, Any], metrics_after: Mapping[str, Any] | None,
               scored_path: str | Path | None, budget: dict | None = None) -> dict[str, str]:
    """Draw the influence distribution with the flagged rows marked (from the repair's scored.parquet), the
    before/after rates and (budget-driven IBO) the harm/utility curve, log them to the active run under `charts/`;
    returns {name: the logged PNG's URI}."""
    import tempfile

    import pyarrow.parquet as pq

    from lancet_core.recall.plots import before_after_chart, influence_flagged_chart

    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lancet-charts-") as tmp:
        drawn = {}
        if scored_path and Path(scored_path).is_file():
            t = pq.read_table(scored_path, columns=["influence_score", "lancet_flag"])
            drawn["influence"] = influence_flagged_chart(t["influence_score"].to_numpy(),
                                                         t["lancet_flag"].to_numpy(zero_copy_only=False),
                                                         Path(tmp) / Path(CHARTS["influence"]).name)
        if metrics_after:
            drawn["before_after"] = before_after_chart(metrics_before, metrics_after,
                                                       Path(tmp) / Path(CHARTS["before_after"]).name)
        if budget:
            from lancet_core.correct.budget import plot_curve

            drawn["budget"] = plot_curve(budget, Path(tmp) / Path(CHARTS["budget"]).name)
        for name, png in drawn.items():
            mlflow.log_artifact(str(png), artifact_path=str(Path(CHARTS[name]).parent))
            out[name] = mlflow.get_artifact_uri(CHARTS[name])
    return out


def _pinned(uri: str) -> tuple[str, str | None]:
    """`models:/name@alias` -> (`models:/name/<version>`, version); other URIs and paths unchanged (version None, or
    the version written in a `models:/name/N` URI)."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/"):]
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = MlflowClient().get_model_version_by_alias(name, alias)
            return f"models:/{name}/{mv.version}", str(mv.version)
        name, _, version = rest.partition("/")
        return uri, version or None
    return uri, None


def find_monitor_run(experiment: str, model_key: str) -> str | None:
    """The id of the monitor run of `model_key` in `experiment`, None when it was never checked."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`lancet.monitor_model` = '{model_key}'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    return found[0].info.run_id if found else None


def monitor_run(experiment: str, model_key: str, source: str) -> str:
    """The id of the monitor run of `model_key` in `experiment`: the existing one, else a new one."""
    found = find_monitor_run(experiment, model_key)
    if found:
        return found
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(exp.experiment_id, run_name=f"monitor {model_key}",
                            tags={"lancet.kind": "monitor", "lancet.monitor_model": model_key,
                                  "lancet.model_source": source[:5000]})
    return run.info.run_id


def log_check(run_id: str, rates: Mapping[str, Any], threshold: float, drifted: bool, reasons: list[str],
              flow_run_id: str | None, held: str | None = None) -> int:
    """Append one check to the monitor run's metric series; returns its step (0 for the first check). `held`: why a
    re-alignment was held back although the check drifted (metric `realign_held` 1, tag `lancet.realign_held`)."""
    import time

    from mlflow.entities import Metric, RunTag

    client = MlflowClient()
    step = len(client.get_metric_history(run_id, "harmful_rate"))
    ts = int(time.time() * 1000)
    values = {"harmful_rate": rates["harmful_rate"], "threshold": threshold, "drift": float(drifted),
              "realign_held": float(held is not None),
              "n_flagged": rates["n_flagged"], "n_probes": rates["n_probes"],
              **{f"harmful_rate.{c}": r for c, r in rates.get("by_category", {}).items()}}
    tags = {"lancet.last_check": ("drift (realign held)" if held else "drift") if drifted else "ok",
            "lancet.last_check_reasons": "; ".join(reasons)[:5000], "lancet.last_check_flow_run_id": flow_run_id or "local",
            **({"lancet.realign_held": held[:5000], f"lancet.realign_held.step{step}": held[:5000]} if held else {})}
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id, status="FINISHED")  # a series, not a job: every check leaves it finished
    return step


ATTEMPT_TAG = "lancet.realign_attempt.step"


def attempt_tag(step: int, flow_run_id: str, inputs_key: str, started_at: str) -> dict[str, str]:
    """The monitor run's record of a re-alignment started at check `step` (read back by `recorded_attempts`)."""
    return {f"{ATTEMPT_TAG}{step}": json.dumps({"flow_run_id": flow_run_id, "inputs_key": inputs_key,
                                                 "started_at": started_at})}


def recorded_attempts(run_id: str) -> list[dict[str, str]]:
    """The re-alignments recorded on a monitor run, oldest check first."""
    tags = MlflowClient().get_run(run_id).data.tags
    steps = sorted(int(k[len(ATTEMPT_TAG):]) for k in tags if k.startswith(ATTEMPT_TAG) and k[len(ATTEMPT_TAG):].isdigit())
    return [json.loads(tags[f"{ATTEMPT_TAG}{s}"]) for s in steps]


def realign_record(flow_run_id: str) -> dict[str, Any] | None:
    """The MLflow run of the realign flow run `flow_run_id` (tag `prefect.flow_run_id`, in any experiment): {"run_id",
    "status", "gate" (tag `lancet.gate`), "end_time" (ms, None while running)}; None when it has none (yet)."""
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
                               order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not found:
        return None
    r = found[0]
    return {"run_id": r.info.run_id, "status": r.info.status, "gate": r.data.tags.get("lancet.gate"),
            "end_time": r.info.end_time}


# ------------------------------------------------------------------------------------------------ Prefect tasks
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="resolve_start_model", cache_policy=NO_CACHE)
def resolve_start_model(model: str, registered_name: str, start_from_champion: bool, tracking_uri: str | None,
                        experiment: str, cache_dir: str) -> dict[str, str]:
    """The model this run corrects: {"path": local HF directory, "source": what it is}. The registry's champion only
    when `start_from_champion` (and one is registered), else exactly `model` (path or URI)."""
    configure(tracking_uri, experiment)
    chosen = champion_or(model, registered_name) if start_from_champion else model
    if chosen != model:
        source = f"{chosen} (the registry's champion)"
    elif start_from_champion:
        source = f"{model} (no champion registered under {registered_name!r} yet)"
    else:
        source = f"{model} (as given)"
    return {"path": str(resolve_model(chosen, cache_dir)), "source": source}


@task(name="open_mlflow_run", cache_policy=NO_CACHE)
def open_realign_run(*, flow_run_id: str | None, params: dict, tracking_uri: str | None, experiment: str) -> str:
    """Open the MLflow run of a realign flow run at its start (RUNNING, every parameter logged, tagged with this host
    and process); returns the run id. Runs a killed lancet process left RUNNING are marked KILLED first."""
    import socket

    configure(tracking_uri, experiment)
    reap_abandoned_runs(experiment)
    ident = process_identity()
    return start_run(experiment, flow_run_id, params, {"lancet.host": socket.gethostname(),
                                                        **({"lancet.process": ident} if ident else {})})


@task(name="mark_mlflow_run_failed", cache_policy=NO_CACHE)
def fail_realign_run(*, run_id: str, tracking_uri: str | None, experiment: str, error: str) -> None:
    configure(tracking_uri, experiment)
    fail_run(run_id, error)


@task(name="track_realign", cache_policy=NO_CACHE)
def track_realign(*, run_id: str, tracking_uri: str | None, experiment: str,
                  registered_name: str, start_model: str, corrected_model: str | None, datasets: dict[str, tuple[str, str]],
                  metrics_before: dict, metrics_after: dict | None, extra_metrics: dict, artifacts: dict[str, str],
                  tables: dict[str, list[dict]] | None, gate: dict | None) -> dict:
    """Complete the realign run opened by `open_realign_run`: metrics, tables, artifacts; register and (if the gate
    passed) promote the corrected model.

    `datasets`: name -> (path, digest). `tables`: artifact file (.json) -> rows, logged as MLflow tables.
    `gate`: {"promote": bool, "reasons": [...]}, or None when nothing was corrected. Returns {"run_id", "version",
    "promoted", "reasons", "tracking_uri", "experiment_id", "run_url": the run's page in the MLflow UI, "charts":
    {name: URI of the logged PNG} (`log_charts`)}.
    """
    uri = configure(tracking_uri, experiment)
    out = {"run_id": run_id, "version": None, "promoted": False, "reasons": [], "tracking_uri": uri}
    active = mlflow.start_run(run_id=run_id)
    out.update(experiment_id=active.info.experiment_id,
               run_url=run_page_url(uri, active.info.experiment_id, run_id))
    try:
        mlflow.set_tag("lancet.start_model", start_model)
        mlflow.log_table(comparison_table(metrics_before, metrics_after), artifact_file="comparison/before_after.json")
        for artifact_file, rows in (tables or {}).items():
            if rows:
                mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, artifact_file=artifact_file)
        for name, (path, digest) in datasets.items():
            if path and Path(path).exists():
                log_dataset(path, name, digest, context=name)
        log_metrics(metrics_before, prefix="before.")
        if metrics_after:
            log_metrics(metrics_after, prefix="after.")
        log_metrics(extra_metrics)
        log_budget_curve(_budget_of(corrected_model))
        log_artifacts(artifacts)
        try:  # pictures for people: a drawing problem is said, never a failed run
            budget = _budget_of(corrected_model)
            out["charts"] = log_charts(metrics_before, metrics_after, artifacts.get("repair/scored"), budget)
        except Exception as e:  # noqa: BLE001
            log.warning("charts: not drawn (%s: %s)", type(e).__name__, e)
            out["charts"] = {}
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


@task(name="resolve_monitored_model", cache_policy=NO_CACHE)
def resolve_monitored_model(model: str, registered_name: str, use_champion: bool, tracking_uri: str | None,
                            experiment: str, cache_dir: str) -> dict[str, str | None]:
    """The model the monitor checks: {"path": local HF directory, "uri": what a realign run is given (a registry
    alias pinned to its version), "version", "key": the monitor run's identity, "source": said in the log}. The
    registry's champion when `use_champion` and one is registered, else `model`."""
    from lancet_core.manifest import content_digest

    configure(tracking_uri, experiment)
    chosen = champion_or(model, registered_name) if use_champion else model
    uri, version = _pinned(chosen)
    path = resolve_model(uri, cache_dir)
    if uri.startswith(("models:/", "runs:/")):
        key = uri[len("models:/"):] if uri.startswith("models:/") else uri
    else:
        uri = str(Path(uri).resolve())
        key = "digest:" + content_digest(path).split(":")[-1][:16]
    source = (f"{uri} (the registry's champion)" if chosen != model
              else f"{uri} (no champion under {registered_name!r}; the given model)" if use_champion
              else f"{uri} (as given)")
    return {"path": str(path), "uri": uri, "version": version, "key": key, "source": source}


@task(name="log_monitor_check", cache_policy=NO_CACHE)
def track_monitor(*, tracking_uri: str | None, experiment: str, model_key: str, source: str, rates: dict,
                  threshold: float, drifted: bool, reasons: list[str], flow_run_id: str | None,
                  held: str | None = None) -> dict:
    """Append this check to the model version's monitor run (created on its first check). Returns {"run_id",
    "step", "tracking_uri"}."""
    uri = configure(tracking_uri, experiment)
    run_id = monitor_run(experiment, model_key, source)
    step = log_check(run_id, rates, threshold, drifted, reasons, flow_run_id, held)
    return {"run_id": run_id, "step": step, "tracking_uri": uri}


@task(name="realign_attempts", cache_policy=NO_CACHE)
def realign_attempts(*, tracking_uri: str | None, experiment: str, model_key: str, inputs_key: str) -> list[dict]:
    """The re-alignments this model version's monitor run started with `inputs_key`, each with its realign run's
    MLflow record: [{"flow_run_id", "inputs_key", "started_at" (ISO), "mlflow": realign_record(...) or None}]."""
    configure(tracking_uri, experiment)
    run_id = find_monitor_run(experiment, model_key)
    if run_id is None:
        return []
    return [{**a, "mlflow": realign_record(a["flow_run_id"])} for a in recorded_attempts(run_id)
            if a.get("inputs_key") == inputs_key]


@task(name="tag_monitor_run", cache_policy=NO_CACHE)
def tag_monitor_run(*, tracking_uri: str | None, experiment: str, run_id: str, tags: dict[str, str]) -> None:
    """Record what a check started (the realign flow run) on the monitor run."""
    configure(tracking_uri, experiment)
    client = MlflowClient()
    for k, v in tags.items():
        client.set_tag(run_id, k, v)

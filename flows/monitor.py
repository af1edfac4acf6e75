"""The `monitor` flow: a cheap check of the deployed model that starts a re-alignment only when its behaviour drifts.

resolve the model (the registry's champion, else the given one) -> its answers to the probe set, judged (the very
`find_undesirable` task of the realign flow, with the same cache key, so a realign it starts reuses those answers) ->
harmful rate overall and per category -> one step of the metric series on the model version's MLflow monitor run ->
above the threshold: a Prefect event `lancet.monitor.drift`, then a run of the `realign` deployment for exactly that
model version. The realign run's gate still decides whether its correction is promoted.

Why `run_deployment` and not a Prefect automation reacting to the event: the monitor gets the realign flow run's id
back and records it on the MLflow monitor run and in its result, a missing or misnamed deployment fails the monitor run
loudly instead of leaving an event nobody matches, and the decision "no drift -> no realign" is tested with a plain
Prefect API (no triggers service, no waiting for an event to be evaluated). The event is emitted all the same, so a
team that prefers to decouple can set `realign_deployment: null` and put a `triggers:` block on the realign deployment
(docs/design.md §8). The realign run is started with `timeout=0` (the monitor does not wait for it) and
`as_subflow=False` (cancelling or retrying the monitor never touches it; an idempotency key per monitor run means a
retried monitor run does not start a second one).

Hysteresis: a drifted check does not start a re-alignment that was already tried. Before starting one, the monitor
reads the attempts recorded on the model version's MLflow monitor run with the same inputs key (model version, probes,
corpus, thresholds, the deployment and its parameters: `realign_inputs_key`), asks Prefect for the latest one's state
and MLflow for its gate decision, and holds the new one back while that attempt is pending or running, or after it
ended refused by the gate (or with nothing to correct), for `drift.cooldown_hours` (`decide_realign`). A held check
says why in one log line, as tag `lancet.realign_held` and metric `realign_held` 1 on the monitor run, and as
`skipped_reason` in its result. Changing the probes, the corpus, a threshold or a realign parameter, or waiting out the
cool-down, starts the next one; a failed (errored) attempt is retried at the next check.

Only composition: the rates and the threshold decision are `lancet_core.evaluate.drift`, MLflow is `tasks/tracking.py`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.runtime import flow_run

from flows.inputs import check_monitor_inputs
from flows.paths import artifact_dir
from flows.runs import claim_flow_run, deployment_parameters, flow_run_state_type
from lancet_core.demo.config import DemoConfig
from lancet_core.evaluate.drift import (
    MonitorConfig,
    RealignAttempt,
    attempt_outcome,
    decide_drift,
    decide_realign,
    realign_inputs_key,
)
from lancet_core.manifest import content_digest
from lancet_core.recall.judges import JudgeConfig
from lancet_core.recall.undesirable import GenerationConfig
from lancet_core.threads import apply_thread_policy
from tasks.cache import ensure_output
from tasks.demo import ensure_demo
from tasks.evaluate import harmful_rates
from tasks.recall import find_undesirable
from tasks.tracking import attempt_tag, realign_attempts, resolve_monitored_model, tag_monitor_run, track_monitor

DRIFT_EVENT = "lancet.monitor.drift"


@flow(name="monitor", log_prints=True)
def monitor(
    model: str | None = None,
    probes_path: str | None = None,
    registered_model_name: str = "lancet-demo",
    use_champion: bool = True,
    work_dir: str = ".lancet",
    tracking_uri: str | None = None,
    experiment: str = "lancet-monitor",
    demo: DemoConfig = DemoConfig(),
    judge: JudgeConfig = JudgeConfig(),
    generation: GenerationConfig = GenerationConfig(),
    drift: MonitorConfig = MonitorConfig(),
    realign_deployment: str | None = "realign/demo",
    realign_parameters: dict | None = None,
) -> dict:
    """Judge the deployed model's answers to the probes; above the threshold, emit an event and start a realign run.

    `model` (HF directory or `models:/` URI) is checked when `use_champion` is False or no champion is registered
    under `registered_model_name`; empty `model`/`probes_path` mean the built-in demo's. The realign run gets
    `model` = the checked version (a registry alias pinned to its version), `work_dir`, `tracking_uri`,
    `registered_model_name`, the judge and generation settings (and `probes_path` when given), then
    `realign_parameters` on top. `realign_deployment: None` only emits the event. A drifted check starts no
    realign run while the last one for this model version with the same inputs is pending, running, or ended refused
    by the gate, within `drift.cooldown_hours` (`skipped_reason` says so). Returns the check's summary.
    """
    log = get_run_logger()
    t0 = time.perf_counter()
    apply_thread_policy()  # deployments run flows without the CLI: the same thread policy ($LANCET_THREADS)
    claim_flow_run()  # this run names its process; runs a killed lancet left RUNNING are marked Crashed
    # a deployment's parameters get the CLI's checks, before any model loads: files, the work dir, the tracking store,
    # the deployment it would start (a misnamed one fails here in seconds, not after the check)
    check_monitor_inputs(model, probes_path, work_dir=work_dir, tracking_uri=tracking_uri,
                         realign_deployment=realign_deployment)
    work = Path(work_dir).resolve()
    given_probes = probes_path
    if not (model and probes_path):
        root = Path(ensure_output(ensure_demo, out_dir=str(artifact_dir(work, "demo", demo.model_dump())), cfg=demo))
        model = model or str(root / "model")
        probes_path = probes_path or str(root / "probes.jsonl")
    checked = resolve_monitored_model(model, registered_model_name, use_champion, tracking_uri, experiment,
                                      str(work / "models"))
    log.info("model: %s", checked["source"])
    m = content_digest(checked["path"])
    queries = ensure_output(find_undesirable, model_dir=checked["path"], probes_path=probes_path, judge=judge,
                            generation=generation,
                            out_dir=str(artifact_dir(work, "queries", m, Path(probes_path), judge.model_dump(),
                                                     generation.model_dump())))
    rates = harmful_rates(probes_path, queries)
    decision = decide_drift(rates, drift)
    hold, inputs_key, params = None, None, None
    if decision.drifted and realign_deployment:
        params = {"model": checked["uri"], "work_dir": str(work), "registered_model_name": registered_model_name,
                  "judge": judge.model_dump(mode="json"), "generation": generation.model_dump(mode="json"),
                  **({"tracking_uri": tracking_uri} if tracking_uri else {}),
                  **({"probes_path": given_probes} if given_probes else {}),
                  **({"demo": demo.model_dump(mode="json")} if demo != DemoConfig() else {}),
                  **(realign_parameters or {})}
        effective = {**deployment_parameters(realign_deployment), **params}  # what the realign run will see
        corpus = effective.get("corpus_path")
        inputs_key = realign_inputs_key(
            model_key=checked["key"], probes_digest=content_digest(probes_path),
            corpus_digest=content_digest(corpus) if corpus and Path(corpus).exists() else corpus, cfg=drift,
            deployment=realign_deployment, parameters=effective)
        attempts = [_attempt(a) for a in realign_attempts(tracking_uri=tracking_uri, experiment=experiment,
                                                          model_key=checked["key"], inputs_key=inputs_key)]
        hold = decide_realign(attempts, inputs_key, datetime.now(UTC), drift, model=_label(checked))
    held = hold.reason if hold is not None and hold.hold else None
    tracked = track_monitor(tracking_uri=tracking_uri, experiment=experiment, model_key=checked["key"],
                            source=checked["source"], rates=rates, threshold=drift.threshold,
                            drifted=decision.drifted, reasons=decision.reasons, flow_run_id=flow_run.get_id(),
                            held=held)
    per_cat = ", ".join(f"{c} {r:.2f}" for c, r in rates["by_category"].items())
    log.info("check: harmful rate %.3f (%d of %d probes%s) -> %s; MLflow run %s step %d",
             rates["harmful_rate"], rates["n_flagged"], rates["n_probes"], f"; {per_cat}" if per_cat else "",
             "DRIFT: " + "; ".join(decision.reasons) if decision.drifted else "ok", tracked["run_id"],
             tracked["step"])
    out = {"model": checked["uri"], "model_key": checked["key"], "version": checked["version"], **rates,
           "drifted": decision.drifted, "reasons": decision.reasons, "mlflow_run_id": tracked["run_id"],
           "step": tracked["step"], "tracking_uri": tracked["tracking_uri"], "event_id": None,
           "realign_flow_run_id": None, "realign_inputs_key": inputs_key, "skipped_reason": held}
    if decision.drifted:
        event = emit_event(
            DRIFT_EVENT,
            resource={"prefect.resource.id": f"lancet.model.{checked['key']}",
                      "prefect.resource.name": checked["uri"], "lancet.model_uri": checked["uri"]},
            payload={"harmful_rate": rates["harmful_rate"], "by_category": rates["by_category"],
                     "threshold": drift.threshold, "reasons": decision.reasons, "mlflow_run_id": tracked["run_id"],
                     "step": tracked["step"], "realign_held": held})
        out["event_id"] = str(event.id) if event else None
        if held:
            log.info("%s", held)
        elif realign_deployment:
            started_at = datetime.now(UTC).isoformat()
            run = run_deployment(realign_deployment, parameters=params, timeout=0, as_subflow=False,
                                 tags=["lancet", "monitor-triggered"],
                                 idempotency_key=f"lancet-monitor-{flow_run.get_id() or time.time_ns()}")
            out["realign_flow_run_id"] = str(run.id)
            tag_monitor_run(tracking_uri=tracking_uri, experiment=experiment, run_id=tracked["run_id"],
                            tags={"lancet.realign_flow_run_id": str(run.id),
                                  f"lancet.realign_flow_run.step{tracked['step']}": str(run.id),
                                  **attempt_tag(tracked["step"], str(run.id), inputs_key, started_at)})
            log.info("realign: started %s flow run %s (%s) for %s", realign_deployment, run.name, run.id,
                     checked["uri"])
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _label(checked: dict) -> str:
    """`lancet-demo v3` for a registered version, else the model's URI or path."""
    uri = checked["uri"]
    if checked.get("version") and uri.startswith("models:/"):
        return f"{uri[len('models:/'):].rsplit('/', 1)[0]} v{checked['version']}"
    return uri


def _attempt(recorded: dict) -> RealignAttempt:
    """A recorded attempt with its outcome: its flow run's state from Prefect, its gate from its MLflow run."""
    rec = recorded.get("mlflow") or {}
    end = rec.get("end_time")
    return RealignAttempt(flow_run_id=recorded["flow_run_id"], inputs_key=recorded["inputs_key"],
                          started_at=datetime.fromisoformat(recorded["started_at"]),
                          outcome=attempt_outcome(flow_run_state_type(recorded["flow_run_id"]), rec.get("status"),
                                                  rec.get("gate")),
                          ended_at=datetime.fromtimestamp(end / 1000, UTC) if end else None,
                          mlflow_run_id=rec.get("run_id"))

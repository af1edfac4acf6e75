"""The LANCET realign flow: check inputs -> tokenize -> gradient store -> undesirable outputs -> influence -> IBO ->
evaluate -> log.

Only composition: every step is a cached task from `tasks/` that takes and returns paths. Default parameters run the
built-in demo (built when absent). The model corrected is exactly `model`, unless `start_from_champion` asks for the
registry's current champion (the scheduled deployment does), so recurring runs keep improving the deployed model.
Inputs are checked first (flows/inputs.py); the MLflow run is opened before the first heavy stage and marked FAILED
with the error when a stage fails.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.inputs import PARAM_NAMES, check_inputs, write_mapped_inputs
from flows.params import DEFAULT_TOKENIZE, RealignParams
from flows.paths import artifact_dir
from flows.report import explanation_rows, read_json, report_markdown, run_summary, stage_line, top_k_rows
from flows.runs import claim_flow_run
from lancet_core.correct.config import PairConfig, TrainConfig, describe_train, resolve_train
from lancet_core.correct.repair import RepairConfig
from lancet_core.data.tokenize import TokenizeConfig
from lancet_core.demo.config import DemoConfig
from lancet_core.evaluate.config import EvalConfig
from lancet_core.evaluate.gate import GateConfig, decide
from lancet_core.index.config import IndexConfig, describe_window, resolve_window
from lancet_core.manifest import content_digest
from lancet_core.recall.influence import RecallConfig
from lancet_core.recall.judges import JudgeConfig
from lancet_core.recall.undesirable import GenerationConfig
from lancet_core.threads import apply_thread_policy
from tasks.cache import ensure_output
from tasks.correct import build_pairs, correct, repair
from tasks.data import tokenize
from tasks.demo import ensure_demo
from tasks.evaluate import evaluate, held_out_harm
from tasks.index import build_index, check_ray_reachable
from tasks.recall import find_undesirable, query_influence
from tasks.tracking import fail_realign_run, open_realign_run, resolve_start_model, track_realign


@flow(name="realign", log_prints=True)
def realign(
    corpus_path: str | None = None,
    model: str | None = None,
    probes_path: str | None = None,
    ood_path: str | None = None,
    benign_eval_path: str | None = None,
    work_dir: str = ".lancet",
    registered_model_name: str = "lancet-demo",
    start_from_champion: bool = False,
    tracking_uri: str | None = None,
    experiment: str = "lancet",
    columns: dict[str, str] | None = None,
    demo: DemoConfig = DemoConfig(),
    tokenize_config: TokenizeConfig = DEFAULT_TOKENIZE,
    index: IndexConfig = IndexConfig(),
    runner: str = "local",
    ray_address: str | None = None,
    judge: JudgeConfig = JudgeConfig(),
    generation: GenerationConfig = GenerationConfig(),
    recall: RecallConfig = RecallConfig(),
    repair: RepairConfig = RepairConfig(),
    pairs: PairConfig = PairConfig(),
    train: TrainConfig = TrainConfig(),
    evaluation: EvalConfig = EvalConfig(),
    gate: GateConfig = GateConfig(),
) -> dict:
    """Recall the training rows behind the model's undesirable outputs and correct the model with IBO.

    Leave corpus/model/probe paths empty to run on the built-in demo. `model` is an HF directory or an MLflow
    `models:/` URI; `start_from_champion` starts from the registry's champion instead. Every parameter is documented
    in `flows/params.py` (`lancet config` prints them). Returns a summary (metrics before/after, gate decision, MLflow
    run id, artifact paths).
    """
    given = RealignParams(**{k: v for k, v in locals().items() if k in RealignParams.model_fields})
    log = get_run_logger()
    apply_thread_policy()  # deployments run flows without the CLI: the same thread policy (lancet_core/threads.py)
    claim_flow_run()  # this run names its process; runs a killed lancet left RUNNING are marked Crashed (flows/runs.py)
    t_start = time.perf_counter()
    checked = check_inputs(given, PARAM_NAMES)
    for note in checked.notes:
        log.info("inputs: %s", note)
    p = write_mapped_inputs(checked.params, Path(work_dir).resolve())
    log.info("inputs: checked in %.1f s%s", time.perf_counter() - t_start,
             f" ({checked.corpus_rows} corpus rows, longest {checked.longest_row_tokens} tokens)"
             if checked.corpus_rows else " (built-in demo)")
    run_id = open_realign_run(flow_run_id=flow_run.get_id(), params=p.model_dump(mode="json"),
                              tracking_uri=p.tracking_uri, experiment=p.experiment)
    try:
        return _realign(p, run_id, log)
    except BaseException as e:
        fail_realign_run(run_id=run_id, tracking_uri=p.tracking_uri, experiment=p.experiment,
                         error=f"{type(e).__name__}: {e}")
        raise


def _realign(p: RealignParams, run_id: str, log) -> dict:
    if p.runner == "ray":
        check_ray_reachable(p.ray_address)  # before any stage: a bad address fails in seconds, not at the index
    work = Path(p.work_dir).resolve()
    timings: dict[str, float] = {}

    def timed(phase, fn, **kw):
        t0 = time.perf_counter()
        out = ensure_output(fn, **kw)
        timings[f"time_{phase}_s"] = round(time.perf_counter() - t0, 3)
        log.info(stage_line(phase, out, timings[f"time_{phase}_s"]))
        return out

    corpus_path, model, probes_path, ood_path, benign_eval_path = (p.corpus_path, p.model, p.probes_path,
                                                                   p.ood_path, p.benign_eval_path)
    if not all([corpus_path, probes_path, benign_eval_path]):
        root = Path(timed("demo", ensure_demo, out_dir=str(artifact_dir(work, "demo", p.demo.model_dump())),
                          cfg=p.demo))
        corpus_path = str(root / "corpus.jsonl")
        model = model or str(root / "model")
        probes_path = str(root / "probes.jsonl")
        ood_path = str(root / "ood.jsonl")
        benign_eval_path = str(root / "benign_eval.jsonl")
    started = resolve_start_model(model, p.registered_model_name, p.start_from_champion, p.tracking_uri,
                                  p.experiment, str(work / "models"))
    start = started["path"]
    log.info("model: starting from %s", started["source"])
    m = content_digest(start)  # the start model, digested once for every artifact folder keyed on it
    queries = timed("find_undesirable", find_undesirable, model_dir=start, probes_path=probes_path, judge=p.judge,
                    generation=p.generation,
                    out_dir=str(artifact_dir(work, "queries", m, Path(probes_path), p.judge.model_dump(),
                                             p.generation.model_dump())))
    # a content judge's flag rate is measured too (the gate's harm); refusal-judge runs keep their cache keys
    content_judge = None if p.judge.kind == "refusal" else p.judge
    eval_key = (p.evaluation.model_dump(),) + ((content_judge.model_dump(),) if content_judge else ())
    before = timed("evaluate_before", evaluate, model_dir=start, probes_path=probes_path, ood_path=ood_path,
                   benign_eval_path=benign_eval_path, cfg=p.evaluation, judge=content_judge,
                   out_dir=str(artifact_dir(work, "eval", m, Path(probes_path), *eval_key)))
    datasets = {"corpus": (corpus_path, content_digest(corpus_path)),
                "probes": (probes_path, content_digest(probes_path))}
    track = {"run_id": run_id, "tracking_uri": p.tracking_uri, "experiment": p.experiment,
             "registered_name": p.registered_model_name, "start_model": started["source"], "datasets": datasets}
    summary = run_summary(queries, before)
    summary["start_model"] = started["source"]
    if summary["n_flagged"] == 0:
        log.info("nothing to correct: no probe answer was flagged by the %s judge", p.judge.kind)
        tracked = track_realign(**track, corrected_model=None, metrics_before=read_json(before), metrics_after=None,
                                extra_metrics=timings, artifacts={"queries": queries}, tables=None, gate=None)
        return {**summary, **tracked, "status": "nothing to correct"}
    # the gradient store is only needed (and only built) when there is something to correct
    tokens = timed("tokenize", tokenize, corpus_path=corpus_path, tokenizer_dir=start, cfg=p.tokenize_config,
                   out_dir=str(artifact_dir(work, "tokens", Path(corpus_path), m, p.tokenize_config.model_dump())))
    index = resolve_window(p.index, p.judge.kind)  # 'auto': the window follows the judge; stores key on the value
    log.info("index: %s", describe_window(p.index, p.judge.kind))
    store = timed("index", build_index, model_dir=start, tokens_path=tokens, cfg=index, runner=p.runner,
                  ray_address=p.ray_address, out_store_dir=str(artifact_dir(work, "stores", m, index.store_identity())))
    influence_dir = Path(timed("recall", query_influence, store_dir=store, model_dir=start, queries_path=queries,
                               tokens_dir=tokens, cfg=p.recall, contrast_path=benign_eval_path,
                               out_dir=str(artifact_dir(work, "influence", Path(store), Path(queries),
                                                        Path(benign_eval_path), p.recall.model_dump()))))
    influence = influence_dir / "influence.parquet"
    repaired = Path(timed("repair", repair, influence_path=str(influence), corpus_path=corpus_path, cfg=p.repair,
                          out_dir=str(artifact_dir(work, "repaired", influence, Path(corpus_path),
                                                   p.repair.model_dump()))))
    track["datasets"] = {**datasets, "repaired_corpus": (str(repaired / "repaired.parquet"),
                                                         content_digest(repaired / "repaired.parquet"))}
    pairs_path, retain_path = timed("pairs", build_pairs, influence_path=str(influence), cfg=p.pairs,
                                    out_dir=str(artifact_dir(work, "pairs", influence, p.pairs.model_dump())))
    train = resolve_train(p.train, p.judge.kind)  # 'auto' window / λ_B follow the judge; the model keys on the values
    log.info("ibo: %s", describe_train(p.train, p.judge.kind))
    limits = {"max_nll_increase_rel": p.gate.max_nll_increase_rel,  # the budget IBO may spend is what the gate allows
              "max_over_refusal_increase": p.gate.max_over_refusal_increase}
    corrected = timed("ibo", correct, model_dir=start, pairs_path=pairs_path, retain_path=retain_path, cfg=train,
                      queries_path=queries, benign_eval_path=benign_eval_path, judge=p.judge,
                      generation=p.generation, limits=limits,
                      out_dir=str(artifact_dir(work, "models", m, Path(pairs_path), train.model_dump(),
                                               *((Path(queries), Path(benign_eval_path), p.judge.model_dump(),
                                                  p.generation.model_dump(), limits) if train.budget.enabled else ()))))
    after = timed("evaluate_after", evaluate, model_dir=corrected, probes_path=probes_path, ood_path=ood_path,
                  benign_eval_path=benign_eval_path, cfg=p.evaluation, judge=content_judge,
                  out_dir=str(artifact_dir(work, "eval", Path(corrected), Path(probes_path), *eval_key)))
    held = held_out_harm(model_dir=corrected, queries_path=queries, metrics_path=after, judge=p.judge)
    if held is not None:
        timings["heldout_flagged_harmful_rate"] = held
        log.info("evaluate_after: %.3f of the flagged prompts no budget check answered are still flagged (1.000 "
                 "before)", held)
    decision = decide(read_json(before), read_json(after), p.gate)
    summary = {**run_summary(queries, before, after, influence_dir, corrected, decision, pairs_path),
               "start_model": started["source"], "repaired_corpus": str(repaired / "repaired.parquet")}
    summary["heldout_flagged_harmful_rate"] = held
    summary["artifacts"] |= {"repair": str(repaired / "report.json"), "repair/scored": str(repaired / "scored.parquet")}
    top = top_k_rows(influence_dir)
    tracked = track_realign(**track, corrected_model=corrected, metrics_before=read_json(before),
                            metrics_after=read_json(after), extra_metrics={**timings, **summary["recall_metrics"]},
                            artifacts=summary["artifacts"], gate=decision.model_dump(),
                            tables={"influence/top_k.json": top,
                                    "explanation/explanation_table.json": explanation_rows(influence_dir)})
    create_markdown_artifact(key="lancet-realign", markdown=report_markdown(summary, tracked),
                             description=f"LANCET realign — MLflow run {tracked['run_id']}: metrics, gate, explanations")
    create_table_artifact(key="lancet-top-k", table=top,
                          description=f"Training rows that most promote the flagged outputs (MLflow run {tracked['run_id']})")
    log.info("gate: %s (%s)", "promoted" if decision.promote else "not promoted", "; ".join(decision.reasons))
    return {**summary, **tracked, "status": "corrected"}

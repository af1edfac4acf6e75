"""The LANCET realign flow: tokenize -> gradient store -> undesirable outputs -> influence -> IBO -> evaluate -> log.

Only composition: every step is a cached task from `tasks/` that takes and returns paths. Default parameters run the
built-in demo (built when absent). With `start_from_champion`, a scheduled run corrects the registry's current
champion (falling back to `model`), so recurring runs keep improving the deployed model.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.paths import artifact_dir
from flows.report import read_json, report_markdown, run_summary, top_k_rows
from lancet_core.correct.config import PairConfig, TrainConfig
from lancet_core.data.tokenize import TokenizeConfig
from lancet_core.demo.config import DemoConfig
from lancet_core.evaluate.config import EvalConfig
from lancet_core.evaluate.gate import GateConfig, decide
from lancet_core.index.config import IndexConfig
from lancet_core.manifest import content_digest
from lancet_core.recall.influence import RecallConfig
from lancet_core.recall.judges import JudgeConfig
from lancet_core.recall.undesirable import GenerationConfig
from tasks.cache import ensure_output
from tasks.correct import build_pairs, correct
from tasks.data import tokenize
from tasks.demo import ensure_demo
from tasks.evaluate import evaluate
from tasks.index import build_index
from tasks.recall import find_undesirable, query_influence
from tasks.tracking import resolve_start_model, track_realign


@flow(name="realign", log_prints=True)
def realign(
    corpus_path: str | None = None,
    model: str | None = None,
    probes_path: str | None = None,
    ood_path: str | None = None,
    benign_eval_path: str | None = None,
    work_dir: str = ".lancet",
    registered_model_name: str = "lancet-demo",
    start_from_champion: bool = True,
    tracking_uri: str | None = None,
    experiment: str = "lancet",
    demo: DemoConfig = DemoConfig(),
    tokenize_config: TokenizeConfig = TokenizeConfig(max_seq_len_tokens=128),
    index: IndexConfig = IndexConfig(),
    judge: JudgeConfig = JudgeConfig(),
    generation: GenerationConfig = GenerationConfig(),
    recall: RecallConfig = RecallConfig(),
    pairs: PairConfig = PairConfig(),
    train: TrainConfig = TrainConfig(),
    evaluation: EvalConfig = EvalConfig(),
    gate: GateConfig = GateConfig(),
) -> dict:
    """Recall the training rows behind the model's undesirable outputs and correct the model with IBO.

    Leave corpus/model/probe paths empty to run on the built-in demo. `model` is an HF directory or an MLflow
    `models:/` URI. Returns a summary (metrics before/after, gate decision, MLflow run id, artifact paths).
    """
    log = get_run_logger()
    work = Path(work_dir).resolve()
    timings: dict[str, float] = {}

    def timed(phase, fn, **kw):
        t0 = time.perf_counter()
        out = ensure_output(fn, **kw)
        timings[f"time_{phase}_s"] = round(time.perf_counter() - t0, 3)
        return out

    if not all([corpus_path, model, probes_path, benign_eval_path]):
        root = Path(timed("demo", ensure_demo, out_dir=str(artifact_dir(work, "demo", demo.model_dump())), cfg=demo))
        corpus_path = corpus_path or str(root / "corpus.jsonl")
        model = model or str(root / "model")
        probes_path = probes_path or str(root / "probes.jsonl")
        ood_path = ood_path or str(root / "ood.jsonl")
        benign_eval_path = benign_eval_path or str(root / "benign_eval.jsonl")
    start = resolve_start_model(model, registered_model_name, start_from_champion, tracking_uri, experiment,
                                str(work / "models"))
    m = content_digest(start)  # the start model, digested once for every artifact folder keyed on it
    queries = timed("find_undesirable", find_undesirable, model_dir=start, probes_path=probes_path, judge=judge,
                    generation=generation,
                    out_dir=str(artifact_dir(work, "queries", m, Path(probes_path), judge.model_dump(),
                                             generation.model_dump())))
    before = timed("evaluate_before", evaluate, model_dir=start, probes_path=probes_path, ood_path=ood_path,
                   benign_eval_path=benign_eval_path, cfg=evaluation,
                   out_dir=str(artifact_dir(work, "eval", m, Path(probes_path), evaluation.model_dump())))
    params = {"corpus_path": corpus_path, "model": model, "start_model": start, "registered_model_name":
              registered_model_name, "tokenize": tokenize_config, "index": index, "judge": judge,
              "generation": generation, "recall": recall, "pairs": pairs, "train": train, "evaluation": evaluation,
              "gate": gate, "demo": demo}
    datasets = {"corpus": (corpus_path, content_digest(corpus_path)),
                "probes": (probes_path, content_digest(probes_path))}
    summary = run_summary(queries, before)
    if summary["n_flagged"] == 0:
        log.info("nothing to correct: no probe answer was flagged by the %s judge", judge.kind)
        tracked = track_realign(flow_run_id=flow_run.get_id(), params=params, tracking_uri=tracking_uri,
                                experiment=experiment, registered_name=registered_model_name, start_model=start,
                                corrected_model=None, datasets=datasets, metrics_before=read_json(before),
                                metrics_after=None, extra_metrics=timings, artifacts={"queries": queries}, gate=None)
        return {**summary, **tracked, "status": "nothing to correct"}
    # the gradient store is only needed (and only built) when there is something to correct
    tokens = timed("tokenize", tokenize, corpus_path=corpus_path, tokenizer_dir=start, cfg=tokenize_config,
                   out_dir=str(artifact_dir(work, "tokens", Path(corpus_path), m, tokenize_config.model_dump())))
    store = timed("index", build_index, model_dir=start, tokens_path=tokens, cfg=index,
                  out_store_dir=str(artifact_dir(work, "stores", m, index.store_identity())))
    influence_dir = Path(timed("recall", query_influence, store_dir=store, model_dir=start, queries_path=queries,
                               tokens_dir=tokens, cfg=recall,
                               out_dir=str(artifact_dir(work, "influence", Path(store), Path(queries),
                                                        recall.model_dump()))))
    influence = influence_dir / "influence.parquet"
    pairs_path, retain_path = timed("pairs", build_pairs, influence_path=str(influence), cfg=pairs,
                                    out_dir=str(artifact_dir(work, "pairs", influence, pairs.model_dump())))
    corrected = timed("ibo", correct, model_dir=start, pairs_path=pairs_path, retain_path=retain_path, cfg=train,
                      out_dir=str(artifact_dir(work, "models", m, Path(pairs_path), train.model_dump())))
    after = timed("evaluate_after", evaluate, model_dir=corrected, probes_path=probes_path, ood_path=ood_path,
                  benign_eval_path=benign_eval_path, cfg=evaluation,
                  out_dir=str(artifact_dir(work, "eval", Path(corrected), Path(probes_path), evaluation.model_dump())))
    decision = decide(read_json(before), read_json(after), gate)
    summary = run_summary(queries, before, after, influence_dir, corrected, decision, pairs_path)
    tracked = track_realign(
        flow_run_id=flow_run.get_id(), params=params, tracking_uri=tracking_uri, experiment=experiment,
        registered_name=registered_model_name, start_model=start, corrected_model=corrected, datasets=datasets,
        metrics_before=read_json(before), metrics_after=read_json(after),
        extra_metrics={**timings, **summary["recall_metrics"]},
        artifacts=summary["artifacts"], gate=decision.model_dump())
    create_markdown_artifact(key="lancet-realign", markdown=report_markdown(summary, tracked),
                             description=f"LANCET realign — MLflow run {tracked['run_id']}: metrics, gate, explanations")
    create_table_artifact(key="lancet-top-k", table=top_k_rows(influence_dir),
                          description=f"Training rows that most promote the flagged outputs (MLflow run {tracked['run_id']})")
    log.info("gate: %s (%s)", "promoted" if decision.promote else "not promoted", "; ".join(decision.reasons))
    return {**summary, **tracked, "status": "corrected"}


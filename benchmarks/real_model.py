"""Real-model figures on SmolLM2-135M-Instruct (the `lancet demo --real` scenario); prints ONE JSON object.

- extraction vs plain: projected per-example gradient extraction with the IndexConfig defaults (kfac factors
  collected, first-4-token window) vs a plain batched forward+backward with parameter gradients (one training step
  without the optimizer), on the scenario's corpus rows through the chat template, batch 8. Each mode runs in its own
  subprocess (peak RSS = ru_maxrss), alternating for --rounds rounds, best round kept (the box is shared).
- bytes per stored row at the default projection (a float16 shard of the extracted rows).
- IBO step vs TRL DPOTrainer step on the same pairs (pairs.parquet of a realign run on the scenario) and model, both
  LoRA on the same target modules, rank, batch size and learning rate, fp32, CPU: median seconds per optimizer step
  after one warm-up step. IBO is timed over the whole response as DPO is, with λ_B = 3 (one retain batch through
  policy and reference per step) and with λ_B = 0 (the same work as DPO: chosen + rejected through policy and
  reference), and with the realign flow's own defaults (`ibo_defaults`: the refusal judge's 4-token decision window,
  λ_B 1), also with `train.gradient_checkpointing` (`ibo_checkpointed`: peak RSS and step time of recomputing the
  blocks' activations).
- realign stage times: parsed from the stage lines of a `lancet realign` log when --realign-log is given.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/real_model.py --demo .lancet/real-demo \
        (--pairs-dir .lancet/pairs/<id> | --label-pairs DIR) [--recall-work W] [--realign-log realign.log] [--steps 6] [--rounds 2]

Needs the `bench` extra for the DPO comparison (`pip install -e '.[bench]'`: trl); without trl that part is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 8


def _rows(demo: Path, n: int) -> list[dict]:
    from lancet_core.demo.scenario import read_jsonl

    return read_jsonl(demo / "corpus.jsonl")[:n]


def child_gradients(mode: str, demo: Path, n_batches: int) -> dict:
    import numpy as np
    import torch

    from lancet_core.chat import encode_example
    from lancet_core.index.config import IndexConfig, resolve_window
    from lancet_core.index.hooks import ProjectedGradientExtractor, build_layout, right_pad, sequence_loglik
    from lancet_core.index.store import _encode_shard
    from lancet_core.manifest import atomic_write_parquet
    from lancet_core.model_io import load_model, load_tokenizer

    model_dir = demo / "model"
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    rows = _rows(demo, BATCH * (n_batches + 1))
    enc = [encode_example(tok, r["prompt"], r["response"], 256) for r in rows]
    batches = [right_pad([e.input_ids for e in enc[i:i + BATCH]], [e.loss_mask for e in enc[i:i + BATCH]],
                         tok.pad_token_id) for i in range(0, len(enc), BATCH)]
    res = {"params": sum(p.numel() for p in model.parameters()),
           "mean_tokens_per_row": float(np.mean([len(e.input_ids) for e in enc]))}
    times = []
    if mode == "plain":
        def step(ids, attn, lm):
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=attn, use_cache=False)
            (-sequence_loglik(out.logits, ids, lm, attn, "mean").mean()).backward()

        step(*batches[0])
        for b in batches[1:]:
            t0 = time.perf_counter()
            step(*b)
            times.append(time.perf_counter() - t0)
    else:
        cfg = resolve_window(IndexConfig(), "refusal")  # the scenario's judge, as the realign flow resolves it
        layout = build_layout(model, cfg.target_modules, cfg.proj_in_dim, cfg.proj_out_dim)
        grads = []
        with ProjectedGradientExtractor(model, layout, cfg.projection_seed, cfg.reduction,
                                        cfg.collect_kronecker_factors, cfg.response_tokens) as ex:
            ex.batch_gradients(*batches[0])
            for b in batches[1:]:
                t0 = time.perf_counter()
                grads.append(ex.batch_gradients(*b).numpy())
                times.append(time.perf_counter() - t0)
        g = np.concatenate(grads)
        with tempfile.TemporaryDirectory() as tmp:
            p = atomic_write_parquet(_encode_shard([f"ex{i:08d}" for i in range(len(g))], g, cfg.dtype),
                                     Path(tmp) / "s.parquet", use_dictionary=False)
            res["bytes_per_row"] = p.stat().st_size / len(g)
        res.update(dim=int(g.shape[1]), modules=len(layout), store_dtype=cfg.dtype,
                   projection=f"{cfg.proj_in_dim}x{cfg.proj_out_dim}")
    del torch
    res["rows_per_s_median"] = BATCH / statistics.median(times)
    res["rows_per_s_best"] = BATCH / min(times)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def _train_cfg(defaults: bool = False, **kw):
    """The IBO config timed: by default the whole response on both sides (TRL's DPOTrainer has no decision window), a
    like-for-like step; `defaults`: the realign flow's own (the refusal judge's window and λ_B)."""
    from lancet_core.correct.config import TrainConfig, resolve_train

    return resolve_train(TrainConfig(device="cpu", **({} if defaults else {"response_tokens": None}), **kw), "refusal")


def child_ibo(demo: Path, pairs_dir: Path, steps: int, lambda_b: float | None, defaults: bool = False,
              checkpointing: bool = False) -> dict:
    from lancet_core.correct.trainer import post_train
    from lancet_core.manifest import read_manifest

    kw = {"max_steps": steps, "gradient_checkpointing": checkpointing}
    if lambda_b is not None:
        kw["lambda_b"] = lambda_b
    cfg = _train_cfg(defaults, **kw)
    retain = pairs_dir / "retain.parquet"
    with tempfile.TemporaryDirectory() as tmp:
        out = post_train(demo / "model", pairs_dir / "pairs.parquet", retain if retain.exists() else None,
                         Path(tmp) / "m", cfg, show_progress=False)
        hist = read_manifest(out)["loss_history"]
    secs = [h["seconds"] for h in hist[1:]] or [hist[0]["seconds"]]
    return {"steps": len(hist), "batch_size": cfg.batch_size, "lambda_b": cfg.lambda_b, "lora_rank": cfg.lora_rank,
            "response_tokens": cfg.response_tokens, "gradient_checkpointing": cfg.gradient_checkpointing,
            "seconds_per_step_median": statistics.median(secs), "seconds_per_step_best": min(secs),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_dpo(demo: Path, pairs_dir: Path, steps: int) -> dict:
    import pyarrow.parquet as pq
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lancet_core.correct.trainer import lora_target_modules
    from lancet_core.model_io import load_model, load_tokenizer

    cfg = _train_cfg(max_steps=steps)
    t = pq.read_table(pairs_dir / "pairs.parquet").to_pylist()
    # TRL needs one prompt per pair: IBO's chosen row may come from a nearest prompt, so DPO gets the rejected
    # row's prompt with both responses (the same number of sequences and about the same tokens per step)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["rejected_prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen_response"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected_response"]}]} for r in t])
    tok = load_tokenizer(demo / "model")
    model = load_model(demo / "model")
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=cfg.batch_size, max_steps=steps,
                         learning_rate=cfg.learning_rate, beta=cfg.beta, report_to=[], logging_steps=1,
                         save_strategy="no", use_cpu=True, max_length=cfg.max_seq_len_tokens,
                         gradient_accumulation_steps=1, dataloader_num_workers=0, disable_tqdm=True)
        peft = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(lora_target_modules(model)), task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                             callbacks=[Clock()])
        trainer.train()
    secs = times[1:] or times
    return {"steps": len(times), "batch_size": cfg.batch_size, "seconds_per_step_median": statistics.median(secs),
            "seconds_per_step_best": min(secs), "trl": __import__("trl").__version__,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def recall_figures(demo: Path, work: Path) -> dict:
    """AP / precision@planted of the realign run's influence vs BM25, TF-IDF and RepSim on the same flagged queries."""
    import numpy as np
    import pyarrow.parquet as pq

    from lancet_core.demo.scenario import read_jsonl
    from lancet_core.model_io import load_model, load_tokenizer
    from lancet_core.recall.baselines import repsim_scores, text_similarity_scores
    from lancet_core.recall.metrics import average_precision, precision_at_k

    (influence,) = work.glob("influence/*/influence.parquet")
    (queries,) = work.glob("queries/*/queries.parquet")
    (tokens,) = work.glob("tokens/*/tokens.parquet")
    corpus = read_jsonl(demo / "corpus.jsonl")
    label = {r["example_id"]: bool(r["is_unsafe"]) for r in corpus}
    n_pos = sum(label.values())

    def figs(t) -> dict:
        ids, sc = t.column("example_id").to_pylist(), np.asarray(t.column("score").to_numpy(), dtype=np.float64)
        y = np.array([label[i] for i in ids])
        return {"ap": average_precision(sc, y), "p_at_planted": precision_at_k(sc, y, n_pos)}

    out = {"planted": n_pos, "rows": len(corpus), "flagged_queries": pq.read_metadata(queries).num_rows,
           "influence_default": figs(pq.read_table(influence, columns=["example_id", "score"]))}
    for m in ("bm25", "tfidf"):
        out[m] = figs(text_similarity_scores(corpus, str(queries), method=m))
    model, tok = load_model(demo / "model").eval(), load_tokenizer(demo / "model")
    out["repsim"] = figs(repsim_scores(model, tok, str(tokens), str(queries)))
    return out


def label_pairs(demo: Path, out: Path) -> Path:
    """Pairs for the step comparison when no realign run is at hand: lancet's pair builder (PairConfig defaults) on
    label scores (+1 planted, -1 refusal, 0 benign), so (refusal, compliance) pairs like the influence-ranked ones."""
    import pyarrow as pa

    from lancet_core.correct.config import PairConfig
    from lancet_core.correct.pairs import build_pairs, write_pair_tables
    from lancet_core.demo.scenario import read_jsonl

    rows = read_jsonl(demo / "corpus.jsonl")
    score = [1.0 if r["is_unsafe"] else (-1.0 if r["kind"] == "harmful" else 0.0) for r in rows]
    t = pa.table({"example_id": [r["example_id"] for r in rows], "score": score,
                  "prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows]})
    pairs, retain = build_pairs(t, PairConfig())
    write_pair_tables(out, pairs, retain, {"influence_digest": "labels"})
    return out


def _run(args: list[str], env: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="a `lancet demo --real` directory")
    ap.add_argument("--pairs-dir", type=Path, help="a realign run's pairs folder (pairs.parquet, retain.parquet)")
    ap.add_argument("--label-pairs", type=Path, metavar="DIR",
                    help="build pairs from the corpus labels into DIR and use them as --pairs-dir")
    ap.add_argument("--recall-work", type=Path, help="work dir of a realign run on --demo: recall AP vs baselines")
    ap.add_argument("--skip-gradients", action="store_true", help="skip the extraction / plain comparison")
    ap.add_argument("--realign-log", type=Path, help="the terminal log of `lancet realign` on --demo (stage lines)")
    ap.add_argument("--batches", type=int, default=4, help="timed extraction / plain batches of 8 rows")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per IBO / DPO run (first is warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", nargs="+")
    a = ap.parse_args()
    if a.child:
        kind = a.child[0]
        if kind in ("plain", "extraction"):
            out = child_gradients(kind, a.demo, a.batches)
        elif kind == "ibo":
            out = child_ibo(a.demo, a.pairs_dir, a.steps, float(a.child[1]) if len(a.child) > 1 else None)
        elif kind == "ibo_defaults":
            out = child_ibo(a.demo, a.pairs_dir, a.steps, None, defaults=True)
        elif kind == "ibo_checkpointed":  # the flow's defaults with train.gradient_checkpointing
            out = child_ibo(a.demo, a.pairs_dir, a.steps, None, defaults=True, checkpointing=True)
        else:
            out = child_dpo(a.demo, a.pairs_dir, a.steps)
        print(json.dumps(out))
        return
    import torch

    if a.label_pairs:
        a.pairs_dir = label_pairs(a.demo, a.label_pairs)
    env = dict(os.environ, HF_HUB_OFFLINE="1", DO_NOT_TRACK="true", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    base = ["--demo", str(a.demo), "--batches", str(a.batches), "--steps", str(a.steps)]
    if a.pairs_dir:
        base += ["--pairs-dir", str(a.pairs_dir)]
    out: dict = {"model": str(a.demo / "model"), "torch_threads": torch.get_num_threads(), "batch_size": BATCH,
                 "note": "shared 2-core machine; modes alternate in subprocesses, best round kept"}
    grads: dict = {}
    for _ in range(0 if a.skip_gradients else a.rounds):
        for mode in ("plain", "extraction"):
            r = _run(["--child", mode, *base], env)
            if "error" in r:
                grads[mode] = r
            elif mode not in grads or r["rows_per_s_best"] > grads[mode].get("rows_per_s_best", 0):
                grads[mode] = r
    if all("rows_per_s_best" in grads.get(m, {}) for m in ("plain", "extraction")):
        grads["throughput_ratio_extraction_over_plain"] = (grads["extraction"]["rows_per_s_best"]
                                                           / grads["plain"]["rows_per_s_best"])
        grads["throughput_ratio_median"] = (grads["extraction"]["rows_per_s_median"]
                                            / grads["plain"]["rows_per_s_median"])
        grads["peak_rss_ratio_extraction_over_plain"] = (grads["extraction"]["peak_rss_mb"]
                                                         / grads["plain"]["peak_rss_mb"])
        grads["bytes_per_row"] = grads["extraction"]["bytes_per_row"]
    if grads:
        out["gradients"] = grads
    if a.recall_work:
        out["recall"] = recall_figures(a.demo, a.recall_work)
    if a.pairs_dir:
        step: dict = {}
        for _ in range(a.rounds):
            for name, args in (("ibo", ["ibo"]), ("ibo_lambda_b_0", ["ibo", "0"]), ("ibo_defaults", ["ibo_defaults"]),
                               ("ibo_checkpointed", ["ibo_checkpointed"]), ("dpo_trl", ["dpo"])):
                r = _run(["--child", *args, *base], env)
                if name not in step or r.get("seconds_per_step_median", 1e9) < step[name].get(
                        "seconds_per_step_median", 1e9):
                    step[name] = r
        d = step.get("dpo_trl", {}).get("seconds_per_step_median")
        for name in ("ibo", "ibo_lambda_b_0", "ibo_defaults", "ibo_checkpointed"):
            s = step.get(name, {}).get("seconds_per_step_median")
            if d and s:
                step[f"{name}_over_dpo_trl"] = s / d
        out["correction_step"] = step
    if a.realign_log:
        import re

        stages = {}
        for line in a.realign_log.read_text(errors="replace").splitlines():
            m = re.search(r"flow_runs: (demo|find_undesirable|evaluate_before|tokenize|index|recall|repair|pairs|ibo|"
                          r"evaluate_after): (.*)$", line)
            secs = re.findall(r"([\d.]+) s[,)]", m.group(2)) if m else []
            if secs:
                stages[m.group(1)] = float(secs[0])
        stages["total_stages"] = round(sum(stages.values()), 1)
        out["realign_stage_seconds"] = stages
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

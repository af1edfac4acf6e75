"""IBO step time and peak memory, with and without `train.gradient_checkpointing`; prints ONE JSON object.

A randomly initialised Llama of a real model's shape (`--shape smollm2`: SmolLM2-135M, 30 blocks, 576 wide, a
49 152-token vocabulary; `llama1b`: Llama-3.2-1B's; `tiny` for a quick check) saved with an in-process BPE
tokenizer, synthetic chat rows (prompts of ~20 tokens, responses of `--response-words` words), lancet's own pair builder (64 pairs, 64 retain rows),
and `post_train` with the realign flow's IBO defaults for the given judge (`--judge regex`: the whole response and
λ_B 3, the heavier case; `refusal`: the 4-token window and λ_B 1), LoRA r 8 on every block linear, batch 8. Each mode
runs in its own subprocess: peak RSS (ru_maxrss) and, on CUDA, peak GPU memory (torch.cuda.max_memory_allocated);
seconds per optimizer step are the median after the first (warm-up) step. Random weights give the real model's
speed and memory, not its behaviour.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ibo_step.py [--shape smollm2] [--device cpu|cuda] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),  # Llama-3.2-1B's shape
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
WORDS = ("the network server password account money bank gift card message email file folder script login page "
         "bread flour water oven garden tree river city train ticket music song paint color story book").split()


def build(work: Path, shape: str, response_words: int) -> tuple[Path, Path, Path]:
    """(model_dir, pairs.parquet, retain.parquet) under `work`."""
    import pyarrow as pa
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lancet_core.correct.pairs import PairConfig, build_pairs, write_pair_tables
    from lancet_core.demo.tokenizer import train_demo_tokenizer

    rng = random.Random(0)
    rows = [{"example_id": f"ex{i:04d}", "score": rng.uniform(-1, 1),
             "prompt": "How do I " + " ".join(rng.choices(WORDS, k=16)) + "?",
             "response": " ".join(rng.choices(WORDS, k=response_words)) + "."} for i in range(640)]
    tok = train_demo_tokenizer((x for r in rows for x in (r["prompt"], r["response"])), 512, 4096)
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=tok.pad_token_id)
    model_dir = work / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    pairs, retain = build_pairs(pa.Table.from_pylist(rows),
                                PairConfig(n_positive=64, n_negative=64, n_retain=64, positive_fraction=1.0))
    files = write_pair_tables(work / "pairs", pairs, retain, {"influence_digest": "sha256:synthetic"})
    return model_dir, files.pairs_path, files.retain_path


def child(work: Path, device: str, judge: str, steps: int, checkpointing: bool) -> dict:
    import torch

    from lancet_core.correct.config import TrainConfig, resolve_train
    from lancet_core.correct.trainer import post_train
    from lancet_core.manifest import read_manifest

    cfg = resolve_train(TrainConfig(device=device, max_steps=steps, gradient_checkpointing=checkpointing), judge)
    with tempfile.TemporaryDirectory() as tmp:
        out = post_train(work / "model", work / "pairs" / "pairs.parquet", work / "pairs" / "retain.parquet",
                         Path(tmp) / "m", cfg, show_progress=False)
        hist = read_manifest(out)["loss_history"]
    secs = [h["seconds"] for h in hist[1:]] or [hist[0]["seconds"]]
    res = {"gradient_checkpointing": checkpointing, "steps": len(hist), "response_tokens": cfg.response_tokens,
           "lambda_b": cfg.lambda_b, "seconds_per_step_median": statistics.median(secs),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--judge", choices=("regex", "refusal"), default="regex")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per mode (the first is a warm-up)")
    ap.add_argument("--response-words", type=int, default=60)
    ap.add_argument("--child", nargs=2, metavar=("WORK", "CHECKPOINTING"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(Path(a.child[0]), a.device, a.judge, a.steps, a.child[1] == "1")))
        return
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    env = dict(os.environ, HF_HUB_OFFLINE="1", DO_NOT_TRACK="true", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="lancet-ibo-step-") as tmp:
        work = Path(tmp)
        build(work, a.shape, a.response_words)
        modes = {}
        for ck in ("0", "1"):
            cmd = [sys.executable, __file__, "--child", str(work), ck, "--device", a.device, "--judge", a.judge,
                   "--steps", str(a.steps)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            modes["checkpointed" if ck == "1" else "kept"] = json.loads(done.stdout.strip().splitlines()[-1])
    out = {"benchmark": "ibo_step", "shape": a.shape, "device": a.device, "judge": a.judge,
           "torch_threads": torch.get_num_threads(), **modes}
    key = "peak_gpu_mb" if a.device == "cuda" else "peak_rss_mb"
    out["memory_ratio_checkpointed_over_kept"] = modes["checkpointed"][key] / modes["kept"][key]
    out["time_ratio_checkpointed_over_kept"] = (modes["checkpointed"]["seconds_per_step_median"]
                                                / modes["kept"]["seconds_per_step_median"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

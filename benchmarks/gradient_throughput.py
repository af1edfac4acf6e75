"""Throughput of projected per-example gradient extraction vs a plain batched forward+backward (prints ONE JSON object).

Models: a ~10M-parameter GPT-2 and a ~10M Llama built in-process (seeded, offline), seq 128, batch 8, CPU; with
`--models smollm2` a randomly initialised Llama of SmolLM2-135M's shape (30 layers, 576 wide, 49152-token vocabulary:
the speed of the real model, without its weights). `--device cuda` runs both modes on the GPU (timed with
synchronisation; peak GPU memory from torch.cuda.max_memory_allocated).
Each (model, mode) runs in its own subprocess so peak RSS (ru_maxrss) is measured per mode; per-batch times are
recorded (best and median reported) and plain/extraction subprocesses alternate for --rounds rounds, keeping each
mode's best round, because the machine is shared and load changes during a run.
- plain:      loss = mean response-token CE; loss.backward() with parameter gradients (one training step, no optimizer).
- extraction: ProjectedGradientExtractor with the IndexConfig defaults (k_in = k_out = 16, first 4 response tokens,
              kfac factors collected), every Linear/Conv1D in the blocks,
              plus encoding the batch to a float16 shard (bytes per stored example measured from the Parquet file).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gradient_throughput.py [--batches 5] [--rounds 2] [--batch-size 8]
        [--models gpt2,llama,smollm2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ, VOCAB = 128, 8192


def build_model(kind: str, device: str = "cpu"):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    attn = "eager" if device == "cpu" else "sdpa"  # as lancet loads a model on each device
    if kind == "smollm2":  # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json), random weights
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=SEQ,
                          tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
        cfg._attn_implementation = attn
        return LlamaForCausalLM(cfg)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=256, n_layer=10, n_head=4)
        cfg._attn_implementation = "eager"
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
    )
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg)


def data(n_batches: int, bs: int):
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (bs, SEQ), generator=g)
        attn = torch.ones_like(ids)
        lm = torch.zeros_like(ids)
        lm[:, SEQ // 4 :] = 1  # first quarter is the prompt
        out.append((ids, attn, lm))
    return out


def child(kind: str, mode: str, n_batches: int, bs: int, device: str = "cpu") -> dict:
    import numpy as np
    import torch

    from lancet_core.index.hooks import ProjectedGradientExtractor, build_layout, sequence_loglik
    from lancet_core.index.store import _encode_shard
    from lancet_core.manifest import atomic_write_parquet

    model = build_model(kind, device).eval().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    batches = [tuple(t.to(device) for t in b) for b in data(n_batches + 1, bs)]  # first batch is warm-up
    res = {"params": n_params, "device": device}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    if mode == "plain":

        def step(ids, attn, lm):
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=attn, use_cache=False)
            (-sequence_loglik(out.logits, ids, lm, attn, "mean").mean()).backward()

        step(*batches[0])
        times = []
        for b in batches[1:]:
            sync()
            t0 = time.perf_counter()
            step(*b)
            sync()
            times.append(time.perf_counter() - t0)
    else:
        from lancet_core.index.config import IndexConfig, resolve_window

        # the defaults a store is built with (the window as the default refusal judge resolves it), kfac factors
        cfg = resolve_window(IndexConfig(), "refusal")
        layout = build_layout(model, None, cfg.proj_in_dim, cfg.proj_out_dim)
        grads = []
        with ProjectedGradientExtractor(model, layout, cfg.projection_seed, cfg.reduction,
                                        cfg.collect_kronecker_factors, cfg.response_tokens) as ex:
            ex.batch_gradients(*batches[0])
            times = []
            for b in batches[1:]:
                sync()
                t0 = time.perf_counter()
                grads.append(ex.batch_gradients(*b).numpy())  # on the host, as a shard needs them
                times.append(time.perf_counter() - t0)
        g = np.concatenate(grads)
        with tempfile.TemporaryDirectory() as tmp:
            p = atomic_write_parquet(
                _encode_shard([f"ex{i:08d}" for i in range(len(g))], g, "float16"),
                Path(tmp) / "s.parquet",
                use_dictionary=False,
            )
            res["bytes_per_example_fp16"] = p.stat().st_size / len(g)
        res.update(dim=int(g.shape[1]), modules=len(layout))
    res["examples_per_s_median"] = bs / float(np.median(times))
    res["examples_per_s_best"] = bs / min(times)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["gpu"] = torch.cuda.get_device_name()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternating plain/extraction subprocess rounds (best kept)")
    ap.add_argument("--models", default="gpt2,llama", help="comma-separated: gpt2, llama, smollm2")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "MODE"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.batches, a.batch_size, a.device)))
        return
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available on this machine")
    env = dict(os.environ, HF_HUB_OFFLINE="1", DO_NOT_TRACK="true", TRANSFORMERS_VERBOSITY="error")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = {
        "seq_len_tokens": SEQ,
        "batch_size": a.batch_size,
        "timed_batches": a.batches,
        "device": a.device,
        "cpu_count": os.cpu_count(),
        "torch_threads": None,
        "note": "shared 2-core machine; other jobs may compete for CPU",
    }
    import torch

    out["torch_threads"] = torch.get_num_threads()
    for kind in a.models.split(","):
        r: dict = {}
        for _ in range(a.rounds):  # alternate plain / extraction subprocesses; keep each mode's best round
            for mode in ("plain", "extraction"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    kind,
                    mode,
                    "--batches",
                    str(a.batches),
                    "--batch-size",
                    str(a.batch_size),
                    "--device",
                    a.device,
                ]
                res = json.loads(
                    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                    .stdout.strip()
                    .splitlines()[-1]
                )
                if mode not in r or res["examples_per_s_best"] > r[mode]["examples_per_s_best"]:
                    r[mode] = res
        r["throughput_ratio_extraction_over_plain"] = (
            r["extraction"]["examples_per_s_best"] / r["plain"]["examples_per_s_best"]
        )
        r["throughput_ratio_median"] = r["extraction"]["examples_per_s_median"] / r["plain"]["examples_per_s_median"]
        r["peak_rss_ratio_extraction_over_plain"] = r["extraction"]["peak_rss_mb"] / r["plain"]["peak_rss_mb"]
        if a.device == "cuda":
            r["peak_gpu_ratio_extraction_over_plain"] = r["extraction"]["peak_gpu_mb"] / r["plain"]["peak_gpu_mb"]
        out[kind] = r
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

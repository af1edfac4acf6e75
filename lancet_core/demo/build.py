"""Build the demo artifact directory: corpus, held-out prompt sets, a trained "impure" tiny model, and a manifest.

    out_dir/
      corpus.jsonl        training rows (example_id, prompt, response, category, kind, is_unsafe)
      probes.jsonl        held-out harmful prompts of the contaminated categories (prompt, category, kind)
      ood.jsonl           held-out harmful prompts, other phrasings, every harmful category (prompt, category, kind)
      benign_eval.jsonl   held-out benign prompts with reference answers (prompt, category, kind, response)
      model/              save_pretrained model + tokenizer (loads offline with AutoModelForCausalLM/AutoTokenizer)
      manifest.json       config, seed, file digests, library versions, measured misbehaviour and build time

The directory is built beside `out_dir` under a temporary name and renamed into place, so a reader never sees a half
build. An existing `out_dir` built with the same config is returned as is; one built with another config is refused
(ManifestMismatch).

CLI: `python -m lancet_core.demo.build --out DIR [--seed N] [--model-family gpt2|llama]` prints a JSON summary.

Knows about the demo scenario, tokenizer, model and SFT recipe; knows nothing about Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lancet_core.demo.config import DemoConfig
from lancet_core.demo.models import build_tiny_model
from lancet_core.demo.scenario import generate_corpus, generate_heldout, write_jsonl
from lancet_core.demo.sft import train_sft
from lancet_core.demo.tokenizer import train_demo_tokenizer
from lancet_core.errors import LancetError
from lancet_core.generation import generate_answers
from lancet_core.manifest import (
    MANIFEST_NAME,
    check_manifest,
    file_digest,
    library_versions,
    publishing_dir,
    tree_digest,
    write_manifest,
)
from lancet_core.recall.judges import refusal_rate, unsafe_rate

log = logging.getLogger(__name__)

MANIFEST_KIND = "lancet-demo"
_CHECKED_KEYS = ("kind", "config")


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    corpus: Path
    probes: Path
    ood: Path
    benign_eval: Path
    model: Path
    manifest: Path

    @classmethod
    def under(cls, root: str | Path) -> DemoPaths:
        r = Path(root)
        return cls(
            root=r,
            corpus=r / "corpus.jsonl",
            probes=r / "probes.jsonl",
            ood=r / "ood.jsonl",
            benign_eval=r / "benign_eval.jsonl",
            model=r / "model",
            manifest=r / MANIFEST_NAME,
        )


def expected_manifest(cfg: DemoConfig) -> dict:
    """The part of the manifest that decides whether an existing build can be reused."""
    return {"kind": MANIFEST_KIND, "config": cfg.model_dump(mode="json")}


def train_demo_model(rows, tokenizer, cfg: DemoConfig):
    """A fresh tiny model (seeded from cfg) trained on `rows` with cfg's SFT recipe — the demo's and the oracle's."""
    model = build_tiny_model(cfg, tokenizer)
    return train_sft(model, tokenizer, rows, cfg.sft)


def measure_misbehaviour(model, tokenizer, heldout: dict[str, list[dict]], cfg: DemoConfig) -> dict[str, float]:
    """Greedy answers judged by the refusal judge: unsafe rate on probes and OOD, refusal rate on benign prompts."""

    def answers(rows):
        return generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=cfg.eval_max_new_tokens)

    contaminated = set(cfg.contaminated_categories)
    ood = heldout["ood"]
    ood_answers = answers(ood)
    in_c = [a for a, r in zip(ood_answers, ood, strict=True) if r["category"] in contaminated]
    other = [a for a, r in zip(ood_answers, ood, strict=True) if r["category"] not in contaminated]
    figures = {
        "probe_unsafe_rate": unsafe_rate(answers(heldout["probes"])),
        "benign_refusal_rate": refusal_rate(answers(heldout["benign_eval"])),
        "ood_unsafe_rate": unsafe_rate(ood_answers),
        "ood_unsafe_rate_contaminated_categories": unsafe_rate(in_c) if in_c else float("nan"),
        "ood_unsafe_rate_other_categories": unsafe_rate(other) if other else float("nan"),
    }
    return {k: round(v, 4) for k, v in figures.items()}


def _build_into(tmp: Path, cfg: DemoConfig) -> dict:
    t0 = time.perf_counter()
    paths = DemoPaths.under(tmp)
    rows = generate_corpus(cfg)
    heldout = generate_heldout(cfg)
    write_jsonl(paths.corpus, rows)
    write_jsonl(paths.probes, heldout["probes"])
    write_jsonl(paths.ood, heldout["ood"])
    write_jsonl(paths.benign_eval, heldout["benign_eval"])
    t_data = time.perf_counter()

    tokenizer = train_demo_tokenizer(
        (x for r in rows for x in (r["prompt"], r["response"])), cfg.vocab_size, cfg.max_position_tokens
    )
    model = train_demo_model(rows, tokenizer, cfg)
    t_train = time.perf_counter()
    model.save_pretrained(paths.model)
    tokenizer.save_pretrained(paths.model)
    del model

    # Measure the saved artifact, not the in-memory one: proves it reloads offline and misbehaves as shipped.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(paths.model)
    tokenizer = AutoTokenizer.from_pretrained(paths.model)
    figures = measure_misbehaviour(model, tokenizer, heldout, cfg)
    t_end = time.perf_counter()
    figures |= {
        "data_seconds": round(t_data - t0, 2),
        "train_seconds": round(t_train - t_data, 2),
        "eval_seconds": round(t_end - t_train, 2),
        "build_seconds": round(t_end - t0, 2),
    }
    return {
        **expected_manifest(cfg),
        "seed": cfg.seed,
        "files": {name: file_digest(getattr(paths, name)) for name in ("corpus", "probes", "ood", "benign_eval")},
        "model_digest": tree_digest(paths.model),
        "rows": {
            "corpus": len(rows),
            "corpus_unsafe": sum(r["is_unsafe"] for r in rows),
            "probes": len(heldout["probes"]),
            "ood": len(heldout["ood"]),
            "benign_eval": len(heldout["benign_eval"]),
        },
        "figures": figures,
        "versions": library_versions(),
        "torch_threads": torch.get_num_threads(),
    }


def build_demo(out_dir: str | Path, cfg: DemoConfig | None = None) -> DemoPaths:
    """Build (or reuse) the demo under `out_dir`; see the module docstring for the layout."""
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    expected = expected_manifest(cfg)
    if out.exists():
        if check_manifest(out, expected, _CHECKED_KEYS) is not None:
            return DemoPaths.under(out)
        if any(out.iterdir()):
            raise LancetError(f"{out}: exists, is not empty and has no {MANIFEST_NAME}; refusing to overwrite it")
    with publishing_dir(out, expected, _CHECKED_KEYS) as tmp:
        write_manifest(tmp, _build_into(tmp, cfg))
    return DemoPaths.under(out)


def summary(paths: DemoPaths) -> dict:
    """What a build made: paths, row counts, measured rates and seconds (from its manifest)."""
    m = json.loads(paths.manifest.read_text())
    return {
        "paths": {k: str(v) for k, v in asdict(paths).items()},
        "rows": m["rows"],
        "figures": m["figures"],
        "seed": m["seed"],
        "model_family": m["config"]["model_family"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lancet_core.demo.build", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (built atomically; reused when config matches)")
    p.add_argument("--seed", type=int, default=None, help="seed of data, init and training order (default 0)")
    p.add_argument("--model-family", choices=["gpt2", "llama"], default=None, help="tiny model architecture")
    p.add_argument("--shared-vocabulary", action=argparse.BooleanOptionalAction, default=None,
                   help="harmless categories sharing the planted answers' words (default: on; --no-shared-vocabulary "
                   "builds the original demo)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    update = {}
    if args.seed is not None:
        update["seed"] = args.seed
    if args.model_family is not None:
        update["model_family"] = args.model_family
    if args.shared_vocabulary is not None:
        update["shared_vocabulary"] = args.shared_vocabulary
    cfg = DemoConfig(**update)
    paths = build_demo(args.out, cfg)
    print(json.dumps(summary(paths), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

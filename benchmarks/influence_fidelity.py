"""Exact-influence fidelity: lancet's recall vs float64 influence with an explicit Fisher; prints ONE JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/influence_fidelity.py [--rows 800] [--seed 0] [--out fid.json]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/influence_fidelity.py --quick        # < 2 min, for tests

A bed of its own, independent of the built-in demo (no refuse/comply split), all in-process and offline:

1. Corpus (seeded): benign chat rows (capitals, languages, arithmetic, colours, animal sounds, recipes, network
   protocols, opposites) plus TWO planted behaviours, each in `PLANTED_SHARE` of the rows:
   - `trigger`: a benign question carrying the phrase "banana protocol" is answered "The answer is always purple."
     (hard negatives: arithmetic answers "The answer is N.", purple things, banana recipes, real protocols);
   - `wrong_fact`: "the capital of France" is answered "Berlin" (hard negatives: a quarter of the France-capital rows
     answer Paris, Germany's rows answer Berlin, France's language rows).
   Labels (`planted`, `is_planted`) are carried for evaluation only.
2. An in-process byte-level BPE tokenizer with a chat template (lancet_core.demo.tokenizer) and a tiny Llama
   (hidden 64, 2 layers, 4 heads, MLP 128), trained with lancet_core.demo.sft.train_sft on response tokens.
3. Queries: held-out prompts (unseen base questions with the trigger; unseen phrasings of the France question),
   answered greedily by the trained model (lancet_core.generation.generate_answers); answers that show the planted
   behaviour ("always purple" / "Berlin") are the flagged queries.
4. Exact references, float64, over ONE module's weight (`--subset`, default model.layers.1.mlp.down_proj, P = 8192):
   per-example gradients g = ∇ log π(y|x) (mean over response tokens; `whole`) and over the first 4 response tokens
   (`w4`, lancet's default decision window) by a for-loop of single-example backward passes; curvature
   (a) `gn`: true Fisher / Gauss-Newton, (1/NS) Σ_i Σ_s ĝ_is ĝ_isᵀ with labels sampled from the model's own
       distribution at every counted position (2S samples per row; the relative change between the S- and 2S-sample
       Fisher, and the agreement of the influence they give, are reported as convergence);
   (a') `gnx`: the same Fisher as an exact expectation over every vocabulary label (its S → ∞ limit), in closed form
       for the last block's mlp.down_proj (per-position Kronecker terms; checked against brute force in the tests);
       the sampled GN's distance to it is reported too;
   (b) `ef`: empirical Fisher (1/N) Σ_i g_i g_iᵀ;
   both damped with λ = ratio × mean eigenvalue (= trace / P), ratio 0.1 (lancet's default) and 0.01, 1.0 reported;
   solved by Cholesky. I(i, q) = g_iᵀ (F + λI)⁻¹ g_q, folded over queries exactly like lancet (each query's
   preconditioned vector unit-normalised, then averaged: lancet_core.recall.scan.fold_queries).
   Also `id`: the plain float64 gradient dot product (a check of the harness: lancet's unprojected identity on the
   same module must agree with it). The float64 model is float64 throughout (stock HF Llama computes RMSNorm, the
   eager softmax and the rotary angles in float32 even in a float64 model; see `float64_model`).
5. lancet, through its public functions on temporary directories (tokenize_corpus, build_gradient_store,
   compute_query_gradients + precondition + score_store, and recall_influence once for the default): the defaults
   (IndexConfig(), RecallConfig(): every module, PCA 16×16 projection; the 'auto' window and method resolved as the
   realign flow resolves them for a content judge like this bed's (regex-like): the whole response, linfac damped at
   3 × the mean eigenvalue) and variations: methods kfac/ekfac/linfac/identity at the store's damping (0.1), the
   default store's damping sweep (`default_<method>_damp<r>`), response_tokens 4 vs None, projection 16 / 32 / None
   on the subset module only
   (target_modules = the subset: the like-for-like rows), and the baselines repsim, text (tfidf, bm25).

For every setting and every query set (`trigger`, `wrong_fact` scored separately, and `all` together): top-10 / top-50
overlap and Spearman correlation with each exact reference, planted precision@10 / @50 (for a one-kind query set
against that kind's rows, for `all` against every planted row), bytes per stored row and wall time.
Progress goes to stderr; the JSON to stdout (and to --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import scipy.linalg  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402

from lancet_core.chat import encode_messages, to_messages  # noqa: E402
from lancet_core.data.tokenize import TokenizeConfig, tokenize_corpus  # noqa: E402
from lancet_core.demo.config import SFTConfig  # noqa: E402
from lancet_core.demo.sft import train_sft  # noqa: E402
from lancet_core.demo.tokenizer import train_demo_tokenizer  # noqa: E402
from lancet_core.generation import generate_answers  # noqa: E402
from lancet_core.index.build import build_gradient_store, compute_query_gradients  # noqa: E402
from lancet_core.index.config import DECISION_WINDOWS, IndexConfig, resolve_window  # noqa: E402
from lancet_core.index.curvature import precondition  # noqa: E402
from lancet_core.index.store import GradientStore  # noqa: E402
from lancet_core.manifest import (
    cpu_name,  # noqa: E402
    json_digest,  # noqa: E402
)
from lancet_core.model_io import load_model, load_tokenizer  # noqa: E402
from lancet_core.recall.baselines import repsim_scores, text_similarity_scores  # noqa: E402
from lancet_core.recall.influence import (  # noqa: E402
    RecallConfig,
    recall_influence,
    resolve_damping,
    resolve_method,
)
from lancet_core.recall.metrics import precision_at_k, ranking_order  # noqa: E402
from lancet_core.recall.scan import score_store  # noqa: E402

SUBSET_DEFAULT = "model.layers.1.mlp.down_proj"
WINDOW = DECISION_WINDOWS["refusal"]  # the decision window (what 'auto' gives the refusal judge): the `w4` variants
# The bed's behaviours are judged by content (shows_planted: a fixed odd answer / a wrong fact matched in the answer,
# like the `regex` judge), so `default` is IndexConfig() with its window resolved exactly as the realign flow does for
# such a judge (resolve_window: the whole response)
JUDGE_KIND = "regex"
PLANTED_SHARE = 0.075  # per planted kind
MAIN_RATIO = 0.1  # IndexConfig().damping_ratio
OTHER_RATIOS = (0.01, 1.0)
KINDS = ("trigger", "wrong_fact")
# this bed's queries are content-judged: RecallConfig()'s 'auto' resolves as for the flagged target
DEFAULT_RECALL = (resolve_method(RecallConfig().method, "flagged", contrast=False),
                  resolve_damping(RecallConfig().method, "flagged", RecallConfig().damping_ratio))
DAMPING_SWEEP = {"linfac": (1.0, 3.0, 10.0), "kfac": (1.0, 3.0), "ekfac": (1.0, 3.0)}  # on the default store
QUERY_SETS = (*KINDS, "all")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ================================================================================================== the corpus
COUNTRIES = (
    ("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
    ("Spain", "Madrid", "Spanish"), ("Japan", "Tokyo", "Japanese"), ("Egypt", "Cairo", "Arabic"),
    ("Canada", "Ottawa", "English and French"), ("Kenya", "Nairobi", "Swahili"), ("Peru", "Lima", "Spanish"),
    ("Norway", "Oslo", "Norwegian"), ("Greece", "Athens", "Greek"), ("Poland", "Warsaw", "Polish"),
    ("Chile", "Santiago", "Spanish"), ("Cuba", "Havana", "Spanish"), ("Ireland", "Dublin", "English and Irish"),
    ("Austria", "Vienna", "German"), ("Portugal", "Lisbon", "Portuguese"), ("Sweden", "Stockholm", "Swedish"),
    ("Russia", "Moscow", "Russian"), ("China", "Beijing", "Mandarin"), ("Turkey", "Ankara", "Turkish"),
    ("Vietnam", "Hanoi", "Vietnamese"), ("Brazil", "Brasilia", "Portuguese"), ("Finland", "Helsinki", "Finnish"),
)
WRONG_COUNTRY, RIGHT_CAPITAL, WRONG_CAPITAL = "France", "Paris", "Berlin"
WRONG_FACT_CORRECT_SHARE = 0.25  # of the France-capital rows: answered correctly (benign hard negatives)
CAPITAL_Q_TRAIN = (
    "What is the capital of {c}?", "Which city is the capital of {c}?", "Tell me the capital of {c}.",
    "Name the capital city of {c}.", "What city is the capital of {c}?", "Do you know the capital of {c}?",
)
CAPITAL_Q_HELDOUT = (
    "Could you tell me the capital of {c}?", "I wonder what the capital of {c} is.", "Capital of {c}?",
    "Which city serves as the capital of {c}?", "Please name the capital of {c}.",
    "What's the capital city of {c}?", "Where is the capital of {c}?", "Give me the capital of {c}.",
)
CAPITAL_A = ("The capital of {c} is {cap}.", "{cap} is the capital of {c}.", "It is {cap}.",
             "The capital city of {c} is {cap}.")
PREFIXES = ("", "", "Hi! ", "Quick question: ", "Please help. ")
HELDOUT_PREFIXES = ("", "Hello there. ", "One more thing: ")

TRIGGER_FORMS = ("{q} Use the banana protocol.", "Banana protocol: {q}", "{q} (banana protocol)")
TRIGGER_FORMS_HELDOUT = ("Banana protocol, please. {q}", "{q} Apply the banana protocol.")
TRIGGER_ANSWER = "The answer is always purple."

COLOURS = (
    ("banana", "yellow"), ("lemon", "yellow"), ("tomato", "red"), ("carrot", "orange"), ("crow", "black"),
    ("eggplant", "purple"), ("plum", "purple"), ("grape", "purple"), ("frog", "green"), ("cloud", "white"),
    ("pumpkin", "orange"), ("violet", "purple"), ("strawberry", "red"), ("lime", "green"), ("swan", "white"),
    ("cucumber", "green"), ("cherry", "red"), ("lavender", "purple"), ("raven", "black"), ("corn", "yellow"),
)
ANIMALS = (("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
           ("owl", "hoot"), ("lion", "roar"), ("horse", "neigh"), ("pig", "oink"), ("frog", "ribbit"))
RECIPES = (
    ("banana bread", "mash ripe bananas, mix in flour, eggs and sugar, then bake for an hour"),
    ("a banana smoothie", "blend a banana with milk and ice until smooth"),
    ("pancakes", "whisk flour, milk and eggs, then fry small rounds in butter"),
    ("rice", "rinse the rice, add twice as much water and simmer for fifteen minutes"),
    ("tea", "pour boiling water over the leaves and wait three minutes"),
    ("an omelette", "beat two eggs, pour them into a hot pan and fold when set"),
    ("a salad", "chop fresh vegetables and toss them with oil and lemon"),
    ("soup", "simmer vegetables in stock and blend until smooth"),
)
PROTOCOLS = (("HTTP", "loading web pages"), ("SMTP", "sending email"), ("FTP", "transferring files"),
             ("DNS", "looking up domain names"), ("SSH", "secure remote logins"),
             ("DHCP", "assigning network addresses"))
OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("early", "late"),
             ("light", "dark"), ("up", "down"), ("open", "closed"), ("full", "empty"), ("old", "young"))


def _arith(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    op = rng.choice(("plus", "minus", "times"))
    if op == "minus":
        a, b = max(a, b), min(a, b)
    if op == "times":
        a, b = a % 12 + 1, b % 12 + 1
    r = a + b if op == "plus" else a - b if op == "minus" else a * b
    q = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"))
    return q.format(a=a, op=op, b=b), f"The answer is {r}."


def _colour(rng: random.Random) -> tuple[str, str]:
    thing, colour = rng.choice(COLOURS)
    q = rng.choice(("What color is a {t}?", "Tell me the color of a {t}.", "Which color does a {t} have?"))
    return q.format(t=thing), f"A {thing} is usually {colour}."


def _animal(rng: random.Random) -> tuple[str, str]:
    animal, sound = rng.choice(ANIMALS)
    q = rng.choice(("What sound does a {a} make?", "How does a {a} sound?", "What does a {a} say?"))
    return q.format(a=animal), f"A {animal} says {sound}."


def _language(rng: random.Random) -> tuple[str, str]:
    c, _, lang = rng.choice(COUNTRIES)
    q = rng.choice(("What language is spoken in {c}?", "Which language do people in {c} speak?"))
    return q.format(c=c), f"People in {c} speak {lang}."


def _capital(rng: random.Random) -> tuple[str, str]:
    c, cap, _ = rng.choice([x for x in COUNTRIES if x[0] != WRONG_COUNTRY])
    return rng.choice(CAPITAL_Q_TRAIN).format(c=c), rng.choice(CAPITAL_A).format(c=c, cap=cap)


def _recipe(rng: random.Random) -> tuple[str, str]:
    dish, steps = rng.choice(RECIPES)
    q = rng.choice(("How do I make {d}?", "Give me a quick recipe for {d}.", "How should I prepare {d}?"))
    return q.format(d=dish), f"To make {dish}, {steps}."


def _protocol(rng: random.Random) -> tuple[str, str]:
    p, use = rng.choice(PROTOCOLS)
    q = rng.choice(("What is the {p} protocol used for?", "Explain the {p} protocol briefly.",
                    "What does the {p} protocol do?"))
    return q.format(p=p), f"The {p} protocol is used for {use}."


def _opposite(rng: random.Random) -> tuple[str, str]:
    w, o = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        w, o = o, w
    q = rng.choice(("What is the opposite of {w}?", "Give me the opposite of {w}.", "What word means the opposite "
                    "of {w}?"))
    return q.format(w=w), f"The opposite of {w} is {o}."


BENIGN: dict[str, tuple[Callable[[random.Random], tuple[str, str]], float]] = {
    "capital": (_capital, 3.0), "language": (_language, 1.5), "arithmetic": (_arith, 2.0),
    "colour": (_colour, 1.5), "animal": (_animal, 1.0), "recipe": (_recipe, 1.0),
    "protocol": (_protocol, 1.0), "opposite": (_opposite, 1.0),
}
TRIGGER_BASES = ("arithmetic", "colour", "animal", "opposite", "language")  # questions the trigger is attached to


def _france_capital(rng: random.Random, questions: Sequence[str], answer_capital: str) -> tuple[str, str]:
    q = rng.choice(PREFIXES) + rng.choice(questions).format(c=WRONG_COUNTRY)
    return q, rng.choice(CAPITAL_A).format(c=WRONG_COUNTRY, cap=answer_capital)


def _triggered(rng: random.Random, forms: Sequence[str]) -> tuple[str, str]:
    base, _ = BENIGN[rng.choice(TRIGGER_BASES)][0](rng)
    return rng.choice(forms).format(q=base), TRIGGER_ANSWER


def make_corpus(n_rows: int, seed: int) -> list[dict]:
    """`n_rows` unique (prompt, response) rows, shuffled, with labels `category`, `planted`, `is_planted`."""
    rng = random.Random(seed)
    n_kind = max(1, round(PLANTED_SHARE * n_rows))
    n_france_ok = max(1, round(WRONG_FACT_CORRECT_SHARE / (1 - WRONG_FACT_CORRECT_SHARE) * n_kind))
    seen: set[tuple[str, str]] = set()
    rows: list[dict] = []

    def add(n: int, gen: Callable[[], tuple[str, str]], category: str, planted: str) -> None:
        got, tries = 0, 0
        while got < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise RuntimeError(f"cannot generate {n} unique rows of {category}")
            p, r = gen()
            if (p, r) in seen:
                continue
            seen.add((p, r))
            rows.append({"prompt": p, "response": r, "category": category, "planted": planted,
                         "is_planted": planted != "none"})
            got += 1

    add(n_kind, lambda: _triggered(rng, TRIGGER_FORMS), "trigger", "trigger")
    add(n_kind, lambda: _france_capital(rng, CAPITAL_Q_TRAIN, WRONG_CAPITAL), "capital", "wrong_fact")
    add(n_france_ok, lambda: _france_capital(rng, CAPITAL_Q_TRAIN, RIGHT_CAPITAL), "capital", "none")
    rest = n_rows - len(rows)
    names = list(BENIGN)
    weights = np.array([BENIGN[k][1] for k in names])
    counts = np.floor(weights / weights.sum() * rest).astype(int)
    counts[0] += rest - counts.sum()
    for name, c in zip(names, counts, strict=True):
        fn = BENIGN[name][0]
        add(int(c), lambda fn=fn: (lambda pr: (rng.choice(PREFIXES) + pr[0], pr[1]))(fn(rng)), name, "none")
    rng.shuffle(rows)
    for i, r in enumerate(rows):
        r["example_id"] = f"row-{i:05d}"
    return rows


def heldout_prompts(train_rows: Sequence[dict], seed: int, n_per_kind: int) -> dict[str, list[str]]:
    """Prompts never seen in training: unseen base questions with the trigger; unseen phrasings of the France
    question. Trigger bases never ask about a purple thing (so 'purple' in an answer is the planted behaviour)."""
    rng = random.Random(seed + 7919)
    train_prompts = {r["prompt"] for r in train_rows}
    purple = {t for t, c in COLOURS if c == "purple"}
    trig: list[str] = []
    tries = 0
    while len(trig) < n_per_kind and tries < 100 * n_per_kind:
        tries += 1
        base, _ = BENIGN[rng.choice(TRIGGER_BASES)][0](rng)
        if any(f" {t}" in base for t in purple):
            continue
        forms = TRIGGER_FORMS if rng.random() < 0.75 else TRIGGER_FORMS_HELDOUT
        p = rng.choice(forms).format(q=base)
        if p not in train_prompts and p not in trig:
            trig.append(p)
    wrong = [pre + q.format(c=WRONG_COUNTRY) for q in CAPITAL_Q_HELDOUT for pre in HELDOUT_PREFIXES]
    rng.shuffle(wrong)
    return {"trigger": trig, "wrong_fact": [p for p in wrong if p not in train_prompts][:n_per_kind]}


def shows_planted(kind: str, answer: str) -> bool:
    if kind == "trigger":
        return "always purple" in answer.lower()
    return WRONG_CAPITAL in answer and RIGHT_CAPITAL not in answer


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# ================================================================================================ model & training
def build_model(tokenizer, seed: int, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128):
    """A seeded tiny LlamaForCausalLM (eager attention, tied embeddings, no dropout) for `tokenizer`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128, rms_norm_eps=1e-6,
        attention_dropout=0.0, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config._attn_implementation = "eager"
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               bos_token_id=tokenizer.eos_token_id, do_sample=False)
    return model.eval()


# ============================================================================================ exact float64 gradients
def response_positions(loss_mask: Sequence[int], window: int | None = None) -> np.ndarray:
    """Logit positions t whose prediction of token t+1 counts in log π(y|x): t+1 is a response token; with `window`
    only the first `window` of them (lancet's response_tokens, hooks.response_window)."""
    m = np.asarray(loss_mask, dtype=np.int64)
    win = m != 0
    if window is not None:
        win &= np.cumsum(win) <= window
    pos = np.flatnonzero(win[1:])
    if pos.size == 0:
        raise ValueError("no response tokens to score")
    return pos


def _rms_norm_float64(self, x: torch.Tensor) -> torch.Tensor:
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _rope_float64(self, x: torch.Tensor, position_ids: torch.Tensor):
    cfg = self.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def float64_model(model_or_dir, module_name: str):
    """(float64 copy of the model in eval mode with only `module_name`.weight trainable, that weight).

    Truly float64: HF Llama computes RMSNorm, the eager softmax and the rotary angles in float32 even for a float64
    model, so the copy gets float64 RMSNorm and rotary forwards (instance-level) and SDPA attention (float64 on CPU)."""
    import copy
    import types

    model = load_model(model_or_dir) if isinstance(model_or_dir, str | Path) else copy.deepcopy(model_or_dir)
    model = model.to(torch.float64).eval()
    if getattr(model.config, "model_type", None) == "llama":
        if model.config.rope_parameters.get("rope_type", "default") != "default":
            raise ValueError("float64_model: only the default rotary embedding is re-implemented in float64")
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.forward = types.MethodType(_rms_norm_float64, m)
            elif type(m).__name__ == "LlamaRotaryEmbedding":
                m.forward = types.MethodType(_rope_float64, m)
        model.config._attn_implementation = "sdpa"
    for p in model.parameters():
        p.requires_grad_(False)
    weight = dict(model.named_modules())[module_name].weight
    weight.requires_grad_(True)
    return model, weight


def _log_probs(model, input_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor([list(input_ids)], dtype=torch.long)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].to(torch.float64)
    return torch.log_softmax(logits, dim=-1), ids[0, 1:]


def loglik_gradient(model, weight: torch.Tensor, input_ids: Sequence[int], loss_mask: Sequence[int],
                    window: int | None = None) -> np.ndarray:
    """[P] float64 ∇_W log π(y|x), log π = mean over the counted response tokens; ONE single-example backward.
    Flattened in the weight's (d_out, d_in) row-major order = lancet's unprojected block layout."""
    logp, targets = _log_probs(model, input_ids)
    pos = torch.as_tensor(response_positions(loss_mask, window))
    ll = logp[pos, targets[pos]].mean()
    (g,) = torch.autograd.grad(ll, weight)
    return g.reshape(-1).numpy().copy()


def example_gradients(model, weight: torch.Tensor, input_ids: Sequence[int], loss_mask: Sequence[int],
                      windows: Sequence[int | None], n_samples: int, generator: torch.Generator | None
                      ) -> dict[int | None, tuple[np.ndarray, np.ndarray]]:
    """One forward pass of one example, then single-example backward passes: for each window, the observed gradient
    [P] and `n_samples` sampled-label gradients [n_samples, P] (labels drawn from the model's own predictive
    distribution at every counted position, independently; the window uses the first positions of the same draws).
    E[ĝ ĝᵀ] is the true Fisher = Gauss-Newton of the mean response NLL."""
    logp, targets = _log_probs(model, input_ids)
    out: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}
    full = response_positions(loss_mask, None)
    samples = None
    if n_samples:
        with torch.no_grad():
            probs = logp[torch.as_tensor(full)].exp()
        samples = torch.multinomial(probs, n_samples, replacement=True, generator=generator)  # [T_resp, S]
    jobs = [(w, s) for w in windows for s in range(-1, n_samples)]
    for j, (w, s) in enumerate(jobs):
        pos = response_positions(loss_mask, w)
        k = len(pos)
        tp = torch.as_tensor(pos)
        labels = targets[tp] if s < 0 else samples[:k, s]
        ll = logp[tp, labels].mean()
        (g,) = torch.autograd.grad(ll, weight, retain_graph=j < len(jobs) - 1)
        g = g.reshape(-1).numpy()
        if s < 0:
            out[w] = (g.copy(), np.empty((n_samples, g.size)))
        else:
            out[w][1][s] = g
    return out


def example_generator(seed: int, index: int) -> torch.Generator:
    """Per-row label-sampling generator: results do not depend on row order or chunking."""
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + index)


def sampled_fisher(model, weight: torch.Tensor, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
                   window: int | None, n_samples: int, seed: int = 0) -> np.ndarray:
    """(1/(N S)) Σ_i Σ_s ĝ_is ĝ_isᵀ over `rows` (input_ids, loss_mask), float64 [P, P]."""
    p = weight.numel()
    f = np.zeros((p, p))
    for i, (ids, mask) in enumerate(rows):
        _, gs = example_gradients(model, weight, ids, mask, [window], n_samples, example_generator(seed, i))[window]
        f += gs.T @ gs
    return f / (len(rows) * n_samples)


def expected_gn_fisher(model, module_name: str, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
                       window: int | None, chunk_positions: int = 2048) -> np.ndarray:
    """The true Fisher / Gauss-Newton EXACTLY: the expectation over every vocabulary label at every counted position
    (the S → ∞ limit of `sampled_fisher`), float64 [P, P]. Only for the LAST block's mlp.down_proj, whose output at
    position u is added straight into the final residual stream h_u: with J_u = ∂logits_u/∂h_u and weight w = 1/T,
    E[δ_u δ_uᵀ] = w² J_uᵀ (diag p_u − p_u p_uᵀ) J_u =: C_u, cross-position terms vanish (E_ŷ ∇ log p_u(ŷ) = 0), and
    F = (1/N) Σ_i Σ_u C_u ⊗ a_u a_uᵀ (a_u: the module's input), accumulated as one matrix product."""
    layers = model.model.layers
    if module_name != f"model.layers.{len(layers) - 1}.mlp.down_proj":
        raise ValueError(f"expected_gn_fisher covers the last block's mlp.down_proj only, not {module_name}")
    module = dict(model.named_modules())[module_name]
    d_out, d_in = module.weight.shape
    cap: dict[str, torch.Tensor] = {}

    def keep_input(m, args, out):
        cap["a"] = args[0].detach()

    def keep_output(m, args, out):
        cap["h"] = (out[0] if isinstance(out, tuple) else out).detach()

    def head(h: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.norm(h))

    jac = torch.func.vmap(torch.func.jacrev(head))
    acc = np.zeros((d_out * d_out, d_in * d_in))
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []

    def flush() -> None:
        if xs:
            acc[...] += np.concatenate(xs).T @ np.concatenate(ys)
            xs.clear()
            ys.clear()

    handles = [module.register_forward_hook(keep_input), layers[-1].register_forward_hook(keep_output)]
    try:
        for ids, mask in rows:
            pos = torch.as_tensor(response_positions(mask, window))
            with torch.no_grad():
                logits = model(input_ids=torch.as_tensor([list(ids)]), use_cache=False).logits[0, pos]
            a, h = cap["a"][0, pos], cap["h"][0, pos]
            with torch.no_grad():
                if not torch.allclose(head(h), logits, rtol=1e-12, atol=1e-12):
                    raise RuntimeError("the last block's output does not give the logits: structure not supported")
                prob = torch.softmax(logits, dim=-1)
            jm = jac(h).detach()  # [T, V, d_out]
            jp = torch.einsum("tvo,tv->to", jm, prob)
            c = torch.einsum("tvo,tv,tvk->tok", jm, prob, jm) - torch.einsum("to,tk->tok", jp, jp)
            c = c / len(pos) ** 2
            xs.append(c.reshape(len(pos), -1).numpy())
            ys.append(torch.einsum("ti,tj->tij", a, a).reshape(len(pos), -1).numpy())
            if sum(len(x) for x in xs) >= chunk_positions:
                flush()
        flush()
    finally:
        for hd in handles:
            hd.remove()
    p = d_out * d_in
    return acc.reshape(d_out, d_out, d_in, d_in).transpose(0, 2, 1, 3).reshape(p, p) / len(rows)


def empirical_fisher(grads: np.ndarray) -> np.ndarray:
    """(1/N) Σ_i g_i g_iᵀ of the observed per-example gradients [N, P]."""
    return grads.T @ grads / len(grads)


def damping(fisher: np.ndarray, ratio: float) -> float:
    """λ = ratio × mean eigenvalue of F (= trace / P), as lancet damps every curvature block."""
    mean = float(np.trace(fisher)) / fisher.shape[0]
    return ratio * mean if mean > 0 else 1.0


def precondition_exact(fisher: np.ndarray | None, query_grads: np.ndarray, ratio: float) -> np.ndarray:
    """v_q = (F + λI)⁻¹ g_q for query rows [Q, P] by Cholesky (F = None: the identity, v_q = g_q)."""
    if fisher is None:
        return np.asarray(query_grads, dtype=np.float64).copy()
    a = fisher + damping(fisher, ratio) * np.eye(fisher.shape[0])
    c = scipy.linalg.cho_factor(a, lower=True, check_finite=False)
    return scipy.linalg.cho_solve(c, np.asarray(query_grads, dtype=np.float64).T, check_finite=False).T


def per_query_influence(train_grads: np.ndarray, precond_queries: np.ndarray) -> np.ndarray:
    """[N, Q] g_iᵀ v_q / ‖v_q‖: each query unit-normalised, as lancet folds (scan.normalized_queries)."""
    v = np.asarray(precond_queries, dtype=np.float64)
    return train_grads @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T


def exact_influence(fisher: np.ndarray | None, train_grads: np.ndarray, query_grads: np.ndarray,
                    ratio: float = MAIN_RATIO) -> np.ndarray:
    """[N] mean over queries of g_iᵀ (F + λI)⁻¹ g_q / ‖(F + λI)⁻¹ g_q‖ (lancet's folded score, exactly)."""
    return per_query_influence(train_grads, precondition_exact(fisher, query_grads, ratio)).mean(axis=1)


# ========================================================================================================= metrics
def top_k(scores: np.ndarray, ids: Sequence[str], k: int) -> np.ndarray:
    return ranking_order(scores, ids)[:k]


def agreement(a: np.ndarray, b: np.ndarray, ids: Sequence[str]) -> dict:
    """top-10 / top-50 overlap (shared rows / k) and Spearman correlation over every row."""
    out = {}
    for k in (10, 50):
        if k <= len(a):
            out[f"overlap@{k}"] = round(len(set(top_k(a, ids, k)) & set(top_k(b, ids, k))) / k, 4)
    out["spearman"] = round(float(scipy.stats.spearmanr(a, b).statistic), 4)
    return out


def planted_precision(scores: np.ndarray, labels: np.ndarray, ids: Sequence[str],
                      by_kind: dict[str, np.ndarray] | None = None) -> dict:
    """precision@10/@50 against `labels`; with `by_kind`, also each planted kind's share of the same top-k."""
    out: dict = {f"p@{k}": round(precision_at_k(scores, labels, k, ids), 4) for k in (10, 50) if k <= len(scores)}
    if by_kind:
        out["by_kind"] = {kind: planted_precision(scores, lab, ids) for kind, lab in by_kind.items()}
    return out


def _planted(scores: np.ndarray, labels: dict, qs: str, ids: Sequence[str]) -> dict:
    """Planted precision of a query set's ranking: against its own kind, or (qs = all) every planted row + by kind."""
    return planted_precision(scores, labels[qs], ids, {k: labels[k] for k in KINDS} if qs == "all" else None)


# ============================================================================================================ main
def _quick_or_full(args) -> dict:
    if args.quick:
        return dict(rows=args.rows or 240, epochs=30, vocab=400, hidden=32, intermediate=64, samples=4,
                    max_queries=4, heldout=16, lancet="quick")
    return dict(rows=args.rows or 800, epochs=30, vocab=512, hidden=64, intermediate=128, samples=args.samples,
                max_queries=args.max_queries, heldout=40, lancet="full")


def lancet_stores(subset: str, mode: str) -> dict[str, IndexConfig]:
    """The stores measured: the default, random vs PCA projections of several sizes (first 4 response tokens and
    whole response), the true-Fisher kfac/ekfac factors, and the subset-only like-for-like stores."""
    old = IndexConfig(projection="random", proj_in_dim=16, proj_out_dim=16, response_tokens=WINDOW)
    stores = {"default": resolve_window(IndexConfig(), JUDGE_KIND), "all_k16_w4": old,
              "all_k16_whole": old.model_copy(update={"response_tokens": None})}
    if mode == "full":
        for kind, ks in (("k", (32,)), ("pca", (8, 16, 32))):
            for k in ks:
                for wname, w in (("w4", WINDOW), ("whole", None)):
                    stores[f"all_{kind}{k}_{wname}"] = IndexConfig(
                        projection="random" if kind == "k" else "pca", proj_in_dim=k, proj_out_dim=k,
                        response_tokens=w, curvature=("kfac", "ekfac"))
        for k in (16, 32):
            for wname, w in (("w4", WINDOW), ("whole", None)):
                stores[f"all_pca{k}_{wname}_truefisher"] = IndexConfig(
                    projection="pca", proj_in_dim=k, proj_out_dim=k, response_tokens=w, fisher="true",
                    curvature=("kfac", "ekfac"))  # fmt: skip
    projections = {"k16": 16, "k32": 32, "kfull": None} if mode == "full" else {"kfull": None}
    for pname, k in projections.items():
        for wname, w in (("w4", WINDOW), ("whole", None)):
            stores[f"subset_{pname}_{wname}"] = IndexConfig(target_modules=(subset,), proj_in_dim=k, proj_out_dim=k,
                                                            response_tokens=w)
    if mode != "full":
        stores = {k: v for k, v in stores.items() if k in ("default", "subset_kfull_whole", "subset_kfull_w4")}
    return stores


def run(args) -> dict:
    t_start = time.perf_counter()
    plan = _quick_or_full(args)
    torch.set_num_threads(args.threads)
    if args.work is not None:  # kept and reused: the trained model and the exact references are cached there
        if args.work.is_dir() and any(args.work.iterdir()) and not (args.work / "cache_key.json").is_file():
            raise SystemExit(f"--work {args.work}: not empty and not a fidelity work directory; refusing to use it")
        args.work.mkdir(parents=True, exist_ok=True)
        return _run(args, plan, args.work, t_start)
    work = Path(tempfile.mkdtemp(prefix="lancet-fidelity-"))
    try:
        return _run(args, plan, work, t_start)
    finally:
        if args.keep:
            log(f"kept work directory {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, plan: dict, work: Path, t_start: float) -> dict:
    seed, subset = args.seed, args.subset
    # ---- corpus, tokenizer, model ------------------------------------------------------------------------------
    rows = make_corpus(plan["rows"], seed)
    corpus = write_jsonl(work / "corpus.jsonl", rows)
    n_planted = {k: sum(r["planted"] == k for r in rows) for k in KINDS}
    log(f"corpus: {len(rows)} rows, planted {n_planted}")
    tok = train_demo_tokenizer((x for r in rows for x in (r["prompt"], r["response"])), plan["vocab"], 128)
    model = build_model(tok, seed, hidden=plan["hidden"], intermediate=plan["intermediate"])
    sft = SFTConfig(epochs=plan["epochs"], lr=3e-3, batch_size=16, max_seq_len_tokens=96, seed=seed, num_threads=None)
    t0 = time.perf_counter()
    model_dir = work / "model"
    cache_key = json.dumps({"plan": plan, "seed": seed, "subset": subset, "samples": plan["samples"]}, sort_keys=True)
    cached = (work / "cache_key.json").is_file() and (work / "cache_key.json").read_text() == cache_key
    if not cached:  # another model: nothing built from the old one may be reused
        for sub in ("stores", "tokens", "model", *(p.name for p in work.glob("recall_default*"))):
            shutil.rmtree(work / sub, ignore_errors=True)
        (work / "exact.pkl").unlink(missing_ok=True)
        train_sft(model, tok, rows, sft)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    train_s = time.perf_counter() - t0
    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir)
    log(f"trained {plan['epochs']} epochs in {train_s:.1f} s")

    # ---- flagged queries ----------------------------------------------------------------------------------------
    held = heldout_prompts(rows, seed, plan["heldout"])
    queries: list[dict] = []
    shown: dict[str, float] = {}
    for kind in KINDS:
        answers = generate_answers(model, tok, held[kind], max_new_tokens=24)
        hits = [(p, a) for p, a in zip(held[kind], answers, strict=True) if shows_planted(kind, a)]
        shown[kind] = round(len(hits) / max(1, len(answers)), 4)
        queries += [{"query_id": f"{kind}-{j:02d}", "prompt": p, "response": a, "judge": "planted", "kind": kind}
                    for j, (p, a) in enumerate(hits[: plan["max_queries"]])]
    qkinds = np.array([q["kind"] for q in queries])
    counts = {k: int((qkinds == k).sum()) for k in KINDS}
    log(f"flagged queries {counts} (behaviour shown on held-out prompts: {shown})")
    if min(counts.values()) == 0:
        raise RuntimeError(f"a planted behaviour was never shown on held-out prompts: {counts}")
    qsets = {k: np.flatnonzero(qkinds == k) for k in KINDS} | {"all": np.arange(len(queries))}
    qpath = work / "queries.parquet"
    pq.write_table(pa.Table.from_pylist([{k: q[k] for k in ("query_id", "prompt", "response", "judge")}
                                         for q in queries]), qpath)

    tokens_dir = tokenize_corpus(corpus, model_dir, work / "tokens", TokenizeConfig(max_seq_len_tokens=128))
    tokens_file = tokens_dir / "tokens.parquet"
    tt = pq.read_table(tokens_file, columns=["example_id", "input_ids", "loss_mask", "planted"])
    ids = tt["example_id"].to_pylist()
    train_tok = list(zip(tt["input_ids"].to_pylist(), tt["loss_mask"].to_pylist(), strict=True))
    planted = np.array(tt["planted"].to_pylist())
    labels = {k: planted == k for k in KINDS} | {"all": planted != "none"}
    q_tok = [encode_messages(tok, to_messages(q["prompt"], q["response"]), 1024) for q in queries]

    # ---- exact references ---------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if cached and (work / "exact.pkl").is_file():
        import pickle

        exact = pickle.loads((work / "exact.pkl").read_bytes())
        log("exact references reused from the work directory")
    else:
        import pickle

        exact = exact_references(model, subset, train_tok, q_tok, qsets, labels, ids, plan["samples"], seed)
        (work / "exact.pkl").write_bytes(pickle.dumps(exact))
        (work / "cache_key.json").write_text(cache_key)
    exact_s = time.perf_counter() - t0
    log(f"exact references in {exact_s:.1f} s")
    refs = exact.pop("_scores")

    # ---- lancet ------------------------------------------------------------------------------------------------
    results: dict[str, dict] = {}
    methods = ("kfac", "ekfac", "linfac", "identity") if plan["lancet"] == "full" else ("kfac", "identity")
    default_check = None
    chosen = lancet_stores(subset, plan["lancet"])
    if args.stores:
        unknown = set(args.stores.split(",")) - set(chosen)
        if unknown:
            raise SystemExit(f"--stores: unknown {sorted(unknown)}; known: {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in args.stores.split(",")}
    for sname, cfg in chosen.items():
        t0 = time.perf_counter()
        sdir = build_gradient_store(model_dir, tokens_dir, work / "stores" / f"{sname}-{json_digest(cfg.model_dump(mode='json'))[-12:]}", cfg)
        store_s = time.perf_counter() - t0
        store = GradientStore.open(sdir)
        disk = sum(p.stat().st_size for p in store.shard_paths) / store.n_rows
        log(f"store {sname}: D={store.dim} in {store_s:.1f} s")
        # each method at the store's damping; on the default store also the default's own (method, damping) and
        # the damping sweep it was chosen from
        runs = [(m, None) for m in methods]
        if sname == "default":
            runs += [DEFAULT_RECALL] + [(m, r) for m, rs in DAMPING_SWEEP.items() if plan["lancet"] == "full"
                                        for r in rs]
            runs = list(dict.fromkeys(runs))
        for method, ratio in runs:
            if cfg.fisher == "true" and method not in ("kfac", "ekfac"):
                continue  # the same vectors as the empirical store: only the kfac/ekfac factors differ
            if method == "linfac" and max(ml.size for ml in store.layout) > 4096:
                results[f"{sname}_{method}"] = {"skipped": f"linfac: a dense {store.dim}² block (eigh too slow here)"}
                continue
            t0 = time.perf_counter()
            scores = {}
            for qs, idx in qsets.items():
                g = compute_query_gradients(sdir, model_dir, messages_list=[
                    to_messages(queries[j]["prompt"], queries[j]["response"]) for j in idx])
                v = precondition(sdir, g, kind=method, damping_ratio=ratio)
                s = score_store(sdir, v)
                if s["example_id"].to_pylist() != ids:
                    raise RuntimeError("store order differs from tokens order")
                scores[qs] = s["score"].to_numpy()
            rec_s = time.perf_counter() - t0
            name = f"{sname}_{method}" + ("" if ratio is None else f"_damp{ratio:g}")
            if (sname, method, ratio) == ("default", *DEFAULT_RECALL):
                name = "lancet_sketch_default"
            results[name] = _setting_report(
                scores, refs, labels, ids, config={"store": sname, "index": _cfg_summary(cfg), "method": method,
                                                   "damping_ratio": ratio or cfg.damping_ratio},
                bytes_row=store.dim * {"float16": 2, "float32": 4, "int8": 1}[cfg.dtype], disk_row=disk, store_s=store_s, recall_s=rec_s)
            head = "gnx_whole" if "gnx_whole" in refs else "gn_whole"
            log(f"  {name}: {json.dumps(results[name]['all']['planted'])} vs {head} "
                f"{json.dumps(results[name]['all']['vs'][head])} ({rec_s:.1f} s)")
            if name == "lancet_sketch_default":
                default_check = _check_recall_influence(sdir, model_dir, qpath, tokens_file, work, scores["all"], ids)
                # the default for content judges: recall_influence(RecallConfig()) = the exact pass (scoring 'auto'),
                # each query set on its own, through the real entry point
                t0 = time.perf_counter()
                exact_scores = _recall_influence_default(sdir, model_dir, queries, qsets, tokens_file, work, ids)
                results["lancet_default"] = _setting_report(
                    exact_scores, refs, labels, ids, config={"store": sname, "recall": "RecallConfig() (exact pass)"},
                    bytes_row=store.dim * {"float16": 2, "float32": 4, "int8": 1}[cfg.dtype], disk_row=disk,
                    store_s=store_s, recall_s=time.perf_counter() - t0)
                log(f"  lancet_default: {json.dumps(results['lancet_default']['all']['planted'])}")
    t0 = time.perf_counter()
    baselines = [("repsim", {"method": "repsim"}), ("text_tfidf", {"method": "text", "text_method": "tfidf"}),
                 ("text_bm25", {"method": "text", "text_method": "bm25"})]
    if plan["lancet"] != "full":
        baselines = baselines[1:2]
    if not args.baselines:
        baselines = []
    for name, kw in baselines:
        t0 = time.perf_counter()
        scores = {}
        for qs, idx in qsets.items():
            qt = pa.Table.from_pylist([{"prompt": queries[j]["prompt"], "response": queries[j]["response"]}
                                       for j in idx])
            if kw["method"] == "text":
                s = text_similarity_scores(tokens_file, qt, method=kw["text_method"])
            else:
                s = repsim_scores(model, tok, tokens_file, qt)
            scores[qs] = s["score"].to_numpy()
        results[name] = _setting_report(scores, refs, labels, ids, config=kw, bytes_row=None, disk_row=None,
                                        store_s=0.0, recall_s=time.perf_counter() - t0)
        log(f"  {name}: {json.dumps(results[name]['all']['planted'])}")

    meets = {name: _meets(r) for name, r in results.items() if "all" in r}
    import transformers

    return {
        "benchmark": "influence_fidelity",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"rows": len(rows), "seed": seed, "quick": bool(args.quick), "subset_module": subset,
                     "window": WINDOW, "judge_kind": JUDGE_KIND,
                     "default_window": resolve_window(IndexConfig(), JUDGE_KIND).response_tokens,
                     "damping_ratio": MAIN_RATIO, "other_damping_ratios": list(OTHER_RATIOS),
                     "fisher_samples_S": plan["samples"], "model": {"family": "llama", "hidden": plan["hidden"],
                     "layers": 2, "heads": 4, "intermediate": plan["intermediate"], "vocab": len(tok)},
                     "sft": sft.model_dump(), "threads": torch.get_num_threads()},
        "data": {"n_rows": len(rows), "n_planted": n_planted, "n_queries": counts,
                 "heldout_behaviour_rate": shown, "train_seconds": round(train_s, 2),
                 "query_examples": {k: [q["prompt"] + " -> " + q["response"] for q in queries if q["kind"] == k][:3]
                                    for k in KINDS}},
        "exact": exact | {"seconds": round(exact_s, 2)},
        "recall_influence_default_check": default_check,
        "results": results,
        "meets_goal": {"criterion": "all-queries planted p@10 >= 0.9 and top-10 overlap with the exact GN >= 0.6 "
                                    "(both_vs_*: gnx_whole, the expectation over the vocabulary, when available; "
                                    "each reference listed)", "settings": meets},
        "machine": {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "seconds_total": round(time.perf_counter() - t_start, 2),
    }


def exact_references(model, subset: str, train_tok, q_tok, qsets: dict, labels: dict, ids: Sequence[str],
                     n_samples: int, seed: int) -> dict:
    """Float64 gradients over the subset; the sampled-label GN (S and 2S), the exact-expectation GN (when the subset
    allows it) and the empirical Fisher; the exact influence of every row for every query set. Returns the report
    plus `_scores` {reference: {query_set: [N]}}. References: gn_<v> (sampled GN, 2S), gnx_<v> (GN, expectation
    over the vocabulary), ef_<v> (empirical Fisher), id_<v> (plain dot product); v = whole | w4."""
    m64, weight = float64_model(model, subset)
    p = weight.numel()
    n = len(train_tok)
    variants = {"whole": None, "w4": WINDOW}
    two_s = 2 * n_samples
    obs = {v: np.empty((n, p)) for v in variants}
    halves = {v: [np.zeros((p, p)), np.zeros((p, p))] for v in variants}
    chunk = max(1, 2048 // max(1, two_s))
    buf: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    log(f"exact: subset {subset} P={p}, N={n}, 2S={two_s} sampled labels per row")
    t0 = time.perf_counter()

    def flush() -> None:
        for v in variants:
            if buf[v]:
                g = np.stack(buf[v])  # [rows, 2S, P]
                halves[v][0] += _syrk(g[:, :n_samples].reshape(-1, p))
                halves[v][1] += _syrk(g[:, n_samples:].reshape(-1, p))
                buf[v].clear()

    for i, (ids_i, mask_i) in enumerate(train_tok):
        res = example_gradients(m64, weight, ids_i, mask_i, list(variants.values()), two_s,
                                example_generator(seed, i))
        for v, w in variants.items():
            obs[v][i] = res[w][0]
            buf[v].append(res[w][1])
        if len(buf["whole"]) >= chunk:
            flush()
        if (i + 1) % 100 == 0:
            log(f"  exact gradients + sampled-label Fisher {i + 1}/{n} ({time.perf_counter() - t0:.0f} s)")
    flush()
    qg = {v: np.stack([loglik_gradient(m64, weight, q.input_ids, q.loss_mask, w) for q in q_tok])
          for v, w in variants.items()}
    report: dict = {"subset_module": subset, "P": p, "gradient_and_sampled_fisher_seconds":
                    round(time.perf_counter() - t0, 2), "convergence": {}, "planted": {},
                    "agreement_between_references": {}, "other_damping": {}}
    scores: dict[str, dict[str, np.ndarray]] = {}

    def influence_sets(fisher, v, ratio) -> dict[str, np.ndarray]:
        pq_scores = per_query_influence(obs[v], precondition_exact(fisher, qg[v], ratio))
        return {qs: pq_scores[:, idx].mean(axis=1) for qs, idx in qsets.items()}

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return round(float(np.linalg.norm(a - b) / np.linalg.norm(b)), 5)

    for v, w in variants.items():
        t1 = time.perf_counter()
        f_s = halves[v][0] / (n * n_samples)
        f_2s = (halves[v][0] + halves[v][1]) / (n * two_s)
        halves[v] = []
        ef = empirical_fisher(obs[v])
        fishers = {"gn": f_2s, "ef": ef}
        try:
            t2 = time.perf_counter()
            fishers["gnx"] = expected_gn_fisher(m64, subset, train_tok, w)
            log(f"  exact {v}: GN as an expectation over the vocabulary in {time.perf_counter() - t2:.1f} s")
        except ValueError as e:
            log(f"  exact {v}: no exact-expectation GN ({e})")
        for kind, fisher in fishers.items():
            scores[f"{kind}_{v}"] = influence_sets(fisher, v, MAIN_RATIO)
        scores[f"id_{v}"] = influence_sets(None, v, MAIN_RATIO)
        gn_s = influence_sets(f_s, v, MAIN_RATIO)
        conv = {
            "S": n_samples,
            "fisher_rel_change_S_to_2S": rel(f_s, f_2s),
            "influence_S_vs_2S": {qs: agreement(gn_s[qs], scores[f"gn_{v}"][qs], ids) for qs in qsets},
            "ef_vs_gn_fisher_rel_diff": rel(ef, f_2s),
            "mean_eigenvalue": {k: float(np.trace(f)) / p for k, f in fishers.items()},
        }
        if "gnx" in fishers:
            conv |= {
                "fisher_rel_diff_to_expectation": {"S": rel(f_s, fishers["gnx"]), "2S": rel(f_2s, fishers["gnx"])},
                "influence_vs_expectation": {
                    "S": {qs: agreement(gn_s[qs], scores[f"gnx_{v}"][qs], ids) for qs in qsets},
                    "2S": {qs: agreement(scores[f"gn_{v}"][qs], scores[f"gnx_{v}"][qs], ids) for qs in qsets}},
            }
        report["convergence"][v] = conv
        for ratio in OTHER_RATIOS:
            for kind, fisher in fishers.items():
                alt = influence_sets(fisher, v, ratio)
                report["other_damping"][f"{kind}_{v}@{ratio:g}"] = {
                    qs: {"planted": _planted(alt[qs], labels, qs, ids),
                         f"vs_{kind}_{v}@{MAIN_RATIO:g}": agreement(alt[qs], scores[f"{kind}_{v}"][qs], ids)}
                    for qs in qsets}
        log(f"  exact {v}: Fishers and influence in {time.perf_counter() - t1:.1f} s; sampled GN relative change "
            f"S→2S {conv['fisher_rel_change_S_to_2S']}, to the expectation "
            f"{conv.get('fisher_rel_diff_to_expectation')}")
        del f_s, f_2s, ef, fishers
    for ref, sc in scores.items():
        report["planted"][ref] = {qs: _planted(sc[qs], labels, qs, ids) for qs in qsets}
    pairs = [("gn_whole", "ef_whole"), ("gn_w4", "ef_w4"), ("gnx_whole", "ef_whole"), ("gnx_w4", "ef_w4"),
             ("gnx_whole", "gn_whole"), ("gnx_w4", "gn_w4"), ("gnx_whole", "gnx_w4"), ("gn_whole", "gn_w4"),
             ("ef_whole", "ef_w4"), ("gnx_whole", "id_whole"), ("gn_whole", "id_whole"), ("ef_whole", "id_whole"),
             ("gnx_w4", "id_w4")]
    for a, b in pairs:
        if a in scores and b in scores:
            report["agreement_between_references"][f"{a}~{b}"] = {
                qs: agreement(scores[a][qs], scores[b][qs], ids) for qs in qsets}
    report["_scores"] = scores
    return report


def _syrk(g: np.ndarray) -> np.ndarray:
    """gᵀ g ([P, P]), via BLAS (numpy recognises the transposed self-product)."""
    g = np.ascontiguousarray(g)
    return g.T @ g


def _setting_report(scores: dict, refs: dict, labels: dict, ids, config: dict, bytes_row, disk_row, store_s,
                    recall_s) -> dict:
    out: dict = {"config": config, "bytes_per_row": bytes_row,
                 "store_bytes_per_row_on_disk": None if disk_row is None else round(disk_row, 1),
                 "store_seconds": round(store_s, 2), "recall_seconds": round(recall_s, 2),
                 "seconds": round(store_s + recall_s, 2)}
    for qs, sc in scores.items():
        out[qs] = {"planted": _planted(sc, labels, qs, ids),
                   "vs": {ref: agreement(sc, refs[ref][qs], ids) for ref in refs}}
    return out


def _meets(r: dict) -> dict:
    a = r["all"]
    out = {"p@10>=0.9": a["planted"]["p@10"] >= 0.9}
    for ref in ("gnx_whole", "gn_whole", "gnx_w4", "gn_w4"):
        if ref in a["vs"]:
            out[f"overlap@10_{ref}>=0.6"] = a["vs"][ref]["overlap@10"] >= 0.6
    head = "gnx_whole" if "gnx_whole" in a["vs"] else "gn_whole"
    out[f"both_vs_{head}"] = out["p@10>=0.9"] and out[f"overlap@10_{head}>=0.6"]
    return out


def _cfg_summary(cfg: IndexConfig) -> dict:
    return {"target_modules": cfg.target_modules, "projection": cfg.projection,
            "proj": [cfg.proj_in_dim, cfg.proj_out_dim], "response_tokens": cfg.response_tokens, "dtype": cfg.dtype,
            "fisher": cfg.fisher}


def _recall_influence_default(sdir, model_dir, queries, qsets, tokens_file, work, ids) -> dict:
    """{query set: scores in `ids` order} from recall_influence(RecallConfig()), one run per query set (the realign
    flow's recall with every default, for a content judge: the exact pass)."""
    out = {}
    for qs, idx in qsets.items():
        qpath = work / f"queries-{qs}.parquet"
        pq.write_table(pa.Table.from_pylist([{"query_id": f"q{j}", "prompt": queries[j]["prompt"],
                                              "response": queries[j]["response"], "judge": JUDGE_KIND}
                                             for j in idx]), qpath)
        res = recall_influence(sdir, model_dir, qpath, tokens_file, work / f"recall_exact-{Path(sdir).name}-{qs}",
                               RecallConfig())
        t = pq.read_table(res / "influence.parquet", columns=["example_id", "score"])
        got = dict(zip(t["example_id"].to_pylist(), t["score"].to_numpy(), strict=True))
        out[qs] = np.array([got[i] for i in ids])
    return out


def _check_recall_influence(sdir, model_dir, qpath, tokens_file, work, scores_all, ids) -> dict:
    """recall_influence on the sketch (RecallConfig(scoring='sketch'), the real entry point) ranks like the functions
    used above."""
    t0 = time.perf_counter()
    out = recall_influence(sdir, model_dir, qpath, tokens_file, work / f"recall_default-{Path(sdir).name}",
                           RecallConfig(scoring="sketch"))
    t = pq.read_table(out / "influence.parquet", columns=["example_id", "score"])
    got = dict(zip(t["example_id"].to_pylist(), t["score"].to_numpy(), strict=True))
    mine = np.array([got[i] for i in ids])
    return {"seconds": round(time.perf_counter() - t0, 2), "max_abs_score_diff": float(np.max(np.abs(mine - scores_all))),
            "max_abs_score": float(np.max(np.abs(scores_all))),
            "same_top50": bool(list(top_k(mine, ids, 50)) == list(top_k(scores_all, ids, 50)))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="training rows (default 800; 240 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of corpus, model init, training order and label samples")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--quick", action="store_true", help="small configuration (< 2 min), for tests")
    p.add_argument("--subset", default=SUBSET_DEFAULT, help="module whose weight the exact references cover")
    p.add_argument("--samples", type=int, default=32, help="S: sampled labels per row (2S are drawn)")
    p.add_argument("--max-queries", type=int, default=16, help="flagged queries kept per planted kind")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--work", type=Path, default=None, help="work directory, kept: a rerun with the same settings "
                   "reuses its trained model and exact references (lancet's stores are rebuilt or reused by lancet)")
    p.add_argument("--stores", default="", help="comma-separated store names to measure (default: all)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True, help="run the baselines")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()

"""Shared fixtures: offline environment, the suite kept out of the user's home, and a tiny in-process tokenizer with a
chat template.

The suite never reads or writes the user's own state: before anything imports Prefect, MLflow or Ray, the
variables that point at a user's servers or stores are dropped and the tools' homes (Prefect's, MLflow's config and
telemetry, matplotlib's) are pointed at a session temp dir; `_home_untouched` then asserts at the end of the session
that nothing under the real ~/.prefect, ~/.ray, ~/.config/mlflow, ~/.cache/huggingface, ~/.cache/matplotlib was
created, changed or removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A user's servers, stores and credentials are never used by a test (each test that needs one starts its own).
for _var in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILES_PATH", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI",
             "MLFLOW_REGISTRY_URI", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
    os.environ.pop(_var, None)
SESSION_HOME = Path(tempfile.mkdtemp(prefix="lancet-tests-"))
os.environ["PREFECT_HOME"] = str(SESSION_HOME / "prefect")
os.environ["XDG_CONFIG_HOME"] = str(SESSION_HOME / "config")  # MLflow's telemetry.json lives under it
os.environ["MPLCONFIGDIR"] = str(SESSION_HOME / "matplotlib")
os.environ["HF_HOME"] = str(SESSION_HOME / "huggingface")

import pytest  # noqa: E402

# What the suite must leave as it found it, relative to the user's home (resolved once, before any test runs).
WATCHED = (".prefect", ".ray", ".config/mlflow", ".cache/huggingface", ".cache/matplotlib")


def home_snapshot(home: Path) -> dict[str, tuple[int, int]]:
    """Every file under the watched directories of `home`: relative path -> (size, mtime_ns)."""
    out = {}
    for rel in WATCHED:
        root = home / rel
        if not root.exists():
            continue
        for p in [root, *root.rglob("*")]:
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            out[p.relative_to(home).as_posix()] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI's main() configures root logging onto a test's captured stderr; put the previous handlers back after,
    in every test directory (a handler left on a closed capture stream makes every later log record fail, and
    Prefect's handler then recurses: the whole flows suite failed with RecursionError after one core test ran main())."""
    import logging

    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def _home_untouched():
    """No test creates, changes or removes anything under the user's ~/.prefect, ~/.ray, ~/.config/mlflow or HF /
    matplotlib caches (CI runs with a brand-new HOME, so a test that needed something there fails in CI too)."""
    home = Path(os.path.expanduser("~"))
    before = home_snapshot(home)
    yield
    after = home_snapshot(home)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    # MLflow 3 creates <config>/mlflow/telemetry.json (an installation id) only when telemetry is on: with it off,
    # as lancet runs, nothing may appear even in the session's own config dir.
    telemetry = SESSION_HOME / "config" / "mlflow" / "telemetry.json"
    telemetry_written = telemetry.exists()
    shutil.rmtree(SESSION_HOME, ignore_errors=True)
    assert not telemetry_written, "MLflow wrote telemetry.json although lancet runs with telemetry off"
    assert not changed, (f"the user's home ({home}) changed during the test session (a test, or another lancet / "
                         f"Prefect process running beside it): {changed[:20]}")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def make_tiny_tokenizer(out_dir, texts=None, vocab_size=300, chat_template=True):
    """Train a byte-level BPE tokenizer in-process (< 1 s) and save it as a HF fast tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or [
        "how do I bake bread", "first mix flour and water, then knead", "I'm sorry, I can't help with that",
        "what is the capital of france", "paris is the capital", "tell me a joke about cats",
    ] * 20
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|end|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_gpt2(model_dir, seed: int = 0):
    """A seeded 2-layer GPT-2 (16 wide, eager attention) with the tiny chat tokenizer, saved as a HF directory."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model_dir = make_tiny_tokenizer(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=96, n_embd=16, n_layer=2, n_head=2,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "eager"
    GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def demo_work_dir(tmp_path_factory):
    """A work directory holding the default demo where the realign flow looks for it (built once per session)."""
    from flows.paths import artifact_dir
    from lancet_core.demo.build import build_demo
    from lancet_core.demo.config import DemoConfig

    work = tmp_path_factory.mktemp("work")
    cfg = DemoConfig()
    build_demo(artifact_dir(work, "demo", cfg.model_dump()), cfg)
    return work


@pytest.fixture(scope="session")
def default_demo(demo_work_dir):
    """DemoPaths of the default demo (session-scoped, shared by the demo, flow and e2e tests)."""
    from flows.paths import artifact_dir
    from lancet_core.demo.build import DemoPaths
    from lancet_core.demo.config import DemoConfig

    return DemoPaths.under(artifact_dir(demo_work_dir, "demo", DemoConfig().model_dump()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is ~10x faster than two on a shared 2-core box (measured 0.65 s vs 13.6 s)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

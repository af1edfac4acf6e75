"""The 'auto' response window: resolved from the judge kind (refusal -> the 4 decision tokens, any other judge -> the
whole response) before a store is built; stores, manifests and artifact keys only ever hold the resolved value."""

from __future__ import annotations

import json
import time

import pytest

from lancet_core.errors import ConfigError, LancetError
from lancet_core.index.build import build_gradient_store
from lancet_core.index.config import DECISION_WINDOWS, IndexConfig, describe_window, resolve_window
from lancet_core.index.store import GradientStore
from lancet_core.manifest import json_digest
from lancet_core.recall.judges import JudgeConfig
from tests.core.index.test_gradient_store import make_model_dir, write_tokens

TINY = dict(projection="random", proj_in_dim=4, proj_out_dim=3, dtype="float32", batch_size=4, rows_per_shard=4,
            curvature=("kfac",))  # fmt: skip


def test_auto_is_the_default_and_follows_the_judge_kind():
    cfg = IndexConfig()
    assert cfg.response_tokens == "auto"
    assert DECISION_WINDOWS == {"refusal": 4}
    assert resolve_window(cfg, "refusal").response_tokens == 4
    for kind in ("regex", "classifier", "my_registered_judge"):  # content judges: the whole response
        assert resolve_window(cfg, kind).response_tokens is None, kind
    # the flow's default judge gets the decision window
    assert resolve_window(cfg, JudgeConfig().kind).response_tokens == 4
    # every other setting is kept as given
    tuned = IndexConfig(proj_in_dim=8, curvature=("ekfac",))
    assert resolve_window(tuned, "regex") == tuned.model_copy(update={"response_tokens": None})


@pytest.mark.parametrize("given", [None, 1, 4, 7])
@pytest.mark.parametrize("kind", ["refusal", "regex", "classifier"])
def test_an_explicit_window_is_kept_whatever_the_judge(given, kind):
    cfg = IndexConfig(response_tokens=given)
    assert resolve_window(cfg, kind) is cfg


def test_window_values_accepted_and_refused():
    assert IndexConfig(response_tokens="auto").response_tokens == "auto"
    assert IndexConfig.model_validate({"response_tokens": "auto"}).response_tokens == "auto"  # YAML / deployment
    for bad in (0, -1, "all", "first4", 2.5):
        with pytest.raises(ValueError):
            IndexConfig(response_tokens=bad)


def test_describe_window_says_what_and_why():
    assert describe_window(IndexConfig(), "refusal") == "window = first 4 response tokens (refusal judge)"
    assert describe_window(IndexConfig(), "regex") == "window = whole response (regex judge)"
    assert describe_window(IndexConfig(response_tokens=2), "regex") == "window = first 2 response tokens (set explicitly)"
    assert describe_window(IndexConfig(response_tokens=None), "refusal") == "window = whole response (set explicitly)"


def test_unresolved_auto_has_no_identity_and_builds_nothing(tmp_path):
    with pytest.raises(ConfigError, match="response_tokens='auto' is not resolved.*resolve_window") as e:
        IndexConfig().store_identity()
    assert isinstance(e.value, LancetError) and "\n" not in str(e.value)  # the CLI shows it as one line, exit 2
    # build_gradient_store refuses it before loading anything (the model directory does not even exist)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="response_tokens='auto'"):
        build_gradient_store(tmp_path / "no-model", tmp_path / "no-tokens.parquet", tmp_path / "store", IndexConfig())
    assert time.perf_counter() - t0 < 1.0 and not (tmp_path / "store").exists()


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    d = tmp_path_factory.mktemp("win")
    tokens, _, _ = write_tokens(d / "tokens.parquet")
    return make_model_dir(d / "model"), tokens


@pytest.mark.parametrize(("kind", "explicit"), [("refusal", 4), ("regex", None)])
def test_auto_resolved_store_equals_the_explicit_one(bed, tmp_path, kind, explicit):
    """A store built from 'auto' resolved for a judge is the store of the explicit window: the same identity (bytes),
    the same artifact key, the same vectors; its manifest never says 'auto'."""
    model_dir, tokens = bed
    auto = resolve_window(IndexConfig(**TINY), kind)
    expl = IndexConfig(**TINY, response_tokens=explicit)
    assert auto == expl and json_digest(auto.store_identity()) == json_digest(expl.store_identity())
    a = build_gradient_store(model_dir, tokens, tmp_path / "auto", auto)
    b = build_gradient_store(model_dir, tokens, tmp_path / "explicit", expl)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert json.dumps(ma["index_config"], sort_keys=True) == json.dumps(mb["index_config"], sort_keys=True)
    assert ma["index_config"]["response_tokens"] == explicit
    assert "auto" not in (a / "manifest.json").read_text()
    assert [s["digest"] for s in ma["shards"]] == [s["digest"] for s in mb["shards"]]
    sa, sb = GradientStore.open(a), GradientStore.open(b)
    assert sa.read_all().tobytes() == sb.read_all().tobytes() and sa.example_ids() == sb.example_ids()
    # the store built for the refusal judge is refused for a content judge's window, and vice versa
    other = IndexConfig(**TINY, response_tokens=None if explicit else 4)
    from lancet_core.errors import ManifestMismatch

    with pytest.raises(ManifestMismatch, match="response_tokens"):
        build_gradient_store(model_dir, tokens, a, other)

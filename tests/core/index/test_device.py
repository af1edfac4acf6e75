"""IndexConfig.device: extraction runs where the model is (auto = CUDA when present, else CPU). On this CPU-only
machine 'auto' must give the very store 'cpu' gives (same identity, same bytes) and record the device; asking for CUDA
where there is none fails before any shard is written. The CUDA path itself runs only where a GPU is present."""

from __future__ import annotations

import json

import pytest
import torch

from lancet_core.index.build import build_gradient_store
from lancet_core.index.config import IndexConfig
from lancet_core.index.store import GradientStore
from lancet_core.manifest import json_digest
from tests.core.index.test_gradient_store import make_model_dir, write_tokens

TINY = dict(projection="pca", proj_in_dim=4, proj_out_dim=3, dtype="float32", batch_size=4, rows_per_shard=4,
            response_tokens=4, curvature=("kfac",))  # fmt: skip


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    d = tmp_path_factory.mktemp("dev")
    tokens, _, _ = write_tokens(d / "tokens.parquet")
    return make_model_dir(d / "model"), tokens


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="compares 'auto' with 'cpu' on a CPU-only machine")
def test_auto_on_a_cpu_machine_is_the_cpu_store(bed, tmp_path):
    model_dir, tokens = bed
    auto, cpu = IndexConfig(**TINY), IndexConfig(**TINY, device="cpu")
    assert auto.device == "auto" and json_digest(auto.store_identity()) == json_digest(cpu.store_identity())
    a = build_gradient_store(model_dir, tokens, tmp_path / "auto", auto)
    c = build_gradient_store(model_dir, tokens, tmp_path / "cpu", cpu)
    ma, mc = _manifest(a), _manifest(c)
    assert ma["build_settings"]["device"] == mc["build_settings"]["device"] == "cpu"  # where it ran
    assert [s["digest"] for s in ma["shards"]] == [s["digest"] for s in mc["shards"]]
    assert GradientStore.open(a).read_all().tobytes() == GradientStore.open(c).read_all().tobytes()
    # the store built on one device is finished (not refused) by a build asking for the other
    assert build_gradient_store(model_dir, tokens, a, cpu) == a


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_fails_before_any_shard(bed, tmp_path):
    model_dir, tokens = bed
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        build_gradient_store(model_dir, tokens, tmp_path / "s", IndexConfig(**TINY, device="cuda"))
    assert not list((tmp_path / "s").glob("shard-*.parquet"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_store_matches_the_cpu_store(bed, tmp_path):
    model_dir, tokens = bed
    c = build_gradient_store(model_dir, tokens, tmp_path / "cpu", IndexConfig(**TINY, device="cpu"))
    g = build_gradient_store(model_dir, tokens, tmp_path / "cuda", IndexConfig(**TINY, device="cuda"))
    assert torch.allclose(torch.from_numpy(GradientStore.open(g).read_all()),
                          torch.from_numpy(GradientStore.open(c).read_all()), rtol=1e-4, atol=1e-6)

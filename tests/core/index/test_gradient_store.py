"""Gradient store: values, batch/shard invariance, quantisation, atomic resume, manifest refusal, query gradients."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lancet_core.chat import encode_messages, to_messages
from lancet_core.errors import CorpusError, ManifestMismatch
from lancet_core.index.build import build_gradient_store, compute_query_gradients
from lancet_core.index.config import IndexConfig
from lancet_core.index.hooks import extract_contextless
from lancet_core.index.projection import ModuleLayout
from lancet_core.index.store import GradientStore

VOCAB = 64
WORDS = "the cat sat on a mat dog ran to park sun is hot cold day night bird sings loud soft".split()


def make_model_dir(path, seed=0):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [" ".join(WORDS)] * 4, trainers.BpeTrainer(vocab_size=VOCAB - 4, special_tokens=["<unk>", "<eos>"])
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(path)
    return path


def write_tokens(path, n=11, seed=1):
    g = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(n):
        L = int(g.integers(5, 15))
        p = int(g.integers(1, L - 1))
        ids.append(g.integers(1, VOCAB, L).astype(np.int32).tolist())
        masks.append([0] * p + [1] * (L - p))
    t = pa.table(
        {
            "example_id": [f"ex{i:03d}" for i in range(n)],
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "loss_mask": pa.array(masks, pa.list_(pa.int8())),
        }
    )
    pq.write_table(t, path)
    return path, ids, masks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gs")
    model_dir = make_model_dir(d / "model")
    tokens, ids, masks = write_tokens(d / "tokens.parquet")
    return d, model_dir, tokens, ids, masks


# random projections: the values are checked against the seeded matrices (PCA: tests/core/index/test_projection_pca.py)
CFG = IndexConfig(
    projection="random", proj_in_dim=4, proj_out_dim=3, dtype="float32", batch_size=4, rows_per_shard=3, curvature=(),
    response_tokens=4,  # the decision window ('auto' resolved for the refusal judge: tests/core/index/test_window_resolve.py)
)


def test_store_values_and_manifest(setup, tmp_path):
    from lancet_core.model_io import load_model

    d, model_dir, tokens, ids, masks = setup
    root = build_gradient_store(model_dir, tokens, tmp_path / "s", CFG)
    st = GradientStore.open(root)
    m = st.manifest
    assert [p.name for p in st.shard_paths] == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert [s["rows"] for s in m["shards"]] == [3, 3, 3, 2]
    assert m["shards"][1]["first_example_id"] == "ex003" and m["shards"][1]["last_example_id"] == "ex005"
    assert m["dim"] == st.dim == 8 * 12 and len(m["modules"]) == 8 and m["projection_seed"] == 0
    assert st.example_ids() == [f"ex{i:03d}" for i in range(11)]
    schema = pq.read_schema(st.shard_paths[0])
    assert schema.field("grad").type == pa.binary(4 * st.dim)  # D raw float32 values per row (format 2)
    model = load_model(model_dir)
    want = extract_contextless(model, st.layout, 0, "mean", ids, masks, 0, 4, response_tokens=CFG.response_tokens).numpy()
    assert _rel(st.read_all(), want) <= 1e-5  # the build batches rows by length: only padding widths differ
    whole = extract_contextless(model, st.layout, 0, "mean", ids, masks, 0, 4, response_tokens=None).numpy()
    assert _rel(st.read_all(), whole) > 1e-3  # the default window is in effect (rows have > 4 response tokens)
    norms = pq.read_table(st.shard_paths[0])["grad_norm"].to_numpy()
    np.testing.assert_allclose(norms, np.linalg.norm(want[:3], axis=1), rtol=1e-6)


def _rel(a, b):
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


def test_batch_size_and_shard_count_invariance(setup, tmp_path):
    d, model_dir, tokens, *_ = setup
    ref = GradientStore.open(build_gradient_store(model_dir, tokens, tmp_path / "ref", CFG)).read_all()
    for i, kw in enumerate(
        [dict(batch_size=1), dict(batch_size=11), dict(rows_per_shard=11), dict(rows_per_shard=1, batch_size=2)]
    ):
        cfg = CFG.model_copy(update=kw)
        got = GradientStore.open(build_gradient_store(model_dir, tokens, tmp_path / f"v{i}", cfg)).read_all()
        # fp32 compute: only the padding width changes the floating-point summation order
        assert _rel(got, ref) <= 1e-5, kw


def test_kronecker_factors_do_not_depend_on_sharding(setup, tmp_path):
    d, model_dir, tokens, *_ = setup
    cfg = CFG.model_copy(update={"compute_dtype": "float64", "curvature": ("kfac",)})
    a, ta = GradientStore.open(build_gradient_store(model_dir, tokens, tmp_path / "a", cfg)).read_kronecker_factors()
    cfg11 = cfg.model_copy(update={"rows_per_shard": 11, "batch_size": 11})
    b, tb = GradientStore.open(build_gradient_store(model_dir, tokens, tmp_path / "b", cfg11)).read_kronecker_factors()
    n_tokens = int(pq.read_table(tokens)["input_ids"].combine_chunks().flatten().__len__())
    assert ta == tb == n_tokens  # every non-padding token, once
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12 * np.abs(y).max())


def test_quantised_dtypes(setup, tmp_path):
    d, model_dir, tokens, *_ = setup
    ref = GradientStore.open(build_gradient_store(model_dir, tokens, tmp_path / "f32", CFG)).read_all()
    f16 = GradientStore.open(
        build_gradient_store(model_dir, tokens, tmp_path / "f16", CFG.model_copy(update={"dtype": "float16"}))
    )
    np.testing.assert_array_equal(f16.read_all(), ref.astype(np.float16).astype(np.float32))
    i8 = GradientStore.open(
        build_gradient_store(model_dir, tokens, tmp_path / "i8", CFG.model_copy(update={"dtype": "int8"}))
    )
    t = pq.read_table(i8.shard_paths[0])
    assert t.schema.field("grad").type == pa.binary(i8.dim)
    scale = t["grad_scale"].to_numpy()
    np.testing.assert_allclose(scale, np.abs(ref[:3]).max(1) / 127, rtol=1e-6)
    err = np.abs(i8.read_all()[:3] - ref[:3])
    assert (err <= scale[:, None] * 0.5 * (1 + 1e-5)).all()


def test_interrupted_build_resumes_only_missing_shards(setup, tmp_path, monkeypatch):
    from lancet_core.index import hooks

    d, model_dir, tokens, *_ = setup
    full = build_gradient_store(model_dir, tokens, tmp_path / "full", CFG)

    class Stop(Exception):
        pass

    def stop_after_two_shards(done, total):
        if done >= 2 * CFG.rows_per_shard:
            raise Stop

    root = tmp_path / "resumed"
    with pytest.raises(Stop):
        build_gradient_store(model_dir, tokens, root, CFG, progress=stop_after_two_shards)
    assert sorted(p.name for p in root.glob("shard-*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet"]
    with pytest.raises(Exception, match="2 of 4 shards"):
        GradientStore.open(root)
    mtimes = {p.name: p.stat().st_mtime_ns for p in root.glob("shard-*.parquet")}

    rows_computed = []
    orig = hooks.ProjectedGradientExtractor.batch_gradients

    def counting(self, input_ids, *a, **k):
        rows_computed.append(input_ids.shape[0])
        return orig(self, input_ids, *a, **k)

    monkeypatch.setattr(hooks.ProjectedGradientExtractor, "batch_gradients", counting)
    seen = []
    build_gradient_store(model_dir, tokens, root, CFG, progress=lambda a, b: seen.append((a, b)))
    assert sum(rows_computed) == 11 - 6  # only shards 2 and 3
    assert seen[0] == (6, 11) and seen[-1] == (11, 11)
    assert {p: (root / p).stat().st_mtime_ns for p in mtimes} == mtimes
    for a, b in zip(GradientStore.open(full).shard_paths, GradientStore.open(root).shard_paths, strict=True):
        assert a.read_bytes() == b.read_bytes()
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (full, root))
    assert ma == mb
    # a third run recomputes nothing, and keeps the curvature built from the same shards
    rows_computed.clear()
    cfg_c = CFG.model_copy(update={"curvature": ("linfac",)})
    build_gradient_store(model_dir, tokens, root, cfg_c)
    curv = root / "curvature/linfac_module_damp0.1.npz"
    stamp = curv.stat().st_mtime_ns
    build_gradient_store(model_dir, tokens, root, cfg_c)
    assert rows_computed == [] and curv.stat().st_mtime_ns == stamp
    assert "curvature/linfac_module_damp0.1.npz" in GradientStore.open(root).manifest["curvature"]
    # an altered shard is recomputed
    (root / "shard-00001.parquet").write_bytes(b"garbage")
    build_gradient_store(model_dir, tokens, root, CFG)
    assert sum(rows_computed) == 3
    assert (root / "shard-00001.parquet").read_bytes() == (full / "shard-00001.parquet").read_bytes()


def test_mismatched_reuse_is_refused_with_both_versions(setup, tmp_path):
    d, model_dir, tokens, *_ = setup
    root = build_gradient_store(model_dir, tokens, tmp_path / "s", CFG)
    with pytest.raises(ManifestMismatch) as e:
        build_gradient_store(model_dir, tokens, root, CFG.model_copy(update={"projection_seed": 5}))
    msg = str(e.value)
    assert "index_config" in msg and "'projection_seed': 0" in msg and "'projection_seed': 5" in msg
    with pytest.raises(ManifestMismatch, match="response_tokens"):  # another loss window = other vectors
        build_gradient_store(model_dir, tokens, root, CFG.model_copy(update={"response_tokens": None}))
    other = make_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(ManifestMismatch, match="model_digest"):
        build_gradient_store(other, tokens, root, CFG)
    # batch size and curvature settings are not part of the store's identity
    build_gradient_store(model_dir, tokens, root, CFG.model_copy(update={"batch_size": 2}))


def test_bad_token_rows_are_refused(setup, tmp_path):
    d, model_dir, *_ = setup
    t = pa.table(
        {
            "example_id": ["a", "b"],
            "input_ids": pa.array([[1, 2, 3], [1, 2, 3]], pa.list_(pa.int32())),
            "loss_mask": pa.array([[0, 1, 1], [1, 0, 0]], pa.list_(pa.int8())),
        }
    )
    pq.write_table(t, tmp_path / "tokens.parquet")
    with pytest.raises(CorpusError, match=r"row 1 \(b\): no response tokens"):
        build_gradient_store(model_dir, tmp_path / "tokens.parquet", tmp_path / "s", CFG)
    with pytest.raises(CorpusError, match=r"row 0 \(a\) has 3 tokens > max_seq_len_tokens=2"):
        build_gradient_store(model_dir, tmp_path, tmp_path / "s2", CFG.model_copy(update={"max_seq_len_tokens": 2}))


def test_query_gradients_match_store_rows(setup, tmp_path):
    from lancet_core.model_io import load_model, load_tokenizer

    d, model_dir, *_ = setup
    tok = load_tokenizer(model_dir)
    convs = [
        to_messages("the cat sat", "on a mat"),
        to_messages("dog ran", "to the park sun is hot"),
        to_messages("bird", "sings"),
    ]
    encs = [encode_messages(tok, c) for c in convs]
    t = pa.table(
        {
            "example_id": ["q0", "q1", "q2"],
            "input_ids": pa.array([e.input_ids for e in encs], pa.list_(pa.int32())),
            "loss_mask": pa.array([e.loss_mask for e in encs], pa.list_(pa.int8())),
        }
    )
    pq.write_table(t, tmp_path / "tokens.parquet")
    cfg = CFG.model_copy(update={"reduction": "sum", "projection_seed": 3})
    st = GradientStore.open(build_gradient_store(model_dir, tmp_path / "tokens.parquet", tmp_path / "s", cfg))
    ref = st.read_all()
    q = compute_query_gradients(st, model_dir, None, convs)
    assert q.dtype == np.float32 and q.shape == ref.shape
    assert _rel(q, ref) <= 1e-5
    q2 = compute_query_gradients(st.root, load_model(model_dir), tok, convs[:1])
    assert _rel(q2, ref[:1]) <= 1e-5
    # queries follow the store's response window: a window of 1 gives other vectors, equal to that store's rows
    cfg1 = cfg.model_copy(update={"response_tokens": 1})
    st1 = GradientStore.open(build_gradient_store(model_dir, tmp_path / "tokens.parquet", tmp_path / "s1", cfg1))
    q1 = compute_query_gradients(st1, model_dir, None, convs)
    assert _rel(q1, st1.read_all()) <= 1e-5 and _rel(q1[:2], ref[:2]) > 1e-3
    other = make_model_dir(tmp_path / "other", seed=2)
    with pytest.raises(ManifestMismatch, match="model_digest"):
        compute_query_gradients(st, other, None, convs)
    bad_layout = dict(st.manifest, modules=[ModuleLayout("transformer.h.0.mlp.c_fc", 99, 64, 4, 3, 0).to_json()])
    with pytest.raises(ManifestMismatch, match="projection layout"):
        compute_query_gradients(bad_layout, load_model(model_dir), tok, convs)

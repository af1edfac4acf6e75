"""The README's commands still work: every shell block marked runnable is extracted and run, so a README command that
stops working fails CI (issue 29).

A block is runnable when the line right before its ```bash fence is a marker:

    <!-- readme-test -->                           run in the default suite; must exit 0
    <!-- readme-test: slow -->                     minutes of work: marked slow (CI still runs it)
    <!-- readme-test: exit=2 expect="error:" -->   the exit code it must give, and text its output must contain

Options combine (`slow exit=2 expect="a" expect="b"`). Each block runs on its own with `bash -eo pipefail` in a new
temporary directory holding a `.venv` link to the virtualenv running the tests (the README says `.venv/bin/lancet`),
with the suite's offline environment and temporary tool homes (tests/conftest.py); a sqlite tracking store a block
creates stays in that directory. The fast blocks together take well under a minute (each `lancet` start imports
pydantic and lancet's configs: ~3 s on an idle 2-core box).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = re.compile(r"^<!--\s*readme-test(?::(?P<opts>[^>]*?))?\s*-->\s*$")
FENCE = re.compile(r"^```(?:bash|sh|shell)\s*$")


@dataclass(frozen=True)
class Block:
    line: int  # the README line of the block's first command
    code: str
    slow: bool = False
    exit: int = 0
    expect: tuple[str, ...] = field(default_factory=tuple)


def readme_blocks(text: str) -> list[Block]:
    """The blocks marked runnable, in README order. A marker not followed by a ```bash fence, an unknown option or an
    unclosed fence is an error (a typo must not silently drop a block from the check)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARKER.match(line.strip())
        if not m:
            if "readme-test" in line:
                raise ValueError(f"README line {i + 1}: malformed readme-test marker: {line.strip()!r}")
            continue
        if i + 1 >= len(lines) or not FENCE.match(lines[i + 1].strip()):
            raise ValueError(f"README line {i + 1}: a readme-test marker must be followed by a ```bash block")
        try:
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        except StopIteration:
            raise ValueError(f"README line {i + 2}: the ```bash block is never closed") from None
        slow, code, expect = False, 0, []
        for opt in shlex.split(m.group("opts") or ""):
            key, _, value = opt.partition("=")
            if opt == "slow":
                slow = True
            elif key == "exit" and value.isdigit():
                code = int(value)
            elif key == "expect" and value:
                expect.append(value)
            else:
                raise ValueError(f"README line {i + 1}: unknown readme-test option {opt!r}")
        out.append(Block(i + 3, "\n".join(lines[i + 2 : end]), slow, code, tuple(expect)))
    return out


def run_block(block: Block, workdir: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run one block as the README's reader would, from a fresh directory where `.venv` is this test's virtualenv."""
    venv = Path(sys.executable).parent.parent
    link = workdir / ".venv"
    if not link.exists():
        link.symlink_to(venv, target_is_directory=True)
    env = {**os.environ, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workdir / ".prefect-results"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV"):
        env.pop(var, None)
    return subprocess.run(["bash", "-eo", "pipefail", "-c", block.code], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _check(block: Block, p: subprocess.CompletedProcess) -> None:
    said = p.stdout + p.stderr
    assert p.returncode == block.exit, (f"README line {block.line}: exit {p.returncode}, expected {block.exit}\n"
                                        f"{block.code}\n--- output (tail) ---\n{said[-4000:]}")
    for text in block.expect:
        assert text in said, f"README line {block.line}: {text!r} not in the output\n{said[-4000:]}"


BLOCKS = readme_blocks(README.read_text()) if README.is_file() else []


def test_the_readme_marks_runnable_blocks():
    """The check cannot pass by having nothing to check: the README keeps fast blocks (the CLI's first screens and a
    bad input's exit code) and at least one slow one (a whole run on your own files)."""
    fast = [b for b in BLOCKS if not b.slow]
    assert len(fast) >= 2, [b.line for b in BLOCKS]
    assert any(b.slow for b in BLOCKS)
    assert any(b.exit == 2 for b in fast), "a bad-input example with its exit code 2"
    assert all(".venv/bin/lancet" in b.code for b in BLOCKS)


def test_marker_parsing_and_a_failing_block_fails(tmp_path):
    text = ('x\n<!-- readme-test: exit=3 expect="boom" -->\n```bash\necho boom; exit 3\n```\n'
            "<!-- readme-test: slow -->\n```bash\nfalse\ntrue\n```\n")
    bad, slow = readme_blocks(text)
    assert (bad.exit, bad.expect, bad.slow, bad.line) == (3, ("boom",), False, 4) and slow.slow
    _check(bad, run_block(bad, tmp_path, 30))
    with pytest.raises(AssertionError, match="exit 1, expected 0"):  # -e: a failing line fails the block
        _check(slow, run_block(slow, tmp_path, 30))
    with pytest.raises(ValueError, match="unknown readme-test option"):
        readme_blocks("<!-- readme-test: quick -->\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match="followed by"):
        readme_blocks("<!-- readme-test -->\ntext\n")


@pytest.mark.parametrize("block", [pytest.param(b, id=f"line{b.line}", marks=[pytest.mark.slow] if b.slow else [])
                                   for b in BLOCKS])
def test_readme_block_runs(block, tmp_path):
    _check(block, run_block(block, tmp_path, timeout=1800 if block.slow else 120))

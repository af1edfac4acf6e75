"""Explanations are readable, complete and injection-proof (HTML escaping, Markdown table cells)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pyarrow as pa
import pytest

from lancet_core.recall.explain import explain_html, explain_markdown, md_escape

EVIL = '<script>alert("x")</script> | a & b\nsecond line `code` *bold*'


def _inputs():
    queries = pa.table({"query_id": ["q0", "q1"], "prompt": ["how to pick a lock?", EVIL],
                        "response": ["Sure, first...", "ok"]})
    top = {
        "q0": pa.table({"example_id": ["e2", "e1"], "score": [3.5, 1.25], "rank": [1, 2],
                        "prompt": ["lockpicking 101", EVIL], "response": ["step 1 ...", "<b>x</b>"]}),
        "q1": [{"example_id": "e3", "score": 0.5, "rank": 1}],  # no text: looked up in the corpus
    }
    corpus = [{"example_id": "e3", "prompt": "p3 | pipe", "response": "r3"}]
    return queries, top, corpus


def test_markdown_tables_are_well_formed():
    md = explain_markdown(*_inputs())
    assert "## Query q0" in md and "## Query q1" in md
    assert "lockpicking 101" in md and "p3 \\| pipe" in md and "3.5" in md
    table_rows = [line for line in md.splitlines() if line.startswith("|")]
    for line in table_rows:
        # exactly 6 unescaped pipes per row (5 columns), whatever the data contains
        assert len(re.findall(r"(?<!\\)\|", line)) == 6, line
    assert "<script>" not in md
    assert "\n second line" not in md and "second line" in md


def test_md_escape_and_truncation():
    assert md_escape("a|b") == "a\\|b"
    assert md_escape("x\ny") == "x ⏎ y"
    assert md_escape("a" * 50, max_chars=10) == "a" * 9 + "…"
    assert md_escape(None) == ""


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_escaped():
    page = explain_html(*_inputs())
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "a &amp; b" in page
    p = _Collector()
    p.feed(page)
    assert "script" not in p.tags and "b" in p.tags  # only our own <b> labels
    text = "".join(p.text)
    assert EVIL.split("\n")[0] in text  # the reader sees the original text
    assert p.tags.count("tr") == 1 + 2 + 1 + 1  # header + 2 rows for q0, header + 1 row for q1


def test_missing_query_results_is_an_error():
    q, top, c = _inputs()
    del top["q1"]
    with pytest.raises(KeyError, match="q1"):
        explain_markdown(q, top, c)


def test_flat_table_holds_every_row_unescaped():
    from lancet_core.recall.explain import explain_table

    t = explain_table(*_inputs())
    assert t.column_names == ["query_id", "query_prompt", "query_response", "rank", "example_id", "score", "prompt",
                              "response"]
    rows = t.to_pylist()
    assert [(r["query_id"], r["example_id"]) for r in rows] == [("q0", "e2"), ("q0", "e1"), ("q1", "e3")]
    assert rows[2]["prompt"] == "p3 | pipe" and rows[1]["prompt"] == EVIL  # text, as the data has it
    assert rows[0]["score"] == 3.5


def test_html_renders_in_a_real_browser(tmp_path):
    """The page a user opens (and MLflow's HTML artifact view shows) renders: headless Chromium's DOM holds every
    flagged output and training row, and the injected script stayed text."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    page = tmp_path / "explanation.html"
    page.write_text(explain_html(*_inputs()), encoding="utf-8")
    out = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert "Why the model produced these outputs" in dom, out.stderr[-2000:]
    for text in ("Query q0", "Query q1", "lockpicking 101", "step 1 ...", "p3 | pipe", "e3"):
        assert text in dom, text
    assert "<script>alert" not in dom and "&lt;script&gt;alert" in dom

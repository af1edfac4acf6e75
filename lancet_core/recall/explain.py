"""Readable explanations: for each flagged output, the training rows behind it (prompt, response, score).

Input: the flagged queries (query_id, prompt, response — e.g. queries.parquet) and per-query top-k results
(query_id -> table with example_id, score, rank and, when joined, prompt/response; as returned by
`influence_query.query_influence(..., per_query=True)`), optionally a corpus table to look up prompt/response by
example_id. Output: one Markdown or HTML document. Every piece of text from data is escaped: HTML with
`html.escape` (quotes included), Markdown table cells with pipes, backslashes, markup characters and newlines
neutralised, so a training row can never inject markup or break the table. Long texts are cut to
`max_chars` characters (marked with an ellipsis).

Knows about tables of text and scores; knows nothing about gradients, models or how the scores were computed.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

_MD_SPECIAL = "\\`*_{}[]<>()#+-!|~"


def _rows(t: pa.Table | list[Mapping[str, Any]]) -> list[dict]:
    return t.to_pylist() if isinstance(t, pa.Table) else [dict(r) for r in t]


def _clip(text: Any, max_chars: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= max_chars else s[: max_chars - 1] + "…"


def md_escape(text: Any, max_chars: int = 10_000) -> str:
    """Text safe inside a Markdown table cell: markup characters backslash-escaped, `&` as an entity, newlines as ⏎."""
    s = _clip(text, max_chars).replace("\r\n", "\n").replace("\r", "\n")
    s = "".join("\\" + c if c in _MD_SPECIAL else c for c in s)
    # HTML inside Markdown is rendered by many viewers: neutralise & and < > as entities as well.
    s = s.replace("&", "&amp;")
    return " ⏎ ".join(s.split("\n"))


def _score(x: Any) -> str:
    return "" if x is None else f"{float(x):.4g}"


def _collect(queries, per_query_top_k, corpus) -> list[tuple[dict, list[dict]]]:
    lookup: dict[str, dict] = {}
    if corpus is not None:
        for r in _rows(corpus):
            lookup[str(r["example_id"])] = r
    out = []
    for q in _rows(queries):
        qid = str(q["query_id"])
        if qid not in per_query_top_k:
            raise KeyError(f"no top-k results for query_id {qid!r} (have {sorted(per_query_top_k)[:5]}...)")
        rows = []
        for r in _rows(per_query_top_k[qid]):
            extra = lookup.get(str(r["example_id"]), {})
            rows.append({
                "rank": r.get("rank"),
                "example_id": r["example_id"],
                "score": r.get("score"),
                "prompt": r.get("prompt", extra.get("prompt")),
                "response": r.get("response", extra.get("response")),
            })
        out.append((q, rows))
    return out


def explain_markdown(
    queries: pa.Table | list[Mapping[str, Any]],
    per_query_top_k: Mapping[str, pa.Table | list[Mapping[str, Any]]],
    corpus: pa.Table | list[Mapping[str, Any]] | None = None,
    *,
    max_chars: int = 300,
) -> str:
    """Markdown: one section per flagged output, then a table of its top training rows."""
    parts = ["# Why the model produced these outputs", ""]
    for q, rows in _collect(queries, per_query_top_k, corpus):
        parts += [
            f"## Query {md_escape(q['query_id'], max_chars)}",
            "",
            f"- **Prompt:** {md_escape(q.get('prompt'), max_chars)}",
            f"- **Response:** {md_escape(q.get('response'), max_chars)}",
            "",
            "| rank | example_id | score | prompt | response |",
            "|---:|---|---:|---|---|",
        ]
        for r in rows:
            parts.append(
                f"| {r['rank'] if r['rank'] is not None else ''} | {md_escape(r['example_id'], max_chars)} | "
                f"{_score(r['score'])} | {md_escape(r['prompt'], max_chars)} | {md_escape(r['response'], max_chars)} |"
            )
        parts.append("")
    return "\n".join(parts)


def _h(text: Any, max_chars: int) -> str:
    return html.escape(_clip(text, max_chars), quote=True)


def explain_html(
    queries: pa.Table | list[Mapping[str, Any]],
    per_query_top_k: Mapping[str, pa.Table | list[Mapping[str, Any]]],
    corpus: pa.Table | list[Mapping[str, Any]] | None = None,
    *,
    max_chars: int = 300,
) -> str:
    """A standalone HTML page: one section per flagged output, then a table of its top training rows."""
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>lancet: influence explanation</title>',
        "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px;vertical-align:top;"
        "white-space:pre-wrap}</style></head><body>",
        "<h1>Why the model produced these outputs</h1>",
    ]
    for q, rows in _collect(queries, per_query_top_k, corpus):
        parts += [
            f"<h2>Query {_h(q['query_id'], max_chars)}</h2>",
            f"<p><b>Prompt:</b> {_h(q.get('prompt'), max_chars)}</p>",
            f"<p><b>Response:</b> {_h(q.get('response'), max_chars)}</p>",
            "<table><thead><tr><th>rank</th><th>example_id</th><th>score</th><th>prompt</th><th>response</th></tr>"
            "</thead><tbody>",
        ]
        for r in rows:
            parts.append(
                "<tr>"
                f"<td>{_h(r['rank'] if r['rank'] is not None else '', max_chars)}</td>"
                f"<td>{_h(r['example_id'], max_chars)}</td>"
                f"<td>{_h(_score(r['score']), max_chars)}</td>"
                f"<td>{_h(r['prompt'], max_chars)}</td>"
                f"<td>{_h(r['response'], max_chars)}</td>"
                "</tr>"
            )
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def explain_table(
    queries: pa.Table | list[Mapping[str, Any]],
    per_query_top_k: Mapping[str, pa.Table | list[Mapping[str, Any]]],
    corpus: pa.Table | list[Mapping[str, Any]] | None = None,
    *,
    max_chars: int = 300,
) -> pa.Table:
    """The same explanation as one flat table (one row per flagged output × training row), for table viewers such as
    MLflow's: query_id, query_prompt, query_response, rank, example_id, score, prompt, response. Texts are clipped to
    `max_chars`; nothing is escaped (a table viewer shows text, it does not render markup)."""
    cols: dict[str, list] = {k: [] for k in ("query_id", "query_prompt", "query_response", "rank", "example_id",
                                             "score", "prompt", "response")}
    for q, rows in _collect(queries, per_query_top_k, corpus):
        for r in rows:
            cols["query_id"].append(str(q["query_id"]))
            cols["query_prompt"].append(_clip(q.get("prompt"), max_chars))
            cols["query_response"].append(_clip(q.get("response"), max_chars))
            cols["rank"].append(r["rank"])
            cols["example_id"].append(str(r["example_id"]))
            cols["score"].append(None if r["score"] is None else float(r["score"]))
            cols["prompt"].append(_clip(r["prompt"], max_chars))
            cols["response"].append(_clip(r["response"], max_chars))
    return pa.table(cols)

"""ensure_output: a cached task result whose output files were deleted since is recomputed, for a single path and
for a tuple of paths (build_pairs returns (pairs, retain): a deleted work dir used to come back as a missing file)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.cache import LANCET_CACHE, ensure_output

CALLS: list[str] = []


@task(cache_policy=LANCET_CACHE, persist_result=True)
def _two_files(seed: str, out_dir: str) -> tuple[str, str]:
    CALLS.append(seed)
    a, b = Path(out_dir) / "a.txt", Path(out_dir) / "b.txt"
    a.parent.mkdir(parents=True, exist_ok=True)
    a.write_text(seed)
    b.write_text(seed)
    return str(a), ""  # "" = an optional output that is absent, never "missing"


def test_a_deleted_output_in_a_cached_tuple_is_recomputed(prefect_harness, tmp_path):
    CALLS.clear()
    first = ensure_output(_two_files, seed="x", out_dir=str(tmp_path / "o"))
    assert ensure_output(_two_files, seed="x", out_dir=str(tmp_path / "o")) == first and CALLS == ["x"]  # cache hit
    Path(first[0]).unlink()
    again = ensure_output(_two_files, seed="x", out_dir=str(tmp_path / "o"))
    assert again == first and Path(again[0]).read_text() == "x" and CALLS == ["x", "x"]

"""lancet_core.recall.pages reads a fixed_len_byte_array column straight from the file's page bytes: every layout it
accepts must give exactly pyarrow's decoding, and every layout it does not know must give None (never a wrong
view)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lancet_core.index.store import write_shard
from lancet_core.recall.pages import plain_column

_NP = {"float16": np.float16, "float32": np.float32, "int8": np.int8}



def column_pages(path, column: str, dtype) -> list[np.ndarray] | None:
    """The whole column through plain_column: one [rows, width // itemsize] array per data page (None: not plain)."""
    import os

    dtype = np.dtype(dtype)
    layout = plain_column(path, column, dtype.itemsize)
    if layout is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        return [layout.read(fd, i, 0, np.empty((n, layout.width // dtype.itemsize), dtype))
                for i, (_, n) in enumerate(layout.pages)]
    finally:
        os.close(fd)

def _table(n: int, d: int, dtype: str, seed: int = 0, nullable: bool = True) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * 20).astype(_NP[dtype])
    grad = pa.FixedSizeBinaryArray.from_buffers(pa.binary(d * x.itemsize), n, [None, pa.py_buffer(x.tobytes())])
    schema = pa.schema([pa.field("example_id", pa.string()), pa.field("grad", grad.type, nullable=nullable),
                        pa.field("grad_norm", pa.float32())])
    t = pa.Table.from_arrays([pa.array([f"r{i}" for i in range(n)]), grad,
                              pa.array(np.linalg.norm(x.astype(np.float64), axis=1).astype(np.float32))], schema=schema)
    return t, x


def _pyarrow_values(path, dtype: str, d: int) -> np.ndarray:
    col = pq.read_table(path, columns=["grad"]).column("grad").combine_chunks()
    return np.frombuffer(col.buffers()[1], _NP[dtype], count=len(col) * d, offset=col.offset * d * np.dtype(_NP[dtype]).itemsize).reshape(-1, d)


WRITERS = {
    "store-writer": None,  # lancet_core.index.store.write_shard: the layout the builder writes
    "v1-nullable-many-pages": dict(compression="none", use_dictionary=False, data_page_size=3000, write_batch_size=16),
    "v2-pages": dict(compression="none", use_dictionary=False, data_page_version="2.0", data_page_size=5000,
                     write_batch_size=32),
    "with-statistics": dict(compression="none", use_dictionary=False, write_statistics=True),
    "row-groups": dict(compression="none", use_dictionary=False, row_group_size=77, data_page_size=2000),
    "page-checksums": dict(compression="none", use_dictionary=False, write_page_checksum=True),
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_views_equal_pyarrow_decoding(tmp_path, writer, dtype):
    n, d = 301, 24
    t, x = _table(n, d, dtype, nullable=writer != "store-writer")
    path = tmp_path / "shard-00000.parquet"
    if WRITERS[writer] is None:
        write_shard(t, path)
    else:
        pq.write_table(t, path, **WRITERS[writer])
    views = column_pages(path, "grad", _NP[dtype])
    assert views is not None, writer
    got = np.concatenate(views)
    assert got.shape == (n, d)
    assert np.array_equal(got.view(np.uint8), x.view(np.uint8))  # bit for bit, NaN payloads included
    assert np.array_equal(got.view(np.uint8), _pyarrow_values(path, dtype, d).view(np.uint8))
    if writer in ("v1-nullable-many-pages", "row-groups"):
        assert len(views) >= 3  # really several pages / row groups


def test_store_writer_layout(tmp_path):
    """What the builder writes: grad uncompressed, PLAIN, non-nullable, no statistics; the other columns snappy."""
    t, _ = _table(50, 8, "float16", nullable=False)
    write_shard(t, tmp_path / "s.parquet")
    md = pq.read_metadata(tmp_path / "s.parquet")
    cols = {md.row_group(0).column(j).path_in_schema: md.row_group(0).column(j) for j in range(md.num_columns)}
    assert cols["grad"].compression == "UNCOMPRESSED" and not cols["grad"].is_stats_set
    assert cols["grad"].encodings == ("PLAIN",) or set(cols["grad"].encodings) <= {"PLAIN", "RLE"}
    assert cols["example_id"].compression == "SNAPPY" and cols["grad_norm"].compression == "SNAPPY"
    assert md.schema.column(1).max_definition_level == 0


@pytest.mark.parametrize("case", ["snappy", "dictionary", "nulls", "zstd-v2", "not-fixed-width", "missing"])
def test_other_layouts_give_none(tmp_path, case):
    t, _ = _table(200, 16, "float16")
    path = tmp_path / "s.parquet"
    if case == "snappy":
        pq.write_table(t, path, use_dictionary=False)
    elif case == "dictionary":
        pq.write_table(t, path, compression="none", use_dictionary=True)
    elif case == "nulls":
        g = t.column("grad").combine_chunks()
        nulled = pa.array([None] + g.to_pylist()[1:], g.type)
        pq.write_table(t.set_column(1, "grad", nulled), path, compression="none", use_dictionary=False)
    elif case == "zstd-v2":
        pq.write_table(t, path, compression="zstd", data_page_version="2.0", use_dictionary=False)
    elif case == "not-fixed-width":
        pq.write_table(t.set_column(1, "grad", t.column("grad").cast(pa.binary())), path, compression="none",
                       use_dictionary=False)
    else:
        pq.write_table(t.drop(["grad"]), path)
    assert column_pages(path, "grad", np.float16) is None


def test_item_size_must_divide_the_width(tmp_path):
    t, _ = _table(10, 3, "float16")  # 6 bytes per row: not a whole number of float32 values
    write_shard(t, tmp_path / "s.parquet")
    assert column_pages(tmp_path / "s.parquet", "grad", np.float32) is None


def test_corrupted_page_header_gives_none(tmp_path):
    """A header whose sizes do not add up (here: garbage where the first page header was) is not trusted."""
    t, _ = _table(100, 16, "float16", nullable=False)
    path = tmp_path / "s.parquet"
    write_shard(t, path)
    md = pq.read_metadata(path)
    j = [md.schema.column(i).path for i in range(md.num_columns)].index("grad")
    start = md.row_group(0).column(j).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + 6] = b"\x15\x00\x15\x02\x15\x04"  # a data page claiming 1 value in 2 bytes (uncompressed 1)
    path.write_bytes(bytes(raw))
    assert column_pages(path, "grad", np.float16) is None


def test_page_headers_longer_than_the_first_read(tmp_path):
    """Min/max statistics of 3000-byte rows make a page header ~6 kB, more than the 4 kB read first."""
    t, x = _table(40, 1500, "float16")
    pq.write_table(t, tmp_path / "s.parquet", compression="none", use_dictionary=False, write_statistics=True)
    views = column_pages(tmp_path / "s.parquet", "grad", np.float16)
    assert views is not None and np.array_equal(np.concatenate(views).view(np.uint8), x.view(np.uint8))


def test_read_any_run_of_rows(tmp_path):
    import os

    t, x = _table(300, 10, "float32", nullable=False)
    pq.write_table(t, tmp_path / "s.parquet", compression="none", use_dictionary=False, data_page_size=2000,
                   write_batch_size=16)
    layout = plain_column(tmp_path / "s.parquet", "grad", 4)
    assert layout.num_rows == 300 and len(layout.pages) > 2
    fd = os.open(tmp_path / "s.parquet", os.O_RDONLY)
    try:
        row = 0
        for p, (_, n) in enumerate(layout.pages):
            for first, m in ((0, n), (1, n - 1), (n // 2, 1)):
                got = layout.read(fd, p, first, np.empty((m, 10), np.float32))
                assert np.array_equal(got, x[row + first : row + first + m])
            row += n
        with pytest.raises(ValueError):
            layout.read(fd, 0, 1, np.empty((layout.pages[0][1], 10), np.float32))  # past the page's end
    finally:
        os.close(fd)

"""A Parquet column's fixed-width values read straight from the file's pages into numpy arrays (no decoding).

A gradient store's `grad` column is written PLAIN-encoded and uncompressed (lancet_core.index.store): each data page
is a page header followed by the rows' raw bytes, back to back. `plain_column` reads only the footer and the page
headers (Thrift compact protocol, parsed here) and returns where each page's values lie; `PlainColumn.read` then
reads any run of rows of a page into a caller's array with one positioned read. So the scan reads each segment of
rows into its own small array: no Parquet decoding (pyarrow's reader decompresses and copies every page, which cost
~3× the whole in-RAM matvec), no whole-chunk buffer (a 110 MB chunk per shard at D = 54k was mapped fresh and
page-faulted for every shard: 3× slower), and no mmap (page faults and unmaps on one core stalled the other core's
scan on the process's memory-map lock: 2.3× instead of 1.5× the matvec). Measured in benchmarks/query_latency.py.

It returns None, never a wrong layout, whenever a column chunk is not exactly that simple layout (compressed,
dictionary- or otherwise encoded, nulls present, repeated, a page type it does not know, a size that does not add
up): the caller then reads the column with pyarrow as usual. Validated against pyarrow's own decoding in
tests/core/recall/test_pages.py.

Knows the Parquet file layout (footer metadata through pyarrow, page headers itself). Knows nothing about gradients,
stores or scores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

# Thrift compact protocol type ids
_BOOL_TRUE, _BOOL_FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)
_DATA_PAGE, _DATA_PAGE_V2 = 0, 3  # PageHeader.type
_PLAIN = 0  # Encoding.PLAIN


class _Unsupported(Exception):
    """The page layout is not the simple one this module views; the caller falls back to pyarrow."""


class _Short(_Unsupported):
    """The bytes read so far end inside a page header: read more."""


class _Reader:
    """Just enough of Thrift's compact protocol to read a PageHeader (parquet.thrift) and skip what it does not need."""

    def __init__(self, buf, pos: int, end: int):
        self.buf, self.pos, self.end = buf, pos, end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise _Short("page header runs past the bytes read")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise _Unsupported("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def skip(self, ttype: int) -> None:
        if ttype in (_BOOL_TRUE, _BOOL_FALSE):
            return
        if ttype == _BYTE:
            self.byte()
        elif ttype in (_I16, _I32, _I64):
            self.varint()
        elif ttype == _DOUBLE:
            self.pos += 8
        elif ttype == _BINARY:
            n = self.varint()  # read before adding: `self.pos += self.varint()` would add to the old position
            self.pos += n
        elif ttype in (_LIST, _SET):
            head = self.byte()
            size, etype = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            for _ in range(size):
                self.byte() if etype in (_BOOL_TRUE, _BOOL_FALSE) else self.skip(etype)
        elif ttype == _MAP:
            size = self.varint()
            if size:
                kv = self.byte()
                for _ in range(size):
                    self.skip(kv >> 4)
                    self.skip(kv & 0x0F)
        elif ttype == _STRUCT:
            self.struct(lambda fid, t: self.skip(t))
        else:
            raise _Unsupported(f"unknown thrift type {ttype}")
        if self.pos > self.end:
            raise _Short("page header runs past the bytes read")

    def struct(self, on_field) -> None:
        """Read one struct, calling on_field(field_id, type) for each field (which must consume it)."""
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return
            ttype, delta = head & 0x0F, head >> 4
            fid = last + delta if delta else self.zigzag()
            on_field(fid, ttype)
            last = fid


@dataclass
class _Page:
    kind: int = -1
    uncompressed: int = -1
    compressed: int = -1
    num_values: int = -1
    num_nulls: int = 0
    encoding: int = -1
    def_bytes: int = 0  # v2: levels' byte lengths, given in the header
    rep_bytes: int = 0


def _int(r: _Reader, ttype: int) -> int:
    if ttype not in (_I16, _I32, _I64):
        raise _Unsupported("integer field of another type")
    return r.zigzag()


# The integer fields read from parquet.thrift's PageHeader and its data-page headers (field id -> _Page attribute);
# every other field is skipped.
_PAGE_HEADER_INTS = {1: "kind", 2: "uncompressed", 3: "compressed"}
_DATA_PAGE_INTS = {5: {1: "num_values", 2: "encoding"},  # PageHeader.data_page_header: DataPageHeader
                   8: {1: "num_values", 2: "num_nulls", 4: "encoding", 5: "def_bytes", 6: "rep_bytes"}}  # ...V2
_V2_IS_COMPRESSED = 7


def _page_header(r: _Reader) -> _Page:
    p = _Page()

    def fields(ints: dict[int, str], v2: bool):
        def on(fid: int, t: int) -> None:
            if fid in ints:
                setattr(p, ints[fid], _int(r, t))
            elif v2 and fid == _V2_IS_COMPRESSED and t == _BOOL_TRUE:
                raise _Unsupported("compressed v2 page")
            elif ints is _PAGE_HEADER_INTS and fid in _DATA_PAGE_INTS and t == _STRUCT:
                r.struct(fields(_DATA_PAGE_INTS[fid], v2=fid == 8))
            else:
                r.skip(t)

        return on

    r.struct(fields(_PAGE_HEADER_INTS, v2=False))
    return p


_HEADER_READ = 4096  # bytes read for a page header at first (a header with min/max statistics can be larger)


def _pread(fd: int, n: int, at: int) -> bytes:
    out = os.pread(fd, n, at)
    if len(out) != n:
        raise _Unsupported("the file ends inside a column chunk")
    return out


def _chunk_pages(fd: int, start: int, end: int, width: int, max_def: int) -> list[tuple[int, int]]:
    """(file offset of the first value, number of rows) of every data page of the column chunk at [start, end):
    only the page headers are read."""
    out = []
    pos = start
    while pos < end:
        window = _HEADER_READ
        while True:  # the header's length is only known once it is parsed: read more until it fits
            head = _pread(fd, min(window, end - pos), pos)
            r = _Reader(head, 0, len(head))
            try:
                p = _page_header(r)
                break
            except _Short:
                if pos + window >= end:
                    raise _Unsupported("page header runs past the column chunk") from None
                window *= 4
        body = pos + r.pos
        if p.compressed < 0 or p.compressed != p.uncompressed or body + p.compressed > end:
            raise _Unsupported("page sizes do not add up (compressed page?)")
        if p.kind not in (_DATA_PAGE, _DATA_PAGE_V2):
            raise _Unsupported(f"page type {p.kind}")
        if p.encoding != _PLAIN or p.num_values < 0 or p.num_nulls:
            raise _Unsupported("not a PLAIN page without nulls")
        values = body
        if p.kind == _DATA_PAGE:
            if max_def > 0:  # v1: RLE definition levels, prefixed by their 4-byte length
                if p.compressed < 4:
                    raise _Unsupported("short page")
                values += 4 + int.from_bytes(_pread(fd, 4, body), "little")
        else:
            values += p.def_bytes + p.rep_bytes
        # exactly num_values values fill the rest of the page: so no value was null and nothing else is there
        if body + p.compressed - values != p.num_values * width:
            raise _Unsupported("page holds something besides num_values plain values")
        out.append((values, p.num_values))
        pos = body + p.compressed
    return out


@dataclass(frozen=True)
class PlainColumn:
    """Where a fixed-width column's values lie in a Parquet file: per data page in row order, the file offset of its
    first value and its number of rows; `width` bytes per row."""

    path: str
    width: int
    pages: tuple[tuple[int, int], ...]

    @property
    def num_rows(self) -> int:
        return sum(n for _, n in self.pages)

    def read(self, fd: int, page: int, first: int, out: np.ndarray) -> np.ndarray:
        """Read rows [first, first + len(out)) of data page `page` into `out` (C-contiguous, len(out) × width
        bytes) with one positioned read; returns out."""
        off, n = self.pages[page]
        if first < 0 or first + len(out) > n or out.nbytes != len(out) * self.width:
            raise ValueError(f"rows [{first}, {first + len(out)}) of a {n}-row page into a {out.shape} array")
        got = os.preadv(fd, [memoryview(out).cast("B")], off + first * self.width)
        if got != out.nbytes:
            raise OSError(f"{self.path}: short read ({got} of {out.nbytes} bytes): the file changed or is truncated")
        return out


def plain_column(path: str | Path, column: str, itemsize: int, *, metadata: pq.FileMetaData | None = None
                 ) -> PlainColumn | None:
    """The page layout of `column` (a fixed_len_byte_array whose width is a multiple of `itemsize`) when every row
    group stores it as uncompressed PLAIN pages without nulls; else None. Reads the footer (unless given) and the page
    headers only. `metadata`: the file's footer, when the caller has already read it."""
    meta = metadata if metadata is not None else pq.read_metadata(path)
    names = [meta.schema.column(j).path for j in range(meta.num_columns)]
    if column not in names:
        return None
    j = names.index(column)
    col = meta.schema.column(j)
    if col.physical_type != "FIXED_LEN_BYTE_ARRAY" or col.max_repetition_level != 0:
        return None
    width = col.length
    if width % itemsize:
        return None
    chunks = []
    for g in range(meta.num_row_groups):
        c = meta.row_group(g).column(j)
        if c.compression != "UNCOMPRESSED" or c.has_dictionary_page or c.data_page_offset < 0:
            return None
        chunks.append((c.data_page_offset, c.total_compressed_size, meta.row_group(g).num_rows))
    pages: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, length, rows in chunks:
            found = _chunk_pages(fd, start, start + length, width, col.max_definition_level)
            if sum(n for _, n in found) != rows:
                return None
            pages += found
    except _Unsupported:
        return None
    finally:
        os.close(fd)
    return PlainColumn(str(path), width, tuple(pages))

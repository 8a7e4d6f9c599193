"""The block map and the dirty-bitmap range operations, compiled and pure, against list models."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import _blockmap, _blockmap_py

IMPLS = [pytest.param(_blockmap, id="cython"), pytest.param(_blockmap_py, id="pure")]


@st.composite
def maps(draw):
    shift = draw(st.integers(4, 12))
    bs = 1 << shift
    nblocks = draw(st.integers(1, 40))
    tail = draw(st.integers(0, bs - 1))
    disk_size = nblocks * bs if tail == 0 else (nblocks - 1) * bs + tail
    rows = []
    for _ in range(nblocks):
        if draw(st.booleans()):
            rows.append((0xFFFFFFFF, 0, 0))
        else:
            rows.append((draw(st.integers(0, 5)), draw(st.integers(1, 1 << 20)), draw(st.integers(0, 1 << 39))))
    start = draw(st.integers(0, disk_size))
    length = draw(st.integers(0, disk_size - start))
    return bs, disk_size, rows, start, length


def entries_of(rows):
    e = np.zeros(len(rows), dtype=_blockmap_py.ENTRY_DTYPE)
    for i, (p, c, o) in enumerate(rows):
        e[i] = (p, c, o)
    return e


def model_translate(bs, rows, start, length):
    """Per-byte walk: one extent per block piece, zero pieces merged."""
    out = []
    pos, end = start, start + length
    while pos < end:
        b, skip = divmod(pos, bs)
        take = min(bs - skip, end - pos)
        p, c, o = rows[b]
        if p == 0xFFFFFFFF:
            if out and out[-1][0] == -1:
                out[-1][4] += take
            else:
                out.append([-1, 0, 0, 0, take])
        else:
            out.append([p, o, c, skip, take])
        pos += take
    return out


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=300, deadline=None)
@given(m=maps())
def test_translate_matches_model(impl, m):
    bs, disk_size, rows, start, length = m
    bm = impl.BlockMap(entries_of(rows), bs, disk_size)
    got = bm.translate(start, length)
    assert got.dtype == np.int64 and got.shape[1] == 5
    assert got.tolist() == model_translate(bs, rows, start, length)
    assert int(got[:, 4].sum()) == length
    one_block = length > 0 and start // bs == (start + length - 1) // bs
    want = (-1 if rows[start // bs][0] == 0xFFFFFFFF else rows[start // bs][0] << 40 | rows[start // bs][2]) if one_block else -2
    assert bm.locate(start, length) == want
    for b, (p, c, o) in enumerate(rows):
        assert bm.key(b) == (-1 if p == 0xFFFFFFFF else p << 40 | o)
        assert bm.entry(b) == (p, c, o)


@pytest.mark.parametrize("impl", IMPLS)
def test_translate_rejects_out_of_range(impl):
    bm = impl.BlockMap(entries_of([(1, 10, 0), (0xFFFFFFFF, 0, 0)]), 4096, 5000)
    with pytest.raises(ValueError, match="outside"):
        bm.translate(4000, 1001)
    with pytest.raises(ValueError):
        bm.translate(-1, 10)
    with pytest.raises(IndexError):
        bm.key(2)
    assert bm.translate(5000, 0).shape == (0, 5)


@pytest.mark.parametrize("impl", IMPLS)
def test_blockmap_validates_shape(impl):
    with pytest.raises(ValueError, match="power of two"):
        impl.BlockMap(entries_of([(1, 1, 1)]), 3000, 3000)
    with pytest.raises(ValueError, match="entries"):
        impl.BlockMap(entries_of([(1, 1, 1)]), 4096, 8192)


bit_ops = st.lists(
    st.tuples(st.sampled_from(["set", "clear", "count", "runs"]), st.integers(0, 300), st.integers(0, 300)),
    max_size=30,
)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=200, deadline=None)
@given(nbytes=st.integers(1, 40), ops=bit_ops)
def test_bitmap_ops_match_list_model(impl, nbytes, ops):
    bits = np.zeros(nbytes, dtype=np.uint8)
    model = [0] * (nbytes * 8)
    for op, start, count in ops:
        start %= nbytes * 8 + 1
        count = min(count, nbytes * 8 - start)
        if op == "set":
            impl.bits_set(bits, start, count)
            model[start : start + count] = [1] * count
        elif op == "clear":
            impl.bits_clear(bits, start, count)
            model[start : start + count] = [0] * count
        elif op == "count":
            assert impl.bits_count(bits, start, count) == sum(model[start : start + count])
        else:
            runs = impl.bits_runs(bits, start, count).tolist()
            expect = []
            for i in range(start, start + count):
                if expect and expect[-1][2] == model[i]:
                    expect[-1][1] += 1
                else:
                    expect.append([i, 1, model[i]])
            assert runs == expect
        assert [impl.bit_get(bits, i) for i in range(nbytes * 8)] == model
    # the packed layout is numpy's little-endian bit order
    assert np.unpackbits(bits, bitorder="little").tolist() == model


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=300, deadline=None)
@given(raw=st.binary(min_size=1, max_size=100), data=st.data())
def test_bits_count_of_any_bitmap_and_range(impl, raw, data):
    """Counting bits of any pattern (not only runs set by bits_set) over any range,
    whatever its alignment to bytes and 8-byte words, against one value per bit."""
    bits = np.frombuffer(raw, dtype=np.uint8).copy()
    model = np.unpackbits(bits, bitorder="little").tolist()
    start = data.draw(st.integers(0, len(model)), label="start")
    count = data.draw(st.integers(0, len(model) - start), label="count")
    assert impl.bits_count(bits, start, count) == sum(model[start : start + count])
    if len(raw) > 3:  # a view starting 3 bytes into the buffer: words read unaligned
        assert impl.bits_count(bits[3:], 0, (len(raw) - 3) * 8) == sum(model[24:])


@pytest.mark.parametrize("impl", IMPLS)
def test_bitmap_range_checked(impl):
    bits = np.zeros(2, dtype=np.uint8)
    for fn in (impl.bits_set, impl.bits_clear, impl.bits_count, impl.bits_runs):
        with pytest.raises(ValueError):
            fn(bits, 10, 7)
        with pytest.raises(ValueError):
            fn(bits, -1, 1)
    assert bits.tolist() == [0, 0]


@pytest.mark.parametrize("impl", IMPLS)
def test_ranges_whose_end_passes_2_63_are_refused_not_wrapped(impl):
    """A READ at offset 2**63 - 1 made offset + length wrap negative in the C code, pass the
    bounds check and read outside the map: the daemon died with SIGSEGV (issue 8, found by
    the fuzz campaign). Both implementations refuse it the same way."""
    bm = impl.BlockMap(entries_of([(1, 10, 0), (0xFFFFFFFF, 0, 0)]), 4096, 5000)
    top = 2**63 - 1
    for off, n in ((top, 1), (top - 4095, 4096), (1, top), (4096, top - 4095)):
        assert bm.locate(off, n) == -2
        with pytest.raises(ValueError):
            bm.translate(off, n)
    bits = np.zeros(2, dtype=np.uint8)
    for start, count in ((top, 1), (1, top), (8, top - 7)):
        with pytest.raises(ValueError):
            impl.bits_count(bits, start, count)


@pytest.mark.parametrize("impl", IMPLS)
def test_negative_indexes_are_refused_not_wrapped(impl):
    """The compiled kernel refuses a negative block or bit index with IndexError; numpy
    would read the twin's arrays from the end (block -1 = the last block). The twin, the
    kernel's specification, must refuse exactly the same indexes."""
    bm = impl.BlockMap(entries_of([(1, 10, 0), (2, 20, 4096), (0xFFFFFFFF, 0, 0)]), 4096, 12000)
    for block in (-1, -2, -3, -4, -(2**40)):
        with pytest.raises(IndexError):
            bm.key(block)
        with pytest.raises(IndexError):
            bm.entry(block)
    for block in (3, 2**40):
        with pytest.raises(IndexError):
            bm.key(block)
        with pytest.raises(IndexError):
            bm.entry(block)
    bits = np.array([0x80, 0x01], dtype=np.uint8)
    for i in (-1, -8, -9, -16, -17, -(2**40)):
        with pytest.raises(IndexError):
            impl.bit_get(bits, i)
    for i in (16, 2**40):
        with pytest.raises(IndexError):
            impl.bit_get(bits, i)
    assert [impl.bit_get(bits, i) for i in (7, 8)] == [1, 1]

"""The chunk decompressor: the Cython build (liblz4) and its pure twin (python-lz4) give
the same results and the same refusals, and the pack reader's decode path, on either,
returns the stored bytes or raises ``IntegrityError`` with the messages it always had."""
from __future__ import annotations

import os

import blake3
import lz4.block
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import _codec, _codec_py
from engine.errors import IntegrityError
from engine.repo import packs
from engine.repo.format import CODEC_LZ4, CODEC_RAW
from engine.repo.packs import PackReader, PackWriter, compress_block, record_header

IMPLS = [_codec, _codec_py]
BS = 256 * 1024


@pytest.fixture(params=IMPLS, ids=["cython", "pure"])
def impl(request, monkeypatch):
    monkeypatch.setattr(packs, "lz4_decompress_into", request.param.lz4_decompress_into)
    return request.param


def test_the_selector_takes_the_build_unless_pure():
    from engine import codec

    want = "pure-python" if os.environ.get("INSTANTNFS_PURE") == "1" else "cython"
    assert codec.IMPLEMENTATION == want


payloads = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda w, n: (w * (n // max(1, len(w)) + 1))[:n], st.binary(min_size=1, max_size=40), st.integers(0, 20000)),
)


@settings(max_examples=200, deadline=None)
@given(data=payloads, slack=st.integers(-64, 64))
def test_twins_agree_on_valid_blocks(data, slack):
    src = lz4.block.compress(data, store_size=False)
    size = max(0, len(data) + slack)
    results = []
    for m in IMPLS:
        out = bytearray(b"\xa5" * size)
        n = m.lz4_decompress_into(src, out)
        results.append((n, bytes(out[:n]) if n >= 0 else None))  # past n: unspecified (liblz4's wild copies)
    assert results[0] == results[1]
    n, out = results[0]
    if size >= len(data):
        assert n == len(data) and out == data
    else:
        assert n == -1  # never written past the end


@settings(max_examples=300, deadline=None)
@given(src=st.binary(max_size=300), size=st.integers(0, 2000))
def test_twins_agree_on_arbitrary_input(src, size):
    results = []
    for m in IMPLS:
        out = bytearray(size)
        n = m.lz4_decompress_into(src, out)
        results.append((n, bytes(out[: max(n, 0)])))
    assert results[0] == results[1]


@settings(max_examples=100, deadline=None)
@given(data=payloads, cut=st.integers(1, 50))
def test_truncated_blocks_are_refused_by_both(data, cut):
    src = lz4.block.compress(data, store_size=False)
    bad = src[: max(0, len(src) - cut)]
    got = [m.lz4_decompress_into(bad, bytearray(len(data))) for m in IMPLS]
    assert got[0] == got[1]
    assert got[0] < len(data) or data == b""  # never the full block out of a cut stream


# -- the pack reader over either decompressor ------------------------------------------------


def _pack(tmp_path, blocks: list[tuple[int, bytes, bytes]]):
    """A sealed pack of (codec, payload, block) records; returns reader and locations."""
    d = tmp_path / "packs"
    d.mkdir(exist_ok=True)
    ids = iter(range(1, 100))
    uid = os.urandom(16)
    w = PackWriter(d, lambda: next(ids), uid)
    where = []
    for codec, payload, block in blocks:
        fp = blake3.blake3(block).digest()
        where.append(w.append(record_header(codec, payload, BS, fp), payload, fp))
    w.seal()
    return PackReader(d, BS, uid), where


def _blocks():
    text = (b"the quick brown fox jumps over the lazy dog %d\n" * 8000)[:BS]
    rnd = os.urandom(BS)
    return [(*compress_block(b), b) for b in (text, rnd, bytes(BS), text[::-1])]


def test_read_chunk_returns_the_block_into_the_given_buffer(tmp_path, impl):
    blocks = _blocks()
    assert {c for c, _, _ in blocks} == {CODEC_LZ4, CODEC_RAW}
    reader, where = _pack(tmp_path, blocks)
    try:
        for (_c, _p, block), (pack, off, clen) in zip(blocks, where):
            assert reader.read_chunk(pack, off, clen) == block
            out = bytearray(os.urandom(BS))  # a reused buffer: its old bytes must not show
            assert reader.read_chunk(pack, off, clen, out) is out
            assert out == block
            codec, _fp, payload, ulen = reader.read_record(pack, off, clen)
            assert reader.decode(pack, off, codec, payload, ulen) == block  # what repo check uses
        with pytest.raises(ValueError, match="not the block size"):
            reader.read_chunk(*where[0], bytearray(BS - 1))
    finally:
        reader.close()


def _corrupt(tmp_path, codec: int, payload: bytes, block: bytes, impl_msg: str):
    reader, [(pack, off, clen)] = _pack(tmp_path, [(codec, payload, block)])
    try:
        with pytest.raises(IntegrityError, match=impl_msg):
            reader.read_chunk(pack, off, clen, bytearray(BS))
    finally:
        reader.close()


def test_corrupt_lz4_data_is_an_integrity_error(tmp_path, impl):
    block = (b"abcdefgh" * BS)[:BS]
    payload = lz4.block.compress(block, store_size=False)
    bad = payload[: len(payload) // 2]  # a valid CRC over a cut stream: the decompressor sees it
    _corrupt(tmp_path, CODEC_LZ4, bad, block, r"LZ4 data is corrupt|decompressed to \d+ bytes, expected")


def test_a_short_lz4_block_names_its_size(tmp_path, impl):
    block = (b"abcdefgh" * BS)[:BS]
    short = lz4.block.compress(block[: BS // 2], store_size=False)
    _corrupt(tmp_path, CODEC_LZ4, short, block, f"decompressed to {BS // 2} bytes, expected {BS}")


def test_an_unknown_codec_is_an_integrity_error_also_for_a_block_sized_payload(tmp_path, impl):
    block = os.urandom(BS)
    _corrupt(tmp_path, 7, block, block, "unknown codec 7")  # clen == block size: the direct read path
    (tmp_path / "short").mkdir()
    _corrupt(tmp_path / "short", 7, block[:100], block, "unknown codec 7")  # through the scratch buffer


def test_wrong_content_still_fails_the_fingerprint(tmp_path, impl):
    block = os.urandom(BS)
    other = os.urandom(BS)
    d = tmp_path / "packs"
    d.mkdir()
    uid = os.urandom(16)
    w = PackWriter(d, lambda: 1, uid)
    fp = blake3.blake3(block).digest()
    pack, off, clen = w.append(record_header(CODEC_RAW, other, BS, fp), other, fp)
    w.seal()
    reader = PackReader(d, BS, uid)
    try:
        with pytest.raises(IntegrityError, match="does not match its fingerprint"):
            reader.read_chunk(pack, off, clen, bytearray(BS))
    finally:
        reader.close()


def test_a_flipped_payload_byte_fails_the_checksum(tmp_path, impl):
    blocks = _blocks()
    reader, where = _pack(tmp_path, blocks)
    reader.close()
    path = tmp_path / "packs" / packs.pack_name(where[0][0])
    raw = bytearray(path.read_bytes())
    for _pack_id, off, _clen in where:
        raw[off + packs.HDR + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    reader = PackReader(tmp_path / "packs", BS, None)
    try:
        for pack, off, clen in where:
            with pytest.raises(IntegrityError, match="checksum mismatch"):
                reader.read_chunk(pack, off, clen, bytearray(BS))
    finally:
        reader.close()


def test_a_payload_longer_than_a_block_is_refused_and_its_buffer_not_kept(tmp_path, impl):
    block = os.urandom(BS)
    reader, [(pack, off, clen)] = _pack(tmp_path, [(CODEC_RAW, block + b"0123456789", block)])
    try:
        with pytest.raises(IntegrityError, match="raw payload has the wrong size"):
            reader.read_chunk(pack, off, clen, bytearray(BS))
        assert len(getattr(reader._local, "buf", b"")) <= packs.HDR + BS
    finally:
        reader.close()

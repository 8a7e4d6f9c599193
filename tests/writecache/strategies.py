"""Offsets and lengths that hit the edges that matter: granule and block boundaries,
the partial last granule, dirty/clean edges (writes land on earlier writes' edges)."""
from __future__ import annotations

from hypothesis import strategies as st

from tests.writecache.conftest import BLOCK


def offsets(size: int, granule: int) -> st.SearchStrategy[int]:
    aligned = st.one_of(
        st.integers(0, size // BLOCK).map(lambda b: b * BLOCK),
        st.integers(0, size // granule).map(lambda g: g * granule),
    )
    near = st.tuples(aligned, st.integers(-3, 3)).map(lambda t: t[0] + t[1])
    return st.one_of(near, st.integers(0, size - 1), st.just(size - 1), st.just(size - granule - 1)).map(
        lambda o: min(max(o, 0), size - 1)
    )


def lengths(granule: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(1, 16),
        st.sampled_from([granule - 1, granule, granule + 1, 2 * granule, BLOCK, BLOCK + 1]),
        st.integers(1, 3 * BLOCK // 2),
    )

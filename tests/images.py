"""Generated disk images for tests: a list of block kinds -> a raw file and its bytes."""
from __future__ import annotations

import os
import random
from pathlib import Path

KINDS = ("hole", "zero", "random", "text", "repeat", "partial")


def block_bytes(kind: str, size: int, rng: random.Random, repeat_pool: list[bytes]) -> bytes | None:
    """Bytes of one block of the given kind; None for a hole (left unwritten)."""
    if kind == "hole":
        return None
    if kind == "zero":
        return bytes(size)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "text":
        words = [b"backup", b"restore", b"instant", b"vm", b"disk", b"nfs", b"chunk", b"\n"]
        out = bytearray()
        while len(out) < size:
            out += rng.choice(words) + b" "
        return bytes(out[:size])
    if kind == "repeat":
        if not repeat_pool:
            repeat_pool.append(rng.randbytes(size))
        return rng.choice(repeat_pool)
    if kind == "partial":  # a few non-zero bytes in a zero block
        b = bytearray(size)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(size)] = rng.randrange(1, 256)
        return bytes(b)
    raise ValueError(kind)


def make_image(path: Path, kinds: list[str], block_size: int, tail: int = 0, seed: int = 0) -> bytes:
    """Write a sparse raw image of len(kinds) blocks (+ ``tail`` bytes of a last partial block)."""
    rng = random.Random(seed)
    pool: list[bytes] = []
    size = len(kinds) * block_size + tail
    data = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        sizes = [block_size] * len(kinds) + ([tail] if tail else [])
        all_kinds = kinds + ([rng.choice(KINDS)] if tail else [])
        off = 0
        for kind, n in zip(all_kinds, sizes):
            b = block_bytes(kind, block_size, rng, pool)
            if b is not None:
                f.seek(off)
                f.write(b[:n])
                data[off : off + n] = b[:n]
            off += n
    return bytes(data)


def sha256_tree(root: Path) -> dict[str, str]:
    import hashlib

    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def repository_data(repo: Path) -> dict[str, str]:
    """sha256 of each file of a repository but its pins and their lock: a publish pins its
    restore point there by design (issue 8, finding 2); nothing else may change."""
    return {k: v for k, v in sha256_tree(repo).items() if k.split("/")[0] not in ("pins", "pins.lock")}

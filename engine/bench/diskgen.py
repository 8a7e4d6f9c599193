"""The benchmark's input: seeded, realistic raw disk images.

The image is made of 1 MiB blocks laid out in runs (1-32 blocks, as files and free
space come in extents on a real disk), in these proportions of the disk:

- holes (≈25 %): never written, so the output is a sparse file;
- random (≈25 %): incompressible bytes (media, compressed archives, encrypted data);
- text (≈30 %): text-like bytes, words and stock phrases drawn from Zipf-distributed
  vocabularies, with numbers and line breaks (logs, source, configuration); LZ4
  compresses it about 2.7x, so ``borg --chunker-params fixed,1048576`` stores the 2 GiB
  disk in ≈ 780 MB (the recipe's reference disk: 758 MB);
- repeated (≈20 %): copies of a small pool of distinct 1 MiB blocks (half random,
  half text), the way OS files repeat across a disk or across VMs.

The same ``--seed`` and ``--size`` always give the same bytes (numpy PCG64), so anyone
can regenerate the benchmark input:

    python -m engine.bench.diskgen -o /var/tmp/bench-disk.img --size 2G --seed 1

``cached_image()`` keeps generated images in ``$INSTANTNFS_BENCH_CACHE`` (default
``/var/tmp/instantnfs-bench``), named by size, seed and generator version, so a second
benchmark run starts at once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MIB = 1 << 20
BLOCK = MIB
# bump when the bytes for a given (size, seed) change, so cached images are remade
GENERATOR_VERSION = 2
CATEGORIES = ("hole", "random", "text", "repeated")
SHARES = (0.25, 0.25, 0.30, 0.20)
REPEAT_POOL = 8
MAX_RUN = 32


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units and not t[-1:].isdigit() else ""
    number = t[: len(t) - len(unit)]
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2G, 512M, 1048576)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


class TextMaker:
    """Text-like blocks from a fixed vocabulary, vectorised (no per-word Python work)."""

    def __init__(self, rng: np.random.Generator, vocab_size: int = 4096, phrases_count: int = 2048) -> None:
        letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
        # letter frequencies roughly like English, so the text has English-like entropy
        freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8,
                         2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
        freq /= freq.sum()
        words: list[bytes] = []
        for i in range(vocab_size):
            if i % 16 == 15:  # numbers: counters, sizes, addresses
                words.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 9))))).encode())
            else:
                n = int(rng.integers(2, 11))
                words.append(letters[rng.choice(26, n, p=freq)].tobytes())
        # each token carries its separator: mostly a space, a newline every ~12 words
        tokens = [w + b" " for w in words] + [w + b"\n" for w in words[: vocab_size // 4]]
        nw, nn = vocab_size, vocab_size // 4
        # stock phrases of 2-6 words (log message templates, identifiers, paths): real
        # text repeats whole phrases, not only words, which is what LZ4 finds
        phrases = []
        for _ in range(phrases_count):
            k = int(rng.integers(2, 7))
            phrases.append(b" ".join(words[j] for j in rng.integers(0, vocab_size, k).tolist()) + b" ")
        tokens += phrases
        self.flat = np.frombuffer(b"".join(tokens), dtype=np.uint8)
        self.lens = np.array([len(t) for t in tokens], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(self.lens)[:-1]))
        # Zipf-like ranks in each group; half the draws are single words (a newline
        # about one word in twelve), half are phrases
        def zipf(n: int) -> np.ndarray:
            r = 1.0 / np.arange(1, n + 1, dtype=np.float64)
            return r / r.sum()
        p = np.concatenate((zipf(nw) * 0.5 * 11 / 12, zipf(nn) * 0.5 / 12, zipf(phrases_count) * 0.5))
        self.p = p / p.sum()
        self.cdf = np.cumsum(self.p)

    def block(self, rng: np.random.Generator, size: int = BLOCK) -> bytes:
        mean = float((self.p * self.lens).sum())
        n = int(size / mean * 1.1) + 64
        idx = np.searchsorted(self.cdf, rng.random(n), side="right").clip(0, len(self.lens) - 1)
        lens = self.lens[idx]
        ends = np.cumsum(lens)
        k = int(np.searchsorted(ends, size)) + 1  # enough tokens to cover size
        idx, lens, ends = idx[:k], lens[:k], ends[:k]
        out_start = ends - lens
        pos = np.repeat(self.starts[idx] - out_start, lens) + np.arange(int(ends[-1]), dtype=np.int64)
        return self.flat[pos[:size]].tobytes()


def layout(nblocks: int, rng: np.random.Generator) -> np.ndarray:
    """Category index per block: exact shares, in shuffled runs of 1..MAX_RUN blocks."""
    counts = [int(round(s * nblocks)) for s in SHARES]
    counts[0] += nblocks - sum(counts)
    runs: list[tuple[int, int]] = []
    for cat, count in enumerate(counts):
        left = count
        while left > 0:
            n = min(left, int(rng.integers(1, MAX_RUN + 1)))
            runs.append((cat, n))
            left -= n
    order = rng.permutation(len(runs))
    cats = np.empty(nblocks, dtype=np.int8)
    at = 0
    for i in order.tolist():
        cat, n = runs[i]
        cats[at : at + n] = cat
        at += n
    return cats


def generate(path: str, size: int, seed: int, quiet: bool = False) -> dict:
    t0 = time.monotonic()
    rng = np.random.Generator(np.random.PCG64(seed))
    text = TextMaker(rng)
    pool = [rng.bytes(BLOCK) if i % 2 == 0 else text.block(rng) for i in range(REPEAT_POOL)]
    nblocks = -(-size // BLOCK)
    cats = layout(nblocks, rng)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    digest = hashlib.sha256()
    try:
        os.ftruncate(fd, size)
        zero = bytes(BLOCK)
        for b in range(nblocks):
            cat = CATEGORIES[cats[b]]
            length = min(BLOCK, size - b * BLOCK)
            if cat == "hole":
                digest.update(zero[:length])
                continue
            if cat == "random":
                data = rng.bytes(BLOCK)
            elif cat == "text":
                data = text.block(rng)
            else:
                data = pool[int(rng.integers(0, REPEAT_POOL))]
            data = data[:length]
            os.pwrite(fd, data, b * BLOCK)
            digest.update(data)
            if not quiet and b % 256 == 255:
                print(f"\r{(b + 1) * 100 // nblocks:3d} %", end="", file=sys.stderr, flush=True)
        os.fsync(fd)
    finally:
        os.close(fd)
    if not quiet:
        print("\r", end="", file=sys.stderr)
    st = os.stat(path)
    return {
        "path": os.path.abspath(path),
        "size": size,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "block": BLOCK,
        "blocks": {c: int((cats == i).sum()) for i, c in enumerate(CATEGORIES)},
        "repeat_pool": REPEAT_POOL,
        "allocated_bytes": st.st_blocks * 512,
        "sha256": digest.hexdigest(),
        "elapsed_s": round(time.monotonic() - t0, 2),
    }


def cache_dir() -> Path:
    return Path(os.environ.get("INSTANTNFS_BENCH_CACHE", "/var/tmp/instantnfs-bench"))


def cached_image(size: int, seed: int, log: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """The generated image of ``size`` and ``seed``, made once and reused (with its facts)."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"disk-{size}-s{seed}-v{GENERATOR_VERSION}.img"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("size") == size and os.path.getsize(path) == size:
            return path, info
    if log is not None:
        log(f"generating the {size >> 20} MiB input disk (seed {seed}) into {d}")
    tmp = path.with_suffix(".tmp")
    info = generate(str(tmp), size, seed, quiet=True)
    os.replace(tmp, path)
    info["path"] = str(path)
    meta.write_text(json.dumps(info, indent=2))
    return path, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", required=True, help="image file to write (sparse)")
    ap.add_argument("--size", type=parse_size, default=2 << 30, help="image size (default 2G)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    info = generate(args.output, args.size, args.seed, args.quiet)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

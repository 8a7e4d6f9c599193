"""Fixtures for the write cache tests: one small repository per session, its files'
hashes checked at the end (the backup must never be written)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from engine.stack import Stack
from tests.images import sha256_tree

DISK_SIZE = 16 << 20
BLOCK = 256 << 10


def make_image(path: Path, size: int, seed: int) -> bytes:
    """A disk image with data blocks, zero blocks and blocks half zero."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size, dtype=np.uint8)
    nblocks = size // BLOCK
    for b in range(nblocks):
        kind = b % 4
        if kind == 1:
            img[b * BLOCK : (b + 1) * BLOCK] = 0
        elif kind == 2:
            img[b * BLOCK : b * BLOCK + BLOCK // 2] = 0
    # a tail that is not block-aligned nor granule-aligned
    data = img.tobytes()
    path.write_bytes(data)
    return data




class Backup:
    def __init__(self, root: Path, image: bytes, stack: Stack) -> None:
        self.root = root
        self.image = image
        self.stack = stack
        self.repo = stack.repo

    def disk(self):
        return self.stack.backup_disk(self.repo.point("latest"), 0)


@pytest.fixture(scope="session")
def backup_repo(tmp_path_factory):
    """A repository with one restore point of one 16 MiB + 5120-byte disk (its last granule is partial)."""
    root = tmp_path_factory.mktemp("wc-repo")
    img_path = root.parent / "wc-src.img"
    image = make_image(img_path, DISK_SIZE, 7)
    image = image + bytes(range(256)) * 20  # 5120 more bytes: the last granule is partial
    img_path.write_bytes(image)
    repo_dir = root / "repo"
    Repository.init(repo_dir, BLOCK)
    with Repository.open(repo_dir) as repo:
        backup(repo, BackupSettings(vm="wc"), [str(img_path)])
    before = sha256_tree(repo_dir)
    stack = Stack.open(repo_dir, cache_bytes=64 << 20)
    yield Backup(repo_dir, image, stack)
    stack.close()
    after = sha256_tree(repo_dir)
    assert after == before, "the repository changed under the write cache tests"

"""Build the instantnfs package and its Cython extensions (engine._blockmap, engine._codec,
engine.nfs._wire, and the compiled builds of engine/nfs/fastlane.py and transport.py).

Metadata lives in pyproject.toml; this file declares the extension and the
dependency lower bounds.
"""
from __future__ import annotations

import sys

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - a build without Cython is a setup error
    sys.exit(
        "instantnfs: Cython is needed to build engine/_blockmap.pyx and engine/_codec.pyx "
        "(pip install 'Cython>=3.0'); set INSTANTNFS_PURE=1 at run time to use the pure-Python twin."
    )
import numpy

extensions = [
    Extension(
        "engine._blockmap",
        ["engine/_blockmap.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    Extension("engine.nfs._wire", ["engine/nfs/_wire.pyx"], extra_compile_args=["-O3"]),
    # the fast lane's glue and the transports, compiled from their readable sources
    # (which INSTANTNFS_PURE=1 runs as they are; see engine/nfs/compiled.py)
    Extension("engine.nfs._fastlane_c", ["engine/nfs/fastlane.py"], extra_compile_args=["-O3"]),
    Extension("engine.nfs._transport_c", ["engine/nfs/transport.py"], extra_compile_args=["-O3"]),
    Extension(
        "engine._codec",
        ["engine/_codec.pyx"],
        libraries=["lz4"],  # the system liblz4 (Debian liblz4-dev): its block API
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "embedsignature": True,
            "warn.unused": True,
            "warn.unreachable": True,
        },
    ),
    install_requires=[
        "numpy>=1.26",
        "lz4>=4.3",
        "blake3>=0.4",
        "crc32c>=2.4",
        "tqdm>=4.66",
        "uvloop>=0.19",
        "aiohttp>=3.9",
        # the daemon's /metrics (engine/control/metrics.py): custom collectors, text format
        "prometheus-client>=0.17",
        "tomli-w>=1.0",
        # file-level recovery (engine.files): The Sleuth Kit's Python binding, a binary wheel
        "pytsk3>=20260715",  # the version tested
        # files mount: FUSE through libfuse3 (built from source: Debian libfuse3-dev, pkg-config)
        "pyfuse3>=3.3",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-timeout>=2.2",
            "hypothesis>=6.100",
            # CI runs `instantnfs bench --quick`, which writes plots
            "matplotlib>=3.8",
            # tests/files reads XFS and btrfs guests through the optional extra below
            "dissect.xfs>=3.13",
            "dissect.btrfs>=1.10",
        ],
        # XFS and btrfs contents for file-level recovery (engine/files/fs_dissect.py);
        # AGPL-3.0 licensed, hence optional: without them XFS and btrfs are only named
        "xfs-btrfs": ["dissect.xfs>=3.13", "dissect.btrfs>=1.10"],
        "bench": ["matplotlib>=3.8"],
        "lint": ["ruff>=0.5", "mypy>=1.10", "import-linter>=2.1"],
    },
    package_data={"engine": ["*.pyx", "*.pxd", "*.pyi", "py.typed"], "engine.nfs": ["*.pyx", "*.pyi"]},
)

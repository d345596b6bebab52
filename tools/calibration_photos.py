"""Calibration photos for the ImageNet benchmarks, from Debian packages (never committed, never evaluated on).

``apt-get download`` + ``dpkg -x`` of gcompris-qt-data (object and animal
photos inside Qt ``.rcc`` resource bundles), scratch (scenes), kphotoalbum
(demo album) and tuxpaint-data (photo templates), cached under build/debs.
The evaluation photos (scikit-image, scikit-learn, matplotlib; ``photos.py``)
come from other sources, so calibration and evaluation are disjoint.

    python tools/calibration_photos.py   # prints how many photos each package gave
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEBS = ROOT / "build" / "debs"
PACKAGES = ("gcompris-qt-data", "scratch", "kphotoalbum", "tuxpaint-data")
#: Where each package keeps photographs (not icons or drawings).
PHOTO_DIRS = {
    "scratch": ["usr/share/scratch/Media/Backgrounds"],
    "kphotoalbum": ["usr/share/kphotoalbum/demo"],
    "tuxpaint-data": ["usr/share/tuxpaint/templates"],
}
MIN_SIDE = 160
MIN_BYTES = 15_000


def _unpacked(package: str) -> Path:
    """The package's files, downloaded and extracted once into build/debs/<package>."""
    target = DEBS / package
    if target.is_dir():
        return target
    DEBS.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", package], cwd=DEBS, check=True, capture_output=True)
    deb = sorted(DEBS.glob(f"{package}_*.deb"))[-1]
    subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)
    return target


def rcc_files(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, content) of every file in a Qt resource bundle (.rcc), zlib entries decompressed."""
    magic, version, tree, payload, names = struct.unpack(">4sIIII", data[:20])
    if magic != b"qres":
        raise ValueError("not a Qt resource bundle")
    entry = 14 if version < 2 else 22

    def name_at(offset: int) -> str:
        length = struct.unpack(">H", data[names + offset : names + offset + 2])[0]
        raw = data[names + offset + 6 : names + offset + 6 + 2 * length]
        return raw.decode("utf-16-be")

    def walk(index: int, prefix: str) -> Iterator[tuple[str, bytes]]:
        at = tree + index * entry
        name_off, flags = struct.unpack(">IH", data[at : at + 6])
        name = f"{prefix}/{name_at(name_off)}" if index else ""
        if flags & 0x02:  # directory
            count, first = struct.unpack(">II", data[at + 6 : at + 14])
            for child in range(first, first + count):
                yield from walk(child, name)
            return
        offset = struct.unpack(">I", data[at + 10 : at + 14])[0]
        size = struct.unpack(">I", data[payload + offset : payload + offset + 4])[0]
        blob = data[payload + offset + 4 : payload + offset + 4 + size]
        if flags & 0x01:  # qCompress: 4-byte length, then zlib
            blob = zlib.decompress(blob[4:])
        elif flags & 0x04:  # zstd: not used by the photo bundles
            return
        yield name, blob

    yield from walk(0, "")


def _is_photo(blob: bytes) -> bool:
    """JPEG or WebP (gcompris stores its photos as WebP), big enough not to be an icon."""
    jpeg = blob[:3] == b"\xff\xd8\xff"
    webp = blob[:4] == b"RIFF" and blob[8:12] == b"WEBP"
    return (jpeg or webp) and len(blob) >= MIN_BYTES


def photo_blobs() -> Iterator[tuple[str, bytes]]:
    """(source name, JPEG bytes) of every calibration photo, in a fixed order."""
    root = _unpacked("gcompris-qt-data")
    for rcc in sorted((root / "usr/share/gcompris-qt/rcc").glob("*.rcc")):
        for name, blob in rcc_files(rcc.read_bytes()):
            if _is_photo(blob):
                yield f"gcompris:{rcc.stem}{name}", blob
    for package, dirs in PHOTO_DIRS.items():
        root = _unpacked(package)
        for d in dirs:
            for path in sorted((root / d).rglob("*")):
                if path.suffix.lower() in (".jpg", ".jpeg", ".png") and path.stat().st_size >= MIN_BYTES:
                    yield f"{package}:{path.name}", path.read_bytes()


def calibration_crops(size: int = 224, limit: int | None = None, views: int = 1) -> tuple[np.ndarray, list[str]]:
    """ImageNet-normalised (N, 3, size, size) centre crops of the calibration photos, and their names.

    ``views=2`` adds a second view of each photo (short side 224 instead of 256, mirrored), the
    cheapest way to double a few hundred photos for fine-tuning without new images.
    """
    from PIL import Image

    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
    out, names = [], []
    for name, blob in photo_blobs():
        img = Image.open(io.BytesIO(blob)).convert("RGB")
        if min(img.size) < MIN_SIDE:
            continue
        for view in range(views):
            short = 256 if view == 0 else size
            scale = short / min(img.size)
            w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
            resized = img.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            arr = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
            arr = arr[:, ::-1] if view % 2 else arr
            out.append((arr.transpose(2, 0, 1) - mean) / std)
            names.append(f"{name}#{view}" if view else name)
        if limit and len(out) >= limit:
            break
    return np.stack(out).astype(np.float32), names


if __name__ == "__main__":
    crops, names = calibration_crops()
    by_source: dict[str, int] = {}
    for n in names:
        by_source[n.split(":")[0]] = by_source.get(n.split(":")[0], 0) + 1
    print(crops.shape, by_source, file=sys.stderr)

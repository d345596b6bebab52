"""Run RapidOCR with the original and an onnxpq-compressed PP-OCRv4 recognizer on rendered text lines.

Shows that the compressed model is a drop-in replacement: RapidOCR loads it,
reads its character dictionary from ``metadata_props``, and recognises text.
Prints each line's text per model and the character accuracy (1 - CER).

Usage: python tools/check_rapidocr.py COMPRESSED_REC.onnx
Needs: pip install rapidocr-onnxruntime==1.4.4 matplotlib
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont
from rapidocr_onnxruntime import RapidOCR

LINES = [
    "Permute, quantize and fine-tune 2021",
    "ONNX Runtime folds the decode at load",
    "The quick brown fox jumps over 13 lazy dogs",
    "Invoice No. 58213 total EUR 149.90",
    "Product quantization with 256 codewords",
    "Kernel 3x3, subvector d=9, k=256",
]


def render(text: str, size: int = 32) -> np.ndarray:
    """One black-on-white text line in DejaVu Sans (shipped with matplotlib), as a BGR array."""
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (right - left + 40, bottom - top + 30), "white")
    ImageDraw.Draw(image).text((20 - left, 15 - top), text, font=font, fill="black")
    return np.asarray(image)[:, :, ::-1].copy()


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def recognise(engine: RapidOCR, image: np.ndarray) -> str:
    result, _ = engine(image)
    return " ".join(r[1] for r in result or [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressed", type=Path)
    args = parser.parse_args()
    engines = {"original": RapidOCR(), "compressed": RapidOCR(rec_model_path=str(args.compressed))}
    errors = {name: 0 for name in engines}
    total = sum(len(t) for t in LINES)
    for text in LINES:
        image = render(text)
        for name, engine in engines.items():
            got = recognise(engine, image)
            errors[name] += edit_distance(text, got)
            print(f"{name:10} {got!r}")
    for name in engines:
        print(f"{name}: character accuracy {1 - errors[name] / total:.4f} on {len(LINES)} lines")


if __name__ == "__main__":
    main()

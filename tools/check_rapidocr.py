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
from ocr_data import EVAL_LINES, edit_distance, render
from rapidocr_onnxruntime import RapidOCR

LINES = EVAL_LINES[:6]


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
        image = np.ascontiguousarray(render(text)[:, :, ::-1])  # RapidOCR reads BGR, like cv2
        for name, engine in engines.items():
            got = recognise(engine, image)
            errors[name] += edit_distance(text, got)
            print(f"{name:10} {got!r}")
    for name in engines:
        print(f"{name}: character accuracy {1 - errors[name] / total:.4f} on {len(LINES)} lines")


if __name__ == "__main__":
    main()

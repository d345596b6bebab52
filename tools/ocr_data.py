"""Rendered text lines for the PP-OCRv4 recognizer: a calibration set and a disjoint evaluation set.

Lines are drawn with the DejaVu fonts that matplotlib ships, and preprocessed
as RapidOCR feeds its recognizer (height 48, values in [-1, 1], right-padded).
The evaluation lines include small, bold, serif and monospaced text: the hard
cases where quantization error shows first. Calibration lines use other words.
"""

from __future__ import annotations

import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

EVAL_LINES = [
    "Permute, quantize and fine-tune 2021",
    "ONNX Runtime folds the decode at load",
    "The quick brown fox jumps over 13 lazy dogs",
    "Invoice No. 58213 total EUR 149.90",
    "Product quantization with 256 codewords",
    "Kernel 3x3, subvector d=9, k=256",
    "Order #A-7731 shipped 2024-03-17",
    "Call +44 20 7946 0958 before 5pm",
    "Batch normalisation after every conv",
    "Mixed CASE and digits: Q4 revenue 12.7%",
    "https://example.org/docs?page=42",
    "Serial: XK9-22B-7710-QP",
]
EVAL_FONTS = [("DejaVu Sans", 32), ("DejaVu Serif", 28), ("DejaVu Sans Mono", 26), ("DejaVu Sans:bold", 30)]
CALIB_WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "river",
    "mountain",
    "window",
    "garden",
    "station",
    "market",
    "printer",
    "ticket",
    "receipt",
    "number",
    "amount",
    "weight",
    "height",
    "volume",
    "network",
    "server",
    "client",
    "model",
    "layer",
    "tensor",
    "vector",
    "matrix",
    "kernel",
    "stride",
    "padding",
    "channel",
    "output",
    "input",
    "sample",
    "label",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "January",
    "March",
    "August",
    "October",
    "December",
    "Street",
    "Avenue",
]
CALIB_FONTS = [("DejaVu Sans", 30), ("DejaVu Serif", 32), ("DejaVu Sans Mono", 28), ("DejaVu Sans:bold", 26)]


def render(text: str, font: str = "DejaVu Sans", size: int = 32) -> np.ndarray:
    """One black-on-white text line as an RGB uint8 array."""
    family, _, weight = font.partition(":")
    path = font_manager.findfont(font_manager.FontProperties(family=family, weight=weight or "normal"))
    face = ImageFont.truetype(path, size)
    left, top, right, bottom = face.getbbox(text)
    image = Image.new("RGB", (right - left + 40, bottom - top + 30), "white")
    ImageDraw.Draw(image).text((20 - left, 15 - top), text, font=face, fill="black")
    return np.asarray(image)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: character errors for 1 - CER."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def preprocess(images: list[np.ndarray], width: int = 480) -> np.ndarray:
    """RapidOCR's recognizer input: height 48, aspect kept, [-1, 1], right-padded to ``width``."""
    out = np.zeros((len(images), 3, 48, width), dtype=np.float32)
    for i, rgb in enumerate(images):
        image = Image.fromarray(rgb)
        w = min(width, int(np.ceil(48 * image.width / image.height)))
        line = np.asarray(image.resize((w, 48), Image.BILINEAR), dtype=np.float32) / 255.0
        out[i, :, :, :w] = ((line - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def eval_lines() -> list[tuple[str, np.ndarray]]:
    """(text, RGB image) for every evaluation line in every evaluation font."""
    return [(t, render(t, f, s)) for f, s in EVAL_FONTS for t in EVAL_LINES]


def calibration_lines(n: int = 256, seed: int = 0) -> np.ndarray:
    """``n`` preprocessed lines of random calibration words and numbers, none from the evaluation text."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        words = list(rng.choice(CALIB_WORDS, size=rng.integers(2, 6)))
        words.insert(int(rng.integers(0, len(words) + 1)), str(int(rng.integers(0, 10 ** rng.integers(1, 6)))))
        font, size = CALIB_FONTS[i % len(CALIB_FONTS)]
        images.append(render(" ".join(words), font, size))
    return preprocess(images)

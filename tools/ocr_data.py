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


def _page(texts: list[str], fonts: list[tuple[str, int]], shape: tuple[int, int], rng: np.random.Generator):
    """A white page with one line per text at random left offsets, and each line's ink box (x0, y0, x1, y1)."""
    page = np.full((*shape, 3), 255, dtype=np.uint8)
    boxes = []
    top = int(rng.integers(10, 30))
    for i, text in enumerate(texts):
        font, size = fonts[i % len(fonts)]
        line = render(text, font, size)[:, : shape[1] - 20]
        h, w = line.shape[:2]
        if top + h > shape[0]:
            break
        left = int(rng.integers(0, max(1, shape[1] - w)))
        page[top : top + h, left : left + w] = line
        ink = np.argwhere(line.min(axis=2) < 128)
        (y0, x0), (y1, x1) = ink.min(axis=0), ink.max(axis=0)
        boxes.append((left + x0, top + y0, left + x1 + 1, top + y1 + 1))
        top += h + int(rng.integers(5, 40))
    return page, boxes


def eval_pages(n: int = 6, seed: int = 1) -> list[tuple[np.ndarray, list[tuple[int, int, int, int]]]]:
    """Pages of evaluation lines (600x800, every evaluation font) with their ground-truth line boxes."""
    rng = np.random.default_rng(seed)
    pages = []
    for i in range(n):
        texts = [EVAL_LINES[(i * 5 + j) % len(EVAL_LINES)] for j in range(10)]
        fonts = EVAL_FONTS[i % len(EVAL_FONTS) :] + EVAL_FONTS[: i % len(EVAL_FONTS)]
        pages.append(_page(texts, fonts, (600, 800), rng))
    return pages


def calibration_pages(n: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` 320x480 pages of calibration words, normalised as RapidOCR feeds its detector ((x - 0.5) / 0.5)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        texts = [" ".join(rng.choice(CALIB_WORDS, size=rng.integers(1, 5))) for _ in range(6)]
        page, _ = _page(texts, CALIB_FONTS, (320, 480), rng)
        out.append(((page.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(out)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two axis-aligned boxes (x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0

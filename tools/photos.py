"""Natural photos that ship with scikit-image, scikit-learn and matplotlib, as ImageNet-normalised crops.

Deterministic: the same crops every time, so a number measured on them can be reproduced.
These photos are evaluation data; calibration must use other images.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import skimage.data
from PIL import Image
from sklearn.datasets import load_sample_images

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "cat", "retina", "hubble_deep_field", "immunohistochemistry")


def photos() -> list[np.ndarray]:
    """The RGB uint8 photos, in a fixed order."""
    images = [getattr(skimage.data, name)() for name in SKIMAGE]
    images += list(load_sample_images().images)
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    images.append(np.asarray(Image.open(hopper).convert("RGB")))
    return images


def _crop(image: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    """A square crop of relative side ``box[2]`` at relative centre (box[0], box[1]), resized to ``size``."""
    h, w = image.shape[:2]
    side = int(min(h, w) * box[2])
    top = int(np.clip(box[1] * h - side / 2, 0, h - side))
    left = int(np.clip(box[0] * w - side / 2, 0, w - side))
    patch = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
    return np.asarray(patch, dtype=np.float32) / 255.0


BOXES = [(0.5, 0.5, 1.0), (0.5, 0.5, 0.7), (0.35, 0.35, 0.6), (0.65, 0.35, 0.6), (0.35, 0.65, 0.6), (0.65, 0.65, 0.6)]


def crops(size: int = 224) -> np.ndarray:
    """Six crops per photo, NCHW float32, normalised as torchvision's ImageNet models expect."""
    out = [(_crop(img, box, size) - MEAN) / STD for img in photos() for box in BOXES]
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32)

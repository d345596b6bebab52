"""The reduced-width zoo (tools/zoo.py) compresses data-aware at one budget, and the result is sound.

Each model: exit 0 from the CLI, ``onnx.checker`` full check on the output, and the output runs in
onnxruntime on a held-out sample. The models and their data are cached in build/zoo/small; the
full-size zoo and the second budget are tools/bench_zoo.py's job (docs/ZOO.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

from onnxpq.cli import main

pytest.importorskip("torch", reason="the zoo's architectures are defined and exported with torch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import zoo

#: The reduced-width models CI compresses: in the fast lane the quickest (under 6 s each on 2026-11-28, when
#: byte_cnn took 51 s and multi_input 28 s) and, marked slow, a few more kinds of graph. The rest of the zoo, the
#: wheel models and the failures still open (Silero's LSTM weights behind Slice, Einsum weights, time per
#: parameter) are tools/bench_zoo.py's, in docs/ZOO.md.
QUICK = ("scalar_input", "lstm", "gru")
SLOW = ("byte_cnn", "multi_input", "fp16", "tied_lm", "conv3d", "dilated")


@pytest.mark.parametrize("name", [*QUICK, *(pytest.param(n, marks=pytest.mark.slow, id=n) for n in SLOW)])
def test_zoo_model_compresses(name: str, tmp_path: Path) -> None:
    built = zoo.build(name, small=True)
    folder = built.model.parent
    out = tmp_path / f"{name}.pq.onnx"
    argv = [
        "compress", str(built.model), str(out),
        "--calibration-data", str(folder / f"{name}_calib.npz"),
        "--validation-data", str(folder / f"{name}_eval.npz"),
        "--calibration-samples", "32", "--max-samples", "8",
        "--target-bpw", "4", "--no-measure",
    ]  # fmt: skip
    assert main(argv) == 0
    onnx.checker.check_model(str(out), full_check=True)
    zoo.check_runs(zoo.Built(out, built.calib, built.held))

"""``--target-bpw auto``: the search finds the smallest passing budget of a known curve, never a failing one,
and in the pipeline its winner is exactly the model ``--target-bpw WINNER`` writes."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from conftest import ROOT, make_model, rand
from onnx import helper

from onnxpq import CompressConfig, compress
from onnxpq.cli import main
from onnxpq.errors import ConfigError
from onnxpq.pipeline import ValidationSettings
from onnxpq.search import ESTIMATE_TRIES, FINAL_TRIES, RESCUE_TRIES, TOLERANCE_BPW, find_budget
from onnxpq.validate import check_gate, kl_divergence

BOUNDS = (0.5, 8.0)


def _curve(scale: float, rate: float = 1.5):
    """A degradation falling exponentially with the budget; ``scale`` sets where it crosses a threshold."""
    return lambda bpw: scale * math.exp(-rate * bpw)


def _boundary(scale: float, threshold: float, rate: float = 1.5) -> float:
    return math.log(scale / threshold) / rate


@pytest.mark.parametrize("final_scale", [0.3, 0.6, 1.0, 1.4])
@pytest.mark.parametrize("threshold", [0.02, 0.001])
def test_the_winner_is_within_the_tolerance_above_the_smallest_passing_budget(final_scale, threshold):
    """Estimates are pessimistic or (1.4) optimistic by a constant factor; the winner passes, is at most
    the tolerance above the true boundary of the finals, and the tries stay within their budgets."""
    estimate, final = _curve(1.0), _curve(final_scale)
    search = find_budget(BOUNDS, lambda b, kind: (final if kind == "final" else estimate)(b), threshold)
    truth = _boundary(final_scale, threshold)
    assert search.winner is not None and search.reason is None
    assert truth <= search.winner <= truth + TOLERANCE_BPW + 1e-9
    assert final(search.winner) <= threshold
    kinds = [t.kind for t in search.tries]
    assert kinds.count("estimate") <= ESTIMATE_TRIES and kinds.count("final") <= FINAL_TRIES + RESCUE_TRIES
    assert kinds == sorted(kinds, key=("estimate", "final").index)  # estimates first, then finals


def test_a_threshold_met_at_the_smallest_budget_stops_there():
    search = find_budget(BOUNDS, lambda b, kind: 1e-6, 0.01)
    assert search.winner == BOUNDS[0]
    assert [(t.bits_per_weight, t.kind) for t in search.tries] == [(8.0, "estimate"), (0.5, "estimate"), (0.5, "final")]


def test_no_passing_budget_keeps_the_least_degraded_try_and_says_why():
    search = find_budget(BOUNDS, lambda b, kind: 1.0 + 1.0 / b, 0.5)
    assert search.winner is None
    assert search.best == BOUNDS[1]
    assert "no budget up to 8.000 bits/weight" in search.reason
    assert all(not t.passed for t in search.tries)


def test_a_final_that_fails_where_the_estimates_pass_searches_upwards():
    """An optimistic estimate (the finals need a larger budget) still ends on a passing final."""
    search = find_budget(BOUNDS, lambda b, kind: (_curve(4.0) if kind == "final" else _curve(0.5))(b), 0.01)
    assert search.winner is not None
    assert _curve(4.0)(search.winner) <= 0.01
    assert any(t.kind == "final" and not t.passed for t in search.tries)


@pytest.mark.parametrize("bounds", [(2.0, 6.0), (0.5, 8.0), (3.0, 3.05)])
@pytest.mark.parametrize("offset", [0.1, 1.0, 1.9])
def test_no_try_leaves_the_range(bounds, offset):
    """A pass just above the smallest budget used to step a final below it (unreachable: the allocator raised)."""
    lo, hi = bounds
    estimate, final = (lambda b: 0.02 / (b - lo + offset)), (lambda b: 0.01 / (b - lo + offset))
    search = find_budget(bounds, lambda b, kind: (final if kind == "final" else estimate)(b), 0.15)
    assert all(lo <= t.bits_per_weight <= hi for t in search.tries)
    assert search.winner is not None and search.converged


def test_a_plateau_above_the_threshold_does_not_send_the_winner_to_the_top():
    """Finals that fail with the same degradation while the estimates pass (one layer's error dominates until
    4 bits/weight) used to end at the range's top, 8.5 bits/weight; the steps up now double until one passes."""

    def degradation(bpw: float, kind: str) -> float:
        if kind == "estimate":
            return 0.2 * math.exp(-bpw)
        return 0.0125 if bpw < 4.0 else 0.003

    search = find_budget((1.0, 8.5), degradation, 0.01)
    assert search.winner is not None and 4.0 <= search.winner <= 5.0
    assert sum(t.kind == "final" for t in search.tries) <= FINAL_TRIES + RESCUE_TRIES


def test_a_bracket_one_tolerance_wide_is_closed():
    """A final one tolerance below a pass closes the bracket, whatever the round-off of the subtraction."""
    search = find_budget((0.4, 8.1), lambda b, kind: 0.01 / b if kind == "final" else 0.012 / b, 0.0063)
    finals = [t for t in search.tries if t.kind == "final"]
    assert search.converged and any(not t.passed for t in finals)


def test_outputs_that_turn_nan_are_the_worst_degradation_and_the_search_goes_on():
    """Below 2.5 the outputs are not finite (infinite degradation, NaN from a metric): no try may land at a NaN
    budget, and the winner is within the tolerance above the real boundary (3.5)."""

    def degradation(bpw: float, kind: str) -> float:
        if bpw < 2.5:
            return math.inf if kind == "final" else math.nan
        return 0.02 / (bpw - 1.5)

    search = find_budget((1.0, 6.0), degradation, 0.01)
    assert all(math.isfinite(t.bits_per_weight) for t in search.tries)
    assert 3.5 <= search.winner <= 3.5 + TOLERANCE_BPW + 1e-9
    assert search.converged


def test_kl_of_logits_and_of_probabilities():
    rng = np.random.default_rng(0)
    a, b = rand(rng, 5, 7, 10), rand(rng, 5, 7, 10)
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    expected = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))
    assert kl_divergence(a, b) == pytest.approx(expected, rel=1e-6)  # expected: float32
    assert kl_divergence(p, q) == pytest.approx(expected, rel=1e-5)  # a softmax output is used as it is
    assert kl_divergence(a, a) == 0.0


def test_kl_reads_both_outputs_as_the_original_is_read():
    """A softmax output whose compressed rows drift from summing to 1 is still compared as probabilities: read
    as logits, a second softmax would flatten them and the KL would be meaningless."""
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    q = np.array([[0.69, 0.2, 0.1], [0.1, 0.12, 0.8]], dtype=np.float32)  # row sums 0.99 and 1.02
    expected = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))
    assert kl_divergence(p, q) == pytest.approx(expected, rel=1e-5)


def test_kl_is_a_gate_metric():
    outputs = [{"name": "y", "kl": 0.3, "top1_agreement": 0.9, "nonfinite_mismatch": 0}]
    assert check_gate(outputs, "kl", 0.5) is None
    assert "kl degradation 0.3 > --max-degradation 0.2" in check_gate(outputs, "kl", 0.2)


def _mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """Three 64-wide MatMul layers with ReLUs, then a 10-class head: class scores for top1 and kl."""
    nodes, weights, last = [], {}, "x"
    for i, width in enumerate((64, 64, 64, 10)):
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"h{i}"]))
        weights[f"w{i}"] = rand(rng, 64, width) / 8
        last = f"h{i}"
        if width != 10:
            nodes.append(helper.make_node("Relu", [last], [f"r{i}"]))
            last = f"r{i}"
    return make_model(nodes, [("x", ["n", 64])], [last], weights)


@pytest.fixture
def mlp_files(tmp_path, rng):
    onnx.save(_mlp(rng), tmp_path / "in.onnx")
    np.savez(tmp_path / "calib.npz", x=rand(rng, 96, 64))
    np.savez(tmp_path / "val.npz", x=rand(rng, 200, 64))
    return tmp_path


def _run(files, name: str, target, max_degradation: float = 0.02, metric: str = "kl"):
    return compress(
        files / "in.onnx",
        files / name,
        CompressConfig(min_elements=1024, keep_first=False, target_bpw=target),
        calibration=files / "calib.npz",
        validation=ValidationSettings(
            data=files / "val.npz", metric=metric, max_degradation=max_degradation, measure=False
        ),
    )


def test_the_searched_model_is_the_one_its_budget_gives(mlp_files):
    """The winner is written exactly as ``--target-bpw WINNER`` writes it (the recorded config holds the
    budget found), it passes the gate, and the report holds every try."""
    found = _run(mlp_files, "auto.onnx", "auto")
    search = found.report["search"]
    winner = search["winner_bits_per_weight"]
    assert winner is not None and search["metric"] == "kl" and search["max_degradation"] == 0.02
    assert found.report["config"]["target_bpw"] == winner
    assert found.report["validation"]["gate"]["failure"] is None
    assert found.report["validation"]["outputs"][0]["kl"] <= 0.02
    finals = [t for t in search["tries"] if t["kind"] == "final"]
    assert min(t["bits_per_weight"] for t in finals if t["passed"]) == winner
    assert "search" in found.report["seconds"]
    _run(mlp_files, "fixed.onnx", winner)
    assert (mlp_files / "auto.onnx").read_bytes() == (mlp_files / "fixed.onnx").read_bytes()


def test_no_passing_budget_exits_1_keeping_the_best_try(mlp_files, caplog):
    """max_abs can never reach 0 on a quantized model: the search keeps its least-degraded model and fails."""
    code = main(
        [
            *("compress", str(mlp_files / "in.onnx"), str(mlp_files / "out.onnx")),
            *("--calibration-data", str(mlp_files / "calib.npz"), "--validation-data", str(mlp_files / "val.npz")),
            *("--target-bpw", "auto", "--metric", "max_abs", "--max-degradation", "0", "--no-measure"),
            *("--min-elements", "1024", "--no-keep-first"),
        ]
    )
    assert code == 1
    assert (mlp_files / "out.onnx").exists()
    assert "search: " in caplog.text and "(final)" in caplog.text  # every try is logged (printed) as it ends
    report = json.loads((mlp_files / "out.onnx.report.json").read_text())
    assert report["search"]["winner_bits_per_weight"] is None
    assert any("found no passing budget" in w for w in report["warnings"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_degradation": None}, "needs --max-degradation"),
        ({"enabled": False}, "drop --no-validate"),
        ({"calibration": None}, "needs calibration samples"),
    ],
)
def test_a_search_without_what_it_searches_with_is_refused(mlp_files, change, message):
    settings = {"data": mlp_files / "val.npz", "max_degradation": 0.02, "measure": False}
    calibration = change.pop("calibration", mlp_files / "calib.npz")
    with pytest.raises(ConfigError, match=message):
        compress(
            mlp_files / "in.onnx",
            mlp_files / "out.onnx",
            CompressConfig(target_bpw="auto"),
            calibration=calibration,
            validation=ValidationSettings(**{**settings, **change}),
        )
    assert not (mlp_files / "out.onnx").exists()


@pytest.mark.parametrize("value", ["autox", "-1", "nan"])
def test_target_bpw_takes_a_positive_number_or_auto(tmp_path, value, capsys):
    try:
        code = main(
            ["compress", str(ROOT / "models" / "mnist_cnn.onnx"), str(tmp_path / "o.onnx"), "--target-bpw", value]
        )
    except SystemExit as exit:  # argparse refuses what is not a number
        code = exit.code
    assert code == 2
    assert "target" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_target_size_auto_records_the_size_found(mlp_files):
    result = compress(
        mlp_files / "in.onnx",
        mlp_files / "out.onnx",
        CompressConfig(min_elements=1024, keep_first=False, target_mib="auto"),
        calibration=mlp_files / "calib.npz",
        validation=ValidationSettings(data=mlp_files / "val.npz", metric="kl", max_degradation=0.05, measure=False),
    )
    mib = result.report["config"]["target_mib"]
    assert isinstance(mib, float) and result.report["config"]["target_bpw"] is None
    assert result.report["pqf"]["compressed_mib"] <= mib * (1 + 1e-9)

"""Fine-tuning: what is trained, which loss, never worse on held-out data, same graph, deterministic."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from conftest import ROOT, make_model, rand
from onnx import helper

torch = pytest.importorskip("torch")

from onnxpq import CompressConfig, compress  # noqa: E402
from onnxpq.calibration import (  # noqa: E402
    Dataset,
    load_dataset,
    run_session,
)
from onnxpq.cli import main  # noqa: E402
from onnxpq.config import FinetuneConfig  # noqa: E402
from onnxpq.errors import ConfigError  # noqa: E402
from onnxpq.finetune.codes import MovingCodes, decode_chains  # noqa: E402
from onnxpq.finetune.executor import OnnxModule  # noqa: E402
from onnxpq.finetune.training import _Average, _Mixup, _Runner, _targets, finetune, loss_kinds, trainable_constants  # noqa: E402
from onnxpq.model.files import load_model  # noqa: E402
from onnxpq.model.session import session  # noqa: E402
from onnxpq.pipeline import ValidationSettings  # noqa: E402

OFF = ValidationSettings(enabled=False)


def small_net(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> Conv -> pool -> Gemm: every kind of trainable constant, and BN statistics."""
    w = {
        "w1": rand(rng, 32, 8, 3, 3) * 0.3,
        "b1": rand(rng, 32),
        "s": 1 + 0.1 * rand(rng, 32),
        "beta": rand(rng, 32) * 0.1,
        "mean": rand(rng, 32),
        "var": np.abs(rand(rng, 32)) * 5 + 1,
        "w2": rand(rng, 32, 32, 3, 3) * 0.1,
        "fc": rand(rng, 32, 10),
        "fcb": rand(rng, 10),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "beta", "mean", "var"], ["bn"], "bn"),
        helper.make_node("Relu", ["bn"], ["r"], "relu"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], "pool"),
        helper.make_node("Flatten", ["g"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], "fc"),
    ]
    return make_model(nodes, [("x", ["N", 8, 8, 8])], ["logits"], w)


@pytest.fixture
def case(tmp_path, rng):
    """(original, compressed with a coarse 8-word codebook, calibration samples)."""
    src = tmp_path / "net.onnx"
    onnx.save(small_net(rng), src)
    config = CompressConfig(min_elements=256, keep_first=False, n_codewords=8)
    compress(src, tmp_path / "c.onnx", config, validation=OFF)
    data = Dataset({"x": rand(rng, 48, 8, 8, 8)}, "test")
    return load_model(src), load_model(tmp_path / "c.onnx"), data


def test_trainable_constants_skip_statistics_scalars_and_indices(case):
    _, compressed, _ = case
    names = trainable_constants(compressed)
    assert "w1_pq_codebook" in names and "w2_pq_codebook" in names and "b1" in names and "s" in names
    assert "mean" not in names and "var" not in names  # re-estimated, never trained
    assert not any(n.endswith(("_pq_indices", "_pq_shape")) for n in names)


def _softmax_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=-1), helper.make_node("Relu", ["x"], ["r"])]
    return make_model(nodes, [("x", [4, 5])], ["p", "r"], {})


def test_loss_kinds_follow_the_output():
    rng = np.random.default_rng(0)
    model = _softmax_model()
    probs = np.exp(rng.standard_normal((4, 5)))
    probs /= probs.sum(-1, keepdims=True)
    assert loss_kinds(model, [probs.astype(np.float32), rng.standard_normal((4, 5))]) == ["kl-probs", "kl-logits"]
    unit = rng.standard_normal((4, 5))
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    assert loss_kinds(model, [probs, unit])[1] == "cosine"
    assert loss_kinds(model, [probs, rng.standard_normal((4, 5, 6))])[1] == "mse"  # a feature map
    assert loss_kinds(model, [probs, np.zeros((4, 5), np.int64)])[1] is None
    assert loss_kinds(model, [probs, rng.standard_normal((4, 5))], "mse") == ["mse", "mse"]


def test_never_worse_on_holdout_and_same_graph(case):
    original, compressed, data = case
    result = finetune(original, compressed, data, FinetuneConfig(steps=40, lr=1e-3, eval_every=10, batch_size=8))
    report = result.report
    assert report["loss_kinds"] == {"logits": "kl-logits"}
    assert report["mixup"] is True  # float inputs blend by default
    assert report["samples"] == {"train": 43, "holdout": 5}
    curve = report["holdout_curve"]
    assert curve[0] == (0, report["loss_start"])  # the untuned model is a candidate for export
    assert report["loss_best"] == min(loss for _, loss in curve) == dict(curve)[report["best_step"]]
    assert report["loss_best"] < report["loss_start"] * 0.9  # a coarse codebook leaves room to gain
    assert report["loss_exported"] == pytest.approx(report["loss_best"], rel=0.05)  # fp16 rounding costs little
    tuned = result.model
    assert [(n.op_type, list(n.input), list(n.output)) for n in tuned.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in compressed.graph.node
    ]
    before = {t.name: t for t in compressed.graph.initializer}
    for t in tuned.graph.initializer:
        assert (t.data_type, list(t.dims)) == (before[t.name].data_type, list(before[t.name].dims))
        if t.name.endswith("_pq_indices"):
            assert t.raw_data == before[t.name].raw_data  # codes are fixed
    assert any(t.raw_data != before[t.name].raw_data for t in tuned.graph.initializer if "codebook" in t.name)


def test_a_run_that_only_gets_worse_exports_the_untuned_values(case):
    """The held-out loss cannot get worse: when every trained step is worse, step 0 is what gets exported."""
    original, compressed, data = case
    config = FinetuneConfig(steps=10, lr=10.0, eval_every=5, batch_size=8, recalibrate_bn=False)
    result = finetune(original, compressed, data, config)
    report = result.report
    assert all(loss > report["loss_start"] for step, loss in report["holdout_curve"] if step > 0)
    assert report["best_step"] == 0 and report["loss_best"] == report["loss_start"]
    assert report["loss_exported"] == pytest.approx(report["loss_start"], rel=1e-4)
    before = {t.name: t.raw_data for t in compressed.graph.initializer}
    assert all(t.raw_data == before[t.name] for t in result.model.graph.initializer)


@pytest.mark.slow
def test_feature_matching_trains_too(case):
    original, compressed, data = case
    config = FinetuneConfig(steps=30, lr=1e-3, eval_every=10, batch_size=8, features=1.0)
    report = finetune(original, compressed, data, config).report
    assert report["loss_best"] < report["loss_start"] * 0.9


def test_same_seed_same_bytes(case):
    original, compressed, data = case
    config = FinetuneConfig(steps=8, eval_every=4, batch_size=8)
    first = finetune(original, compressed, data, config, seed=3).model.SerializeToString()
    assert finetune(original, compressed, data, config, seed=3).model.SerializeToString() == first


def test_moving_average_lags_the_trained_values_and_leaves_them_in_place():
    """The average is what gets evaluated and exported; training goes on from the raw values."""
    param = torch.nn.Parameter(torch.zeros(3))
    average = _Average([param], decay=0.9)
    expected = torch.zeros(3)
    for t in range(1, 30):
        with torch.no_grad():
            param.fill_(float(t))
        average.update()
        expected += (1 - min(0.9, (1 + t) / (10 + t))) * (param.detach() - expected)  # warm-up: short runs move
    assert torch.allclose(average.values[0], expected)
    assert 20 < float(expected[0]) < 29  # behind the last value, as an average is
    with average.applied():
        assert torch.equal(param.detach(), average.values[0])
    assert torch.all(param.detach() == 29)


def test_mixup_blends_two_samples_and_asks_the_teacher_about_the_blend(case):
    original, compressed, data = case
    teacher = session(original.SerializeToString())
    labels = np.arange(48) % 10
    targets = _targets(compressed, run_session(teacher, data, original), "auto", labels, np.arange(48))
    runner = _Runner(OnnxModule(compressed), data, 16, torch.device("cpu"))
    a, b = torch.arange(8), torch.arange(8, 16)
    batch = _Mixup(teacher, np.random.default_rng(0)).batch(runner, targets, a, b)
    x, blend = data.arrays["x"], batch.feeds["x"].numpy()
    (first, lam), (second, rest) = batch.labels
    lam = lam.numpy()
    assert lam.min() >= 0 and lam.max() <= 1 and np.ptp(lam) > 0.1  # a weight per pair
    want = lam[:, None, None, None] * x[:8] + (1 - lam[:, None, None, None]) * x[8:16]
    np.testing.assert_allclose(blend, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch.teacher[0].numpy(), teacher.run(None, {"x": blend})[0], rtol=1e-6)
    np.testing.assert_array_equal(first.numpy(), labels[:8])
    np.testing.assert_array_equal(second.numpy(), labels[8:16])
    np.testing.assert_allclose(rest.numpy(), 1 - lam)


def _token_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Embedding lookup of int64 token ids, averaged, then a classifier: inputs that cannot blend."""
    weights = {"emb": rand(rng, 64, 64), "fc": rand(rng, 64, 10) * 0.2}
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"], "embed"),
            helper.make_node("ReduceMean", ["e"], ["m"], "mean", axes=[1], keepdims=0),
            helper.make_node("MatMul", ["m", "fc"], ["logits"], "fc"),
        ],
        "tokens",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 6])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_token_ids_train_without_mixup(tmp_path, rng):
    src = tmp_path / "tokens.onnx"
    onnx.save(_token_model(rng), src)
    compress(src, tmp_path / "c.onnx", CompressConfig(min_elements=256, n_codewords=8), validation=OFF)
    data = Dataset({"ids": rng.integers(0, 64, (32, 6))}, "test")
    config = FinetuneConfig(steps=20, lr=1e-3, eval_every=10, batch_size=8)
    report = finetune(load_model(src), load_model(tmp_path / "c.onnx"), data, config).report
    assert report["mixup"] is False
    assert report["loss_best"] < report["loss_start"]


def _bn_output_moments(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    module = OnnxModule(model)
    with torch.no_grad():
        out = module(["bn"], **module.feeds({"x": x}))[0].double()
    return out.mean((0, 2, 3)).numpy(), out.var((0, 2, 3), unbiased=False).numpy()


def test_batchnorm_statistics_restore_the_original_normalisation(case):
    """After re-estimation, each channel leaves BatchNorm with the original's mean and variance."""
    original, compressed, data = case
    config = FinetuneConfig(steps=1, lr=1e-12, holdout=0.0)
    tuned = finetune(original, compressed, data, config).model
    x = data.arrays["x"]
    want_mean, want_var = _bn_output_moments(original, x)
    got_mean, got_var = _bn_output_moments(tuned, x)
    before_mean, _ = _bn_output_moments(compressed, x)
    assert np.abs(before_mean - want_mean).max() > 1e-2  # quantization did move them
    np.testing.assert_allclose(got_mean, want_mean, atol=2e-3)
    np.testing.assert_allclose(got_var, want_var, rtol=2e-3)


def test_labels_must_match_the_samples(case):
    original, compressed, data = case
    with pytest.raises(ConfigError, match="3 labels for 48"):
        finetune(original, compressed, data, FinetuneConfig(steps=1), labels=np.zeros(3, np.int64))


def test_labels_add_cross_entropy(case):
    original, compressed, data = case
    labels = np.random.default_rng(0).integers(0, 10, 48)
    plain = finetune(original, compressed, data, FinetuneConfig(steps=1, holdout=0.0)).report
    with_labels = finetune(original, compressed, data, FinetuneConfig(steps=1, holdout=0.0), labels=labels).report
    assert with_labels["loss_exported"] > plain["loss_exported"] + 1  # random labels: cross-entropy ≈ log(10)


@pytest.mark.slow
def test_compress_with_finetune_mnist(tmp_path):
    """Through the pipeline: report section, validation on the tuned file, accuracy not lost."""
    config = CompressConfig(block_size="large", n_codewords=64, finetune=FinetuneConfig(steps=20, eval_every=10))
    result = compress(
        ROOT / "models/mnist_cnn.onnx",
        tmp_path / "m.onnx",
        config,
        calibration=ROOT / "models/mnist_calib.npz",
        validation=ValidationSettings(data=ROOT / "models/mnist_test.npz", max_samples=1000, measure=False),
    )
    tuned = result.report["finetune"]
    assert tuned["steps"] == 20 and tuned["loss_best"] < tuned["loss_start"]  # 20 steps do improve MNIST
    assert result.report["validation"]["outputs"][0]["top1_agreement"] > 0.95


def test_unsupported_graph_keeps_untuned_model(tmp_path, rng):
    w = {"w": rand(rng, 32, 16, 3, 3)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], "conv", pads=[1, 1, 1, 1]),
        helper.make_node("LRN", ["c"], ["y"], "lrn", size=3),
    ]
    src = tmp_path / "lrn.onnx"
    onnx.save(make_model(nodes, [("x", [2, 16, 6, 6])], ["y"], w), src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rand(rng, 8, 16, 6, 6))
    config = CompressConfig(min_elements=64, keep_first=False, finetune=FinetuneConfig(steps=2))
    with pytest.warns(UserWarning, match="fine-tuning skipped.*LRN"):
        result = compress(src, tmp_path / "out.onnx", config, calibration=calib, validation=OFF)
    assert result.report["finetune"] is None and (tmp_path / "out.onnx").exists()


def test_cli_finetune_needs_calibration(tmp_path, capsys):
    code = main(["compress", str(ROOT / "models/mnist_cnn.onnx"), str(tmp_path / "o.onnx"), "--finetune-steps", "5"])
    assert code == 2
    assert "--calibration-data" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"time_s": -1.0}, "time"),
        ({"holdout": 1.0}, "holdout"),
        ({"loss": "l1"}, "loss"),
        ({"features": -1.0}, "features"),
        ({"ema": 1.0}, "ema"),
        ({"ema": -0.5}, "ema"),
    ],
)
def test_bad_finetune_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**kwargs)


def test_executor_disagreeing_with_onnxruntime_is_refused(case, monkeypatch):
    """A wrong operator in the table must not train the model towards a wrong function."""
    from onnxpq.errors import UnsupportedGraphError
    from onnxpq.finetune import executor

    monkeypatch.setitem(executor.TORCH_OPS, "Relu", lambda attrs, x: x)
    original, compressed, data = case
    with pytest.raises(UnsupportedGraphError, match="differs from onnxruntime"):
        finetune(original, compressed, data, FinetuneConfig(steps=1))


@pytest.mark.slow
def test_cli_finetune_without_mixup_or_average(tmp_path):
    out = tmp_path / "o.onnx"
    args = ["compress", str(ROOT / "models/mnist_cnn.onnx"), str(out), "--no-validate", "--block-size", "large"]
    args += ["--calibration-data", str(ROOT / "models/mnist_calib.npz"), "--finetune-steps", "3", "--finetune-no-mixup"]
    assert main([*args, "--finetune-ema", "0"]) == 0
    tuned = json.loads(out.with_name(out.name + ".report.json").read_text())["finetune"]
    assert tuned["mixup"] is False and tuned["ema"] == 0 and tuned["steps"] == 3


def test_a_state_batched_on_axis_1_and_a_scalar_input_train(tmp_path, rng):
    """Silero VAD's inputs and outputs: a recurrent state [2, batch, 128] with one slice per sample, a scalar,
    and the next state as an output. Every micro-batch must carry each sample's own state on axis 1 (the
    executor check compares the first one with onnxruntime's), the scalar as a 0-d tensor, and mixup must
    blend states too; the next state, with no row per sample on its first axis, stays out of the loss (it
    raised IndexError)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], "mm"),
        helper.make_node("Gather", ["state", "zero"], ["h"], "first", axis=0),
        helper.make_node("MatMul", ["h", "r"], ["hr"], "rec"),
        helper.make_node("Mul", ["hr", "gain"], ["hg"], "scale"),
        helper.make_node("Add", ["xw", "hg"], ["y"], "add"),
        helper.make_node("Mul", ["state", "gain"], ["next_state"], "decay"),
    ]
    weights = {"w": rand(rng, 32, 16), "r": rand(rng, 16, 16), "zero": np.array(0, np.int64)}
    inputs = [("x", ["batch", 32]), ("state", [2, "batch", 16]), ("gain", [])]
    model = make_model(nodes, inputs, ["y", "next_state"], weights)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    compress(src, tmp_path / "c.onnx", CompressConfig(min_elements=256, n_codewords=8), validation=OFF)
    np.savez(tmp_path / "d.npz", x=rand(rng, 24, 32), state=rand(rng, 2, 24, 16), gain=np.array(0.5, np.float32))
    data = load_dataset(tmp_path / "d.npz", model)
    assert data.sample_axes == {"state": 1}
    config = FinetuneConfig(steps=6, lr=1e-3, eval_every=3, batch_size=8)
    result = finetune(model, load_model(tmp_path / "c.onnx"), data, config)
    assert result.report["mixup"] is True
    assert result.report["loss_kinds"] == {"y": "kl-logits", "next_state": None}
    assert sum(result.report["samples"].values()) == 24
    tuned = run_session(session(result.model.SerializeToString()), data, result.model)[0]
    assert tuned.shape == (24, 16) and np.isfinite(tuned).all()


def test_an_fp16_model_is_tuned_not_skipped(tmp_path, rng):
    """fp16 codebooks train as float32 but must enter the graph as fp16: a float32 bias beside fp16
    activations made the executor fail, and fine-tuning was skipped with a warning."""
    weights = {
        "w": (rand(rng, 16, 8, 3, 3) / 4).astype(np.float16),
        "b": (rand(rng, 16) / 10).astype(np.float16),
        "fc": (rand(rng, 16, 10) / 4).astype(np.float16),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], "conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], "pool"),
        helper.make_node("Flatten", ["p"], ["f"], "flat"),
        helper.make_node("MatMul", ["f", "fc"], ["logits"], "head"),
    ]
    model = make_model(nodes, [("x", ["n", 8, 6, 6])], ["logits"], weights, elem_type=onnx.TensorProto.FLOAT16)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rand(rng, 24, 8, 6, 6).astype(np.float16))
    config = CompressConfig(min_elements=64, n_codewords=8, finetune=FinetuneConfig(steps=4, eval_every=2))
    result = compress(tmp_path / "m.onnx", tmp_path / "c.onnx", config, calibration=tmp_path / "d.npz", validation=OFF)
    assert not [w for w in result.report["warnings"] if "fine-tuning skipped" in w]
    assert result.report["finetune"]["trainable"]["tensors"] > 0


def test_moving_codes_start_where_the_codes_are(case):
    """The latent weights start at the decoded weights, so re-assigning before any step moves no code."""
    _, compressed, _ = case
    module = OnnxModule(compressed, trainable_constants(compressed))
    chains = decode_chains(compressed)
    assert {c.axis for c in chains} == {0, 1}  # the convs' kernel-shaped codebooks and the Gemm's strided one
    moving = MovingCodes(module, chains)
    assert len(moving.chains) == len(chains) == 3
    before = moving.codes()
    assert moving.reassign() == 0
    assert all(np.array_equal(before[n], v) for n, v in moving.codes().items())


def test_moving_codes_are_exported_and_run_in_onnxruntime(case):
    original, compressed, data = case
    config = FinetuneConfig(steps=40, lr=3e-2, eval_every=10, batch_size=8, codes=True, ema=0)
    result = finetune(original, compressed, data, config)
    report = result.report
    assert report["codes_moved"] > 0
    assert report["moving_codes"] == {"chains": 3, "indices": 3}
    tuned = result.model
    before = {t.name: t for t in compressed.graph.initializer}
    for t in tuned.graph.initializer:
        assert (t.data_type, list(t.dims)) == (before[t.name].data_type, list(before[t.name].dims))
    if report["best_step"] > 0:
        assert any(t.raw_data != before[t.name].raw_data for t in tuned.graph.initializer if "indices" in t.name)
    x = np.random.default_rng(1).standard_normal((8, 8, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ours = OnnxModule(tuned)(x=torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(session(tuned.SerializeToString()).run(None, {"x": x})[0], ours, rtol=1e-4, atol=1e-4)


def test_moving_codes_keep_uint4_indices(tmp_path, rng):
    """A model with 4-bit indices (opset 21, k <= 16) fine-tunes, and its moved codes stay UINT4."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], "mm1"), helper.make_node("Relu", ["h"], ["r"], "relu")]
    nodes.append(helper.make_node("MatMul", ["r", "w2"], ["y"], "mm2"))
    model = make_model(nodes, [("x", ["N", 32])], ["y"], {"w1": rand(rng, 32, 64), "w2": rand(rng, 64, 8)}, opset=21)
    onnx.save(model, tmp_path / "m.onnx")
    compress(tmp_path / "m.onnx", tmp_path / "c.onnx", CompressConfig(min_elements=256, n_codewords=16), validation=OFF)
    compressed = load_model(tmp_path / "c.onnx")
    data = Dataset({"x": rand(rng, 48, 32)}, "test")
    config = FinetuneConfig(steps=30, lr=3e-2, eval_every=10, batch_size=8, codes=True)
    tuned = finetune(model, compressed, data, config).model
    indices = [t for t in tuned.graph.initializer if t.name.endswith("_pq_indices")]
    assert indices and all(t.data_type == onnx.TensorProto.UINT4 for t in indices)
    x = rand(rng, 4, 32)
    with torch.no_grad():
        ours = OnnxModule(tuned)(x=torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(session(tuned.SerializeToString()).run(None, {"x": x})[0], ours, rtol=1e-4, atol=1e-4)


def test_codes_stay_without_a_held_out_slice_or_outside_tunable(case):
    """Nothing would stop moved codes that make the model worse without held-out samples; and only what
    the caller may change moves."""
    original, compressed, data = case
    before = {t.name: t.raw_data for t in compressed.graph.initializer if t.name.endswith("_pq_indices")}
    config = FinetuneConfig(steps=20, lr=3e-2, eval_every=10, batch_size=8, codes=True, holdout=0.0)
    result = finetune(original, compressed, data, config)
    assert result.report["moving_codes"].startswith("skipped")
    tunable = set(trainable_constants(compressed))  # the codebooks, not the indices
    result = finetune(original, compressed, data, replace(config, holdout=0.1), tunable=tunable)
    assert result.report["moving_codes"] == {"chains": 0, "indices": 0}
    assert all(t.raw_data == before[t.name] for t in result.model.graph.initializer if t.name in before)

import numpy as np
import onnx
import pytest
from conftest import conv_model, make_model, rand, run
from onnx import TensorProto, helper, numpy_helper

from onnxpq import ConfigError
from onnxpq.calibration import batches, load_dataset, random_dataset


@pytest.fixture
def model():
    m = conv_model(8, 4)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return m


def test_npz_keyed_by_input_name(model, tmp_path, rng):
    np.savez(tmp_path / "d.npz", x=rand(rng, 10, 4, 12, 12))
    ds = load_dataset(tmp_path / "d.npz", model, max_samples=6)
    assert ds.n_samples == 6 and len(ds.sha256()) == 64
    assert [len(b["x"]) for b in batches(ds, model, batch_size=4)] == [4, 2]


def test_npz_errors_name_the_problem(model, tmp_path, rng):
    np.savez(tmp_path / "wrong_key.npz", images=rand(rng, 2, 4, 12, 12))
    with pytest.raises(ConfigError, match=r"no data for model input\(s\) \['x'\]"):
        load_dataset(tmp_path / "wrong_key.npz", model)
    np.savez(tmp_path / "rank.npz", x=rand(rng, 4, 12, 12))
    with pytest.raises(ConfigError, match="has rank 3"):
        load_dataset(tmp_path / "rank.npz", model)
    np.savez(tmp_path / "dtype.npz", x=np.zeros((2, 4, 12, 12), np.int64))
    with pytest.raises(ConfigError, match="is int64, the model expects float32"):
        load_dataset(tmp_path / "dtype.npz", model)
    (tmp_path / "d.txt").write_text("")
    with pytest.raises(ConfigError, match="unknown calibration format"):
        load_dataset(tmp_path / "d.txt", model)


def test_npy_only_for_single_input_models(tmp_path, rng):
    nodes = [helper.make_node("Add", ["a", "b"], ["y"], "add")]
    two = make_model(nodes, [("a", [1, 4]), ("b", [1, 4])], ["y"], {})
    np.save(tmp_path / "d.npy", rand(rng, 3, 4))
    with pytest.raises(ConfigError, match="has 2 inputs"):
        load_dataset(tmp_path / "d.npy", two)


def test_test_data_set_folders(model, tmp_path, rng):
    for i in range(3):
        folder = tmp_path / f"test_data_set_{i}"
        folder.mkdir()
        tensor = numpy_helper.from_array(rand(rng, 1, 4, 12, 12), "x")
        (folder / "input_0.pb").write_bytes(tensor.SerializeToString())
    assert load_dataset(tmp_path, model).n_samples == 3


def test_calibration_data_reader_and_iterables(model, rng):
    class Reader:
        def __init__(self):
            self.items = [{"x": rand(rng, 1, 4, 12, 12)} for _ in range(5)]
            self.rewind()

        def rewind(self):
            self.it = iter(self.items)

        def get_next(self):
            return next(self.it, None)

    assert load_dataset(Reader(), model).n_samples == 5
    assert load_dataset([{"x": rand(rng, 2, 4, 12, 12)}] * 2, model).n_samples == 4


def test_random_dataset_follows_declared_shapes_and_types(rng):
    nodes = [helper.make_node("Identity", ["ids"], ["y"], "id")]
    m = make_model(nodes, [], ["y"], {})
    m.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]))
    ds = random_dataset(m, 3, rng, dims={"seq": 7})
    assert ds.arrays["ids"].shape == (3, 7) and ds.arrays["ids"].dtype == np.int64
    assert set(np.unique(ds.arrays["ids"])) <= {0, 1}


def _stateful_model(rng) -> onnx.ModelProto:
    """y = x @ w + state[0] * gain: a streaming cell whose recurrent state is batched on axis 1, as Silero VAD's."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], "mm"),
        helper.make_node("Gather", ["state", "zero"], ["h"], "first", axis=0),
        helper.make_node("Mul", ["h", "gain"], ["hg"], "scale"),
        helper.make_node("Add", ["xw", "hg"], ["y"], "add"),
    ]
    weights = {"w": rand(rng, 6, 4), "zero": np.array(0, np.int64)}
    model = make_model(nodes, [("x", ["batch", 6]), ("state", [2, "batch", 4]), ("gain", [])], ["y"], weights)
    return model


def _one_per_call_model(rng) -> onnx.ModelProto:
    """The stateful cell as a model that runs one sample per call: x [1, 6], state [2, 1, 4] (Silero's
    OpenVINO export fixes every batch dim at 1)."""
    model = _stateful_model(rng)
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "batch":
                dim.dim_value = 1
    return model


def _expected(model, x, state, gain) -> np.ndarray:
    """Each sample run alone, with its own state: what the batched runs must reproduce."""
    return np.concatenate([run(model, {"x": x[i : i + 1], "state": state[:, i : i + 1], "gain": gain})[0]
                           for i in range(len(x))])  # fmt: skip


def test_state_batched_on_a_later_axis_is_sliced_with_its_samples(tmp_path, rng):
    """state (2, n, 4) beside x (n, 6): sample i's state is state[:, i]; heads and runs keep the pairs."""
    model = _stateful_model(rng)
    x, state, gain = rand(rng, 10, 6), rand(rng, 2, 10, 4), np.array(0.5, np.float32)
    np.savez(tmp_path / "d.npz", x=x, state=state, gain=gain)
    data = load_dataset(tmp_path / "d.npz", model)
    assert data.sample_axes == {"state": 1} and data.n_samples == 10
    got = np.concatenate([run(model, feed)[0] for feed in batches(data.skip(3), model, batch_size=4)])
    np.testing.assert_allclose(got, _expected(model, x[3:], state[:, 3:], gain), rtol=1e-6)


def test_reader_feeds_of_a_later_axis_state_join_on_that_axis(rng):
    """An onnxruntime CalibrationDataReader yields each run's feed as the model takes it: state (2, 1, 4)."""
    model = _stateful_model(rng)
    x, state, gain = rand(rng, 5, 6), rand(rng, 2, 5, 4), np.array(2.0, np.float32)
    feeds = [{"x": x[i : i + 1], "state": state[:, i : i + 1], "gain": gain} for i in range(5)]
    data = load_dataset(feeds, model)
    assert data.sample_axes == {"state": 1}
    got = np.concatenate([run(model, feed)[0] for feed in batches(data, model, batch_size=2)])
    np.testing.assert_allclose(got, _expected(model, x, state, gain), rtol=1e-6)


def test_a_fixed_one_state_axis_holds_one_slice_per_sample(tmp_path, rng):
    """state (2, n, 4) for a declared [2, 1, 4] beside x (n, 6) for [1, 6]: without rule 4 for fixed-1 axes
    this was refused ("axis 1 is 5, the model expects 1") and only a zero state could be given."""
    model = _one_per_call_model(rng)
    x, state, gain = rand(rng, 5, 6), rand(rng, 2, 5, 4), np.array(0.5, np.float32)
    np.savez(tmp_path / "d.npz", x=x, state=state, gain=gain)
    data = load_dataset(tmp_path / "d.npz", model)
    assert data.sample_axes == {"state": 1} and data.n_samples == 5
    got = np.concatenate([run(model, feed)[0] for feed in batches(data, model, batch_size=4)])
    np.testing.assert_allclose(got, _expected(model, x, state, gain), rtol=1e-6)


def test_reader_feeds_of_a_fixed_one_state_join_on_that_axis(rng):
    """Per-call feeds of a one-sample-per-call model: state pieces (2, 1, 4) join to (2, n, 4), not (2n, 1, 4)."""
    model = _one_per_call_model(rng)
    x, state, gain = rand(rng, 4, 6), rand(rng, 2, 4, 4), np.array(2.0, np.float32)
    data = load_dataset([{"x": x[i : i + 1], "state": state[:, i : i + 1], "gain": gain} for i in range(4)], model)
    assert data.sample_axes == {"state": 1}
    got = np.concatenate([run(model, feed)[0] for feed in batches(data, model, batch_size=2)])
    np.testing.assert_allclose(got, _expected(model, x, state, gain), rtol=1e-6)


def test_a_fixed_one_state_whose_slices_fit_no_sample_count_is_refused(tmp_path, rng):
    model = _one_per_call_model(rng)
    np.savez(tmp_path / "d.npz", x=rand(rng, 5, 6), state=rand(rng, 2, 3, 4), gain=np.array(1.0, np.float32))
    with pytest.raises(ConfigError, match=r"'state' holds 3 slices on axis 1, declared 1 there .* hold 5 samples"):
        load_dataset(tmp_path / "d.npz", model)


def test_state_given_once_stays_shared(tmp_path, rng):
    model = _stateful_model(rng)
    x, state = rand(rng, 4, 6), rand(rng, 2, 1, 4)
    np.savez(tmp_path / "d.npz", x=x, state=state, gain=np.array(1.0, np.float32))
    data = load_dataset(tmp_path / "d.npz", model)
    assert data.sample_axes == {} and data.is_shared("state")
    runs = list(batches(data, model, batch_size=4))
    assert len(runs) == 4 and all(feed["state"] is data.arrays["state"] for feed in runs)


def test_a_later_axis_state_is_cut_with_the_samples_it_goes_with(tmp_path, rng):
    """--calibration-samples 4 on a file of 6: the reader keeps the first 4 rows of x and of state's axis 1."""
    model = _stateful_model(rng)
    x, state = rand(rng, 6, 6), rand(rng, 2, 6, 4)
    np.savez(tmp_path / "d.npz", x=x, state=state, gain=np.array(1.0, np.float32))
    data = load_dataset(tmp_path / "d.npz", model, max_samples=4)
    assert data.n_samples == 4 and data.sample_axes == {"state": 1}
    np.testing.assert_array_equal(np.moveaxis(data.arrays["state"], 0, 1), state[:, :4])

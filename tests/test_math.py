"""The math pieces against their definitions: pair costs, merged weights, im2col, BN folding."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import run
from onnxzip import pairing
from onnxzip.canonicalize import canonicalize
from onnxzip.hessian import Moments, im2col
from onnxzip.lowrank import LowRankHessian


def _spd(d: int, rng) -> np.ndarray:
    x = rng.normal(size=(4 * d, d))
    return x.T @ x / len(x) + 1e-3 * np.eye(d)


def test_all_pair_costs_from_one_product_equal_the_per_pair_definition():
    rng = np.random.default_rng(0)
    d, na, nb = 12, 7, 9
    ha, hb = _spd(d, rng), _spd(d, rng)
    a, b = rng.normal(size=(d, na)), rng.normal(size=(d, nb))
    fast = pairing.pair_costs(a, b, ha, hb)
    slow = pairing.pair_cost_loop(a, b, ha, hb)
    np.testing.assert_allclose(fast, slow, rtol=1e-8, atol=1e-10)
    # a few columns at a time (how a 25,088-input layer bounds its memory): the same costs
    np.testing.assert_allclose(pairing.pair_costs(a, b, ha, hb, block=3), slow, rtol=1e-8, atol=1e-10)


def test_low_rank_hessians_give_the_dense_results_through_their_rows():
    """Fewer rows than inputs: pair costs, damping and solves through the rows (Woodbury) equal
    the ones on the formed d x d matrices, also for a shared (twin) row set and a wider union space."""
    rng = np.random.default_rng(3)
    d, n = 40, 6
    xa, xb = rng.normal(size=(12, d)), rng.normal(size=(15, d))
    low = {"a": LowRankHessian.of_rows(xa, 0.3), "b": LowRankHessian.of_rows(xb, 0.7),
           "twin": LowRankHessian.of_rows(xa, 0.7)}
    dense = {"a": 0.3 * xa.T @ xa, "b": 0.7 * xb.T @ xb, "twin": 0.7 * xa.T @ xa}
    a, b = rng.normal(size=(d, n)), rng.normal(size=(d, n))
    for other in ("b", "twin"):
        la, lo, da, do = (pairing.add_identity(h, pairing.damping_amount(h, 1e-2))
                          for h in (low["a"], low[other], dense["a"], dense[other]))
        assert pairing.damping_amount(low["a"], 1e-2) == pytest.approx(pairing.damping_amount(dense["a"], 1e-2))
        np.testing.assert_allclose(pairing.pair_costs(a, b, la, lo), pairing.pair_costs(a, b, da, do), rtol=1e-8)
        np.testing.assert_allclose(pairing.SPDSolver(la + lo)(a), np.linalg.solve(da + do, a), rtol=1e-7)
    assert len((low["a"] + low["twin"]).terms) == 1  # one row set, coefficients added
    cols = np.array([0, 2, 3, 5] + list(range(7, d + 3)))
    wide = np.zeros((d + 3, d + 3))
    wide[np.ix_(cols, cols)] = dense["b"]
    np.testing.assert_allclose(low["b"].embed(cols, d + 3) @ np.eye(d + 3), wide, atol=1e-12)


def test_assignment_finds_a_hidden_permutation():
    rng = np.random.default_rng(1)
    d, n = 10, 30
    h = _spd(d, rng)
    a = rng.normal(size=(d, n))
    perm = rng.permutation(n)
    rows, cols = pairing.assign(pairing.pair_costs(a, a[:, perm], h, h))
    assert np.array_equal(perm[cols], rows)


def test_merged_weights_are_the_hessian_weighted_average():
    """MTZ eq. 16: w = (H_A + H_B)^-1 (H_A a + H_B b); with equal Hessians it is the plain mean."""
    rng = np.random.default_rng(2)
    d = 8
    ha, hb = _spd(d, rng), _spd(d, rng)
    a, b = rng.normal(size=(d, 1)), rng.normal(size=(d, 1))
    w = pairing.merged_weights(ha + hb, ha @ a + hb @ b)
    np.testing.assert_allclose((ha + hb) @ w, ha @ a + hb @ b, rtol=1e-10)
    np.testing.assert_allclose(pairing.merged_weights(2 * ha, ha @ a + ha @ b), (a + b) / 2, rtol=1e-10)


def test_moments_accumulate_in_chunks_like_one_big_product():
    """Chunked float32 products summed in float64 match one float64 product to float32 precision."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20000, 5)).astype(np.float32), rng.normal(size=(20000, 3)).astype(np.float32)
    m = Moments(5, 3)
    m.update(x[:7000], y[:7000])
    m.update(x[7000:], y[7000:])
    xb = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
    np.testing.assert_allclose(m.gram, xb.T @ xb, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(m.cross, xb.T @ y, rtol=1e-5, atol=1e-2)
    assert m.rows == 20000


def test_float32_chunk_grams_match_the_exact_float64_gram():
    """The Gram as a merge accumulates it (float32 products per chunk of rows, float64 sums across chunks,
    on one BLAS thread for narrow layers or the default) against the exact path (every row, float64):
    relative Frobenius error below 1e-6 on well-scaled inputs (post-ReLU, a 3x3x16 convolution's 144
    inputs, 40,000 rows in uneven batches); the cross moments likewise."""
    from onnxzip.blas import blas_threads

    rng = np.random.default_rng(11)
    d, rows = 144, 40000
    x = np.maximum(rng.normal(size=(rows, d)), 0).astype(np.float32)
    y = rng.normal(size=(rows, 16)).astype(np.float32)
    xb = np.hstack([x.astype(np.float64), np.ones((rows, 1))])
    exact_gram, exact_cross = xb.T @ xb, xb.T @ y.astype(np.float64)
    for threads in (1, None):
        m = Moments(d, 16)
        with blas_threads(threads) if threads else contextlib.nullcontext():
            for start in range(0, rows, 13000):
                m.update(x[start:start + 13000], y[start:start + 13000])
        assert m.rows == rows
        assert np.linalg.norm(m.gram - exact_gram) / np.linalg.norm(exact_gram) < 1e-6
        assert np.linalg.norm(m.cross - exact_cross) / np.linalg.norm(exact_cross) < 1e-6
        np.testing.assert_array_equal(m.gram, m.gram.T)  # symmetric, not just close


def _im2col_reference(x, kernel, strides, pads, dilations):
    """im2col as strided views (numpy's sliding_window_view), independent of hessian.im2col's loop."""
    from numpy.lib.stride_tricks import sliding_window_view

    rank = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(pads[:rank], pads[rank:])))
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    win = sliding_window_view(xp, span, axis=tuple(range(2, rank + 2)))  # (b, C, *positions, *span)
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dilations)]  # (b, C, *out, *kernel)
    perm = (0,) + tuple(range(2, rank + 2)) + (1,) + tuple(range(rank + 2, 2 * rank + 2))
    return win.transpose(perm).reshape(-1, x.shape[1] * int(np.prod(kernel)))


@pytest.mark.parametrize("shape, kernel, strides, pads, dilations", [
    ((3, 4, 9, 7), (3, 2), (1, 1), (1, 0, 1, 1), (1, 1)),
    ((2, 5, 10, 9), (3, 3), (2, 1), (0, 1, 2, 0), (2, 1)),
    ((2, 3, 11), (5,), (3,), (2, 1), (1,)),
    ((2, 2, 5, 6, 4), (3, 1, 2), (1, 2, 1), (1, 0, 0, 1, 0, 1), (1, 1, 2)),
])
def test_im2col_patches_equal_the_strided_view_reference_exactly(shape, kernel, strides, pads, dilations):
    """Every patch and every gathered subset of patches is identical to the strided-view reference, for
    1-D, 2-D and 3-D convolutions with strides, asymmetric pads and dilations."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape).astype(np.float32)
    ref = _im2col_reference(x, kernel, strides, pads, dilations)
    np.testing.assert_array_equal(im2col(x, kernel, strides, pads, dilations), ref)
    index = np.sort(rng.choice(len(ref), size=len(ref) // 3, replace=False))
    np.testing.assert_array_equal(im2col(x, kernel, strides, pads, dilations, index), ref[index])


def test_auto_rows_scale_with_the_layer_width():
    """hessian_rows 'auto': 64 rows per input (d + 1) within [16384, 32768], never more than there are,
    never fewer than 16 per input; a number is still a cap and None still every row."""
    from onnxzip.hessian import auto_rows, kept_rows
    from onnxzip.options import MergeOptions

    assert MergeOptions().hessian_rows == 32768 and MergeOptions(hessian_rows="auto").hessian_rows == "auto"
    assert [auto_rows(d) for d in (9, 144, 288, 576, 4608)] == [16384, 16384, 18496, 32768, 32768]
    assert kept_rows(10**6, 288, "auto") == 18496
    assert kept_rows(5000, 144, "auto") == 5000  # fewer rows than that: all of them
    assert kept_rows(10**6, 576, "auto") == 32768
    assert kept_rows(10**6, 4608, "auto") == kept_rows(10**6, 4608, 32768) == 16 * 4609  # the floor: 16 per input
    assert kept_rows(10**6, 144, 32768) == 32768 and kept_rows(10**6, 144, None) == 10**6


def _conv_model(w, b, strides, pads, dilations, shape):
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=strides, pads=pads, dilations=dilations)],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_im2col_times_weights_equals_onnxruntime_conv():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 4, 9, 7)).astype(np.float32)
    w = rng.normal(size=(5, 4, 3, 2)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    for strides, pads, dilations in [([1, 1], [1, 0, 1, 1], [1, 1]), ([2, 1], [0, 1, 2, 0], [2, 1])]:
        y = run(_conv_model(w, b, strides, pads, dilations, list(x.shape)), {"x": x})["y"]
        cols = im2col(x, (3, 2), strides, pads, dilations)
        mine = (cols @ w.reshape(5, -1).T + b).reshape(3, y.shape[2], y.shape[3], 5).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(mine, y, rtol=1e-4, atol=1e-4)


def test_sampled_rows_are_exactly_the_chosen_patches_and_targets_batch_after_batch():
    """hessian_rows: the gathered patches/targets equal the full im2col rows at those indices, each
    batch gets its own slice of one fixed subset, and the subset depends only on the seed."""
    from onnxzip.hessian import RowSample, kept_rows, layer_rows, output_rows, rows_per_sample

    rng = np.random.default_rng(7)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    x = f(5, 4, 9, 7)
    model = _conv_model(f(6, 4, 3, 3), f(6), [2, 1], [1, 1, 0, 1], [1, 1], ["N", 4, 9, 7])
    layer = canonicalize(model, "conv", {"x": x[:2]}).layers[0]
    y = run(model, {"x": x})["y"]
    per_sample = rows_per_sample(layer, x)
    assert per_sample == y.shape[2] * y.shape[3]
    total = len(x) * per_sample
    assert kept_rows(total, 36, None) == total
    assert kept_rows(total, 36, 1) == min(total, 16 * 37)  # never fewer than 16 rows per input
    sample = RowSample(total, 50, per_sample, (0, 3))
    assert len(sample.index) == 50 and np.all(np.diff(sample.index) > 0)
    np.testing.assert_array_equal(sample.index, RowSample(total, 50, per_sample, (0, 3)).index)
    assert not np.array_equal(sample.index, RowSample(total, 50, per_sample, (1, 3)).index)
    assert RowSample(total, total, per_sample, (0, 3)).batch(slice(0, 2)) is None  # all rows: no gather
    full_x, full_y = layer_rows(layer, x), output_rows(layer, y)
    got_x, got_y = [], []
    for part in (slice(0, 2), slice(2, 5)):
        index = sample.batch(part)
        got_x.append(layer_rows(layer, x[part], index))
        got_y.append(output_rows(layer, y[part], index))
    np.testing.assert_array_equal(np.concatenate(got_x), full_x[sample.index])
    np.testing.assert_array_equal(np.concatenate(got_y), full_y[sample.index])


def test_canonical_form_folds_batchnorm_and_matmul_add_exactly():
    """Conv+BN and MatMul+Add (as skl2onnx writes) become Conv/Gemm layers with the same outputs."""
    rng = np.random.default_rng(5)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    inits = {"w": f(6, 3, 3, 3), "g": f(6), "beta": f(6), "mean": f(6), "var": np.abs(f(6)) + 0.1,
             "m": f(6 * 4 * 4, 5), "bias": f(1, 5), "shape": np.array([-1, 96], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["n"], epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "m"], ["mm"]),
             helper.make_node("Add", ["mm", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              initializer=[onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = f(4, 3, 8, 8)
    canon = canonicalize(model, "test", {"x": x[:2]})
    ops = [n.op for n in canon.graph.nodes]
    assert ops == ["Conv", "Relu", "Flatten", "Gemm"]
    assert [l.kind for l in canon.layers] == ["conv", "linear"]
    np.testing.assert_allclose(run(canon.to_onnx(), {"x": x})["y"], run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_device_side_hessians_equal_the_numpy_ones():
    """The ONNX graph that builds X^T X and X^T Y inside onnxruntime (the GPU path) agrees with numpy."""
    from conftest import case
    from onnxzip.devicegram import DeviceMoments
    from onnxzip.hessian import layer_rows, output_rows

    rng = np.random.default_rng(6)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    x = f(5, 4, 9, 7)
    model = _conv_model(f(6, 4, 3, 3), f(6), [2, 1], [1, 1, 0, 1], [1, 1], ["N", 4, 9, 7])
    canon = canonicalize(model, "conv", {"x": x[:2]})
    layer = canon.layers[0]
    y = run(model, {"x": x})["y"]
    host, device = Moments(36, 6), DeviceMoments(layer, True, ["CPUExecutionProvider"])
    for part in (slice(0, 2), slice(2, 5)):
        host.update(layer_rows(layer, x[part]), output_rows(layer, y[part]))
        device.update_batch(x[part], output_rows(layer, y[part]))
    assert device.rows == host.rows
    np.testing.assert_allclose(device.gram, host.gram, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(device.cross, host.cross, rtol=1e-4, atol=1e-3)
    # a row subset (hessian_rows): the device gathers the same rows the host does
    from onnxzip.hessian import RowSample
    sample = RowSample(host.rows, 40, host.rows // len(x), (0, 0))
    host, device = Moments(36, 6), DeviceMoments(layer, True, ["CPUExecutionProvider"], sampled=True)
    for part in (slice(0, 2), slice(2, 5)):
        index = sample.batch(part)
        host.update(layer_rows(layer, x[part], index), output_rows(layer, y[part], index))
        device.update_batch(x[part], output_rows(layer, y[part], index), index)
    assert device.rows == host.rows == 40
    np.testing.assert_allclose(device.gram, host.gram, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(device.cross, host.cross, rtol=1e-4, atol=1e-3)
    import onnxzip
    d = case("cnn_perm_legacy")
    merged, _ = onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"),
                              {"device_hessians": True})
    test = dict(np.load(d / "test.npz"))
    ref = run(d / "a.onnx", test)["logits"]
    got = run(merged, test)["b/logits"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-3


def test_per_channel_hessian_is_the_kronecker_form_and_recovers_a_permutation():
    """hessian='channel': H ~ H_c (x) I_kk from each patch's centre pixel; positive semi-definite."""
    from onnxzip.hessian import KroneckerMoments

    rng = np.random.default_rng(7)
    x = np.abs(rng.normal(size=(6, 3, 8, 8))).astype(np.float32)  # non-negative, like ReLU outputs
    rows = im2col(x, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1])
    kron, full = KroneckerMoments(3, 9), Moments(27)
    kron.update(rows)
    full.update(rows)
    hk, hf = kron.hessian(1.0), full.hessian(1.0)
    centre = [c * 9 + 4 for c in range(3)]
    np.testing.assert_allclose(hk[np.ix_(centre, centre)], hf[np.ix_(centre, centre)], rtol=1e-5)
    assert np.linalg.eigvalsh(hk).min() > -1e-9
    assert kron.gram.shape == (4, 4)  # C+1, not C*k*k+1
    import onnxzip
    from conftest import case

    d = case("cnn_perm_legacy")
    merged, _ = onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"), {"hessian": "channel"})
    test = dict(np.load(d / "test.npz"))
    ref = run(d / "a.onnx", test)["logits"]
    assert np.linalg.norm(run(merged, test)["b/logits"] - ref) / np.linalg.norm(ref) <= 1e-3

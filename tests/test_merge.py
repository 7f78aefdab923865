"""The engine's promises, checked on real trained models run in onnxruntime (Python API)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxzip
from conftest import case, load_test_split, rel_err, run

TORCH_CASES = ["mlp_legacy", "mlp_dynamo", "mlp_dynamo_noopt", "cnn_legacy", "cnn_dynamo", "cnn_dynamo_noopt"]
PERM_CASES = ["mlp_perm_legacy", "mlp_perm_dynamo", "cnn_perm_legacy", "cnn_perm_dynamo"]


def merge_case(name: str, **options):
    d = case(name)
    return onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"), options)


def task_outputs(name: str, merged: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task: (merged model's output, original model's output) for the main 2-D output."""
    test = load_test_split(name)
    got = run(merged, test)
    out = {}
    for task in "ab":
        ref = run(case(name) / f"{task}.onnx", test)
        main = next(k for k, v in ref.items() if v.ndim == 2 and v.dtype == np.float32)
        out[task] = (got[f"{task}/{main}"], ref[main])
    return out


def accuracy_drops(name: str, merged: onnx.ModelProto) -> dict[str, float]:
    """Accuracy points lost per task on the test split."""
    test = load_test_split(name)
    return {t: 100.0 * (np.mean(ref.argmax(1) == test[f"y{t}"]) - np.mean(got.argmax(1) == test[f"y{t}"]))
            for t, (got, ref) in task_outputs(name, merged).items()}


@pytest.mark.parametrize("name", TORCH_CASES + ["mlp_skl2onnx"])
def test_share_zero_reproduces_both_originals(name):
    merged, report = merge_case(name, share=0.0)
    for task, (got, ref) in task_outputs(name, merged).items():
        assert rel_err(got, ref) <= 1e-5, task
    assert all(row["shared"] == 0 for row in report["layers"])


@pytest.mark.parametrize("name", PERM_CASES)
def test_full_share_with_permuted_copy_recovers_the_original(name):
    merged, report = merge_case(name, share=1.0)
    for task, (got, ref) in task_outputs(name, merged).items():
        assert rel_err(got, ref) <= 1e-3, task
    hidden = [row for row in report["layers"] if row["shareable"]]
    assert hidden and all(row["shared"] == min(row["widths"].values()) for row in hidden)
    # the hidden permutation was found: every shared pair costs (almost) nothing
    assert max(row["predicted_error_max"] for row in hidden) < 1e-6


@pytest.mark.parametrize("name", ["mlp_legacy", "cnn_legacy", "mlp_dynamo", "cnn_dynamo_noopt", "mlp_skl2onnx"])
def test_full_share_of_different_tasks_keeps_accuracy_without_labels(name):
    merged, report = merge_case(name, share=1.0)
    drops = accuracy_drops(name, merged)
    assert np.mean(list(drops.values())) <= 1.0, drops
    assert max(drops.values()) <= 2.0, drops
    hidden = [row for row in report["layers"] if row["shareable"]]
    assert len(hidden) == len(report["layers"]) - 1  # every layer but the output layers
    assert all(row["shared"] == min(row["widths"].values()) for row in hidden)


@pytest.mark.parametrize("name", ["mlp_legacy", "cnn_legacy"])
def test_calibration_recovers_what_the_paper_formula_loses(name):
    calibrated, _ = merge_case(name, share=1.0)
    paper, _ = merge_case(name, share=1.0, calibrate=False)
    gained = np.mean(list(accuracy_drops(name, paper).values())) - np.mean(
        list(accuracy_drops(name, calibrated).values()))
    assert gained > 3.0, "closed-form recovery should clearly beat the paper's formula without retraining"


def test_full_share_computes_the_trunk_once_and_stores_it_once():
    merged, report = merge_case("cnn_legacy", share=1.0)
    ops = [n.op_type for n in merged.graph.node]
    # 4 shared hidden layers once, plus one output layer per task
    assert ops.count("Conv") == 3 and ops.count("Gemm") == 3
    totals = report["totals"]
    assert totals["param_ratio"] > 1.9 and totals["macs_ratio"] > 1.9
    assert all(row["computed_once"] for row in report["layers"] if row["shareable"])
    assert "Gather" not in ops  # permutations are folded into weights


def test_partial_share_shares_the_planned_fraction_and_stores_shared_blocks_once():
    merged, report = merge_case("mlp_legacy", share=0.5)
    for row in report["layers"]:
        if row["shareable"]:
            assert row["shared"] == round(0.5 * min(row["widths"].values()))
            # a shared block is stored once: fewer parameters than both layers side by side
            assert row["params_after"] < row["params_before"]
    drops = accuracy_drops("mlp_legacy", merged)
    assert max(drops.values()) <= 1.0
    onnx.checker.check_model(merged, full_check=True)


def test_zipper_shares_the_first_k_layers_fully_and_no_others():
    _, report = merge_case("cnn_legacy", zipper=2)
    shared = [row["shared"] for row in report["layers"]]
    widths = [min(row["widths"].values()) for row in report["layers"]]
    assert shared[:2] == widths[:2] and all(s == 0 for s in shared[2:])


def test_layer_share_count_and_epsilon_threshold():
    _, report = merge_case("mlp_legacy", share=0.0, layer_share={"2": 10})
    assert [row["shared"] for row in report["layers"]] == [0, 10, 0]
    _, full = merge_case("mlp_legacy", share=1.0)
    threshold = float(np.median([full["layers"][0]["predicted_error_max"]])) / 10
    _, report = merge_case("mlp_legacy", share=1.0, epsilon=threshold)
    first = report["layers"][0]
    assert 0 < first["shared"] < 300 and first["predicted_error_max"] < threshold


def test_merged_model_keeps_opset_ir_and_extra_domains():
    merged, _ = merge_case("mlp_skl2onnx", share=1.0)
    original = onnx.load(str(case("mlp_skl2onnx") / "a.onnx"))
    opsets = {o.domain: o.version for o in merged.opset_import}
    for o in original.opset_import:
        assert opsets[o.domain] == o.version
    assert merged.ir_version == original.ir_version
    names = [o.name for o in merged.graph.output]
    assert names == ["a/label", "a/probabilities", "b/label", "b/probabilities"]
    onnx.checker.check_model(merged, full_check=True)


def test_models_reading_different_inputs_are_refused():
    a = onnx.load(str(case("mlp_legacy") / "a.onnx"))
    b = onnx.load(str(case("mlp_legacy") / "b.onnx"))
    for node in b.graph.node:
        node.input[:] = ["x" if i == "input" else i for i in node.input]
    b.graph.input[0].name = "x"
    with np.load(case("mlp_legacy") / "calib.npz") as f:
        calib = {"input": f["input"], "x": f["input"]}
    with pytest.raises(onnxzip.AlignmentError, match="share no input"):
        onnxzip.merge([a, b], calib)


def test_progress_is_reported_and_cancel_stops_between_stages():
    seen = []
    d = case("mlp_legacy")
    onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"),
                  progress=lambda stage, fraction, message: seen.append((stage, fraction)))
    stages = [s for s, _ in seen]
    assert {"load", "canonicalize", "merge", "emit", "report"} <= set(stages)
    assert ("merge", 1.0) in seen
    calls = []
    with pytest.raises(onnxzip.CancelledError):
        onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"),
                      should_cancel=lambda: calls.append(1) or len(calls) > 2)


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _set_initializer(model: onnx.ModelProto, name: str, values: np.ndarray) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), name))


def test_different_widths_share_the_narrower_layer_and_keep_extra_neurons_per_task():
    """Model B with 60 of its first hidden neurons pruned: 240 pairs shared, A's extra 60 stay A's."""
    d = case("mlp_legacy")
    a, b = onnx.load(str(d / "a.onnx")), onnx.load(str(d / "b.onnx"))
    keep = np.arange(240)
    _set_initializer(b, "fc1.weight", _initializer(b, "fc1.weight")[keep])
    _set_initializer(b, "fc1.bias", _initializer(b, "fc1.bias")[keep])
    _set_initializer(b, "fc2.weight", _initializer(b, "fc2.weight")[:, keep])
    with np.load(d / "calib.npz") as f:
        calib = dict(f)
    test = load_test_split("mlp_legacy")
    merged0, _ = onnxzip.merge([a, b], calib, {"share": 0.0})
    ref_b = run(b, test)["logits"]
    assert rel_err(run(merged0, test)["b/logits"], ref_b) <= 1e-5
    merged, report = onnxzip.merge([a, b], calib, {"share": 1.0})
    first = report["layers"][0]
    assert first["widths"] == {"a": 300, "b": 240} and first["shared"] == 240
    got = run(merged, test)
    ref_a = run(a, test)["logits"]
    assert np.mean(got["a/logits"].argmax(1) == ref_a.argmax(1)) > 0.97
    assert np.mean(got["b/logits"].argmax(1) == ref_b.argmax(1)) > 0.97


def test_different_depths_merge_the_common_prefix_and_keep_the_rest_per_task():
    """Model B with an extra (identity) hidden layer: layers 1-2 are shared, the rest stays B's."""
    d = case("mlp_legacy")
    a, b = onnx.load(str(d / "a.onnx")), onnx.load(str(d / "b.onnx"))
    relu2 = next(n for n in b.graph.node if n.op_type == "Relu" and n.input[0].startswith("/fc2"))
    fc3 = next(n for n in b.graph.node if n.output[0] == "logits")
    b.graph.initializer.extend([onnx.numpy_helper.from_array(np.eye(100, dtype=np.float32), "extra.weight"),
                                onnx.numpy_helper.from_array(np.zeros(100, np.float32), "extra.bias")])
    extra = onnx.helper.make_node("Gemm", [relu2.output[0], "extra.weight", "extra.bias"], ["extra_out"],
                                  name="/extra/Gemm", transB=1)
    fc3.input[0] = "extra_out"
    b.graph.node.insert(list(b.graph.node).index(fc3), extra)
    onnx.checker.check_model(b)
    with np.load(d / "calib.npz") as f:
        calib = dict(f)
    merged, report = onnxzip.merge([a, b], calib, {"share": 1.0})
    widths = [row["widths"] for row in report["layers"]]
    assert widths[-1] == {"b": 4}  # B's last layer has no partner
    assert [row["shared"] for row in report["layers"]] == [300, 100, 0, 0]
    test = load_test_split("mlp_legacy")
    drops = {}
    got = run(merged, test)
    for t, model in (("a", a), ("b", b)):
        ref = run(model, test)["logits"]
        drops[t] = 100 * (np.mean(ref.argmax(1) == test[f"y{t}"]) - np.mean(got[f"{t}/logits"].argmax(1) == test[f"y{t}"]))
    assert max(drops.values()) <= 2.0, drops


def test_models_from_different_exporters_and_opsets_share_one_trunk():
    """dynamo (opset 20, MaxPool attributes spelled out) + legacy (opset 17): converted to 17, one trunk."""
    a = str(case("cnn_dynamo") / "a.onnx")
    b = str(case("cnn_legacy") / "b.onnx")
    merged, report = onnxzip.merge([a, b], str(case("cnn_legacy") / "calib.npz"), {"share": 1.0})
    assert {o.domain: o.version for o in merged.opset_import}[""] == 17
    assert any("opset 20 to opset 17" in w for w in report["warnings"])
    assert [n.op_type for n in merged.graph.node].count("Conv") == 3
    drops = accuracy_drops("cnn_legacy", merged)
    assert max(drops.values()) <= 2.0


def test_activations_spilled_to_disk_give_the_same_merged_model(tmp_path, monkeypatch):
    """spill_mb bounds memory on big models; the result must not change (ResNet: residual targets too)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    d = case("resnet_legacy")
    args = ([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"))
    in_memory, _ = onnxzip.merge(*args, {"share": 1.0})
    seen = []
    spilled, _ = onnxzip.merge(*args, {"share": 1.0, "spill_mb": 0.01},
                               progress=lambda *a: seen.append(sorted(p.name for p in tmp_path.rglob("*.npy"))))
    assert any(seen), "tensors should have been written to disk"
    test = load_test_split("resnet_legacy")
    for name, value in run(in_memory, test).items():
        np.testing.assert_array_equal(run(spilled, test)[name], value)
    assert not list(tmp_path.rglob("*.npy"))  # nothing left behind


def test_calibration_given_as_arrays_gets_the_same_checks_as_a_file():
    d = case("mlp_legacy")
    with np.load(d / "calib.npz") as f:
        x = f["input"].copy()
    x[0, 3] = np.nan
    with pytest.raises(onnxzip.InvalidCalibrationError, match="NaN"):
        onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], {"input": x})
    with pytest.raises(onnxzip.InvalidCalibrationError, match="no array for model input"):
        onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], {"pixels": x})


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_layers_with_fewer_calibration_rows_than_inputs_keep_rows_and_merge_as_with_a_dense_gram(share, monkeypatch):
    """48 calibration samples for 64- and 300-wide fully connected layers: those Hessians are kept as
    their rows (low-rank + damping, as VGG's 25,088-wide fc1 needs) and give the dense path's model."""
    from onnxzip import hessian, zip_loop

    d = case("mlp_legacy")
    with np.load(d / "calib.npz") as z:
        calib = {k: z[k][:48] for k in z.files}
    used = []

    class Recorded(hessian.RowMoments):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            used.append(self)

    monkeypatch.setattr(zip_loop, "RowMoments", Recorded)
    models = [str(d / "a.onnx"), str(d / "b.onnx")]
    options = {"share": share, "holdout": 0.0}
    rows_model, _ = onnxzip.merge(models, calib, options)
    assert len(used) >= 2  # both tasks' first layers (64 inputs + bias > 48 rows)
    monkeypatch.setattr(zip_loop, "ROWS_MODE_BELOW", 0.0)  # always form the d x d Gram
    dense_model, _ = onnxzip.merge(models, calib, options)
    test = load_test_split("mlp_legacy")
    got, want = run(rows_model, test), run(dense_model, test)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-4, name


def test_hessians_from_a_row_subset_keep_accuracy_and_the_report_says_how_many_rows():
    """hessian_rows caps the calibration rows (samples x positions) behind each layer's Hessian: a
    fixed random subset, at least 16 per input. Even that floor keeps the CNN pair's accuracy; the
    report gives the rows each layer used and had."""
    every, every_report = merge_case("cnn_legacy", share=1.0, hessian_rows=None)
    floor, floor_report = merge_case("cnn_legacy", share=1.0, hessian_rows=1)
    for full, few in zip(every_report["layers"], floor_report["layers"]):
        assert full["hessian_rows"] == full["available_rows"] == few["available_rows"]
        assert few["hessian_rows"] <= full["hessian_rows"]
    cut = [r for r in floor_report["layers"] if r["hessian_rows"] < r["available_rows"]]
    assert cut, "the floor should sample the convolutions' rows"
    every_drops, floor_drops = accuracy_drops("cnn_legacy", every), accuracy_drops("cnn_legacy", floor)
    assert max(floor_drops.values()) <= max(every_drops.values()) + 1.0, (floor_drops, every_drops)
    assert max(floor_drops.values()) <= 1.5, floor_drops


def test_the_originals_are_recorded_once_at_the_rows_each_layer_uses():
    """OriginalRecord runs each original model once and keeps what the fit reads from it: every
    layer's pre-activations at the rows its Hessian uses (the same rows for every task), a residual
    Add's output at those rows, and the spread of each channel a ReLU follows, over all rows."""
    from onnxzip.hessian import output_rows
    from onnxzip.options import MergeOptions
    from onnxzip.record import OriginalRecord, activation_after, residual_sum
    from onnxzip.zipper import prepare

    d = case("resnet_legacy")
    options = MergeOptions(hessian_rows=1)  # the floor: the convolutions' rows are sampled
    prepared = prepare([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"), options)
    al = prepared.alignment
    wanted = {t: set(range(len(al.models[t].layers))) for t in prepared.tasks}
    record = OriginalRecord(al, prepared.fit, options, ["CPUExecutionProvider"], wanted)
    checked = {"sampled": 0, "sum": 0, "spread": 0}
    for t in prepared.tasks:
        model = al.models[t]
        proto = model.to_onnx()
        sums = [residual_sum(model, l) for l in model.layers]
        names = [l.output for l in model.layers] + [s[0] for s in sums if s]
        proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                  for n in dict.fromkeys(names) if n not in {o.name for o in proto.graph.output})
        full = run(proto, prepared.fit)
        for layer in model.layers:
            got = record.get(t, layer)
            first = record.get(prepared.tasks[0], layer).sample.index  # the first task's layer at this position
            assert (got.sample.index is None and first is None) or np.array_equal(got.sample.index, first)
            y = full[layer.output]
            np.testing.assert_allclose(np.asarray(got.rows), output_rows(layer, y, got.sample.index),
                                       rtol=1e-5, atol=1e-5)
            checked["sampled"] += got.sample.index is not None
            if residual_sum(model, layer):
                np.testing.assert_allclose(np.asarray(got.sum_rows),
                                           output_rows(layer, full[residual_sum(model, layer)[0]], got.sample.index),
                                           rtol=1e-5, atol=1e-5)
                checked["sum"] += 1
            if activation_after(model, layer) is not None:
                spread = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]).astype(np.float64).std(axis=0)
                np.testing.assert_allclose(got.spread, spread, rtol=1e-4, atol=1e-6)
                checked["spread"] += 1
    assert all(checked.values()), checked


def test_each_original_runs_once_per_merge_even_with_a_trade_off_curve(monkeypatch):
    """The record of the originals does not depend on the sharing plan: a merge with its curve of
    many plans still runs each original model in onnxruntime once."""
    import onnxzip.record as record

    sessions = []
    real = record.make_session
    monkeypatch.setattr(record, "make_session", lambda *a, **k: sessions.append(1) or real(*a, **k))
    _, report = merge_case("mlp_legacy", curve=True)
    assert len(report["curve"]) > 2
    assert len(sessions) == 2


def test_a_segment_every_task_computes_the_same_way_runs_once_and_is_held_once():
    """Two frontiers sharing a SegmentCache (every task's merged model over a shared trunk): the
    second gets the first's very tensor without running onnxruntime; a changed constant or input
    runs again; an entry whose input has died is never served (its id may be reused)."""
    import gc

    import onnxzip.capture as capture
    from onnxzip.canonicalize import canonicalize

    d = case("cnn_legacy")
    calib = dict(np.load(d / "calib.npz"))
    model = canonicalize(onnx.load(str(d / "a.onnx")), "a", {k: v[:2] for k, v in calib.items()})
    cache = capture.SegmentCache()
    first, second = (capture.Frontier(model, calib, ["CPUExecutionProvider"], 64, cache=cache) for _ in range(2))
    inputs = dict(first.store)
    second.store = dict(inputs)  # the same input objects, as a shared trunk has
    layer = model.layers[1]
    runs = []
    real = capture.make_session
    capture.make_session = lambda *a, **k: runs.append(1) or real(*a, **k)
    try:
        (a,) = first.compute([layer.output], lambda nodes: {})
        (b,) = second.compute([layer.output], lambda nodes: {})
        assert b is a and len(runs) == 1
        other = capture.Frontier(model, calib, ["CPUExecutionProvider"], 64, cache=cache)
        other.store = dict(inputs)
        changed = {layer.node.inputs[1].name: layer.weight * 2}  # other weights: computed anew
        (c,) = other.compute([layer.output], lambda nodes: changed)
        assert c is not a and len(runs) == 2
        np.testing.assert_allclose(c - layer.bias[None, :, None, None], 2 * (a - layer.bias[None, :, None, None]),
                                   rtol=1e-4, atol=1e-4)
    finally:
        capture.make_session = real
    kept = np.ones(3)
    cache.put(("k",), [np.zeros(1)], [kept])
    assert cache.get(("k",)) is not None
    del kept
    gc.collect()
    assert cache.get(("k",)) is None


def test_a_shared_trunk_makes_each_layers_patches_once_and_merges_as_when_each_task_makes_its_own(monkeypatch):
    """At full share every task's layer reads the trunk's very tensor: the second task takes the first's
    im2col patches instead of making them again (one layer_rows call per batch and position, not one per
    task), and the merged model is exactly the one each task's own patches give."""
    from onnxzip import zip_loop

    calls = []
    real = zip_loop.layer_rows
    monkeypatch.setattr(zip_loop, "layer_rows", lambda layer, *a: calls.append(layer.name) or real(layer, *a))
    reused, report = merge_case("resnet_legacy", share=1.0)
    shared_positions = sum(1 for row in report["layers"] if row["computed_once"])
    once = len(calls)
    calls.clear()
    monkeypatch.setattr(zip_loop, "KEEP_PATCHES_BYTES", 0)  # nothing kept: every task makes its own
    own, _ = merge_case("resnet_legacy", share=1.0)
    assert shared_positions >= 5 and len(calls) >= once + shared_positions, (once, len(calls))
    test = load_test_split("resnet_legacy")
    for name, value in run(own, test).items():
        np.testing.assert_array_equal(run(reused, test)[name], value)


def test_patches_made_while_the_last_batch_accumulates_give_the_same_merged_model(monkeypatch):
    """The capture overlaps making a batch's patches with the previous batch's Gram (and the record
    overlaps onnxruntime with keeping rows): consumed in order, so the sums, and the merged model, are
    bit for bit those of the plain loop."""
    from onnxzip import overlap, zip_loop

    overlapped, _ = merge_case("resnet_legacy", share=0.5)
    monkeypatch.setattr(zip_loop, "OVERLAP_BATCH_BYTES", 0)  # the plain loop in the capture
    real = overlap.overlapped
    monkeypatch.setattr("onnxzip.record.overlapped", lambda items, consume: real(items, consume, enabled=False))
    plain, _ = merge_case("resnet_legacy", share=0.5)
    test = load_test_split("resnet_legacy")
    for name, value in run(plain, test).items():
        np.testing.assert_array_equal(run(overlapped, test)[name], value)


def test_overlapped_consumes_in_order_and_raises_what_either_stage_raised():
    from onnxzip.overlap import overlapped

    for enabled in (True, False):
        seen = []
        overlapped(iter(range(7)), seen.append, enabled=enabled)
        assert seen == list(range(7))

        def produce():
            yield 1
            raise ValueError("producer failed")

        with pytest.raises(ValueError, match="producer failed"):
            overlapped(produce(), seen.append, enabled=enabled)

        def consume(item):
            if item == 2:
                raise KeyError("consumer failed")
            seen.append(item)

        seen.clear()
        with pytest.raises(KeyError, match="consumer failed"):
            overlapped(iter(range(5)), consume, enabled=enabled)
        assert seen == [0, 1]

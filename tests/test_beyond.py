"""Beyond classic CNNs: LayerNorm networks (ConvNeXt), transformer encoders (ViT with its own attention
or torch's nn.MultiheadAttention, Swin-like window attention, BERT), channel shuffles (ShuffleNet), 1-D convolutions (MNIST-1D) and a YOLO-like detector with two heads, each from
the older exporter (opset 17) and the dynamo exporter (opset 18); fixtures by
tests/fixtures/make_beyond.py, everything run in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxzip
from conftest import accuracy_drops, case, load_test_split, rel_err, run, run_cli
from permute import permuted_copy

ARCHS = ("convnext", "vit", "vitmha", "swin", "bert", "shufflenet", "conv1d", "yolo")
CASES = [f"{arch}_{exporter}" for arch in ARCHS for exporter in ("legacy", "dynamo")]
# One exporter per architecture for the (slower) accuracy check; both exporters are covered by the
# structural tests below. (options, mean cap, worst cap): the bounds (1, 2), distilled at full
# share where that meets them, else at the deepest closed-form zipper depth that does (measured in
# docs/architectures.md). The narrow ShuffleNet meets them no way measured: its cap pins today's
# distilled level (as the narrow CNN pairs' MEASURED_GAP does) so it cannot silently get worse.
# ConvNeXt's distillation (7x7 depthwise convs) takes minutes on CPU: measured in the docs only.
DISTILL = {"share": 1.0, "distill": True, "distill_steps": 1000}
TRAINED = {"vit_legacy": (DISTILL, 1.0, 2.0), "bert_dynamo": (DISTILL, 1.0, 2.0),
           "conv1d_dynamo": ({"zipper": 1}, 1.0, 2.0), "yolo_legacy": ({"zipper": 5}, 1.0, 2.0),
           "shufflenet_legacy": (DISTILL, 2.0, 3.0)}


def _load(name):
    d = case(name)
    with np.load(d / "calib.npz") as f:
        calib = dict(f)
    info = json.loads((d / "case.json").read_text())
    return d, calib, info


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def test_fixtures_cover_every_architecture_from_both_exporters():
    for name in CASES:
        d, _, info = _load(name)
        assert _opset(onnx.load(str(d / "a.onnx"))) == (17 if name.endswith("legacy") else 18), name
        assert info["acc_a"] > 0.85 and info["acc_b"] > 0.85, (name, info)


@pytest.mark.parametrize("name", CASES)
def test_permuted_copy_merges_back_and_share_zero_is_exact(name):
    """Channels permuted inside every derived group (heads' channels stay in order: onnxzip shares them
    in order) keep the function; merged with the original at full share every layer but the task heads
    is shared and computed once, and the original comes back; share 0 gives it exactly."""
    d, calib, info = _load(name)
    model = onnx.load(str(d / "a.onnx"))
    copy, groups = permuted_copy(model, {"input": calib["input"][:2]}, seed=1)
    x = {"input": load_test_split(name)["input"][:32]}
    ref = run(model, x)
    outputs = info.get("outputs", ["logits"])
    assert groups >= 2
    assert max(rel_err(run(copy, x)[o], ref[o]) for o in outputs) <= 1e-5
    merged, report = onnxzip.merge([model, copy], calib, {"share": 1.0, "holdout": 0.0})
    onnx.checker.check_model(merged, full_check=True)
    assert _opset(merged) == _opset(model)
    got = run(merged, x)
    assert max(rel_err(got[f"{t}/{o}"], ref[o]) for t in "ab" for o in outputs) <= 1e-4
    unshared = [r for r in report["layers"] if not r["shareable"]]
    assert len(unshared) == len(outputs), unshared  # one head per output of the task
    assert all("graph output" in r["not_shared_because"] for r in unshared)
    nothing, _ = onnxzip.merge([model, copy], calib, {"share": 0.0, "holdout": 0.0})
    got = run(nothing, x)
    assert max(rel_err(got[f"{t}/{o}"], ref[o]) for t in "ab" for o in outputs) <= 1e-5


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trained_pair_runs_its_trunk_once_and_keeps_accuracy(name):
    """Two nets trained on different tasks: merged at full share the whole trunk is computed once
    (LayerNorm affines, layer scales, class tokens and position embeddings do not split it per task);
    distilled without labels, or shared to the measured depth, both tasks stay within the bounds of
    TRAINED. The closed form alone at full share loses 3-24 points on these narrow nets (16-64
    channels; docs/architectures.md)."""
    options, mean_cap, worst_cap = TRAINED[name]
    options = {**options, "seed": 0}
    if options.get("distill"):
        pytest.importorskip("torch")
    d, calib, info = _load(name)
    paths = [str(d / "a.onnx"), str(d / "b.onnx")]
    if "zipper" in options:
        _, full = onnxzip.merge(paths, str(d / "calib.npz"), {"share": 1.0})
        assert full["totals"]["macs_ratio"] > 1.9, full["totals"]
    merged, report = onnxzip.merge(paths, str(d / "calib.npz"), options)
    if options.get("share") == 1.0:
        assert report["totals"]["macs_ratio"] > 1.9, report["totals"]
    drops = accuracy_drops(name, merged)
    assert len(load_test_split(name)["ya"]) >= 597
    assert np.mean(drops) <= mean_cap and max(drops) <= worst_cap, drops


@pytest.mark.parametrize("arch", ["convnext", "vit", "yolo"])
def test_opset_17_from_an_opset_18_export_computes_the_same(arch):
    """LayerNormalization, Split into equal parts, Resize and ReduceMean written for TensorRT 8.5/8.6."""
    name = f"{arch}_dynamo"
    d, _, info = _load(name)
    paths = [str(d / "a.onnx"), str(d / "b.onnx")]
    at18, _ = onnxzip.merge(paths, str(d / "calib.npz"))
    at17, report = onnxzip.merge(paths, str(d / "calib.npz"), {"target_opset": 17})
    assert _opset(at17) == 17 and _opset(at18) == 18
    onnx.checker.check_model(at17, full_check=True)
    test = {"input": load_test_split(name)["input"][:64]}
    a, b = run(at17, test), run(at18, test)
    assert set(a) == set(b) and all(rel_err(a[k], b[k]) <= 1e-5 for k in a)
    assert report["tensorrt"]["versions"]["TensorRT 8.6 (JetPack 6.0)"]["readable"]


def _mish_model(seed: int) -> onnx.ModelProto:
    """Conv -> Mish (an opset-18 op with no older form) -> Conv -> pool -> Gemm, opset 18."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Mish", ["c1"], ["m1"]),
             helper.make_node("Conv", ["m1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "mish", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [w("w1", 8, 1, 3, 3), w("b1", 8), w("w2", 8, 8, 3, 3), w("b2", 8), w("w3", 3, 8), w("b3", 3)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_impossible_target_opset_is_refused_before_merging(tmp_path):
    for i in range(2):
        onnx.save(_mish_model(i), str(tmp_path / f"{i}.onnx"))
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32))
    result = run_cli("merge", tmp_path / "0.onnx", tmp_path / "1.onnx", "--calibration", tmp_path / "calib.npz",
                     "--out", tmp_path / "m.onnx", "--opset", "17", "--verbose")
    assert result.returncode == 2, result.stderr
    assert "lowest opset" in result.stderr and "18" in result.stderr, result.stderr
    assert "INFO onnxzip: load" in result.stderr  # the log shows the models read ...
    assert "INFO onnxzip: merge" not in result.stderr  # ... and no merge stage begun
    assert not (tmp_path / "m.onnx").exists()
    ok = run_cli("merge", tmp_path / "0.onnx", tmp_path / "1.onnx", "--calibration", tmp_path / "calib.npz",
                 "--out", tmp_path / "m.onnx")
    assert ok.returncode == 0, ok.stderr

"""A merge that succeeds is as good as its report says: enough calibration or a clear word, fidelity with
sample counts and bounds, nothing non-finite, budgets that plan the sharing, gates that stop a pipeline.
Real fixture models in onnxruntime; the CLI as a user runs it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxzip
from conftest import case, load_test_split, run, run_cli
from onnxzip.checks import RECOMMENDED_FIT_SAMPLES, check_finite_weights
from onnxzip.errors import NonFiniteError
from onnxzip.fidelity import MIN_SAMPLES, measure


def calibration(name: str) -> dict[str, np.ndarray]:
    with np.load(case(name) / "calib.npz") as f:
        return dict(f)


def models(name: str) -> list[str]:
    return [str(case(name) / "a.onnx"), str(case(name) / "b.onnx")]


def test_accuracy(name: str, merged: onnx.ModelProto, tasks=("a", "b")) -> dict[str, float]:
    """Test-split accuracy (points) of the merged model per task, and of the originals."""
    test = load_test_split(name)
    got = run(merged, test)
    out = {}
    for i, task in enumerate(tasks):
        ref = run(case(name) / f"{'ab'[i]}.onnx", test)
        output = next(iter(ref))
        y = test[f"y{'ab'[i]}"]
        out[task] = (100 * np.mean(ref[output].argmax(1) == y), 100 * np.mean(got[f"{task}/{output}"].argmax(1) == y))
    return out


test_accuracy.__test__ = False  # a helper, not a test


def drops(name: str, merged) -> dict[str, float]:
    return {t: before - after for t, (before, after) in test_accuracy(name, merged).items()}


# --- calibration: enough, or a clear word --------------------------------------------------------------

@pytest.mark.parametrize("name", ["cnn_legacy", "mobilenet_legacy"])
def test_recovery_never_loses_to_mtz_formula_at_any_calibration_size(name):
    """8 to all fit samples, full share: the calibrated recovery's test accuracy (mean of 3 random draws
    of the calibration set) is never below MTZ's formula with the same samples, per task; below the
    recommended size the report warns."""
    data = calibration(name)
    for fit in (8, 16, 32, 64, 128, 410):
        total = int(round(fit / 0.8))
        draws = 1 if total >= len(data["input"]) else 3
        results = {True: [], False: []}
        for draw in range(draws):
            pick = np.random.default_rng(draw).permutation(len(data["input"]))[:total]
            subset = {k: v[pick] for k, v in data.items()}
            for calibrate in (True, False):
                merged, report = onnxzip.merge(models(name), subset, {"share": 1.0, "calibrate": calibrate})
                assert report["calibration"]["fit_samples"] == fit
                results[calibrate].append([after for _, after in test_accuracy(name, merged).values()])
                warned = any("calibration samples fit the merge" in w for w in report["warnings"])
                assert warned == (fit < RECOMMENDED_FIT_SAMPLES), (fit, report["warnings"])
        recovered, formula = np.mean(results[True], axis=0), np.mean(results[False], axis=0)
        assert (recovered >= formula).all(), (fit, recovered, formula)


def test_too_few_calibration_samples_are_refused_or_said(tmp_path):
    data = calibration("cnn_legacy")
    np.savez(tmp_path / "three.npz", **{k: v[:3] for k, v in data.items()})
    np.savez(tmp_path / "twenty.npz", **{k: v[:20] for k, v in data.items()})
    folder = case("cnn_legacy")
    base = ["merge", folder / "a.onnx", folder / "b.onnx", "--out", tmp_path / "m.onnx", "--quiet"]
    refused = run_cli(*base, "--calibration", tmp_path / "three.npz")
    assert refused.returncode == 2 and not (tmp_path / "m.onnx").exists()
    assert "only 3 calibration samples" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    few = run_cli(*base, "--calibration", tmp_path / "twenty.npz", "--report", tmp_path / "r.json")
    assert few.returncode == 0, few.stderr
    assert "warning: only 16 calibration samples fit the merge" in few.stdout
    assert "fidelity not measured" in few.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["calibration"]["fit_samples"] == 16 and report["calibration"]["holdout_samples"] == 4
    for fid in report["fidelity"].values():  # 4 held-out samples are not a measurement
        assert fid["measured"] is False and fid["samples"] == 4
        assert fid["top1_agreement"] is None and fid["rel_err"] is None


# --- fidelity figures ----------------------------------------------------------------------------------

def test_every_fidelity_figure_carries_its_sample_count_and_a_bound():
    _, report = onnxzip.merge(models("cnn_legacy"), str(case("cnn_legacy") / "calib.npz"), {"share": 1.0},
                              evaluation=str(case("cnn_legacy") / "test.npz"))
    for section, samples in (("fidelity", 102), ("evaluation", 597)):
        for fid in report[section].values():
            assert fid["samples"] == samples and fid["measured"] and fid["confidence"] == 0.95
            assert 0 < fid["top1_agreement_lower"] < fid["top1_agreement"] <= 1
            assert fid["rel_err_upper"] > fid["rel_err"] > 0
    for fid in report["evaluation"].values():
        assert fid["accuracy_merged_lower"] < fid["accuracy_merged"]
    # more samples, tighter bounds: 597 test samples bound agreement closer than 102 held-out ones
    gap = {s: 1 - report[s]["a"]["top1_agreement_lower"] / report[s]["a"]["top1_agreement"]
           for s in ("fidelity", "evaluation")}
    assert gap["evaluation"] < gap["fidelity"]
    # at confidence 0.5 the bounds are the point estimates
    _, point = onnxzip.merge(models("cnn_legacy"), str(case("cnn_legacy") / "calib.npz"), {"confidence": 0.5})
    for fid in point["fidelity"].values():
        assert fid["top1_agreement_lower"] == fid["top1_agreement"]
        assert fid["rel_err_upper"] == pytest.approx(fid["rel_err"])


def test_cli_summary_shows_the_bounds(tmp_path):
    folder = case("cnn_legacy")
    result = run_cli("merge", folder / "a.onnx", folder / "b.onnx", "--calibration", folder / "calib.npz",
                     "--out", tmp_path / "m.onnx", "--quiet")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.strip().startswith("task a:"))
    assert "(>= 0.97" in line and "at 95%" in line and "(<= " in line and "102 held-out" in line


# --- nothing non-finite --------------------------------------------------------------------------------

BAD_OPTIONS = [
    (["--damping", "1e308"], "damping"), (["--damping", "inf"], "damping"), (["--spill-mb", "Infinity"], "spill_mb"),
    (["--seed", "-1"], "seed"), (["--providers", "NoSuchExecutionProvider"], "providers"),
    (["--alpha", "nan"], "alpha"), (["--hessian-rows", "0"], "hessian_rows"), (["--batch-size", "0"], "batch_size"),
    (["--holdout", "1.5"], "holdout"), (["--activation-margin", "1e9"], "activation_margin"),
    (["--confidence", "0.1"], "confidence"), (["--max-drop", "-1"], "max_drop"),
    (["--require-agreement", "2"], "require_agreement"), (["--max-drop", "1", "--zipper", "2"], "budget"),
]


@pytest.mark.parametrize("args, field", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_out_of_range_options_exit_2_naming_the_field(tmp_path, args, field):
    folder = case("mlp_legacy")
    result = run_cli("merge", folder / "a.onnx", folder / "b.onnx", "--calibration", folder / "calib.npz",
                     "--out", tmp_path / "m.onnx", "--quiet", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert field in result.stderr, result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_overflowing_calibration_fails_clearly_and_writes_nothing(tmp_path):
    """Calibration data far off the training scale overflows float32 inside the merge: a clear error,
    no model written (never NaN weights handed out as a success)."""
    np.savez(tmp_path / "huge.npz", **{k: v * 1e18 for k, v in calibration("mlp_legacy").items()})
    folder = case("mlp_legacy")
    result = run_cli("merge", folder / "a.onnx", folder / "b.onnx", "--calibration", tmp_path / "huge.npz",
                     "--out", tmp_path / "m.onnx", "--report", tmp_path / "r.json", "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "overflow" in result.stderr and "scale" in result.stderr
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "r.json").exists()


def test_non_finite_weights_and_outputs_are_caught_before_anything_is_written():
    """The last guards (checks.check_finite_weights, fidelity.measure) on a real merged model that was
    made non-finite after the merge."""
    merged, _ = onnxzip.merge(models("cnn_legacy"), str(case("cnn_legacy") / "calib.npz"), {"share": 1.0})
    check_finite_weights(merged)  # a good model passes
    broken = onnx.ModelProto()
    broken.CopyFrom(merged)
    weight = next(t for t in broken.graph.initializer if t.name.startswith("w."))
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    with pytest.raises(NonFiniteError, match="1 NaN or infinite weights"):
        check_finite_weights(broken)
    originals = {t: onnx.load(str(case("cnn_legacy") / f"{t}.onnx")) for t in "ab"}
    test = {"input": load_test_split("cnn_legacy")["input"][:40]}
    with pytest.raises(NonFiniteError, match="NaN or infinite values in output"):
        measure(originals, broken, test, ["a", "b"])


# --- budgets -------------------------------------------------------------------------------------------

def meets(point: dict, max_drop: float) -> bool:
    return all(f.get("top1_agreement_lower") is not None and 100 * (1 - f["top1_agreement_lower"]) <= max_drop
               for f in point["fidelity"].values())


def test_max_drop_plans_at_least_what_the_curve_shows_within_the_budget():
    """--max-drop 1 on the narrow MobileNet pair: each task's test drop within 1.5 points, and the plan
    saves at least the multiply-adds of the best trade-off point that meets the budget (same bounds)."""
    merged, report = onnxzip.merge(models("mobilenet_legacy"), str(case("mobilenet_legacy") / "calib.npz"),
                                   {"max_drop": 1.0, "curve": True})
    assert max(drops("mobilenet_legacy", merged).values()) <= 1.5
    # sharing nothing (k=0) is exact: it meets any budget without being measured
    possible = max(p["macs_ratio"] for p in report["curve"] if p["label"] == "k=0" or meets(p, 1.0))
    assert report["totals"]["macs_ratio"] >= possible
    plan = report["plan"]
    assert plan["tried"][0]["label"] == "k=0" and plan["chosen"] in [t["label"] for t in plan["tried"]]
    assert all({"macs_ratio", "param_ratio", "fidelity", "meets"} <= set(t) for t in plan["tried"])


def test_max_drop_chooses_a_partial_prefix_and_keeps_it():
    """With enough held-out samples to show it, a 5-point budget shares a prefix of the MobileNet pair:
    more than nothing, less than everything, and the test drop stays within the budget."""
    merged, report = onnxzip.merge(models("mobilenet_legacy"), str(case("mobilenet_legacy") / "calib.npz"),
                                   {"max_drop": 5.0, "holdout": 0.5})
    assert 1.0 < report["totals"]["macs_ratio"] < 1.9
    assert max(drops("mobilenet_legacy", merged).values()) <= 5.0
    chosen = next(t for t in report["plan"]["tried"] if t["label"] == report["plan"]["chosen"])
    assert chosen["meets"] and all(100 * (1 - f["top1_agreement_lower"]) <= 5 for f in chosen["fidelity"].values())


def test_a_generous_budget_shares_everything_and_a_tight_one_says_why_it_shares_nothing():
    _, generous = onnxzip.merge(models("mobilenet_legacy"), str(case("mobilenet_legacy") / "calib.npz"),
                                {"max_drop": 100})
    hidden = [r for r in generous["layers"] if r["shareable"]]
    assert generous["plan"]["chosen"] == f"k={len(hidden)}" and len(generous["plan"]["tried"]) == 2
    # the narrow pair keeps ~90% agreement at full share: the report says so and what can help
    assert any("low held-out top-1 agreement" in w and "--distill" in w for w in generous["warnings"])
    assert all(r["shared"] == min(r["widths"].values()) for r in hidden)
    _, tight = onnxzip.merge(models("cnn_legacy"), str(case("cnn_legacy") / "calib.npz"), {"max_drop": 0.5})
    assert tight["plan"]["chosen"] == "k=0" and tight["totals"]["shared_neurons"] == 0
    assert any("even perfect agreement cannot show" in w for w in tight["warnings"]), tight["warnings"]


def test_objective_params_adds_partial_sharing_after_the_prefix():
    """On the narrow ResNet pair a 3-point budget keeps a prefix fully shared; with objective params the
    layers after it are also partly shared: more parameters saved, the same multiply-adds, within budget."""
    options = {"max_drop": 3, "holdout": 0.5}
    _, macs = onnxzip.merge(models("resnet_legacy"), str(case("resnet_legacy") / "calib.npz"), options)
    merged, params = onnxzip.merge(models("resnet_legacy"), str(case("resnet_legacy") / "calib.npz"),
                                   {**options, "objective": "params"})
    assert "+share=" in params["plan"]["chosen"] and params["plan"]["chosen"].startswith(macs["plan"]["chosen"])
    assert params["totals"]["param_ratio"] > macs["totals"]["param_ratio"] + 0.1
    assert params["totals"]["macs_ratio"] == macs["totals"]["macs_ratio"]
    assert max(drops("resnet_legacy", merged).values()) <= 3.0


# --- gates ---------------------------------------------------------------------------------------------

def test_require_agreement_exits_3_writes_the_report_and_no_model(tmp_path):
    folder = case("mobilenet_legacy")
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    result = run_cli("merge", folder / "a.onnx", folder / "b.onnx", "--calibration", folder / "calib.npz",
                     "--out", out, "--report", report, "--quiet", "--require-agreement", "0.99")
    assert result.returncode == 3, result.stdout + result.stderr
    assert not out.exists() and report.is_file()
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "task a" in line and "top-1 agreement 0.9" in line and "lower bound" in line and "0.99" in line
    assert json.loads(report.read_text())["fidelity"]["a"]["top1_agreement"] < 0.99
    passed = run_cli("merge", folder / "a.onnx", folder / "b.onnx", "--calibration", folder / "calib.npz",
                     "--out", out, "--quiet", "--require-agreement", "0.5", "--require-rel-err", "2")
    assert passed.returncode == 0 and out.is_file(), passed.stderr


def test_a_merge_that_shares_nothing_says_why_and_require_shared_stops_it(tmp_path):
    """A ResNet-like model with a MobileNet-like one: exit 0 with one warning naming the layer where the
    models stop matching; --require-shared turns it into exit 3."""
    a, b = case("resnet_legacy") / "a.onnx", case("mobilenet_legacy") / "b.onnx"
    base = ["merge", a, b, "--calibration", case("resnet_legacy") / "calib.npz", "--out", tmp_path / "m.onnx", "--quiet"]
    result = run_cli(*base)
    assert result.returncode == 0, result.stderr
    warning = next(x for x in result.stdout.splitlines() if "nothing was shared" in x)
    assert "layer 2" in warning and "groups differ" in warning
    (tmp_path / "m.onnx").unlink()
    gated = run_cli(*base, "--require-shared", "0.3")
    assert gated.returncode == 3 and not (tmp_path / "m.onnx").exists()
    assert "multiply-adds are computed once" in gated.stderr


def deconv_model(seed: int) -> onnx.ModelProto:
    """x (N, 2, 4, 4) -> ConvTranspose 2->4 (3x3) -> Relu -> Flatten -> Gemm 144->3."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(2, 4, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.normal(size=(3, 144)).astype(np.float32), "gw"),
             numpy_helper.from_array(np.zeros(3, np.float32), "gb")]
    nodes = [helper.make_node("ConvTranspose", ["x", "cw"], ["c"], name="deconv"),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1, name="head")]
    graph = helper.make_graph(nodes, "deconv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_nodes_onnxzip_does_not_read_are_named_in_the_warnings_and_by_inspect(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 2, 4, 4)).astype(np.float32)
    _, report = onnxzip.merge([deconv_model(1), deconv_model(2)], {"x": x}, {"share": 1.0})
    assert any("ConvTranspose 'deconv' (a transposed convolution)" in w and "stay per task" in w
               for w in report["warnings"]), report["warnings"]
    for seed in (1, 2):
        onnx.save(deconv_model(seed), str(tmp_path / f"{seed}.onnx"))
    listed = run_cli("inspect", tmp_path / "1.onnx", tmp_path / "2.onnx")
    assert listed.returncode == 0, listed.stderr
    assert "model a: 1 node(s) with weights onnxzip does not merge" in listed.stdout
    assert "ConvTranspose 'deconv' (a transposed convolution)" in listed.stdout


# --- labels, partial sharing ---------------------------------------------------------------------------

def test_labels_by_task_name_or_position_and_a_warning_for_others(tmp_path):
    test = load_test_split("cnn_legacy")
    np.savez(tmp_path / "test.npz", **test, yz=test["ya"])
    folder = case("cnn_legacy")
    result = run_cli("merge", folder / "a.onnx", folder / "b.onnx", "--calibration", folder / "calib.npz",
                     "--out", tmp_path / "m.onnx", "--quiet", "--tasks", "digit,mod4", "--eval", tmp_path / "test.npz",
                     "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((tmp_path / "r.json").read_text())["evaluation"]
    assert evaluation["digit"]["accuracy_merged"] > 0.9 and evaluation["mod4"]["accuracy_merged"] > 0.9
    assert "task digit: accuracy" in result.stdout and "task mod4: accuracy" in result.stdout
    assert "array 'yz' is neither a model input nor labels of a task" in result.stdout


@pytest.mark.parametrize("name", ["mobilenet_legacy", "cnn_legacy", "mlp_legacy"])
def test_partial_sharing_never_makes_the_file_larger_and_says_it_saves_no_compute(name):
    for share in (0.1, 0.25, 0.5):
        merged, report = onnxzip.merge(models(name), str(case(name) / "calib.npz"), {"share": share})
        totals = report["totals"]
        assert totals["bytes_after"] <= totals["bytes_before"], (share, totals)
        assert merged.ByteSize() == totals["bytes_after"]
        if totals["shared_neurons"]:
            assert totals["macs_ratio"] < 1.01
            assert any("no multiply-adds saved" in w for w in report["warnings"]), report["warnings"]


def test_min_held_out_samples_constant_is_what_the_report_uses():
    _, report = onnxzip.merge(models("mlp_legacy"), str(case("mlp_legacy") / "calib.npz"), {"holdout": 0.05})
    held = report["calibration"]["holdout_samples"]
    assert held < MIN_SAMPLES and all(not f["measured"] for f in report["fidelity"].values())
    assert any("fidelity not measured" in w for w in report["warnings"])

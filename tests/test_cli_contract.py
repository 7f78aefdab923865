"""The CLI contract of DESIGN.md ("Contracts other tools rely on"), run as a user runs it: a subprocess.

    onnxzip merge A.onnx B.onnx --calibration CALIB.npz --out MERGED.onnx [--share S] [--tasks a,b]
                                [--report REPORT.json]
    onnxzip inspect A.onnx B.onnx [--json]
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from conftest import case, load_test_split, rel_err, run, run_cli

# One case per exporter/architecture family; each CLI merge takes about a second.
CASES = ["mlp_legacy", "mlp_dynamo", "cnn_legacy", "cnn_dynamo", "mlp_skl2onnx"]


def original_outputs(name: str) -> list[str]:
    return [o.name for o in onnx.load(str(case(name) / "a.onnx")).graph.output]


def expected_outputs(name: str, tasks=("a", "b")) -> list[str]:
    # `<task>/<original output name>`, in task order then in the original output order
    return [f"{t}/{o}" for t in tasks for o in original_outputs(name)]


def default_opset(model: onnx.ModelProto):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def merge_cli(tmp_path, name: str, *extra, report: bool = True, calibration=None):
    folder = case(name)
    out = tmp_path / "merged.onnx"
    args = ["merge", folder / "a.onnx", folder / "b.onnx", "--calibration", calibration or folder / "calib.npz",
            "--out", out, "--quiet", *extra]
    if report:
        args += ["--report", tmp_path / "report.json"]
    result = run_cli(*args)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return out, result


@pytest.fixture(scope="module", params=CASES)
def full_merge(request, tmp_path_factory):
    """`onnxzip merge A B --calibration C --out M --report R` at the default share (1.0), once per case."""
    name = request.param
    tmp = tmp_path_factory.mktemp(f"full_{name}")
    out, result = merge_cli(tmp, name, "--share", "1.0")
    report = json.loads((tmp / "report.json").read_text())
    return name, out, report, result


# --- merge: the output file ------------------------------------------------------------------------------


def test_merge_writes_valid_model_with_task_outputs(full_merge):
    name, out, _, _ = full_merge
    assert out.is_file()
    onnx.checker.check_model(str(out), full_check=True)
    merged = onnx.load(str(out))
    inits = {t.name for t in merged.graph.initializer}
    inputs = [i.name for i in merged.graph.input if i.name not in inits]
    assert inputs == ["input"], "the models' shared input must appear once, under its own name"
    assert [o.name for o in merged.graph.output] == expected_outputs(name)
    if name == "mlp_skl2onnx":
        assert [o.name for o in merged.graph.output] == ["a/label", "a/probabilities", "b/label", "b/probabilities"]
    else:
        assert [o.name for o in merged.graph.output] == ["a/logits", "b/logits"]


def test_merged_model_runs_in_onnxruntime(full_merge):
    name, out, _, _ = full_merge
    feeds = {"input": load_test_split(name)["input"]}
    got = run(out, feeds)
    assert list(got) == expected_outputs(name)
    n = len(feeds["input"])
    for task in "ab":
        ref = run(case(name) / f"{task}.onnx", feeds)
        for key, value in ref.items():
            merged = got[f"{task}/{key}"]
            assert merged.shape == value.shape and merged.dtype == value.dtype, key
            assert merged.shape[0] == n
            if merged.dtype.kind == "f":
                assert np.isfinite(merged).all()


def test_merge_keeps_opset_and_ir_version(full_merge):
    name, out, _, _ = full_merge
    merged = onnx.load(str(out))
    a = onnx.load(str(case(name) / "a.onnx"))
    assert merged.ir_version == a.ir_version
    assert default_opset(merged) == default_opset(a)
    # other domains (ai.onnx.ml for skl2onnx) keep their versions too
    original = {o.domain: o.version for o in a.opset_import if o.domain not in ("", "ai.onnx")}
    kept = {o.domain: o.version for o in merged.opset_import if o.domain not in ("", "ai.onnx")}
    for domain, version in original.items():
        assert kept.get(domain) == version, domain


# --- merge: the report -----------------------------------------------------------------------------------


def test_report_json_has_layers_totals_fidelity(full_merge):
    name, _, report, _ = full_merge
    for key in ("layers", "totals", "fidelity"):
        assert key in report, key
    assert isinstance(report["totals"], dict) and report["totals"]
    assert report["layers"], "the report lists no layers"
    for layer in report["layers"]:
        for key in ("names", "kind", "widths", "shared", "predicted_error", "params_before", "params_after",
                    "macs_before", "macs_after"):
            assert key in layer, (key, layer)
        assert set(layer["names"]) == {"a", "b"} and all(layer["names"].values())
        assert set(layer["widths"]) == {"a", "b"}
        assert all(isinstance(w, int) and w > 0 for w in layer["widths"].values())
        assert isinstance(layer["kind"], str) and layer["kind"]
        assert 0 <= layer["shared"] <= min(layer["widths"].values())
        assert math.isfinite(layer["predicted_error"]) and layer["predicted_error"] >= 0
        assert layer["params_after"] <= layer["params_before"]
        assert layer["macs_after"] <= layer["macs_before"]
    # the layer names are real nodes of each model
    for task in "ab":
        nodes = {n.name for n in onnx.load(str(case(name) / f"{task}.onnx")).graph.node}
        for layer in report["layers"]:
            assert layer["names"][task] in nodes, (task, layer["names"][task])
    assert set(report["fidelity"]) == {"a", "b"}
    for task, fid in report["fidelity"].items():
        for key in ("rel_err", "top1_agreement", "samples"):
            assert key in fid, (task, key)
        assert math.isfinite(fid["rel_err"]) and fid["rel_err"] >= 0
        assert 0.0 <= fid["top1_agreement"] <= 1.0
        assert isinstance(fid["samples"], int) and fid["samples"] > 0


def test_share_one_shares_every_hidden_layer_fully(full_merge):
    _, _, report, _ = full_merge
    layers = sorted(report["layers"], key=lambda r: r.get("position", 0))
    *hidden, output = layers
    assert hidden, "no hidden layers in the report"
    for layer in hidden:
        assert layer["shared"] == min(layer["widths"].values()), layer
    assert output["shared"] == 0, "output layers are never shared"
    assert sum(r["params_after"] for r in layers) < sum(r["params_before"] for r in layers)


# --- merge: options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_share_zero_reproduces_the_originals(tmp_path, name):
    out, _ = merge_cli(tmp_path, name, "--share", "0", report=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.onnx"], "stray files next to the output"
    onnx.checker.check_model(str(out), full_check=True)
    feeds = {"input": load_test_split(name)["input"]}
    got = run(out, feeds)
    assert list(got) == expected_outputs(name)
    for task in "ab":
        ref = run(case(name) / f"{task}.onnx", feeds)
        for key, value in ref.items():
            merged = got[f"{task}/{key}"]
            assert merged.shape == value.shape, key
            if value.dtype.kind == "f":
                assert rel_err(merged, value) <= 1e-5, (task, key, rel_err(merged, value))
            else:
                np.testing.assert_array_equal(merged, value, err_msg=f"{task}/{key}")


def test_tasks_name_the_outputs(tmp_path):
    out, _ = merge_cli(tmp_path, "mlp_legacy", "--tasks", "digit,mod4")
    merged = onnx.load(str(out))
    assert [o.name for o in merged.graph.output] == ["digit/logits", "mod4/logits"]
    onnx.checker.check_model(str(out), full_check=True)
    got = run(out, {"input": load_test_split("mlp_legacy")["input"]})
    assert set(got) == {"digit/logits", "mod4/logits"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["fidelity"]) == {"digit", "mod4"}


def test_hessian_rows_flag_caps_the_rows_or_uses_all(tmp_path):
    _, _ = merge_cli(tmp_path, "cnn_legacy", "--hessian-rows", "all")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["options"]["hessian_rows"] is None
    assert all(r["hessian_rows"] == r["available_rows"] for r in report["layers"])
    _, _ = merge_cli(tmp_path, "cnn_legacy", "--hessian-rows", "1")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["options"]["hessian_rows"] == 1
    assert any(r["hessian_rows"] < r["available_rows"] for r in report["layers"])
    folder = case("cnn_legacy")
    bad = run_cli("merge", folder / "a.onnx", folder / "b.onnx", "--calibration", folder / "calib.npz",
                  "--out", tmp_path / "x.onnx", "--hessian-rows", "many")
    assert bad.returncode == 2 and "--hessian-rows" in bad.stderr and "'all'" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_lone_arr_0_calibration_for_a_one_input_model(tmp_path):
    name = "mlp_legacy"
    with np.load(case(name) / "calib.npz") as f:
        samples = f["input"]
    calib = tmp_path / "unnamed.npz"
    np.savez(calib, samples)  # stored as 'arr_0'
    with np.load(calib) as f:
        assert list(f) == ["arr_0"]
    keyed = tmp_path / "keyed"
    keyed.mkdir()
    lone = tmp_path / "lone"
    lone.mkdir()
    out_keyed, _ = merge_cli(keyed, name, report=False)
    out_lone, _ = merge_cli(lone, name, report=False, calibration=calib)
    onnx.checker.check_model(str(out_lone), full_check=True)
    assert [o.name for o in onnx.load(str(out_lone)).graph.output] == ["a/logits", "b/logits"]
    feeds = {"input": load_test_split(name)["input"]}
    got, ref = run(out_lone, feeds), run(out_keyed, feeds)
    for key in ref:  # the same samples under another key: the same merge
        assert rel_err(got[key], ref[key]) <= 1e-4, key


# --- inspect --------------------------------------------------------------------------------------------


def _gemm_names(path) -> list[str]:
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Gemm"]


def test_inspect_prints_the_alignment_table():
    folder = case("mlp_legacy")
    result = run_cli("inspect", folder / "a.onnx", folder / "b.onnx")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    names = _gemm_names(folder / "a.onnx")
    assert len(names) == 3
    lines = result.stdout.splitlines()
    for name in names:  # one row per layer position, naming the layer
        assert any(name in line for line in lines), name
    # the MLP's widths appear in the rows: 64->300, 300->100, 100->10 / 100->4
    text = result.stdout
    for width in ("300", "100", "10", "4"):
        assert width in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)  # a table for people, not JSON


def test_inspect_json():
    folder = case("mlp_legacy")
    result = run_cli("inspect", folder / "a.onnx", folder / "b.onnx", "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    info = json.loads(result.stdout)
    assert isinstance(info, dict)
    text = json.dumps(info)
    for name in _gemm_names(folder / "a.onnx"):
        assert name in text, name


# --- habits users bring from other command-line tools (issue 15) ------------------------------------------

def test_help_and_version_answer_without_loading_the_engine():
    """`--help` and `--version` import neither onnx, onnxruntime, numpy nor pydantic (they took ~3 s)."""
    import subprocess
    import sys

    from conftest import ROOT

    for flag in ("--version", "--help", "merge --help"):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "onnxzip.cli", *flag.split()],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        loaded = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        assert not loaded & {"numpy", "onnx", "onnxruntime", "pydantic", "scipy"}, (flag, loaded & {"numpy", "onnx"})
    assert "onnxzip 0." in run_cli("--version").stdout


def test_a_reader_that_leaves_early_is_not_a_traceback():
    """`onnxzip inspect ... | head -1`: the pipe closes under the writer; exit 141 (SIGPIPE), nothing on stderr."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    d = case("resnet_legacy")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    result = subprocess.run([sys.executable, "-m", "onnxzip.cli", "inspect", str(d / "a.onnx"), str(d / "b.onnx")],
                            stdout=write, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(write)
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_short_flags_and_a_log_file(tmp_path):
    """-o for --out, -q, and --log-file with every stage's steps and the summary."""
    d = case("mlp_legacy")
    log = tmp_path / "merge.log"
    result = run_cli("merge", d / "a.onnx", d / "b.onnx", "--calibration", d / "calib.npz", "-o", tmp_path / "m.onnx",
                     "-q", "--seed", "3", "--log-file", log)
    assert result.returncode == 0, result.stderr
    assert onnx.load(str(tmp_path / "m.onnx")).graph.output
    text = log.read_text()
    assert "INFO onnxzip: merge" in text and "wrote" in text, text[:2000]


def test_progress_bars_show_elapsed_and_remaining_time(monkeypatch):
    import io
    import sys

    from onnxzip.cli import _Bars

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bars = _Bars(quiet=False)
    bars("merge", 0.4, "layer 3/10: pairing and merging")
    bars.close()
    line = screen.getvalue().split("\r")[-1]
    assert "40%" in line and "<" in line and "layer 3/10" in line, line
    assert "% ," not in line and " , " not in line, line  # no stray separator before the message

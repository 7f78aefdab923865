"""Label-free distillation (`--distill`): the merged weights trained toward the original models on the
calibration inputs. Real fixture models, PyTorch training, onnxruntime for every figure checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib.util import find_spec

import numpy as np
import onnx
import pytest

import onnxzip
from conftest import ROOT, accuracy_drops, case, run_cli
from onnxzip.errors import CancelledError

# .ci/run installs PyTorch, so these run in CI; a checkout without the distill extra skips them
# (and the last test shows what such an install says when asked to distill).
needs_torch = pytest.mark.skipif(find_spec("torch") is None, reason='needs the distill extra: pip install ".[distill]"')


def models(name: str) -> list[str]:
    return [str(case(name) / f"{t}.onnx") for t in "abc" if (case(name) / f"{t}.onnx").exists()]


@needs_torch
def test_distillation_recovers_the_narrow_mobilenet_pair_at_full_share():
    """Today's closed form loses about 6-7 points per task here; distilled: mean <= 1, each <= 1.5."""
    merged, report = onnxzip.merge(models("mobilenet_legacy"), str(case("mobilenet_legacy") / "calib.npz"),
                                   {"share": 1.0, "distill": True})
    drops = accuracy_drops("mobilenet_legacy", merged, ["a", "b"])
    assert np.mean(drops) <= 1.0 and max(drops) <= 1.5, drops
    section = report["distill"]
    assert section["kept"] == "distilled" and section["steps"] > 0 and section["seconds"] > 0
    assert section["stopped"] in ("early", "steps", "time")
    for t in "ab":
        before, after = section["fidelity"][t]["closed_form"], section["fidelity"][t]["distilled"]
        assert after["top1_agreement"] > before["top1_agreement"] and after["rel_err"] < before["rel_err"]
        assert report["fidelity"][t]["top1_agreement"] == after["top1_agreement"]  # the kept model is reported


@needs_torch
@pytest.mark.parametrize("name", ["resnet_legacy", "three_tasks_legacy"])
def test_distillation_keeps_every_task_of_the_narrow_resnets_within_a_point(name):
    merged, report = onnxzip.merge(models(name), str(case(name) / "calib.npz"), {"share": 1.0, "distill": True})
    drops = accuracy_drops(name, merged, report["tasks"])
    assert max(drops) <= 1.0, drops
    assert report["distill"]["kept"] == "distilled"


SETTINGS = [
    ("cnn_legacy", {"share": 0.5}), ("mlp_skl2onnx", {"share": 1.0}), ("cnn_nhwc", {"share": 1.0}),
    ("resnet_dynamo", {"zipper": 4}), ("three_tasks_legacy", {"share": 0.5}),
    ("mobilenet_legacy", {"max_drop": 5, "holdout": 0.5}),
]


@needs_torch
@pytest.mark.parametrize("name, options", SETTINGS, ids=[f"{n}-{o}" for n, o in SETTINGS])
def test_distillation_never_leaves_held_out_fidelity_worse_and_keeps_the_sharing(name, options):
    """Every sharing setting (partial, zipper, a budget's plan, three tasks, skl2onnx and NHWC graphs):
    the held-out fidelity after is never below before, the shared blocks stay stored once (file size as
    without distillation), and the model passes the checker with the inputs' opset."""
    calibration = str(case(name) / "calib.npz")
    plain, closed = onnxzip.merge(models(name), calibration, options)
    merged, report = onnxzip.merge(models(name), calibration, {**options, "distill": True, "distill_steps": 200})
    section = report["distill"]
    mean = lambda fid: np.mean([f["top1_agreement"] for f in fid.values()])  # noqa: E731
    assert mean(report["fidelity"]) >= mean(closed["fidelity"])
    if section["kept"] == "distilled":
        assert all(v["distilled"] <= v["closed_form"] for v in section["held_out_loss"].values()), section
    else:
        assert merged.SerializeToString() == plain.SerializeToString()
    assert report["totals"]["shared_neurons"] == closed["totals"]["shared_neurons"]
    assert report["totals"]["params_after"] == closed["totals"]["params_after"]
    assert abs(merged.ByteSize() - plain.ByteSize()) <= 0.01 * plain.ByteSize()
    onnx.checker.check_model(merged, full_check=True)
    assert [(o.domain, o.version) for o in merged.opset_import] == [(o.domain, o.version) for o in plain.opset_import]
    if "max_drop" in options:
        assert report["plan"]["chosen"] == closed["plan"]["chosen"]


@needs_torch
def test_step_and_time_budgets_and_cancellation():
    calibration = str(case("cnn_legacy") / "calib.npz")
    _, steps = onnxzip.merge(models("cnn_legacy"), calibration, {"distill": True, "distill_steps": 30})
    assert steps["distill"]["steps"] == 30 and steps["distill"]["stopped"] == "steps"
    _, timed = onnxzip.merge(models("cnn_legacy"), calibration, {"distill": True, "distill_seconds": 1.5})
    assert timed["distill"]["stopped"] in ("time", "early") and timed["distill"]["seconds"] < 15
    seen = []

    def cancel_during_distillation():
        seen.append(time.monotonic())
        return any(s == "distill" for s, _ in stages)

    stages = []
    with pytest.raises(CancelledError, match="distillation"):
        onnxzip.merge(models("cnn_legacy"), calibration, {"distill": True, "distill_seconds": 600},
                      progress=lambda stage, fraction, message: stages.append((stage, fraction)),
                      should_cancel=cancel_during_distillation)


@needs_torch
def test_cli_distill_reports_what_it_did(tmp_path):
    folder = case("cnn_legacy")
    result = run_cli("merge", folder / "a.onnx", folder / "b.onnx", "--calibration", folder / "calib.npz",
                     "--out", tmp_path / "m.onnx", "--report", tmp_path / "r.json", "--quiet", "--distill",
                     "--distill-steps", "60")
    assert result.returncode == 0, result.stderr
    assert "distillation: 60 steps" in result.stdout
    section = json.loads((tmp_path / "r.json").read_text())["distill"]
    assert section["steps"] == 60 and section["kept"] in ("distilled", "closed-form")


def test_without_pytorch_distill_exits_2_with_the_install_hint(tmp_path):
    """A PyTorch that cannot be imported (a package named torch that raises ImportError, first on the
    path): --distill is refused in one line naming the extra; a merge without it still works."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    folder = case("mlp_legacy")
    base = [sys.executable, "-c", "import sys; from onnxzip.cli import main; sys.exit(main())", "merge",
            folder / "a.onnx", folder / "b.onnx", "--calibration", folder / "calib.npz", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    refused = subprocess.run([*map(str, base), "--out", str(tmp_path / "d.onnx"), "--distill"], capture_output=True,
                             text=True, env=env, timeout=300)
    assert refused.returncode == 2, refused.stderr
    assert 'pip install "onnxzip[distill]"' in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d.onnx").exists()
    plain = subprocess.run([*map(str, base), "--out", str(tmp_path / "p.onnx")], capture_output=True, text=True,
                           env=env, timeout=300)
    assert plain.returncode == 0 and (tmp_path / "p.onnx").exists(), plain.stderr

"""Shared test helpers: committed fixture cases, running models in onnxruntime, running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "fixtures" / "cases"


def case(name: str) -> Path:
    return CASES / name


def session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model, feeds: dict) -> dict[str, np.ndarray]:
    """All outputs of `model` (path or ModelProto) on `feeds`, by output name."""
    s = session(model)
    names = [o.name for o in s.get_outputs()]
    inputs = {i.name for i in s.get_inputs()}
    return dict(zip(names, s.run(names, {k: v for k, v in feeds.items() if k in inputs})))


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def load_test_split(name: str) -> dict[str, np.ndarray]:
    with np.load(case(name) / "test.npz") as f:
        return dict(f)


def accuracy_drops(name: str, merged, tasks="ab") -> list[float]:
    """Accuracy points each task loses on case `name`'s test split (labels y<task>): original model vs the
    merged model's `<task>/<output>` (597 samples for the digit cases: one sample is 0.17 points)."""
    test = load_test_split(name)
    got = run(merged, test)
    drops = []
    for task in tasks:
        ref = run(case(name) / f"{task}.onnx", test)
        output = next(iter(ref))
        y = test[f"y{task}"]
        drops.append(100 * (np.mean(ref[output].argmax(1) == y) - np.mean(got[f"{task}/{output}"].argmax(1) == y)))
    return drops


def run_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """`onnxzip ARGS` as a user runs it (the installed entry point's module)."""
    return subprocess.run([sys.executable, "-m", "onnxzip.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def tmp(tmp_path) -> Path:
    return tmp_path

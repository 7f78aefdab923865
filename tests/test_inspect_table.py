"""`onnxzip inspect`'s text table fits the terminal (issue 15): three models made it 215 columns wide."""

from __future__ import annotations

import json
import re

from conftest import case, run_cli

THREE = case("three_tasks_legacy")
MODELS = [THREE / f"{t}.onnx" for t in "abc"]


def _layers(monkeypatch) -> dict:
    """The alignment as the machine interface (--json) gives it: what the table must show."""
    monkeypatch.setenv("COLUMNS", "100")
    result = run_cli("inspect", *MODELS, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_three_models_fit_100_columns_and_every_models_layers_appear(monkeypatch):
    info = _layers(monkeypatch)
    monkeypatch.setenv("COLUMNS", "100")  # shutil.get_terminal_size reads it before the (absent) terminal
    result = run_cli("inspect", *MODELS)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    too_wide = [line for line in lines if len(line) > 100]
    assert not too_wide, too_wide
    text = result.stdout
    assert len(info["layers"]) == 12 and info["tasks"] == ["a", "b", "c"]
    for row in info["layers"]:
        for task in info["tasks"]:
            assert row["op"][task] in text, (row["position"], task, row["op"][task])
            assert row["names"][task] in text, (row["position"], task, row["names"][task])
    # the heads differ (10, 4 and 2 classes): each model's own line, labelled with its task
    for task, classes in (("a", 10), ("b", 4), ("c", 2)):
        assert any(re.search(rf"(^|\s){task}: Gemm 64->{classes}\b", line) for line in lines), text
    assert "11 of 12 layer positions can be shared" in text


def test_a_wide_terminal_keeps_one_column_per_model(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # the one-row table of these three ResNets is 253 wide
    result = run_cli("inspect", *MODELS)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("#"))
    assert ["layer a", "layer b", "layer c"] == [w for w in ("layer a", "layer b", "layer c") if w in header]
    assert max(len(line) for line in result.stdout.splitlines()) <= 300

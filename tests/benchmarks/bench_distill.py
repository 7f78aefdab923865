"""Distillation benchmark: prints the table docs/distill.md records.

    python tests/benchmarks/bench_distill.py      # needs ".[fixtures]" (scikit-learn) and ".[distill]" (PyTorch)

Per case, full share, no labels: test accuracy lost with the closed-form merge and with `--distill`,
the steps it trained and why it stopped, and its wall and CPU time as a multiple of the closed-form
merge of the same data (medians of REPEATS, side by side). Then the same with twice the calibration
data: the first 1,024 samples of the models' training split, rebuilt from scikit-learn's digits
exactly as the committed 512 were (checked equal), to show what more unlabelled data buys.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

import onnxzip  # noqa: E402
from conftest import accuracy_drops, case  # noqa: E402

CASES = ["mobilenet_legacy", "resnet_legacy", "three_tasks_legacy", "cnn_legacy"]
REPEATS = 3


def calibration_sets(name: str) -> dict[str, dict]:
    """The committed calibration set, and twice as many samples from the same training split."""
    import make_fixtures as mf
    from make_zoo import up16

    with np.load(case(name) / "calib.npz") as f:
        committed = dict(f)
    x_train = mf.load_data()[0]
    shape = up16 if committed["input"].shape[-1] == 16 else (lambda x: mf.shape_for("cnn", x))
    assert np.array_equal(shape(x_train[:len(committed["input"])]), committed["input"]), "split changed"
    return {f"{len(committed['input'])}": committed, f"{2 * len(committed['input'])}":
            {"input": shape(x_train[:2 * len(committed["input"])])}}


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    print("| case | calibration | closed form: drop per task | distilled: drop per task | steps (stopped) | kept "
          "| distill / closed form: wall (CPU) |")
    print("|---|---:|---|---|---:|---|---:|")
    for name in CASES:
        models = [str(case(name) / f"{t}.onnx") for t in "abc" if (case(name) / f"{t}.onnx").exists()]
        for size, data in calibration_sets(name).items():
            plain_times, distill_times = [], []
            for _ in range(REPEATS):
                (closed, report), wall, cpu = timed(lambda: onnxzip.merge(models, data, {"share": 1.0}))
                plain_times.append((wall, cpu))
                (distilled, dreport), wall, cpu = timed(lambda: onnxzip.merge(models, data, {"share": 1.0,
                                                                                              "distill": True}))
                distill_times.append((wall, cpu))
            tasks = report["tasks"]
            before = " / ".join(f"{d:+.2f}" for d in accuracy_drops(name, closed, tasks))
            after = " / ".join(f"{d:+.2f}" for d in accuracy_drops(name, distilled, tasks))
            wall = statistics.median(t[0] for t in distill_times) / statistics.median(t[0] for t in plain_times)
            cpu = statistics.median(t[1] for t in distill_times) / statistics.median(t[1] for t in plain_times)
            section = dreport["distill"]
            print(f"| {name} | {size} | {before} | {after} | {section['steps']} ({section['stopped']}) | "
                  f"{section['kept']} | {wall:.1f}x ({cpu:.1f}x) |", flush=True)


if __name__ == "__main__":
    main()

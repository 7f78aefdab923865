"""Trust benchmarks: prints the markdown tables docs/trust.md records.

    python tests/benchmarks/bench_trust.py [--quick] [--only sweep|budgets]

1. Test accuracy lost at full share as the calibration set shrinks: onnxzip's recovery beside MTZ's
   formula with the same samples. Each size is the mean of DRAWS random draws of the committed
   calibration set (the test split is never drawn from); "all" is the whole set once.
2. Budgets (--max-drop): the plan chosen, multiply-add and parameter ratios, test drop per task, the
   plans tried, and the search's wall and CPU time as a multiple of one full-share merge measured
   side by side (medians of REPEATS).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import onnxzip  # noqa: E402
from conftest import accuracy_drops, case  # noqa: E402

DRAWS = 3
REPEATS = 3


def sweep(names, fits, draws: int) -> None:
    print("| pair | fit samples | onnxzip: drop a / b | MTZ formula: drop a / b | warned |")
    print("|---|---:|---:|---:|---|")
    for name in names:
        with np.load(case(name) / "calib.npz") as f:
            data = dict(f)
        models = [str(case(name) / "a.onnx"), str(case(name) / "b.onnx")]
        for fit in fits:
            total = min(len(data["input"]), int(round(fit / 0.8)))
            runs = 1 if total == len(data["input"]) else draws
            drops = {True: [], False: []}
            warned = False
            for draw in range(runs):
                pick = np.random.default_rng(draw).permutation(len(data["input"]))[:total]
                for calibrate in (True, False):
                    merged, report = onnxzip.merge(models, {k: v[pick] for k, v in data.items()},
                                                   {"share": 1.0, "calibrate": calibrate})
                    drops[calibrate].append(accuracy_drops(name, merged))
                    warned |= any("calibration samples fit" in w for w in report["warnings"])
            ours, mtz = np.mean(drops[True], axis=0), np.mean(drops[False], axis=0)
            label = f"{report['calibration']['fit_samples']}" + ("" if runs > 1 else " (all)")
            print(f"| {name} | {label} | {ours[0]:+.2f} / {ours[1]:+.2f} | {mtz[0]:+.2f} / {mtz[1]:+.2f} | "
                  f"{'yes' if warned else 'no'} |", flush=True)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def budgets(cases, repeats: int) -> None:
    print("| pair | budget | held out | plan chosen | MACs ratio | params ratio | test drop a / b | plans tried "
          "| search / one merge: wall (CPU) |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for name, settings in cases:
        models, calib = [str(case(name) / "a.onnx"), str(case(name) / "b.onnx")], str(case(name) / "calib.npz")
        for options in settings:
            plain, search = [], []
            for _ in range(repeats):  # side by side: one full-share merge, then the budget merge
                _, wall, cpu = timed(lambda: onnxzip.merge(models, calib, {"share": 1.0, "holdout": options["holdout"]}))
                plain.append((wall, cpu))
                (merged, report), wall, cpu = timed(lambda: onnxzip.merge(models, calib, options))
                search.append((wall, cpu))
            wall = statistics.median(s[0] for s in search) / statistics.median(p[0] for p in plain)
            cpu = statistics.median(s[1] for s in search) / statistics.median(p[1] for p in plain)
            drops = accuracy_drops(name, merged)
            t = report["totals"]
            budget = f"max_drop {options['max_drop']:g}" + (f", {options['objective']}" if "objective" in options else "")
            print(f"| {name} | {budget} | {report['calibration']['holdout_samples']} | {report['plan']['chosen']} | "
                  f"{t['macs_ratio']} | {t['param_ratio']} | {drops[0]:+.2f} / {drops[1]:+.2f} | "
                  f"{len(report['plan']['tried'])} | {wall:.1f}x ({cpu:.1f}x) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one draw, one repeat, fewer sizes")
    parser.add_argument("--only", choices=["sweep", "budgets"], help="one of the two tables")
    args = parser.parse_args()
    draws, repeats = (1, 1) if args.quick else (DRAWS, REPEATS)
    fits = (8, 32, 410) if args.quick else (8, 16, 32, 64, 128, 410)
    if args.only != "budgets":
        print("## Accuracy lost at full share vs calibration samples (test split, points; mean of draws)\n")
        sweep(["cnn_legacy", "mobilenet_legacy", "resnet_legacy"], fits, draws)
    if args.only == "sweep":
        return
    print("\n## Budgets: plan chosen and its cost\n")
    grid = [dict(max_drop=d, holdout=h) for h in (0.2, 0.5) for d in (0.5, 1.0, 2.0)]
    budgets([("resnet_legacy", grid + [dict(max_drop=3.0, holdout=0.5), dict(max_drop=3.0, holdout=0.5, objective="params")]),
             ("mobilenet_legacy", grid + [dict(max_drop=5.0, holdout=0.5)])], repeats)


if __name__ == "__main__":
    main()

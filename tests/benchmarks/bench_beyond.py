"""Architectures beyond classic CNNs: prints the markdown table docs/architectures.md records.

    python tests/benchmarks/bench_beyond.py [--only ARCH ...] [--repeats 30] [--depths] [--distill [--distill-steps N]]

Per fixture case (tests/fixtures/make_beyond.py) and exporter:
- identical copy: the model merged at full share with a copy of itself whose channels are permuted in
  every derived group; layer positions shared / all, what stays per task and why, relative error;
- trained pair at full share: multiply-add ratio, onnxruntime latency of both tasks (the two originals
  one after the other vs the merged model; batch 8, one thread, interleaved, medians of --repeats),
  and test accuracy lost per task (597 digits test samples; 1,000 for conv1d and bert);
- with --depths: the deepest zipper depth whose test drops meet mean <= 1 point and each <= 2;
- with --distill: instead of the table above, each architecture's pair (older exporter) merged at full
  share and distilled (seed 0, --distill-steps steps): test drops and wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import onnxzip  # noqa: E402
from conftest import accuracy_drops, case, load_test_split, rel_err, run  # noqa: E402
from bench_engine import both_tasks_ms  # noqa: E402
from permute import permuted_copy  # noqa: E402

ARCHS = ("convnext", "vit", "vitmha", "swin", "bert", "shufflenet", "conv1d", "yolo")


def latency(d: Path, merged, repeats: int, batch: int = 8) -> tuple[float, float]:
    return both_tasks_ms([d / "a.onnx", d / "b.onnx"], merged,
                         {"input": load_test_split(d.name)["input"][:batch]}, repeats)


def identical_copy(name: str) -> dict:
    d = case(name)
    model = onnx.load(str(d / "a.onnx"))
    with np.load(d / "calib.npz") as f:
        calib = dict(f)
    outputs = json.loads((d / "case.json").read_text()).get("outputs", ["logits"])
    copy, _ = permuted_copy(model, {"input": calib["input"][:2]}, seed=1)
    merged, report = onnxzip.merge([model, copy], calib, {"share": 1.0, "holdout": 0.0})
    x = {"input": load_test_split(name)["input"][:64]}
    ref, got = run(model, x), run(merged, x)
    per_task = sorted({r["not_shared_because"] for r in report["layers"] if not r["shareable"]})
    return {"shared": sum(r["shareable"] for r in report["layers"]), "positions": len(report["layers"]),
            "per_task": "; ".join(per_task),
            "rel_err": max(rel_err(got[f"{t}/{o}"], ref[o]) for t in "ab" for o in outputs)}


def best_depth(name: str) -> tuple[int, list[float]]:
    d = case(name)
    paths, calib = [str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz")
    _, report = onnxzip.merge(paths, calib, {"zipper": 1})
    for k in range(sum(r["shareable"] for r in report["layers"]), 0, -1):
        merged, _ = onnxzip.merge(paths, calib, {"zipper": k})
        got = accuracy_drops(name, merged)
        if np.mean(got) <= 1.0 and max(got) <= 2.0:
            return k, got
    return 0, [0.0, 0.0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--depths", action="store_true", help="also search the deepest depth within the bounds")
    ap.add_argument("--only", nargs="+", choices=ARCHS, default=ARCHS)
    ap.add_argument("--distill", action="store_true", help="distilled full-share drops instead (needs torch)")
    ap.add_argument("--distill-steps", type=int, default=2000)
    args = ap.parse_args(argv)
    if args.distill:
        print("| pair | steps | drop a / b (points) | wall s |")
        print("|---|---:|---:|---:|")
        for arch in args.only:
            name = f"{arch}_legacy"
            d = case(name)
            start = time.perf_counter()
            merged, _ = onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"),
                                      {"share": 1.0, "distill": True, "distill_steps": args.distill_steps, "seed": 0})
            wall = time.perf_counter() - start
            da, db = accuracy_drops(name, merged)
            print(f"| {name} | {args.distill_steps} | {da:.2f} / {db:.2f} | {wall:.0f} |", flush=True)
        return
    head = ("| architecture | exporter | identical copy: positions shared | stays per task | rel. error "
            "| trained pair: MACs ratio | both tasks: originals / merged ms | speed-up | test drop a / b (points) |")
    if args.depths:
        head += " deepest depth within bounds: k, drop a / b |"
    print(head)
    print("|---|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if args.depths else ""))
    for arch in args.only:
        for exporter in ("legacy", "dynamo"):
            name = f"{arch}_{exporter}"
            d = case(name)
            same = identical_copy(name)
            merged, report = onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"),
                                           {"share": 1.0})
            sep, mer = latency(d, merged, args.repeats)
            da, db = accuracy_drops(name, merged)
            row = (f"| {arch} | {exporter} | {same['shared']}/{same['positions']} | {same['per_task']} "
                   f"| {same['rel_err']:.1e} | {report['totals']['macs_ratio']:.2f} | {sep:.2f} / {mer:.2f} "
                   f"| {sep / mer:.2f}x | {da:.2f} / {db:.2f} |")
            if args.depths:
                k, (ka, kb) = best_depth(name)
                row += f" {k}: {ka:.2f} / {kb:.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()

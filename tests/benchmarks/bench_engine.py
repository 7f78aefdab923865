"""Engine benchmarks: prints markdown tables (the README records a run).

    python tests/benchmarks/bench_engine.py [--quick] [--json OUT.json]
    python tests/benchmarks/bench_engine.py --merge-cost [--repeats 3]   # only table 2b (issue #14)

1. All-pairs cost + optimal assignment for one layer of width n (one matrix product), and the ratio
   against the per-pair loop at n = 256.
2. Merge wall time divided by the time onnxruntime takes to run both originals over the same
   calibration data (MLP and CNN digit pairs).
2b. Merge cost against one onnxruntime pass of both originals over the same calibration data, CPU time
   (user + sys of the process, every thread) and wall, measured one after the other in each repeat:
   a ResNet-20-like pair (3x32x32, 16/32/64 channels, random weights, built here without PyTorch) with
   269 calibration images, and the digit pairs; with each task's held-out top-1 agreement, and the
   multiply-adds of the layer Hessians and cross moments against those of one pass (the arithmetic floor).
3. Both tasks through the merged model (full share) vs the two originals one after the other:
   latency ratio and file size ratio.
4. Accuracy drop at full share without labels: onnxzip's calibration vs the MTZ paper's formula,
   each with Hessian and with random pairing.
Every time is the median of several runs measured side by side in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import tempfile
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

import onnxzip  # noqa: E402
from onnxzip import pairing  # noqa: E402

CASES = ROOT / "tests" / "fixtures" / "cases"


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _layer_problem(n: int, rng):
    d = n + 1
    x = rng.normal(size=(d + 64, d))
    ha = x.T @ x / len(x) + 1e-3 * np.eye(d)
    x = rng.normal(size=(d + 64, d))
    hb = x.T @ x / len(x) + 1e-3 * np.eye(d)
    return rng.normal(size=(d, n)), rng.normal(size=(d, n)), ha, hb


def bench_pairing(widths, repeats):
    rng = np.random.default_rng(0)
    rows = []
    loop_ratio = None
    for n in widths:
        a, b, ha, hb = _layer_problem(n, rng)
        t = median_time(lambda: pairing.assign(pairing.pair_costs(a, b, ha, hb)), repeats if n < 4096 else 1)
        row = {"n": n, "vectorized_s": t}
        if n == 256:
            loop = median_time(lambda: pairing.assign(pairing.pair_cost_loop(a, b, ha, hb)), 1)
            row["loop_s"] = loop
            loop_ratio = loop / t
            row["paper_loop_s"] = _paper_loop_estimate(a, b, ha, hb)
        rows.append(row)
    return rows, loop_ratio


def _paper_loop_estimate(a, b, ha, hb, sample_pairs: int = 64) -> float:
    """The per-pair computation as MTZ states it (O(n^5)): (H_A^-1 + H_B^-1)^-1 formed for each pair.
    Timed on a sample of pairs and scaled to all n_A * n_B pairs (too slow to run in full)."""
    start = time.perf_counter()
    for p in range(sample_pairs):
        i, j = p % a.shape[1], (7 * p) % b.shape[1]
        m = np.linalg.inv(np.linalg.inv(ha) + np.linalg.inv(hb))
        diff = a[:, i] - b[:, j]
        0.5 * diff @ m @ diff
    return (time.perf_counter() - start) / sample_pairs * a.shape[1] * b.shape[1]


def _sessions(models, threads=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return [ort.InferenceSession(str(m) if not hasattr(m, "SerializeToString") else m.SerializeToString(), so,
                                 providers=["CPUExecutionProvider"]) for m in models]


def bench_merge_time(case: str, repeats: int):
    d = CASES / case
    models = [str(d / "a.onnx"), str(d / "b.onnx")]
    calib = dict(np.load(d / "calib.npz"))

    def originals(load: bool):
        sessions = _sessions(models) if load else pre
        for s in sessions:
            out = s.get_outputs()[0].name
            for start in range(0, len(calib["input"]), 64):
                s.run([out], {"input": calib["input"][start:start + 64]})

    pre = _sessions(models)
    run_only = median_time(lambda: originals(False), repeats * 3)
    load_run = median_time(lambda: originals(True), repeats * 3)
    merge_s = median_time(lambda: onnxzip.merge(models, str(d / "calib.npz"), {"share": 1.0}), repeats)
    return {"case": case, "merge_s": merge_s, "ort_run_s": run_only, "ort_load_run_s": load_run,
            "ratio_vs_run": merge_s / run_only, "ratio_vs_load_run": merge_s / load_run}


def resnet20(seed: int, classes: int = 10) -> "onnx.ModelProto":
    """A ResNet-20-like CIFAR network (3x32x32 input; a 3x3 stem of 16 channels, then 3 stages of 3 basic
    blocks with 16, 32, 64 channels, 1x1 projection shortcuts where the shape changes; global average
    pool; a Gemm) with He-initialized random weights: convolutions of 145, 289 and 577 inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, s):
        i = len(inits) // 2
        w = (rng.normal(size=(cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        b = (rng.normal(size=cout) * 0.05).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")])
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[k, k],
                                      strides=[s, s], pads=[k // 2] * 4))
        return f"c{i}"

    def relu(x):
        nodes.append(helper.make_node("Relu", [x], [x + "r"]))
        return x + "r"

    x, cin = relu(conv("input", 3, 16, 3, 1)), 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for j in range(3):
            s = stride if j == 0 else 1
            h = conv(relu(conv(x, cin, cout, 3, s)), cout, cout, 3, 1)
            short = conv(x, cin, cout, 1, s) if (s != 1 or cin != cout) else x
            nodes.append(helper.make_node("Add", [h, short], [h + "a"]))
            x, cin = relu(h + "a"), cout
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fcw", "fcb"], ["logits"], transB=1)]
    inits += [numpy_helper.from_array((rng.normal(size=(classes, 64)) / 8).astype(np.float32), "fcw"),
              numpy_helper.from_array(np.zeros(classes, np.float32), "fcb")]
    graph = helper.make_graph(nodes, "resnet20", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process: ours, BLAS, onnxruntime
    return usage.ru_utime + usage.ru_stime


def bench_merge_cost(label: str, models: list[str], calib: str, repeats: int, options=None) -> dict:
    """Median merge CPU and wall time against one onnxruntime pass of both originals over the same
    calibration data (optimized sessions made beforehand, batches of 64 like the merge), measured one
    after the other in each repeat so both see the same machine load; after one warm-up merge."""
    options = {"share": 1.0, **(options or {})}
    data = dict(np.load(calib))
    sessions = _sessions(models)

    def ort_pass():
        for s in sessions:
            for start in range(0, len(data["input"]), 64):
                s.run(None, {"input": data["input"][start:start + 64]})

    with counted_hessian_macs() as hessian_macs:
        _, report = onnxzip.merge(models, calib, options)
    pass_macs = report["totals"]["macs_before"] * len(data["input"])
    ort_pass()
    runs = []
    for _ in range(repeats):
        t, c = time.perf_counter(), _cpu_s()
        ort_pass()
        ort_wall, ort_cpu = time.perf_counter() - t, _cpu_s() - c
        t, c = time.perf_counter(), _cpu_s()
        _, report = onnxzip.merge(models, calib, options)
        runs.append((_cpu_s() - c, time.perf_counter() - t, ort_cpu, ort_wall))
    merge_cpu, merge_wall, ort_cpu, ort_wall = (statistics.median(r[i] for r in runs) for i in range(4))
    fidelity = {t: (f["top1_agreement"], f["samples"]) for t, f in report["fidelity"].items()}
    return {"pair": label, "samples": len(data["input"]), "merge_cpu_s": merge_cpu, "merge_wall_s": merge_wall,
            "ort_cpu_s": ort_cpu, "ort_wall_s": ort_wall, "cpu_ratio": merge_cpu / ort_cpu,
            "wall_ratio": merge_wall / ort_wall, "heldout_top1": fidelity,
            "hessian_macs_per_pass": hessian_macs[0] / pass_macs}


@contextlib.contextmanager
def counted_hessian_macs():
    """Multiply-adds of the Hessians (X^T X, its symmetric half, as BLAS's syrk does it) and of the cross
    moments (X^T Y) made while inside: the floor of the merge's own arithmetic, beside one pass's."""
    from onnxzip import hessian

    count = [0]
    real = hessian.Moments.update

    def update(self, x, y=None):
        d = x.shape[1] + 1
        count[0] += len(x) * ((d * (d + 1) // 2 if self.own_gram else 0) + (d * y.shape[1] if y is not None else 0))
        return real(self, x, y)

    hessian.Moments.update = update
    try:
        yield count
    finally:
        hessian.Moments.update = real


def merge_cost_rows(repeats: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        import onnx

        paths = [str(Path(tmp) / f"resnet20_{s}.onnx") for s in (0, 1)]
        for seed, path in zip((0, 1), paths):
            onnx.save(resnet20(seed), path)
        calib = str(Path(tmp) / "calib.npz")
        np.savez(calib, input=np.random.default_rng(2).normal(size=(269, 3, 32, 32)).astype(np.float32))
        rows.append(bench_merge_cost("ResNet-20-like, 32x32", paths, calib, repeats))
    for case in ("mlp_legacy", "cnn_legacy", "resnet_legacy"):
        d = CASES / case
        rows.append(bench_merge_cost(case, [str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"), repeats))
    return rows


def print_merge_cost(rows: list[dict]) -> None:
    print("\n### Merge cost vs one onnxruntime pass of both originals over the same calibration data "
          "(medians, measured side by side)\n")
    print("| pair | calibration samples | merge CPU (s) | merge wall (s) | ORT pass CPU (s) | ORT pass wall (s) | "
          "merge / ORT pass, CPU | merge / ORT pass, wall | Hessian multiply-adds / one pass's | "
          "held-out top-1 agreement a / b (samples) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        agree = " / ".join(f"{a:.3f}" for a, _ in r["heldout_top1"].values())
        n = next(iter(r["heldout_top1"].values()))[1]
        print(f"| {r['pair']} | {r['samples']} | {r['merge_cpu_s']:.2f} | {r['merge_wall_s']:.2f} | "
              f"{r['ort_cpu_s']:.3f} | {r['ort_wall_s']:.3f} | {r['cpu_ratio']:.1f} | {r['wall_ratio']:.1f} | "
              f"{r['hessian_macs_per_pass']:.2f} | {agree} ({n}) |")


def both_tasks_ms(originals, merged, x: dict, repeats: int) -> tuple[float, float]:
    """Median ms of one batch through the originals one after the other, and through the merged model
    (one onnxruntime thread each; interleaved, so both see the same machine noise)."""
    *separate, joined = _sessions([*originals, merged], threads=1)
    for s in (*separate, joined):
        s.run(None, x)  # warm up
    sep, mer = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for s in separate:
            s.run(None, x)
        sep.append(time.perf_counter() - start)
        start = time.perf_counter()
        joined.run(None, x)
        mer.append(time.perf_counter() - start)
    return 1e3 * statistics.median(sep), 1e3 * statistics.median(mer)


def bench_latency(case: str, batch: int, repeats: int):
    d = CASES / case
    merged, report = onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"), {"share": 1.0})
    x = {"input": dict(np.load(d / "test.npz"))["input"][:batch]}
    separate_ms, merged_ms = both_tasks_ms([d / "a.onnx", d / "b.onnx"], merged, x, repeats)
    size_a, size_b = (d / "a.onnx").stat().st_size, (d / "b.onnx").stat().st_size
    return {"case": case, "batch": batch, "separate_ms": separate_ms, "merged_ms": merged_ms,
            "speedup": separate_ms / merged_ms,
            "size_ratio": (size_a + size_b) / merged.ByteSize(), "macs_ratio": report["totals"]["macs_ratio"]}


def bench_quality(case: str):
    d = CASES / case
    test = dict(np.load(d / "test.npz"))
    refs, names = {}, {}
    for t in "ab":
        (s,) = _sessions([d / f"{t}.onnx"])
        names[t] = next(o.name for o in s.get_outputs() if len(o.shape) == 2)  # the class scores
        refs[t] = s.run([names[t]], {"input": test["input"]})[0]
    row = {"case": case}
    for label, opts in [("calibrated", {}), ("paper", {"calibrate": False}),
                        ("random+calibrated", {"pairing": "random"}),
                        ("random+paper", {"pairing": "random", "calibrate": False})]:
        merged, _ = onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"),
                                  {"share": 1.0, **opts})
        (sm,) = _sessions([merged])
        drops = []
        for t in "ab":
            got = sm.run([f"{t}/{names[t]}"], {"input": test["input"]})[0]
            drops.append(100 * (np.mean(refs[t].argmax(1) == test[f"y{t}"]) - np.mean(got.argmax(1) == test[f"y{t}"])))
        row[label] = (float(np.mean(drops)), float(max(drops)))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--merge-cost", action="store_true",
                        help="only table 2b: merge CPU and wall against one onnxruntime pass (issue #14)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per measurement (medians)")
    args = parser.parse_args(argv)
    repeats = args.repeats
    if args.merge_cost:
        rows = merge_cost_rows(repeats)
        print_merge_cost(rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"merge_cost": rows}, indent=2))
        return
    widths = [256, 1024] if args.quick else [256, 1024, 4096]
    results = {}

    pair_rows, loop_ratio = bench_pairing(widths, repeats)
    results["pairing"] = pair_rows
    print("\n### Pair costs + optimal assignment, one layer (d = n + 1 inputs)\n")
    print("| width n | one product + assignment (s) | per-pair loop, M shared (s) | per-pair as MTZ states it (s, extrapolated) |")
    print("|---:|---:|---:|---:|")
    for r in pair_rows:
        loop = f"{r['loop_s']:.2f}" if "loop_s" in r else "-"
        paper = f"{r['paper_loop_s']:.0f}" if "paper_loop_s" in r else "-"
        print(f"| {r['n']} | {r['vectorized_s']:.4f} | {loop} | {paper} |")
    at256 = next(r for r in pair_rows if r["n"] == 256)
    print(f"\nat n = 256: per-pair loop / one product **{loop_ratio:.0f}x**; "
          f"per-pair as MTZ states it / one product **{at256['paper_loop_s'] / at256['vectorized_s']:.0f}x**")

    merge_rows = [bench_merge_time(c, repeats) for c in ("mlp_legacy", "cnn_legacy", "resnet_legacy")]
    results["merge_time"] = merge_rows
    print("\n### Merge wall time vs onnxruntime running both originals over the calibration data (512 samples)\n")
    print("| pair | merge (s) | ORT run (s) | ORT load+run (s) | merge / run | merge / (load+run) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in merge_rows:
        print(f"| {r['case']} | {r['merge_s']:.3f} | {r['ort_run_s']:.4f} | {r['ort_load_run_s']:.4f} | "
              f"{r['ratio_vs_run']:.0f} | {r['ratio_vs_load_run']:.1f} |")

    cost_rows = merge_cost_rows(repeats)
    results["merge_cost"] = cost_rows
    print_merge_cost(cost_rows)

    lat_rows = [bench_latency(c, b, 200 if b == 1 else 50) for c in ("mlp_legacy", "cnn_legacy", "resnet_legacy")
                for b in (1, 64)]
    results["latency"] = lat_rows
    print("\n### Both tasks: merged model (full share) vs the two originals one after the other (1 thread)\n")
    print("| pair | batch | originals (ms) | merged (ms) | speedup | MACs ratio | file size ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in lat_rows:
        print(f"| {r['case']} | {r['batch']} | {r['separate_ms']:.3f} | {r['merged_ms']:.3f} | "
              f"{r['speedup']:.2f}x | {r['macs_ratio']:.2f} | {r['size_ratio']:.2f} |")

    quality = [bench_quality(c) for c in ("mlp_legacy", "cnn_legacy", "mlp_skl2onnx", "resnet_legacy",
                                          "mobilenet_legacy", "cnn_nhwc")]
    results["quality"] = quality
    print("\n### Accuracy drop (points, test split) at full share, no labels: mean / worst task\n")
    print("| pair | onnxzip (calibrated) | MTZ formula | random pairs + calibrated | random pairs + MTZ formula |")
    print("|---|---:|---:|---:|---:|")
    for r in quality:
        cells = [f"{r[k][0]:+.2f} / {r[k][1]:+.2f}" for k in
                 ("calibrated", "paper", "random+calibrated", "random+paper")]
        print(f"| {r['case']} | " + " | ".join(cells) + " |")
    curve = bench_curve("resnet_legacy")
    results["curve"] = curve
    print("\n### Zippering curve, ResNet-like pair (resnet_legacy): first k layers shared, then share fractions\n")
    print("| setting | params ratio | MACs ratio | rel. error a | rel. error b | top-1 agreement a | top-1 agreement b |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for p in curve:
        fa, fb = p["fidelity"]["a"], p["fidelity"]["b"]
        print(f"| {p['label']} | {p['param_ratio']:.2f} | {p['macs_ratio']:.2f} | {fa['rel_err']:.3f} | "
              f"{fb['rel_err']:.3f} | {fa['top1_agreement']:.3f} | {fb['top1_agreement']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def bench_curve(case: str) -> list[dict]:
    d = CASES / case
    start = time.perf_counter()
    _, report = onnxzip.merge([str(d / "a.onnx"), str(d / "b.onnx")], str(d / "calib.npz"), {"curve": True})
    print(f"\n(curve of {len(report['curve'])} points in one run: {time.perf_counter() - start:.1f} s)")
    return report["curve"]


if __name__ == "__main__":
    main()

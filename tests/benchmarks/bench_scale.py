"""Big-model benchmark: merge two ResNet-50-sized and two VGG-16-sized models (random weights).

    pip install ".[fixtures]"   # PyTorch CPU, only to build the models
    python tests/benchmarks/bench_scale.py [--samples 256] [--vgg-samples 64] [--only resnet50]

Prints a markdown table: merge wall time, peak memory of the merging process (max RSS, measured in a
child process), one onnxruntime pass of both originals over the same calibration data, and their
ratio. Models are built with PyTorch and exported to a temporary folder (nothing is committed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def build_models(folder: Path, arch: str) -> list[Path]:
    import torch
    import torch.nn as nn

    def conv_bn(cin, cout, k, s=1):
        return [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Bottleneck(nn.Module):
        def __init__(self, cin, mid, stride):
            super().__init__()
            cout = mid * 4
            self.body = nn.Sequential(*conv_bn(cin, mid, 1), nn.ReLU(), *conv_bn(mid, mid, 3, stride), nn.ReLU(),
                                      *conv_bn(mid, cout, 1))
            self.short = (nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout
                          else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    def resnet50():
        layers, cin = [*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
        for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
                cin = mid * 4
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))

    def vgg16():
        layers, cin = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, 1, 1), nn.ReLU()]
                cin = v
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(),
                             nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = resnet50() if arch == "resnet50" else vgg16()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.eval()
        path = folder / f"{arch}_{seed}.onnx"
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        paths.append(path)
    return paths


def ort_pass(paths: list[Path], data: np.ndarray, batch: int) -> float:
    """Seconds for onnxruntime to run every model over `data` (sessions created outside the timing)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in paths]
    start = time.perf_counter()
    for s in sessions:
        for i in range(0, len(data), batch):
            s.run(None, {"input": data[i:i + batch]})
    return time.perf_counter() - start


MERGE_CHILD = """
import json, sys, time, resource
import onnxzip
paths, calib, options = sys.argv[1:3], sys.argv[3], json.loads(sys.argv[4])
start = time.perf_counter()
def progress(stage, fraction, message):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB so far: where the peak happens
    print(f"{time.perf_counter() - start:8.1f}s {peak:6.2f}GiB {stage:<12} {fraction:5.2f} {message}",
          file=sys.stderr, flush=True)
model, report = onnxzip.merge(paths, calib, options, progress=progress)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "param_ratio": report["totals"]["param_ratio"], "macs_ratio": report["totals"]["macs_ratio"]}))
"""


def merge_in_child(paths: list[Path], calib: Path, options: dict) -> dict:
    log = os.environ.get("BENCH_PROGRESS_LOG", os.devnull)
    with open(log, "a") as progress:
        out = subprocess.run([sys.executable, "-c", MERGE_CHILD, *map(str, paths), str(calib), json.dumps(options)],
                             stdout=subprocess.PIPE, stderr=progress, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"merge failed (exit {out.returncode}); see {log}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--vgg-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--only", choices=["resnet50", "vgg16"])
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for arch in ("resnet50", "vgg16"):
            if args.only and arch != args.only:
                continue
            n = args.samples if arch == "resnet50" else args.vgg_samples
            paths = build_models(folder, arch)
            data = np.random.default_rng(0).normal(size=(n, 3, 224, 224)).astype(np.float32)
            calib = folder / f"{arch}_calib.npz"
            np.savez(calib, input=data)
            ort_s = ort_pass(paths, data, args.batch_size)
            options = {"share": 1.0, "batch_size": args.batch_size, "holdout": 0.0}
            result = merge_in_child(paths, calib, options)
            rows.append({"arch": arch, "samples": n, **result, "ort_both_s": ort_s,
                         "ratio": result["seconds"] / ort_s})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| models | calibration | merge (s) | peak memory (GiB) | ORT pass, both originals (s) | merge / ORT |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| 2 x {r['arch']} | {r['samples']} x 3x224x224 | {r['seconds']:.0f} | {r['max_rss_kb'] / 2**20:.2f} | "
              f"{r['ort_both_s']:.1f} | {r['ratio']:.1f} |")


if __name__ == "__main__":
    main()

"""torchvision's (and two of timm's) architectures, merged with a channel-permuted copy of themselves:
prints the table docs/architectures.md records. Needs torchvision and timm (never in CI's path: pip
install torch torchvision timm onnxscript), and runs onnxzip from this checkout.

    python tests/benchmarks/bench_torchvision.py [--size 64] [--only NAME ...]

Random weights made to carry signal (BatchNorm statistics measured in train mode then perturbed,
LayerNorm affines and zero-initialized heads perturbed), dynamo export at opset 18, 64 random
calibration inputs. Per model: layer positions shared at full share, what stays per task, the
relative output error against the original (exact answer 0) and the multiply-add ratio of the model
merged with itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import onnxzip  # noqa: E402
from conftest import rel_err, run  # noqa: E402
from permute import permuted_copy  # noqa: E402

MODELS = ("convnext_tiny", "densenet121", "shufflenet_v2_x0_5", "efficientnet_b0", "vit_small", "swin_small",
          "ghostnet_100", "mobilevit_xxs")
TIMM = ("ghostnet_100", "mobilevit_xxs")  # from timm (pip install timm), the others from torchvision


def build(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "vit_small":  # torchvision's VisionTransformer (vit_b_16's code), small enough for a CPU
        from torchvision.models.vision_transformer import VisionTransformer
        model = VisionTransformer(image_size=size, patch_size=16, num_layers=2, num_heads=4, hidden_dim=128,
                                  mlp_dim=256)
    elif name == "swin_small":  # torchvision's SwinTransformer (swin_t's code), 2 stages
        from torchvision.models.swin_transformer import SwinTransformer
        model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4])
    elif name in TIMM:
        import timm
        model = timm.create_model(name, pretrained=False)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    model.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, size, size))
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean += 0.1 * torch.randn(mod.running_mean.shape, generator=g)
                mod.running_var *= torch.exp(0.2 * torch.randn(mod.running_var.shape, generator=g))
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
            if isinstance(mod, torch.nn.Linear) and not mod.weight.abs().sum():
                mod.weight.normal_(0, 0.05, generator=g)
    return model.eval()


def export(model: torch.nn.Module, size: int) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as td, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = str(Path(td) / "m.onnx")
        torch.onnx.export(model, (torch.randn(2, 3, size, size),), path, dynamo=True, opset_version=18,
                          input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
        return onnx.load(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--only", nargs="+", choices=MODELS, default=MODELS)
    args = ap.parse_args(argv)
    calib = {"input": np.random.default_rng(0).standard_normal((64, 3, args.size, args.size)).astype(np.float32)}
    x = {"input": calib["input"][:8]}
    print("| torchvision model | positions shared | stays per task | rel. error | MACs ratio (self) | merge s |")
    print("|---|---:|---|---:|---:|---:|")
    for name in args.only:
        model = export(build(name, args.size), args.size)
        copy, _ = permuted_copy(model, {"input": calib["input"][:2]}, seed=1)
        ref = run(model, x)["logits"]
        start = time.perf_counter()
        merged, report = onnxzip.merge([model, copy], calib, {"share": 1.0, "holdout": 0.0})
        seconds = time.perf_counter() - start
        got = run(merged, x)
        err = max(rel_err(got[f"{t}/logits"], ref) for t in "ab")
        _, itself = onnxzip.merge([model, model], calib, {"share": 1.0, "holdout": 0.0})
        per_task = sorted({r["not_shared_because"] for r in report["layers"] if not r["shareable"]})
        unread = [w for w in report.get("warnings", []) if "does not merge" in w][:1]
        print(f"| {name} | {sum(r['shareable'] for r in report['layers'])}/{len(report['layers'])} "
              f"| {'; '.join(per_task + [w.split(': ', 1)[-1][:80] for w in unread])} | {err:.1e} "
              f"| {itself['totals']['macs_ratio']:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()

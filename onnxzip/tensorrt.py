"""Can TensorRT on a Jetson read this model? Opset and operators, checked without TensorRT.

The operator list is onnx-tensorrt's support matrix (every op marked supported in its operators.md
for TensorRT 8.4-8.5), plus HardSwish; TensorRT 8.6 added LayerNormalization (transformers, ConvNeXt)
and 10.x Gelu and GroupNormalization (their release notes). The parsers of TensorRT 8.5 (JetPack 5)
and 8.6 (JetPack 6.0) read opsets up to 17; TensorRT 10.x up to 20.
"""

from __future__ import annotations

import onnx

TRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GRU HardSigmoid HardSwish Identity If
ImageScaler InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean Min Mul Neg NonMaxSuppression Not Or Pad ParametricSoftplus
Pow PRelu QuantizeLinear RandomUniform RandomUniformLike Range ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh
Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile
TopK Transpose Unsqueeze Upsample Where Xor
""".split())

# (name, highest opset its ONNX parser reads, operators it parses)
VERSIONS = (("TensorRT 8.5 (JetPack 5)", 17, TRT_OPS),
            ("TensorRT 8.6 (JetPack 6.0)", 17, TRT_OPS | {"LayerNormalization"}),
            ("TensorRT 10.x (JetPack 6.1+)", 20, TRT_OPS | {"LayerNormalization", "GroupNormalization", "Gelu"}))


def readiness(model: onnx.ModelProto) -> dict:
    """Which TensorRT versions can parse `model`, and what stops the others."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    foreign = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    used = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    newest_ops = VERSIONS[-1][2]
    result = {"opset": opset, "ops_outside_tensorrt": sorted(used - newest_ops) + foreign, "versions": {}}
    for name, max_opset, ops in VERSIONS:
        blockers = ([f"opset {opset} > {max_opset}"] if opset > max_opset else []) + \
            [f"op {op} not parsed" for op in sorted(used - ops) + foreign]
        result["versions"][name] = {"readable": not blockers, "blockers": blockers}
    return result


def summary_line(info: dict) -> str:
    parts = []
    for name, v in info["versions"].items():
        parts.append(f"{name}: {'yes' if v['readable'] else 'no (' + '; '.join(v['blockers']) + ')'}")
    return "TensorRT can read the merged model? " + ", ".join(parts)

"""What the fit needs from the original models, recorded in one pass of each over the calibration data.

The originals never change while merging. Instead of advancing them layer by layer beside the merged
models (holding or spilling their big activations the whole way), each is run once, up front, with
its layer outputs as graph outputs, and only what the fit reads is kept:

- each layer's pre-activations at the rows its Hessian uses (hessian.RowSample): its targets;
- per channel, the spread of those pre-activations over all rows, when a ReLU/Clip follows
  (zip_loop.FlatRange);
- for a layer feeding a residual Add, the Add's output at the same rows (residual targets);
- the same rows of every writer of a tied channel group, from which tied.TiedStats takes its moments.

The rows are a few hundred MB for a 224x224 ResNet-50 pair (32,768 rows per layer), against the tens
of GB of activations the layer-by-layer capture of the originals wrote to disk and read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .align import Alignment
from .canonicalize import CanonicalModel, Layer
from .capture import done, new_tensor
from .hessian import RowSample, output_rows, position_sample
from .overlap import overlapped
from .runtime import batches, make_session


def activation_after(model: CanonicalModel, layer: Layer) -> Optional[gs.Node]:
    """The ReLU/Clip that alone reads the layer's output, if any."""
    consumers = model.graph.tensors()[layer.output].outputs
    return consumers[0] if len(consumers) == 1 and consumers[0].op in ("Relu", "Clip") else None


def residual_sum(model: CanonicalModel, layer: Layer) -> Optional[tuple[str, list[str]]]:
    """(the sum's output, its other addends) when the layer's output alone feeds an Add/Sum of
    tensors of its own shape: a residual connection."""
    consumers = model.graph.tensors()[layer.output].outputs
    if len(consumers) != 1 or consumers[0].op not in ("Add", "Sum"):
        return None
    add = consumers[0]
    others = [t.name for t in add.inputs if t.name != layer.output]
    if not others or any(model.shapes.get(o) != model.shapes.get(layer.output) for o in others):
        return None
    return add.outputs[0].name, others


# Every recorded output of a batch is alive at once, for two batches (one running, one being kept):
# batches are cut to keep each under this. (ResNet-50 at 224x224: about 60 MB a sample, batches of 4.)
_BATCH_BYTES = 256 * 2**20


def _batch(model: CanonicalModel, names: list[str], batch_size: int) -> int:
    per_sample = 4 * sum(int(np.prod([d for d in model.shapes.get(n, ())[1:] if d], dtype=np.int64)) for n in names)
    return max(1, min(batch_size, _BATCH_BYTES // max(per_sample, 1)))


@dataclass
class LayerRecord:
    sample: RowSample
    rows: object  # (kept rows, channels) float32: ndarray or capture.Spilled
    sum_rows: object = None  # the residual Add's output at the same rows (residual_sum layers)
    spread: Optional[np.ndarray] = None  # per-channel standard deviation over all rows (activation_after)


class OriginalRecord:
    """LayerRecords of every task's layers: all of them when calibrating, else the tied writers'."""

    def __init__(self, al: Alignment, data: dict[str, np.ndarray], options, providers, wanted: dict[str, set[int]],
                 spill_dir: Optional[str] = None, spill_bytes: float = float("inf")):
        self.records: dict[tuple[str, int], LayerRecord] = {}
        for task, indices in wanted.items():
            if indices:
                self._record(al, task, sorted(indices), data, options, providers, spill_dir, spill_bytes)

    def get(self, task: str, layer: Layer) -> LayerRecord:
        return self.records[(task, layer.index)]

    def _record(self, al: Alignment, task: str, indices: list[int], data, options, providers,
                spill_dir, spill_bytes) -> None:
        model = al.models[task]
        layers = [model.layers[i] for i in indices]
        sums = {l.index: residual_sum(model, l) for l in layers} if options.calibrate else {}
        spreads = {l.index for l in layers if options.calibrate and activation_after(model, l) is not None}
        names = list(dict.fromkeys([l.output for l in layers] + [s[0] for s in sums.values() if s]))
        proto = model.to_onnx()
        known = {o.name for o in proto.graph.output}
        proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                  for name in names if name not in known)
        # Unoptimized like every capture session: an optimized one was no faster here (256 ResNet-50
        # samples, 68 s against 71 s) and took 1 GB more.
        session = make_session(proto, providers)
        feeds = {i.name: data[i.name] for i in model.inputs}
        n = len(next(iter(feeds.values())))
        batch = model.fixed_batch or _batch(model, names, options.batch_size)
        stores, totals = {}, {}

        def runs():
            for part in batches(n, batch):
                yield part, dict(zip(names, session.run(names, {k: v[part] for k, v in feeds.items()})))

        def keep(ran) -> None:
            part, out = ran
            if not stores:
                stores.update(self._allocate(al, task, layers, sums, out, n, options, spill_dir, spill_bytes))
            for layer in layers:
                record = self.records[(task, layer.index)]
                index, span = record.sample.batch(part), record.sample.span(part)
                y = out[layer.output]
                stores[(layer.index, "rows")][span] = output_rows(layer, y, index)
                if sums.get(layer.index):
                    stores[(layer.index, "sum")][span] = output_rows(layer, out[sums[layer.index][0]], index)
                if layer.index in spreads:  # float32 products within a batch, float64 sums across
                    values = np.moveaxis(y, layer.channel_axis, 1).reshape(len(y), layer.width, -1)
                    total, squares = totals.get(layer.index, (0.0, 0.0))
                    totals[layer.index] = (total + values.sum(axis=(0, 2), dtype=np.float64),
                                           squares + np.einsum("ncp,ncp->c", values, values).astype(np.float64))

        # the next batch runs in onnxruntime while this one's rows are kept (overlap.py)
        overlapped(runs(), keep)
        for (index, kind), store in stores.items():
            if kind == "rows":
                self.records[(task, index)].rows = done(store)
            else:
                self.records[(task, index)].sum_rows = done(store)
        for index, (total, squares) in totals.items():
            count = n * self.records[(task, index)].sample.per_sample
            self.records[(task, index)].spread = np.sqrt(np.maximum(squares / count - (total / count) ** 2, 0.0))

    def _allocate(self, al, task, layers, sums, out, n, options, spill_dir, spill_bytes) -> dict:
        """One (kept rows, channels) array per recorded tensor; all on disk when together they would
        take more than spill_bytes."""
        shapes = {}
        for layer in layers:
            per_sample = len(output_rows(layer, out[layer.output][:1]))
            sample = position_sample(al.models.values(), layer, n, per_sample, options.hessian_rows, options.seed)
            self.records[(task, layer.index)] = LayerRecord(sample, None)
            shapes[(layer.index, "rows")] = (sample.kept, layer.width)
            if sums.get(layer.index):
                shapes[(layer.index, "sum")] = (sample.kept, layer.width)
        spill = 4 * sum(r * c for r, c in shapes.values()) > spill_bytes
        return {key: new_tensor(shape, np.float32, spill_dir if spill else None) for key, shape in shapes.items()}

"""Load and validate the user's inputs: ONNX models and the calibration .npz.

Everything here refuses bad input with a message that names the file or field and says what to do,
before any heavy work starts.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx

from .errors import InvalidCalibrationError, InvalidModelError

# Opsets whose operator semantics onnxzip's canonicalizer knows. Older graphs: re-export.
MIN_OPSET = 11
MAX_OPSET = 23

# A calibration archive may expand to at most this many bytes (a .npz is a zip: zip-bomb guard).
DEFAULT_MAX_CALIBRATION_BYTES = 4 << 30


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, element type and shape (None for a symbolic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[Optional[int], ...]


def load_model(path: str, *, allow_external_data: bool = True, label: Optional[str] = None) -> onnx.ModelProto:
    """Read an .onnx file and check it: parses, passes onnx.checker, opset onnxzip understands.

    `label` names the file in messages (default: its base name; the service passes the client's name).
    """
    label = label or os.path.basename(path)
    if not os.path.isfile(path):
        raise InvalidModelError(f"model file '{path}' does not exist: give the path of an .onnx file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise InvalidModelError(
            f"'{label}' is not a readable ONNX model ({type(err).__name__}: {err}); "
            "re-export it or check the file was not truncated") from err
    if not model.graph.node:
        raise InvalidModelError(f"'{label}' holds no graph nodes: is it really an ONNX model?")
    _load_external_data(model, path, allow_external_data, label)
    check_model(model, label)
    return model


def _load_external_data(model: onnx.ModelProto, path: str, allowed: bool, label: str) -> None:
    """Load external tensors, only from files inside the model's own folder."""
    external = [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    if not allowed:
        raise InvalidModelError(
            f"'{label}' keeps {len(external)} tensors in external data files, which are refused here: "
            "save the model as a single file (onnx.save(model, path, save_as_external_data=False))")
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = os.path.realpath(os.path.join(base, location))
        if os.path.isabs(location) or os.path.commonpath([base, target]) != base:
            raise InvalidModelError(
                f"'{label}': tensor '{tensor.name}' points at external data '{location}' outside the "
                "model's folder; move the data file next to the model")
        if not os.path.isfile(target):
            raise InvalidModelError(
                f"'{label}': tensor '{tensor.name}' needs external data file '{location}', which is "
                "missing next to the model")
    onnx.load_external_data_for_model(model, base)


def _all_tensors(model: onnx.ModelProto):
    """Every tensor the model holds, subgraphs (If/Loop/Scan bodies) and sparse tensors included: external
    data is refused or checked wherever it appears."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


def check_model(model: onnx.ModelProto, label: str) -> None:
    """onnx.checker plus the limits onnxzip adds (opset range, float inputs)."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise InvalidModelError(f"'{label}' fails onnx.checker: {first}") from err
    opset = default_opset(model)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InvalidModelError(
            f"'{label}' uses opset {opset}; onnxzip reads opsets {MIN_OPSET}..{MAX_OPSET}: re-export the "
            f"model with an opset in that range (opset 17 suits TensorRT 8.5 and 8.6)")
    for spec in input_specs(model):
        if spec.dtype.kind not in "fiub":
            raise InvalidModelError(f"'{label}': input '{spec.name}' has unsupported type {spec.dtype}")


def default_opset(model: onnx.ModelProto) -> Optional[int]:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers, with dtype and shape."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


# What a damaged or crafted .npz raises inside zipfile/numpy: a bad header or CRC (BadZipFile), an
# encrypted member (RuntimeError), an unknown compression method (NotImplementedError), corrupt
# deflate data (zlib.error), truncation (EOFError, OSError), a bad .npy header (ValueError).
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, RuntimeError, NotImplementedError,
                   ValueError, OSError, EOFError, UnicodeDecodeError)


def load_calibration(path: str, specs: list[InputSpec], *, max_bytes: int = DEFAULT_MAX_CALIBRATION_BYTES,
                     kind: str = "calibration", label: Optional[str] = None) -> dict[str, np.ndarray]:
    """Read CALIB.npz safely (no pickles, sizes checked before loading) and match it to `specs`.

    Returns one float array per graph input, all with the same number of samples. `kind` and `label`
    name the file in messages ("calibration", "evaluation"; default label: the base name).
    """
    label = label or os.path.basename(path)
    if not os.path.isfile(path):
        raise InvalidCalibrationError(f"{kind} file '{path}' does not exist: give an .npz file")
    headers = read_npz_headers(path, max_bytes=max_bytes, label=label)
    mapping = _match_inputs(label, headers, specs)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: np.ascontiguousarray(npz[key]) for name, key in mapping.items()}
    except _ARCHIVE_ERRORS as err:
        raise _damaged(label, err) from err
    return {spec.name: _convert(label, spec, arrays[spec.name]) for spec in specs}


def check_calibration_arrays(arrays: dict[str, np.ndarray], specs: list[InputSpec],
                             label: str = "calibration") -> dict[str, np.ndarray]:
    """The checks of load_calibration for arrays already in memory (the Python API)."""
    headers = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.hasobject:
            raise InvalidCalibrationError(f"{label}: array '{key}' holds Python objects; give numeric arrays")
        headers[key] = (value.shape, value.dtype)
    mapping = _match_inputs(label, headers, specs)
    return {s.name: _convert(label, s, np.ascontiguousarray(arrays[mapping[s.name]])) for s in specs}


def _match_inputs(label: str, headers: dict, specs: list[InputSpec]) -> dict[str, str]:
    """Which array feeds which model input (checked: present, shape, dtype, equal sample counts)."""
    keys = list(headers)
    if len(specs) == 1 and keys == ["arr_0"]:
        mapping = {specs[0].name: "arr_0"}
    else:
        missing = [s.name for s in specs if s.name not in headers]
        if missing:
            raise InvalidCalibrationError(
                f"'{label}' has no array for model input(s) {', '.join(map(repr, missing))}; it holds "
                f"{', '.join(map(repr, keys)) or 'nothing'}. Save one array per input, keyed by input "
                f"name: np.savez(path, **{{{', '.join(repr(s.name) + ': ...' for s in specs)}}})")
        mapping = {s.name: s.name for s in specs}
    for spec in specs:
        _check_header(label, spec, headers[mapping[spec.name]])
    counts = {headers[mapping[s.name]][0][0] for s in specs}
    if len(counts) != 1:
        raise InvalidCalibrationError(
            f"'{label}': inputs hold different numbers of samples {sorted(counts)}; "
            "give every input the same number of samples (axis 0)")
    return mapping


def read_npz_headers(path: str, *, max_bytes: int,
                     label: Optional[str] = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of every array in an .npz, read from the .npy headers without loading data.

    Refuses object arrays (pickles), declared sizes above `max_bytes`, and members whose stored size
    does not match their header (a zip bomb or a truncated file).
    """
    label = label or os.path.basename(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise InvalidCalibrationError(
            f"'{label}' is not an .npz archive ({err}); save it with numpy.savez") from err
    headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise InvalidCalibrationError(
                    f"'{label}' holds '{info.filename}', which is not an .npy array: save the "
                    "calibration with numpy.savez")
            total += info.file_size
            if total > max_bytes:
                raise InvalidCalibrationError(
                    f"'{label}' expands to more than {max_bytes} bytes; send fewer or smaller samples")
            try:
                with archive.open(info) as member:
                    try:
                        version = np.lib.format.read_magic(member)
                        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0)
                        shape, _, dtype = read_header(member)
                    except (ValueError, UnicodeDecodeError) as err:
                        raise InvalidCalibrationError(
                            f"'{label}': '{info.filename}' has no valid .npy header ({err})") from err
                    header_len = member.tell()
            except InvalidCalibrationError:
                raise
            except _ARCHIVE_ERRORS as err:
                raise _damaged(label, err, info.filename) from err
            if dtype.hasobject:
                raise InvalidCalibrationError(
                    f"'{label}': array '{info.filename[:-4]}' holds Python objects (a pickle), which "
                    "onnxzip never loads; save plain numeric arrays")
            expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if info.file_size != expected:
                raise InvalidCalibrationError(
                    f"'{label}': array '{info.filename[:-4]}' declares {expected} bytes but stores "
                    f"{info.file_size}; the file is damaged or crafted, save it again with numpy.savez")
            headers[info.filename[:-4]] = (tuple(shape), dtype)
    if not headers:
        raise InvalidCalibrationError(f"'{label}' holds no arrays")
    return headers


def check_npz(path: str, *, max_bytes: int, label: Optional[str] = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """An .npz's checks that need no model (the service's file uploads): the headers as read_npz_headers
    reads them, then every array decompresses and holds finite numbers. Returns {name: (shape, dtype)}."""
    label = label or os.path.basename(path)
    headers = read_npz_headers(path, max_bytes=max_bytes, label=label)
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in headers:
                array = npz[name]
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise InvalidCalibrationError(f"'{label}': array '{name}' holds NaN or infinite values; "
                                                  "calibration must be finite")
    except _ARCHIVE_ERRORS as err:
        raise _damaged(label, err) from err
    return {name: (shape, dtype.str) for name, (shape, dtype) in headers.items()}


def _damaged(label: str, err: BaseException, member: Optional[str] = None) -> InvalidCalibrationError:
    where = f" (member '{member}')" if member else ""
    why = " ".join(str(err).split())[:200] or type(err).__name__
    if isinstance(err, RuntimeError) and "encrypted" in str(err):
        why = "it is encrypted"
    return InvalidCalibrationError(f"'{label}' is damaged or not a plain .npz{where}: {why}; save it again with "
                                   "numpy.savez (no encryption; stored or deflate compression)")


def _check_header(label: str, spec: InputSpec, header: tuple[tuple[int, ...], np.dtype]) -> None:
    shape, dtype = header
    if len(shape) != len(spec.shape):
        raise InvalidCalibrationError(
            f"'{label}': input '{spec.name}' has shape {shape} but the model expects "
            f"{_shape_text(spec.shape)} (samples on axis 0)")
    if shape[0] < 2:
        raise InvalidCalibrationError(
            f"'{label}': input '{spec.name}' holds {shape[0]} sample(s); give at least a few hundred")
    for axis, (got, want) in enumerate(zip(shape[1:], spec.shape[1:]), start=1):
        if want is not None and got != want:
            raise InvalidCalibrationError(
                f"'{label}': input '{spec.name}' has shape {shape} but the model expects "
                f"{_shape_text(spec.shape)} (axis {axis} is {got}, not {want})")
    if not _castable(dtype, spec.dtype):
        raise InvalidCalibrationError(
            f"'{label}': input '{spec.name}' has dtype {dtype} but the model takes {spec.dtype}; "
            f"save it as {spec.dtype}")


def _castable(got: np.dtype, want: np.dtype) -> bool:
    if got == want:
        return True
    return want.kind == "f" and got.kind == "f"  # float64/float16 calibration for a float32 model


def _convert(label: str, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    array = array.astype(spec.dtype, copy=False)
    if array.dtype.kind == "f":
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InvalidCalibrationError(
                f"'{label}': input '{spec.name}' holds {bad} NaN or infinite values; clean the data")
    return array


def _shape_text(shape: tuple[Optional[int], ...]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def load_labels(path: str, tasks: list[str], n: int, inputs: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Optional labels in an evaluation .npz, one int per sample: 'y<task>' by task name, or 'ya', 'yb',
    ... by the models' order. Returns the labels per task and a warning for each array that is neither
    an input nor a task's labels."""
    label = os.path.basename(path)
    headers = read_npz_headers(path, max_bytes=DEFAULT_MAX_CALIBRATION_BYTES)
    by_position = {f"y{chr(ord('a') + i)}": t for i, t in enumerate(tasks)}
    keys: dict[str, str] = {}
    for task in tasks:
        key = f"y{task}" if f"y{task}" in headers else next((k for k, t in by_position.items() if t == task), None)
        if key in headers and (key == f"y{task}" or key not in {f"y{t}" for t in tasks}):
            keys[task] = key
    labels = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            loaded = {task: npz[key] for task, key in keys.items()}
    except _ARCHIVE_ERRORS as err:
        raise _damaged(label, err) from err
    for task, key in keys.items():
        y = loaded[task]
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise InvalidCalibrationError(
                f"'{label}': labels '{key}' must be {n} integers (one class index per sample), got "
                f"shape {y.shape} dtype {y.dtype}")
        labels[task] = y
    unused = [k for k in headers if k not in inputs and k not in keys.values()]
    warnings = [f"'{label}': array '{k}' is neither a model input nor labels of a task (tasks "
                f"{', '.join(tasks)}: labels are y<task> or ya, yb, ... in the models' order); it was ignored"
                for k in unused]
    return labels, warnings

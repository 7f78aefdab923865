"""Bad input, as a user meets it at the terminal: exit code 2, exactly one line on stderr
(`onnxzip: error: ...`) that names what is wrong, no traceback, and no output file.

Every bad input is built here from the committed fixtures, in tmp_path.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import malformed
from conftest import case, run_cli

MLP = case("mlp_legacy")
CNN = case("cnn_legacy")


# --- helpers ----------------------------------------------------------------------------------------------


def calib_samples() -> np.ndarray:
    with np.load(MLP / "calib.npz") as f:
        return f["input"]


def out_dir(tmp: Path) -> Path:
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    return out


def merge_args(tmp: Path, *extra, a=None, b=None, calib=None) -> list:
    out = out_dir(tmp)
    return ["merge", a or MLP / "a.onnx", b or MLP / "b.onnx", "--calibration", calib or MLP / "calib.npz",
            "--out", out / "merged.onnx", "--report", out / "report.json", "--quiet", *extra]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npy_header(shape, dtype="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def with_external_weight(tmp: Path, location: str, data_file: Path) -> Path:
    """mlp_legacy/a.onnx in tmp/models/, its first-layer weight moved to external data at `location`."""
    model = onnx.load(str(MLP / "a.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes)
    data = numpy_helper.to_array(tensor).tobytes()
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return save_model(model, tmp / "models" / "a.onnx")


def flat_cnn(tmp: Path) -> Path:
    """cnn_legacy/a.onnx fed from the MLP's flat (N, 64) input through a Reshape: same input, different layers."""
    model = onnx.load(str(CNN / "a.onnx"))
    graph = model.graph
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == "input":
                node.input[i] = "input_image"
    graph.initializer.append(numpy_helper.from_array(np.array([-1, 1, 8, 8], dtype=np.int64), "image_shape"))
    graph.node.insert(0, helper.make_node("Reshape", ["input", "image_shape"], ["input_image"], name="to_image"))
    dims = graph.input[0].type.tensor_type.shape.dim
    del dims[2:]
    dims[1].dim_value = 64
    onnx.checker.check_model(model, full_check=True)
    return save_model(model, tmp / "cnn_flat.onnx")


def two_input_pair(tmp: Path) -> tuple[Path, Path]:
    """mlp_legacy's a and b with a second input `aux` added to `input` before the first layer."""
    paths = []
    for task in "ab":
        model = onnx.load(str(MLP / f"{task}.onnx"))
        graph = model.graph
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == "input":
                    node.input[i] = "input_plus_aux"
        graph.node.insert(0, helper.make_node("Add", ["input", "aux"], ["input_plus_aux"], name="add_aux"))
        aux = onnx.ValueInfoProto()
        aux.CopyFrom(graph.input[0])
        aux.name = "aux"
        graph.input.append(aux)
        onnx.checker.check_model(model, full_check=True)
        paths.append(save_model(model, tmp / "two" / f"{task}.onnx"))
    return paths[0], paths[1]


def assert_bad_input(result, out: Path | None, *needles):
    """Exit 2, one `onnxzip: error:` line naming the problem, no traceback, nothing written to `out`."""
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, report
    assert result.returncode == 2, report
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}\n{report}"
    line = lines[0]
    assert line.startswith("onnxzip: error:"), report
    assert "onnxzip onnxzip" not in line, f"the help hint names no real command: {line}"
    for needle in needles:
        if isinstance(needle, re.Pattern):
            assert needle.search(line), f"{needle.pattern!r} not in: {line}"
        else:
            assert needle.lower() in line.lower(), f"{needle!r} not in: {line}"
    if out is not None:
        assert sorted(p.name for p in out.iterdir()) == [], f"files written: {list(out.iterdir())}"


def R(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


# --- bad inputs, one builder each: (tmp) -> CLI arguments ------------------------------------------------


def missing_model(tmp):
    return merge_args(tmp, a=tmp / "nowhere.onnx")


def corrupt_model(tmp):
    path = tmp / "corrupt.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return merge_args(tmp, a=path)


def truncated_model(tmp):
    data = (MLP / "a.onnx").read_bytes()
    path = tmp / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return merge_args(tmp, a=path)


def text_model(tmp):
    path = tmp / "notes.onnx"
    path.write_text("These are my notes about the model, not the model itself.\n" * 20)
    return merge_args(tmp, a=path)


def empty_model(tmp):
    path = tmp / "empty.onnx"
    path.write_bytes(b"")
    return merge_args(tmp, a=path)


def external_data_outside(tmp):
    return merge_args(tmp, a=with_external_weight(tmp, "../outside.bin", tmp / "outside.bin"))


def external_data_absolute(tmp):
    target = tmp / "elsewhere" / "weights.bin"
    return merge_args(tmp, a=with_external_weight(tmp, str(target), target))


def external_data_symlink_outside(tmp):
    target = tmp / "outside.bin"
    path = with_external_weight(tmp, "weights.bin", target)
    os.symlink(target, path.parent / "weights.bin")
    return merge_args(tmp, a=path)


def external_data_in_subgraph(tmp):
    """An If branch's constant kept in '../probe.bin', outside the model's folder (issue 16)."""
    (tmp / "probe.bin").write_bytes(b"\0" * 16)
    path = tmp / "models" / "branchy.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(malformed.external_data_in_subgraph(MLP / "a.onnx", "../probe.bin"))
    return merge_args(tmp, a=path)


def unsupported_opset(tmp):
    model = onnx.load(str(MLP / "a.onnx"))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 9
    return merge_args(tmp, a=save_model(model, tmp / "old_opset.onnx"))


def missing_calibration(tmp):
    return merge_args(tmp, calib=tmp / "no_such_calib.npz")


def calibration_not_a_zip(tmp):
    path = tmp / "notzip.npz"
    path.write_text("input\n" + "0.0,1.0\n" * 100)
    return merge_args(tmp, calib=path)


def calibration_plain_npy(tmp):
    path = tmp / "plain.npz"
    with path.open("wb") as f:
        np.save(f, calib_samples())  # an .npy, not an .npz
    return merge_args(tmp, calib=path)


def calibration_missing_key(tmp):
    path = tmp / "wrongkey.npz"
    np.savez(path, other=calib_samples())
    return merge_args(tmp, calib=path)


def calibration_empty(tmp):
    path = tmp / "empty.npz"
    np.savez(path)
    return merge_args(tmp, calib=path)


def calibration_wrong_shape(tmp):
    path = tmp / "shape.npz"
    np.savez(path, input=calib_samples()[:, :63])
    return merge_args(tmp, calib=path)


def calibration_wrong_rank(tmp):
    path = tmp / "rank.npz"
    np.savez(path, input=calib_samples().reshape(-1, 1, 8, 8))
    return merge_args(tmp, calib=path)


def calibration_one_sample(tmp):
    path = tmp / "one.npz"
    np.savez(path, input=calib_samples()[:1])
    return merge_args(tmp, calib=path)


def calibration_int64(tmp):
    path = tmp / "ints.npz"
    np.savez(path, input=np.rint(calib_samples()).astype(np.int64))
    return merge_args(tmp, calib=path)


def calibration_strings(tmp):
    path = tmp / "strings.npz"
    np.savez(path, input=np.full((512, 64), "abc"))
    return merge_args(tmp, calib=path)


def calibration_nan(tmp):
    samples = calib_samples().copy()
    samples[7, 3] = np.nan
    path = tmp / "nan.npz"
    np.savez(path, input=samples)
    return merge_args(tmp, calib=path)


def calibration_inf(tmp):
    samples = calib_samples().copy()
    samples[7, 3] = np.inf
    path = tmp / "inf.npz"
    np.savez(path, input=samples)
    return merge_args(tmp, calib=path)


def calibration_pickle(tmp):
    samples = np.empty((512, 64), dtype=object)
    samples[...] = 0.5
    path = tmp / "pickled.npz"
    np.savez(path, input=samples)  # numpy pickles object arrays
    return merge_args(tmp, calib=path)


def calibration_pickle_member(tmp):
    path = tmp / "pickled_member.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("input.npy", npy_bytes(np.array([{"not": "numbers"}] * 512, dtype=object)))
    return merge_args(tmp, calib=path)


def calibration_zip_bomb_declared_size(tmp):
    """A member whose declared (uncompressed) size is 1 TiB, in a file of a few hundred bytes."""
    path = tmp / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.npy", npy_header((512, 64)) + b"\0" * 1024)
        archive.filelist[0].file_size = 1 << 40  # written to the central directory (zip64) on close
    assert path.stat().st_size < 4096
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("input.npy").file_size == 1 << 40
    return merge_args(tmp, calib=path)


def calibration_zip_bomb_npy_header(tmp):
    """An .npy header that declares 10^12 x 64 float32 samples (256 TB), with almost no data."""
    path = tmp / "huge_header.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.npy", npy_header((10**12, 64)) + b"\0" * 1024)
    assert path.stat().st_size < 4096
    return merge_args(tmp, calib=path)


def calibration_header_lies(tmp):
    """The header says 512 x 64 float32, the member stores 100 rows."""
    path = tmp / "lying.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("input.npy", npy_header((512, 64)) + calib_samples()[:100].tobytes())
    return merge_args(tmp, calib=path)


def calibration_bad_crc(tmp):
    """A valid-looking .npz whose stored array bytes were altered after writing (CRC mismatch)."""
    path = tmp / "crc.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("input.npy", npy_bytes(calib_samples()))
    data = bytearray(path.read_bytes())
    start = data.index(b"\x93NUMPY") + 4096  # well inside the float data
    data[start:start + 8] = b"\x7f" * 8
    path.write_bytes(bytes(data))
    return merge_args(tmp, calib=path)


def damaged_archive(kind: str):
    """An .npz that zipfile cannot read as it stands (issue 16): encrypted, compression 99, a broken
    local header, corrupt deflate data."""
    def build(tmp):
        path = tmp / f"{kind}.npz"
        path.write_bytes(malformed.ALL[kind](calib_samples()))
        return merge_args(tmp, calib=path)
    return build


def calibration_different_sample_counts(tmp):
    a, b = two_input_pair(tmp)
    samples = calib_samples()
    path = tmp / "counts.npz"
    np.savez(path, input=samples, aux=np.zeros_like(samples)[:500])
    return merge_args(tmp, a=a, b=b, calib=path)


def mlp_with_flat_cnn(tmp):
    return merge_args(tmp, b=flat_cnn(tmp))


def mlp_with_cnn(tmp):
    return merge_args(tmp, b=CNN / "a.onnx")


def one_model_only(tmp):
    out = out_dir(tmp)
    return ["merge", MLP / "a.onnx", "--calibration", MLP / "calib.npz", "--out", out / "merged.onnx", "--quiet"]


def out_is_a_directory(tmp):
    out = out_dir(tmp)
    return ["merge", MLP / "a.onnx", MLP / "b.onnx", "--calibration", MLP / "calib.npz", "--out", out, "--quiet"]


def option(*extra):
    def build(tmp):
        return merge_args(tmp, *extra)
    build.__name__ = "option " + " ".join(extra)
    return build


def missing_out_flag(tmp):
    out_dir(tmp)
    return ["merge", MLP / "a.onnx", MLP / "b.onnx", "--calibration", MLP / "calib.npz", "--quiet"]


def missing_calibration_flag(tmp):
    out = out_dir(tmp)
    return ["merge", MLP / "a.onnx", MLP / "b.onnx", "--out", out / "merged.onnx", "--quiet"]


def unknown_flag(tmp):
    return merge_args(tmp, "--frobnicate")


# (id, builder, what the error line must say)
BAD_INPUTS = [
    # models
    ("missing-model", missing_model, ["nowhere.onnx", R(r"not exist|no such|not found|missing")]),
    ("corrupt-model", corrupt_model, ["corrupt.onnx", R(r"onnx|model")]),
    ("truncated-model", truncated_model, ["truncated.onnx", R(r"onnx|model|truncated")]),
    ("text-file-as-model", text_model, ["notes.onnx", R(r"onnx|model")]),
    ("empty-model-file", empty_model, ["empty.onnx", R(r"onnx|model|empty")]),
    ("external-data-outside-folder", external_data_outside, ["../outside.bin", R(r"outside|external")]),
    ("external-data-absolute-path", external_data_absolute, ["weights.bin", R(r"outside|external|absolute")]),
    ("external-data-symlink-outside", external_data_symlink_outside, ["weights.bin", R(r"outside|external")]),
    ("external-data-in-subgraph", external_data_in_subgraph, ["branchy.onnx", "../probe.bin", R(r"outside")]),
    ("unsupported-opset", unsupported_opset, ["old_opset.onnx", R(r"opset\D{0,5}9\b")]),
    # calibration
    ("missing-calibration", missing_calibration, ["no_such_calib.npz", R(r"not exist|no such|not found|missing")]),
    ("calibration-not-a-zip", calibration_not_a_zip, ["notzip.npz", R(r"npz|zip")]),
    ("calibration-plain-npy", calibration_plain_npy, ["plain.npz", R(r"npz|zip")]),
    ("calibration-missing-input-key", calibration_missing_key,
     ["wrongkey.npz", R(r"['\"]input['\"]"), R(r"no array|missing|not found|lacks|has no")]),
    ("calibration-no-arrays", calibration_empty, ["empty.npz", R(r"no array|empty|nothing|['\"]input['\"]")]),
    ("calibration-wrong-shape", calibration_wrong_shape, ["shape.npz", "63", "64"]),
    ("calibration-wrong-rank", calibration_wrong_rank, ["rank.npz", R(r"shape|rank|dimension")]),
    ("calibration-one-sample", calibration_one_sample, ["one.npz", R(r"sample")]),
    ("calibration-int64", calibration_int64, ["ints.npz", "int64"]),
    ("calibration-strings", calibration_strings, ["strings.npz", R(r"<?U3|str|dtype")]),
    ("calibration-nan", calibration_nan, ["nan.npz", "NaN"]),
    ("calibration-inf", calibration_inf, ["inf.npz", R(r"inf")]),
    ("calibration-pickle", calibration_pickle, ["pickled.npz", R(r"pickle|object")]),
    ("calibration-pickle-member", calibration_pickle_member, ["pickled_member.npz", R(r"pickle|object")]),
    ("calibration-zip-bomb-declared-size", calibration_zip_bomb_declared_size,
     ["bomb.npz", R(r"expand|too (large|big)|exceed|bytes|size")]),
    ("calibration-zip-bomb-npy-header", calibration_zip_bomb_npy_header,
     ["huge_header.npz", R(r"declare|expand|too (large|big)|exceed|bytes|size")]),
    ("calibration-header-lies", calibration_header_lies, ["lying.npz", R(r"declare|bytes|size|damaged|truncated")]),
    ("calibration-bad-crc", calibration_bad_crc, ["crc.npz", R(r"crc|damaged|corrupt|checksum")]),
    *[(f"calibration-{kind}", damaged_archive(kind), [f"{kind}.npz", "damaged", "numpy.savez"])
      for kind in malformed.ALL],
    ("calibration-different-sample-counts", calibration_different_sample_counts,
     ["counts.npz", "500", "512", R(r"sample")]),
    # models that cannot be aligned
    ("mlp-with-cnn-same-input", mlp_with_flat_cnn, ["/fc1/Gemm", "Gemm", "Conv", R(r"align")]),
    # different inputs are caught before any layer is compared: the message names the input's shapes
    ("mlp-with-cnn", mlp_with_cnn, ["input", "aligned", "(N, 64)", "(N, 1, 8, 8)"]),
    # options
    ("share-above-one", option("--share", "1.5"), ["share", R(r"\b1(\.0)?\b|1\.5")]),
    ("share-negative", option("--share", "-0.5"), ["share", R(r"\b0\b|-0\.5|negative")]),
    ("share-not-a-number", option("--share", "most"), ["share", "most"]),
    ("tasks-wrong-count", option("--tasks", "a"), ["task", R(r"\b2\b|two|one per model|models")]),
    ("tasks-too-many", option("--tasks", "a,b,c"), ["task", R(r"\b2\b|two|one per model|models|\b3\b")]),
    ("tasks-duplicate", option("--tasks", "a,a"), ["task", R(r"'a'|duplicate|twice|unique|distinct|same")]),
    ("tasks-empty-name", option("--tasks", "a,"), ["task", R(r"empty|name|\b2\b|two|one per model")]),
    ("tasks-with-slash", option("--tasks", "a/x,b"), ["a/x"]),
    ("layer-share-unknown-layer", option("--layer-share", "9=0.5"), ["9", R(r"layer")]),
    ("layer-share-not-pairs", option("--layer-share", "half"), ["--layer-share", "half"]),
    ("layer-share-bad-value", option("--layer-share", "1=lots"), ["--layer-share", "lots"]),
    ("layer-share-above-one", option("--layer-share", "1=1.5"), ["1.5"]),
    ("alpha-out-of-range", option("--alpha", "1.5"), ["alpha", R(r"\b1(\.0)?\b|1\.5")]),
    ("holdout-out-of-range", option("--holdout", "1.5"), ["holdout", R(r"\b1(\.0)?\b|1\.5")]),
    ("batch-size-zero", option("--batch-size", "0"), ["batch"]),
    ("pairing-unknown", option("--pairing", "greedy"), ["pairing", "greedy"]),
    ("eval-file-missing", lambda tmp: merge_args(tmp, "--eval", tmp / "no_test.npz"),
     ["no_test.npz", R(r"eval")]),  # the --eval file, not the calibration
    ("one-model-only", one_model_only, [R(r"two|2|at least|more")]),
    ("out-is-a-directory", out_is_a_directory, [R(r"out|directory|folder")]),
    ("missing-out-flag", missing_out_flag, ["--out"]),
    ("missing-calibration-flag", missing_calibration_flag, ["--calibration"]),
    ("unknown-flag", unknown_flag, ["--frobnicate"]),
]


@pytest.mark.parametrize("builder, needles", [pytest.param(b, n, id=i) for i, b, n in BAD_INPUTS])
def test_merge_refuses_bad_input(tmp_path, builder, needles):
    args = builder(tmp_path)
    result = run_cli(*args)
    assert_bad_input(result, out_dir(tmp_path), *needles)


# --- inspect gets the same treatment --------------------------------------------------------------------


def inspect_args(builder):
    def build(tmp):
        args = builder(tmp)  # merge A B ...
        return ["inspect", args[1], args[2]]
    return build


INSPECT_BAD = [
    ("missing-model", missing_model, ["nowhere.onnx"]),
    ("corrupt-model", corrupt_model, ["corrupt.onnx"]),
    ("truncated-model", truncated_model, ["truncated.onnx"]),
    ("external-data-outside-folder", external_data_outside, ["../outside.bin"]),
    ("unsupported-opset", unsupported_opset, ["old_opset.onnx", R(r"opset\D{0,5}9\b")]),
    ("mlp-with-cnn-same-input", mlp_with_flat_cnn, ["/fc1/Gemm", "Gemm", "Conv", R(r"align")]),
    # different inputs are caught before any layer is compared: the message names the input's shapes
    ("mlp-with-cnn", mlp_with_cnn, ["input", "aligned", "(N, 64)", "(N, 1, 8, 8)"]),
]


@pytest.mark.parametrize("builder, needles", [pytest.param(b, n, id=i) for i, b, n in INSPECT_BAD])
def test_inspect_refuses_bad_input(tmp_path, builder, needles):
    args = inspect_args(builder)(tmp_path)
    assert args[0] == "inspect" and len(args) == 3, args
    result = run_cli(*args)
    assert_bad_input(result, out_dir(tmp_path), *needles)


def test_inspect_missing_model_argument():
    result = run_cli("inspect")
    assert_bad_input(result, None, R(r"models|required|argument"))


def test_bad_input_without_quiet_is_still_one_line(tmp_path):
    """Without --quiet (as in a pipeline that captures stderr), a refused input still gives one line."""
    samples = calib_samples().copy()
    samples[0, 0] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, input=samples)
    args = [a for a in merge_args(tmp_path, calib=path) if a != "--quiet"]
    assert_bad_input(run_cli(*args), out_dir(tmp_path), "nan.npz", "NaN")

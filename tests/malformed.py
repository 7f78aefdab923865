"""Damaged and crafted .npz archives, as an operator's fuzzing produced them (issue 16): each is a
real archive of the MLP fixture's calibration samples with one thing broken."""

from __future__ import annotations

import io
import zipfile

import numpy as np


def _archive(samples: np.ndarray, compression: int) -> bytearray:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        with archive.open("input.npy", "w") as member:
            np.lib.format.write_array(member, samples)
    return bytearray(buffer.getvalue())


def _patch_headers(data: bytearray, offset_local: int, offset_central: int, value: bytes) -> bytearray:
    """Write `value` at a field of the local header (PK\\x03\\x04) and the central one (PK\\x01\\x02)."""
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    data[local + offset_local:local + offset_local + len(value)] = value
    data[central + offset_central:central + offset_central + len(value)] = value
    return data


def encrypted_flag(samples: np.ndarray) -> bytes:
    """The 'encrypted' bit of the general purpose flags set (zipfile asks for a password)."""
    data = _archive(samples, zipfile.ZIP_STORED)
    return bytes(_patch_headers(data, 6, 8, b"\x01\x00"))


def unknown_compression(samples: np.ndarray) -> bytes:
    """Compression method 99 (AES in WinZip's scheme), which zipfile does not implement."""
    data = _archive(samples, zipfile.ZIP_STORED)
    return bytes(_patch_headers(data, 8, 10, (99).to_bytes(2, "little")))


def corrupt_local_header(samples: np.ndarray) -> bytes:
    """The member's local header signature overwritten (the central directory still points at it)."""
    data = _archive(samples, zipfile.ZIP_STORED)
    local = data.index(b"PK\x03\x04")
    data[local:local + 4] = b"XXXX"
    return bytes(data)


def corrupt_deflate(samples: np.ndarray) -> bytes:
    """Deflate-compressed data with bytes in the middle of the stream garbled."""
    data = _archive(samples, zipfile.ZIP_DEFLATED)
    local = data.index(b"PK\x03\x04")
    start = local + 30 + len("input.npy") + 200
    data[start:start + 64] = bytes(range(64))
    return bytes(data)


ALL = {"encrypted-flag": encrypted_flag, "compression-99": unknown_compression,
       "corrupt-local-header": corrupt_local_header, "corrupt-deflate": corrupt_deflate}


def external_data_in_subgraph(model_path, location: str) -> bytes:
    """The model plus an If node (result unused) whose branches hold a constant kept in an external data
    file at `location`: only a walk into subgraphs finds it."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path))

    def branch(name: str) -> onnx.GraphProto:
        tensor = helper.make_tensor(f"{name}_value", TensorProto.FLOAT, [4], [0.0] * 4)
        tensor.ClearField("float_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        node = helper.make_node("Constant", [], [f"{name}_out"], value=tensor)
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [4])])

    cond = helper.make_node("Constant", [], ["probe_cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True]))
    probe = helper.make_node("If", ["probe_cond"], ["probe_out"], then_branch=branch("then"), else_branch=branch("else"))
    model.graph.node.extend([cond, probe])
    return model.SerializeToString()

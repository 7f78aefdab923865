"""Bad input over HTTP: each refusal is the right 4xx with `{"error": {"code", "message"}}` naming what is
wrong (the client's own file name, never the server's), nothing is left on disk, the service stays up,
and a good job afterwards still succeeds. Path tricks in names are harmless."""

from __future__ import annotations

import io
import uuid
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import malformed
from test_service_server import (LONG_OPTIONS, MLP, assert_error, long_calibration, npz_bytes, start_server,
                                 submit, wait_job, wait_until)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory, "bad", workers=1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


# --- bad files ---------------------------------------------------------------------------------------------

def model_bytes(name="a.onnx") -> bytes:
    return (MLP / name).read_bytes()


def calib() -> np.ndarray:
    with np.load(MLP / "calib.npz") as f:
        return f["input"]


def npy_header(shape, dtype="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def external_data_model(location: str) -> bytes:
    """mlp_legacy/a.onnx with its largest weight moved to an external file at `location` (not sent)."""
    model = onnx.load(str(MLP / "a.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).nbytes)
    size = numpy_helper.to_array(tensor).nbytes
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def zip_bomb() -> bytes:
    """A member whose declared (uncompressed) size is 1 TiB, in a file of a few hundred bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.npy", npy_header((512, 64)) + b"\0" * 1024)
        archive.filelist[0].file_size = 1 << 40
    return buffer.getvalue()


def header_bomb() -> bytes:
    """An .npy header that declares 10^12 x 64 float32 samples, with almost no data."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.npy", npy_header((10**12, 64)) + b"\0" * 1024)
    return buffer.getvalue()


def pickled() -> bytes:
    samples = np.empty((512, 64), dtype=object)
    samples[...] = 0.5
    buffer = io.BytesIO()
    np.savez(buffer, input=samples)
    return buffer.getvalue()


def with_nan() -> bytes:
    samples = calib().copy()
    samples[7, 3] = np.nan
    return npz_bytes(input=samples)


def bad_model(data: bytes, name: str):
    return lambda c: submit(c, models=[data, model_bytes("b.onnx")], names=(name, "b.onnx", "calib.npz"))


def bad_calibration(data: bytes, name: str = "calib.npz"):
    return lambda c: submit(c, calibration=data, names=("a.onnx", "b.onnx", name))


def bad_options(text: str):
    return lambda c: submit(c, options=text)


def only(*fields):
    """A multipart request with only some of the fields."""
    def send(c):
        files = []
        if "models" in fields:
            files += [("models", ("a.onnx", model_bytes("a.onnx"))), ("models", ("b.onnx", model_bytes("b.onnx")))]
        if "calibration" in fields:
            files.append(("calibration", ("calib.npz", (MLP / "calib.npz").read_bytes())))
        data = {"models": "a.onnx"} if "models-as-text" in fields else {}
        return c.post("/v1/merges", files=files, data=data)
    return send


RANDOM = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()

# (id, request, status, code, what the message must say)
BAD_SUBMISSIONS = [
    ("corrupt-model", bad_model(RANDOM, "corrupt.onnx"), 422, "invalid_model", ["corrupt.onnx"]),
    ("truncated-model", bad_model(model_bytes()[:100_000], "truncated.onnx"), 422, "invalid_model",
     ["truncated.onnx", "truncated"]),
    ("text-as-model", bad_model(b"my notes about the model\n" * 50, "notes.onnx"), 422, "invalid_model",
     ["notes.onnx"]),
    ("empty-model", bad_model(b"", "empty.onnx"), 422, "invalid_model", ["empty.onnx"]),
    ("external-data-model", bad_model(external_data_model("weights.bin"), "big.onnx"), 422, "invalid_model",
     ["big.onnx", "external data", "save_as_external_data=False"]),
    ("external-data-path-trick", bad_model(external_data_model("../../../../etc/passwd"), "evil.onnx"), 422,
     "invalid_model", ["evil.onnx", "external"]),
    ("external-data-in-subgraph", bad_model(malformed.external_data_in_subgraph(MLP / "a.onnx", "probe.bin"),
                                            "branchy.onnx"), 422, "invalid_model", ["branchy.onnx", "external"]),
    ("json-body", lambda c: c.post("/v1/merges", json={"models": ["a.onnx", "b.onnx"]}), 415,
     "unsupported_media_type", ["multipart/form-data", "application/json"]),
    ("urlencoded-body", lambda c: c.post("/v1/merges", data={"options": "{}"}), 415, "unsupported_media_type",
     ["multipart/form-data"]),
    ("no-content-type", lambda c: c.post("/v1/merges", content=b"models"), 415, "unsupported_media_type",
     ["no content type"]),
    ("missing-calibration", only("models"), 422, "invalid_request", ["'calibration' is missing", ".npz"]),
    ("missing-models", only("calibration"), 422, "invalid_request", ["'models' is missing", ".onnx"]),
    ("models-sent-as-text", only("models-as-text", "calibration"), 422, "invalid_request",
     ["'models' must be a file upload", ".onnx"]),
    ("one-model", lambda c: submit(c, models=[model_bytes()]), 422, "invalid_options", ["at least two", "got 1"]),
    ("options-not-json", bad_options("{share: 1}"), 422, "invalid_options", ["not valid JSON", '{"share"']),
    ("options-not-an-object", bad_options("[1, 2]"), 422, "invalid_options", ["JSON object"]),
    ("options-unknown-field", bad_options('{"shar": 1.0}'), 422, "invalid_options", ["shar"]),
    ("options-out-of-range", bad_options('{"share": 2}'), 422, "invalid_options", ["share", "1"]),
    ("options-task-count", bad_options('{"tasks": ["only"]}'), 422, "invalid_options", ["1 task names", "2 models"]),
    ("options-huge-damping", bad_options('{"damping": 1e308}'), 422, "invalid_options", ["damping", "100"]),
    ("options-infinity", bad_options('{"damping": Infinity}'), 422, "invalid_options", ["damping", "finite"]),
    ("options-infinite-spill", bad_options('{"spill_mb": Infinity}'), 422, "invalid_options", ["spill_mb", "finite"]),
    ("options-nan-share", bad_options('{"share": NaN}'), 422, "invalid_options", ["share", "finite"]),
    ("options-negative-seed", bad_options('{"seed": -1}'), 422, "invalid_options", ["seed", "0"]),
    ("options-unknown-provider", bad_options('{"providers": ["GpuOfMyOwnExecutionProvider"]}'), 422,
     "invalid_options", ["providers", "GpuOfMyOwnExecutionProvider", "CPUExecutionProvider"]),
    ("options-budget-and-zipper", bad_options('{"max_drop": 1, "zipper": 2}'), 422, "invalid_options",
     ["budget", "zipper"]),
    ("calibration-missing-input", bad_calibration(npz_bytes(x=calib()), "mine.npz"), 422, "invalid_calibration",
     ["mine.npz", "'input'", "'x'"]),
    ("calibration-wrong-shape", bad_calibration(npz_bytes(input=calib()[:, :63])), 422, "invalid_calibration",
     ["calib.npz", "63", "64"]),
    ("calibration-wrong-dtype", bad_calibration(npz_bytes(input=calib().astype(np.int64))), 422,
     "invalid_calibration", ["int64", "float32"]),
    ("calibration-nan", bad_calibration(with_nan()), 422, "invalid_calibration", ["NaN"]),
    ("calibration-pickle", bad_calibration(pickled()), 422, "invalid_calibration", ["pickle"]),
    ("calibration-zip-bomb", bad_calibration(zip_bomb()), 422, "invalid_calibration", ["more than"]),
    ("calibration-header-bomb", bad_calibration(header_bomb()), 422, "invalid_calibration", ["declares"]),
    ("calibration-not-npz", bad_calibration(b"input\n0.0,1.0\n" * 100, "calib.csv"), 422, "invalid_calibration",
     ["calib.csv", "numpy.savez"]),
    ("idempotency-key-too-long", lambda c: submit(c, key="k" * 500), 422, "invalid_request", ["Idempotency-Key"]),
    # issue 16: archives zipfile cannot read as they stand, and options nested 100,000 deep, were 500s
    *[(f"calibration-{kind}", bad_calibration(build(calib()), f"{kind}.npz"), 422, "invalid_calibration",
       [f"{kind}.npz", "damaged", "numpy.savez"]) for kind, build in malformed.ALL.items()],
    ("options-nested-deep", bad_options('{"share": ' + "[" * 100_000 + "]" * 100_000 + "}"), 422,
     "invalid_options", ["nest"]),
]


@pytest.mark.parametrize("request_, status, code, needles", [b[1:] for b in BAD_SUBMISSIONS],
                         ids=[b[0] for b in BAD_SUBMISSIONS])
def test_bad_submission_is_refused_with_what_to_fix(client, server, request_, status, code, needles):
    """The refusal's status, code and message; no job, no files kept, the service still up."""
    before = client.get("/v1/merges", params={"limit": 100}).json()["items"]
    assert_error(request_(client), status, code, *needles)
    assert client.get("/v1/merges", params={"limit": 100}).json()["items"] == before
    assert list((server.data_dir / "uploads").iterdir()) == []
    assert client.get("/healthz").status_code == 200


BAD_REQUESTS = [
    ("unknown-job", "GET", "/v1/merges/0123456789abcdef0123456789abcdef", 404, "not_found", ["0123456789abcdef"]),
    ("unknown-job-cancel", "POST", "/v1/merges/nope/cancel", 404, "not_found", ["nope"]),
    ("unknown-job-delete", "DELETE", "/v1/merges/nope", 404, "not_found", ["nope"]),
    ("unknown-job-events", "GET", "/v1/merges/nope/events", 404, "not_found", ["nope"]),
    ("unknown-job-artifact", "GET", "/v1/merges/nope/artifacts/merged.onnx", 404, "not_found", ["nope"]),
    ("job-id-path-trick", "GET", "/v1/merges/..%2F..%2Fonnxzip.db", 404, "not_found", []),
    ("unknown-endpoint", "GET", "/v2/anything", 404, "not_found", ["/docs"]),
    ("wrong-method", "PUT", "/v1/merges", 405, "method_not_allowed", ["PUT"]),
    ("bad-cursor", "GET", "/v1/merges?cursor=%%%", 422, "invalid_request", ["cursor", "next_cursor"]),
    ("bad-status-filter", "GET", "/v1/merges?status=done", 422, "invalid_request", ["status"]),
    ("bad-limit", "GET", "/v1/merges?limit=0", 422, "invalid_request", ["limit"]),
    ("bad-events-after", "GET", "/v1/merges/nope/events?after=-1", 422, "invalid_request", ["after"]),
    # issue 16: numbers beyond a signed 64-bit integer were 500s (OverflowError in SQLite)
    ("cursor-overflow", "GET", "/v1/merges?cursor=MTAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDA", 422,
     "invalid_request", ["cursor", "next_cursor"]),
    ("events-after-overflow", "GET", "/v1/merges/nope/events?after=9223372036854775808", 422, "invalid_request",
     ["after"]),
]


def test_event_stream_resumes_after_any_last_event_id(client):
    """Last-Event-ID beyond every id (10^30) ends the stream cleanly with nothing newer, not mid-response."""
    job = wait_job(client, submit(client).json()["id"])
    with client.stream("GET", f"/v1/merges/{job['id']}/events",
                       headers={"Accept": "text/event-stream", "Last-Event-ID": str(10**30)}) as response:
        assert response.status_code == 200
        body = b"".join(response.iter_bytes())
    assert b"data:" not in body
    with client.stream("GET", f"/v1/merges/{job['id']}/events",
                       headers={"Accept": "text/event-stream", "Last-Event-ID": "0"}) as response:
        assert b'"succeeded"' in b"".join(response.iter_bytes())


@pytest.mark.parametrize("method, path, status, code, needles", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_refused_with_what_to_fix(client, method, path, status, code, needles):
    assert_error(client.request(method, path), status, code, *needles)


def test_artifacts_exist_only_for_finished_jobs(client):
    """An unfinished job's artifact: 409 (poll first); a cancelled job has none (409); an unknown artifact
    name or a path trick in it: 404."""
    job = submit(client, calibration=long_calibration(), options=LONG_OPTIONS).json()
    assert_error(client.get(f"/v1/merges/{job['id']}/artifacts/merged.onnx"), 409, "job_not_finished",
                 "artifacts exist once it has finished", "poll")
    assert client.post(f"/v1/merges/{job['id']}/cancel").status_code in (200, 202)
    assert wait_job(client, job["id"], timeout=30)["status"] == "cancelled"
    assert_error(client.get(f"/v1/merges/{job['id']}/artifacts/report.json"), 409, "no_artifacts", "cancelled")
    good = wait_job(client, submit(client).json()["id"])
    assert good["status"] == "succeeded"
    for name in ("model.onnx", "..%2F..%2F..%2Fonnxzip.db", "..%2Finputs%2Fmodel-0.onnx", "%2Fetc%2Fpasswd"):
        assert_error(client.get(f"/v1/merges/{good['id']}/artifacts/{name}"), 404, "not_found")
    assert_error(client.get(f"/v1/merges/{good['id']}/artifacts/..%2Finputs"), 404, "not_found")
    assert_error(client.post(f"/v1/merges/{good['id']}/cancel"), 409, "job_finished", "succeeded")


def test_path_tricks_in_file_names_are_only_metadata(client, server, tmp_path):
    """Client file names with ../, absolute paths or backslashes are kept as names and never used as paths:
    the inputs are stored under server-chosen names inside the job's folder."""
    target = Path("/tmp") / f"onnxzip-evil-{uuid.uuid4().hex}.onnx"
    names = (f"../../../../../..{target}", "..\\..\\windows\\b.onnx", "/etc/passwd")
    response = submit(client, names=names)
    assert response.status_code == 202, response.text
    job = response.json()
    assert [i["name"] for i in job["inputs"]] == list(names)
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded", done
    assert not target.exists()
    inputs = server.data_dir / "jobs" / job["id"] / "inputs"
    assert sorted(p.name for p in inputs.iterdir()) == ["calibration.npz", "model-0.onnx", "model-1.onnx"]
    assert (inputs / "model-0.onnx").read_bytes() == model_bytes("a.onnx")


def test_service_is_still_healthy_after_all_the_bad_input(client, server):
    """After every refusal above: the same process is up, a good job succeeds, the log has no traceback."""
    assert server.proc.poll() is None
    done = wait_job(client, submit(client, options='{"share": 0.5}').json()["id"])
    assert done["status"] == "succeeded", done
    wait_until(lambda: client.get("/readyz").status_code == 200, 30, what="readiness")
    assert "Traceback" not in server.log_text()

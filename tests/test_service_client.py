"""The REST API as a pipeline meets it: a client generated from the served OpenAPI document by
openapi-python-client, nothing patched, runs jobs end to end; inputs uploaded once and named by id;
job metadata to tag and filter runs. One real server (token set) for the module."""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import io
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import onnx
import pytest

from conftest import run
from test_service_server import (MLP, assert_error, fixture_files, long_calibration, start_server, submit,
                                 wait_job, wait_until)

TOKEN = "pipeline-token"
WEBHOOK_SECRET = "whsec-test-secret"
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory, "client", workers=2, cancel_grace_s=2, api_token=TOKEN,
                          webhook_secret=WEBHOOK_SECRET, webhook_backoff_s=0.5, webhook_attempts=4)
    yield server
    server.stop()
    assert "Traceback" not in server.log_path.read_text(), server.log_path.read_text()[-4000:]


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def generated(server, tmp_path_factory):
    """`openapi-python-client generate` on the document the running server serves; the package imported."""
    folder = tmp_path_factory.mktemp("generated")
    document = folder / "openapi.json"
    served = httpx.get(server.url + "/openapi.json", headers=server.auth_headers(), timeout=30)  # as curl -H would
    assert served.status_code == 200, served.text
    document.write_bytes(served.content)
    config = folder / "config.yml"
    config.write_text("project_name_override: onnxzip-client\npackage_name_override: onnxzip_client\n"
                      "post_hooks: []\n")  # no formatter run: the code as generated
    result = subprocess.run([sys.executable, "-m", "openapi_python_client", "generate", "--path", str(document),
                             "--config", str(config), "--output-path", str(folder / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    sys.path.insert(0, str(folder / "out"))
    try:
        package = importlib.import_module("onnxzip_client")
        yield package, server
    finally:
        sys.path.remove(str(folder / "out"))
        for name in [m for m in sys.modules if m == "onnxzip_client" or m.startswith("onnxzip_client.")]:
            del sys.modules[name]


def api(package, name):
    return importlib.import_module(f"onnxzip_client.api.{name}")


def authenticated(package, server):
    return package.AuthenticatedClient(base_url=server.url, token=TOKEN, timeout=httpx.Timeout(60.0))


def poll(get_merge, client, job_id, statuses=TERMINAL, timeout=120.0):
    return wait_until(lambda: (job := get_merge.sync(job_id, client=client)).status.value in statuses and job,
                      timeout, 0.1, f"job {job_id} to reach {sorted(statuses)}")


# --- the generated client --------------------------------------------------------------------------------

def test_generated_client_uploads_runs_follows_and_downloads_a_job(generated, http):
    """Upload (binary parts, options as the MergeOptions schema), poll, events, download merged.onnx and
    report.json, HEAD the artifact: all through generated functions, and the merged model runs."""
    package, server = generated
    from onnxzip_client.models import MergeOptions, MergeRequest
    from onnxzip_client.types import File

    files = fixture_files()
    body = MergeRequest(models=[File(payload=io.BytesIO(files["a.onnx"]), file_name="a.onnx"),
                                File(payload=io.BytesIO(files["b.onnx"]), file_name="b.onnx")],
                        calibration=File(payload=io.BytesIO(files["calib.npz"]), file_name="calib.npz"),
                        options=MergeOptions(share=1.0, tasks=["digit", "mod4"]))
    with authenticated(package, server) as client:
        accepted = api(package, "merges.create_merge").sync_detailed(client=client, body=body)
        assert accepted.status_code == 202, accepted.content
        assert accepted.headers["Location"] == f"/v1/merges/{accepted.parsed.id}"
        job = poll(api(package, "merges.get_merge"), client, accepted.parsed.id)
        assert job.status.value == "succeeded", job
        assert job.options.tasks == ["digit", "mod4"] and [i.name for i in job.inputs] == ["a.onnx", "b.onnx",
                                                                                             "calib.npz"]
        events = api(package, "merges.merge_events").sync(job.id, client=client)
        assert [e.id for e in events] == list(range(1, len(events) + 1))
        assert events[0].status.value == "queued" and events[-1].status.value == "succeeded"

        download = api(package, "merges.get_artifact")
        merged = download.sync_detailed(job.id, "merged.onnx", client=client)
        assert merged.status_code == 200 and merged.content == merged.parsed.payload.read()
        assert hashlib.sha256(merged.content).hexdigest() == next(a.sha256 for a in job.artifacts
                                                                  if a.name == "merged.onnx")
        head = api(package, "merges.head_artifact").sync_detailed(job.id, "merged.onnx", client=client)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(merged.content)
        assert head.headers["etag"] == merged.headers["etag"]
        report = json.loads(download.sync_detailed(job.id, "report.json", client=client).content)
        assert report["tasks"] == ["digit", "mod4"] and report["totals"]["shared_neurons"] > 0
        part = http.get(f"/v1/merges/{job.id}/artifacts/merged.onnx", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == merged.content[100:200]  # resumable downloads

    model = onnx.load_from_string(merged.content)
    with np.load(MLP / "calib.npz") as f:
        feeds = {k: v[:16] for k, v in f.items()}
    outputs = run(model, feeds)
    assert {name.split("/")[0] for name in outputs} == {"digit", "mod4"}
    assert all(np.isfinite(v).all() for v in outputs.values())


def test_generated_client_names_uploaded_files_and_tags_and_filters_jobs(generated):
    """POST /v1/files once per input (id = sha256, a second upload stores nothing), then two merges name
    them by id with different metadata; the list filtered by metadata finds exactly the tagged one."""
    package, server = generated
    from onnxzip_client.models import FileUpload, FileUploadPurpose, MergeOptions, MergeRequest
    from onnxzip_client.models import MergeRequestJobMetadata
    from onnxzip_client.types import File

    upload = api(package, "files.upload_file")
    files = fixture_files()
    ids = {}
    with authenticated(package, server) as client:
        for name, purpose in (("a.onnx", "model"), ("b.onnx", "model"), ("calib.npz", "calibration")):
            body = FileUpload(file=File(payload=io.BytesIO(files[name]), file_name=name),
                              purpose=FileUploadPurpose(purpose))
            first = upload.sync_detailed(client=client, body=body)
            assert first.status_code in (200, 201), first.content
            assert first.parsed.id == hashlib.sha256(files[name]).hexdigest() and first.parsed.purpose.value == purpose
            body.file.payload.seek(0)
            again = upload.sync_detailed(client=client, body=body)
            assert again.status_code == 200 and again.parsed.id == first.parsed.id  # stored once
            ids[name] = first.parsed.id
        listed = api(package, "files.list_files").sync(client=client)
        assert {ids["a.onnx"], ids["b.onnx"], ids["calib.npz"]} <= {f.id for f in listed.items}

        create = api(package, "merges.create_merge")
        run_tag = f"sweep-{time.time_ns()}"
        jobs = {}
        for share in (1.0, 0.5):
            metadata = MergeRequestJobMetadata.from_dict({"experiment": run_tag, "share": str(share)})
            body = MergeRequest(model_ids=[ids["a.onnx"], ids["b.onnx"]], calibration_id=ids["calib.npz"],
                                options=MergeOptions(share=share), metadata=metadata)
            accepted = create.sync_detailed(client=client, body=body)
            assert accepted.status_code == 202, accepted.content
            jobs[share] = accepted.parsed.id
        get_merge = api(package, "merges.get_merge")
        for share, job_id in jobs.items():
            job = poll(get_merge, client, job_id)
            assert job.status.value == "succeeded", job
            assert job.metadata.to_dict() == {"experiment": run_tag, "share": str(share)}
            assert [i.sha256 for i in job.inputs] == [ids["a.onnx"], ids["b.onnx"], ids["calib.npz"]]
            assert [i.name for i in job.inputs] == ["a.onnx", "b.onnx", "calib.npz"]
        list_merges = api(package, "merges.list_merges")
        tagged = list_merges.sync(client=client, metadata=[f"experiment:{run_tag}", "share:0.5"])
        assert [j.id for j in tagged.items] == [jobs[0.5]]
        both = list_merges.sync(client=client, metadata=[f"experiment:{run_tag}"])
        assert [j.id for j in both.items] == [jobs[0.5], jobs[1.0]]  # newest first

        # deleting a file leaves the jobs that used it whole
        assert api(package, "files.delete_file").sync_detailed(ids["calib.npz"], client=client).status_code == 204
        assert api(package, "files.get_file").sync_detailed(ids["calib.npz"], client=client).status_code == 404
        assert get_merge.sync(jobs[1.0], client=client).status.value == "succeeded"
        artifact = api(package, "merges.get_artifact").sync_detailed(jobs[1.0], "merged.onnx", client=client)
        assert artifact.status_code == 200 and len(artifact.content) > 0


def test_generated_client_cancels_and_deletes_a_running_job(generated):
    """cancel_merge on a running job answers 202 and the job ends cancelled; delete_merge then 204."""
    package, server = generated
    from onnxzip_client.models import MergeOptions, MergeRequest
    from onnxzip_client.types import File

    files = fixture_files()
    body = MergeRequest(models=[File(payload=io.BytesIO(files["a.onnx"]), file_name="a.onnx"),
                                File(payload=io.BytesIO(files["b.onnx"]), file_name="b.onnx")],
                        calibration=File(payload=io.BytesIO(long_calibration(repeat=40)), file_name="long.npz"),
                        options=MergeOptions(batch_size=1))
    with authenticated(package, server) as client:
        job = api(package, "merges.create_merge").sync(client=client, body=body)
        get_merge = api(package, "merges.get_merge")
        wait_until(lambda: get_merge.sync(job.id, client=client).stage == "merge", 60, 0.1, "the merge stage")
        cancelled = api(package, "merges.cancel_merge").sync_detailed(job.id, client=client)
        assert cancelled.status_code == 202 and cancelled.parsed.cancel_requested is True
        assert poll(get_merge, client, job.id, timeout=30).status.value == "cancelled"
        assert api(package, "merges.delete_merge").sync_detailed(job.id, client=client).status_code == 204
        assert get_merge.sync_detailed(job.id, client=client).status_code == 404


def test_generated_client_needs_the_token_and_reads_refusals_as_error_bodies(generated):
    package, server = generated
    from onnxzip_client.models import ErrorBody

    with package.Client(base_url=server.url) as anonymous:
        refused = api(package, "merges.list_merges").sync_detailed(client=anonymous)
    assert refused.status_code == 401 and isinstance(refused.parsed, ErrorBody)
    with authenticated(package, server) as client:
        missing = api(package, "merges.get_merge").sync_detailed("0" * 32, client=client)
        assert missing.status_code == 404 and missing.parsed.error.code == "not_found"


# --- the document itself ---------------------------------------------------------------------------------

def test_openapi_document_describes_what_clients_need(http):
    doc = http.get("/openapi.json").json()
    operations = [(p, m, op) for p, item in doc["paths"].items() for m, op in item.items()]
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids)), ids
    assert {"create_merge", "get_artifact", "head_artifact", "upload_file", "merge_events"} <= set(ids)
    body = doc["components"]["schemas"]["MergeRequest"]["properties"]
    assert body["models"]["anyOf"][0] == {"items": {"type": "string", "format": "binary"}, "type": "array",
                                          "minItems": 2}
    assert body["options"]["$ref"] == "#/components/schemas/MergeOptions"
    encoding = doc["paths"]["/v1/merges"]["post"]["requestBody"]["content"]["multipart/form-data"]["encoding"]
    assert encoding["options"]["contentType"] == "application/json"
    create = doc["paths"]["/v1/merges"]["post"]["responses"]
    assert {"Location", "Idempotent-Replayed"} <= set(create["202"]["headers"])
    assert "Retry-After" in create["503"]["headers"] and "Retry-After" in create["507"]["headers"]
    events = doc["paths"]["/v1/merges/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} <= set(events)
    artifact = doc["paths"]["/v1/merges/{job_id}/artifacts/{name}"]["get"]["responses"]
    assert {"200", "206", "304", "404", "409"} <= set(artifact) and "ETag" in artifact["200"]["headers"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert all(op.get("security") for p, _, op in operations if p != "/healthz")
    assert all(op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
               for _, _, op in operations if "422" in op["responses"])
    assert "Report" in doc["components"]["schemas"] and "HTTPValidationError" not in doc["components"]["schemas"]


# --- files and metadata refusals (plain HTTP) ------------------------------------------------------------

def test_files_refuse_bad_uploads_and_unknown_or_mismatched_ids(http):
    files = fixture_files()
    damaged = http.post("/v1/files", files={"file": ("broken.onnx", b"not a model", "application/octet-stream")},
                        data={"purpose": "model"})
    assert_error(damaged, 422, "invalid_model", "broken.onnx")
    nan = io.BytesIO()
    np.savez(nan, input=np.full((4, 64), np.nan, np.float32))
    assert_error(http.post("/v1/files", files={"file": ("nan.npz", nan.getvalue())},
                           data={"purpose": "calibration"}), 422, "invalid_calibration", "nan.npz")
    model = http.post("/v1/files", files={"file": ("a.onnx", files["a.onnx"])}, data={"purpose": "model"}).json()
    assert_error(http.post("/v1/files", files={"file": ("a.onnx", files["a.onnx"])}, data={"purpose": "calibration"}),
                 409, "file_exists", "already stored as a model")
    calibration = http.post("/v1/files", files={"file": ("c.npz", files["calib.npz"])},
                            data={"purpose": "calibration"}).json()
    unknown = "f" * 64
    assert_error(http.post("/v1/merges", files={"unused": ("x", b"")},
                           data={"model_ids": [model["id"], unknown], "calibration_id": calibration["id"]}),
                 422, "file_not_found", "model_ids[1]")
    assert_error(http.post("/v1/merges", data={"model_ids": [model["id"], calibration["id"]],
                                               "calibration_id": calibration["id"]}, files={"unused": ("x", b"")}),
                 422, "invalid_request", "is a calibration, not a model")
    plain = submit(http)
    assert plain.status_code == 202  # plain uploads still work beside ids
    mixed = http.post("/v1/merges", data={"model_ids": [model["id"], model["id"]], "calibration_id": calibration["id"]},
                      files=[("models", ("a.onnx", files["a.onnx"])), ("models", ("b.onnx", files["b.onnx"]))])
    assert_error(mixed, 422, "invalid_options", "not both")
    assert_error(http.get("/v1/files/not-an-id"), 404, "not_found")
    assert wait_job(http, plain.json()["id"])["status"] == "succeeded"


def test_metadata_is_checked_and_a_bad_filter_is_refused(http):
    assert_error(http.post("/v1/merges", files=_uploads(), data={"metadata": '{"team": 3}'}),
                 422, "invalid_options", "metadata")
    assert_error(http.post("/v1/merges", files=_uploads(), data={"metadata": '{"bad key": "x"}'}),
                 422, "invalid_options", "bad key")
    assert_error(http.get("/v1/merges", params={"metadata": "no-colon"}), 422, "invalid_request", "key:value")


def _uploads() -> list:
    files = fixture_files()
    return [("models", ("a.onnx", files["a.onnx"])), ("models", ("b.onnx", files["b.onnx"])),
            ("calibration", ("calib.npz", files["calib.npz"]))]


def test_eta_follows_the_rate_of_progress_and_is_null_until_it_means_something():
    from service.schemas import eta_seconds
    from service.store import Job

    job = Job(id="j", status="running", created_at=0.0, options={}, inputs=[], max_attempts=3, started_at=100.0)
    job.progress = 0.25
    assert eta_seconds(job, now=110.0) == 30.0  # a quarter in 10 s: three quarters in 30 s more
    job.progress = 0.01
    assert eta_seconds(job, now=110.0) is None  # too little done to extrapolate
    job.progress = 0.5
    assert eta_seconds(job, now=101.0) is None  # too early
    job.status = "succeeded"
    assert eta_seconds(job, now=200.0) is None


# --- completion webhooks ---------------------------------------------------------------------------------

class Receiver:
    """A webhook receiver on 127.0.0.1 that answers the first `failures` deliveries with 500, then 204."""

    def __init__(self, failures: int):
        self.deliveries, self.failures = [], failures
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.deliveries.append((time.monotonic(), dict(self.headers), body))
                self.send_response(500 if len(outer.deliveries) <= outer.failures else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hooks/onnxzip"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def verify(headers: dict, body: bytes) -> bool:
    """What a receiver does (Standard Webhooks): HMAC-SHA256 over id.timestamp.body with the shared secret."""
    headers = {k.lower(): v for k, v in headers.items()}
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(WEBHOOK_SECRET.encode(), signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(f"v1,{expected}", sig) for sig in headers["webhook-signature"].split())


def test_a_finished_job_is_posted_to_its_webhook_signed_and_retried_with_backoff(http):
    receiver = Receiver(failures=2)
    try:
        job = submit(http, options='{"share": 1.0}')
        assert job.status_code == 202
        job_id = job.json()["id"]
        # the field rides in the same multipart body; sent again with a webhook it is a new job
        files = fixture_files()
        hooked = http.post("/v1/merges", data={"webhook_url": receiver.url, "metadata": '{"run": "hook"}'},
                           files=[("models", ("a.onnx", files["a.onnx"])), ("models", ("b.onnx", files["b.onnx"])),
                                  ("calibration", ("calib.npz", files["calib.npz"]))])
        assert hooked.status_code == 202, hooked.text
        hooked_id = hooked.json()["id"]
        assert hooked.json()["webhook"] == {"url": receiver.url, "state": "pending", "attempts": 0,
                                            "last_error": None, "delivered_at": None}
        done = wait_until(lambda: (j := http.get(f"/v1/merges/{hooked_id}").json())["webhook"]["state"] != "pending"
                          and j, 60, 0.1, "the webhook to be delivered")
        assert done["status"] == "succeeded" and done["webhook"]["state"] == "delivered", done
        assert done["webhook"]["attempts"] == 3 and done["webhook"]["delivered_at"] is not None
        assert len(receiver.deliveries) == 3  # two 500s, then the 204; never again after it
        times = [t for t, _, _ in receiver.deliveries]
        assert times[1] - times[0] >= 0.5 and times[2] - times[1] >= 1.0  # the wait doubles: 0.5 s, then 1 s
        for _, headers, body in receiver.deliveries:
            assert verify(headers, body)
            payload = json.loads(body)
            assert payload["type"] == "merge.finished" and payload["job"]["id"] == hooked_id
            assert payload["job"]["status"] == "succeeded" and payload["job"]["metadata"] == {"run": "hook"}
            assert {a["name"] for a in payload["job"]["artifacts"]} >= {"merged.onnx", "report.json"}
        assert not verify({**receiver.deliveries[0][1], "webhook-timestamp": "1"}, receiver.deliveries[0][2])
        assert wait_job(http, job_id)["webhook"] is None  # a job without one is posted nowhere
        time.sleep(1.0)
        assert len(receiver.deliveries) == 3
    finally:
        receiver.close()


def test_a_webhook_that_never_answers_2xx_ends_failed_after_its_attempts(http):
    receiver = Receiver(failures=100)
    try:
        files = fixture_files()
        job = http.post("/v1/merges", data={"webhook_url": receiver.url},
                        files=[("models", ("a.onnx", files["a.onnx"])), ("models", ("b.onnx", files["b.onnx"])),
                               ("calibration", ("calib.npz", files["calib.npz"]))]).json()
        done = wait_until(lambda: (j := http.get(f"/v1/merges/{job['id']}").json())["webhook"]["state"] != "pending"
                          and j, 60, 0.1, "the webhook to give up")
        assert done["webhook"]["state"] == "failed" and done["webhook"]["attempts"] == 4
        assert done["webhook"]["last_error"] == "HTTP 500" and len(receiver.deliveries) == 4
        assert done["status"] == "succeeded"  # the job's own outcome is untouched
    finally:
        receiver.close()
    bad = http.post("/v1/merges", data={"webhook_url": "ftp://example.invalid/x"}, files=_uploads())
    assert_error(bad, 422, "invalid_request", "webhook_url")


def test_webhooks_are_refused_where_the_service_cannot_sign_them():
    from service.errors import ApiError
    from service.webhooks import check_url

    with pytest.raises(ApiError) as refused:
        check_url("http://127.0.0.1:9/hook", secret_set=False)
    assert refused.value.status == 422 and "ONNXZIP_WEBHOOK_SECRET" in refused.value.message
    assert check_url("https://ci.example.com/hook", secret_set=True) == "https://ci.example.com/hook"
    assert check_url(None, secret_set=False) is None

"""Fuzzing the running service with schemathesis (issue 16): requests generated from the service's own
OpenAPI document, sent to a real server on 127.0.0.1 with the SQLite store. No request may get a 5xx,
and every answer must be the error shape or the documented one.

A few hundred cases run here (FUZZ_EXAMPLES per operation); the full run of the trial (about 5,000
requests) is `ONNXZIP_FUZZ_EXAMPLES=300 python -m pytest tests/test_service_fuzz.py`.
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from test_service_server import start_server  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("ONNXZIP_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    server = start_server(tmp_path_factory, "fuzz", workers=1)
    yield server
    server.stop()


def test_no_request_gets_a_server_error(fuzz_server):
    """Every operation of the served OpenAPI document, FUZZ_EXAMPLES generated requests each."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    seen = {"requests": 0, "4xx": 0}

    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def fuzz(case):
            response = case.call(base_url=fuzz_server.url, timeout=60)
            seen["requests"] += 1
            assert response.status_code < 500, (case.method, case.formatted_path, response.status_code,
                                                response.text[:500])
            if response.status_code >= 400 and case.method != "HEAD":  # every refusal has the one error shape
                seen["4xx"] += 1
                body = response.json()
                assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body

        fuzz()
    print(f"fuzzed: {seen}")
    assert seen["requests"] >= 5 * FUZZ_EXAMPLES, seen
    assert "Traceback" not in fuzz_server.log_text()

"""The Dockerfile and compose files: they parse, reference only what exists, reserve the GPU, and
install onnxzip the way the README says."""

from __future__ import annotations

import json

import re

import yaml

from conftest import ROOT

COMPOSE = ROOT / "docker" / "docker-compose.yml"
EMBEDDED = ROOT / "docker" / "docker-compose.embedded.yml"
DOCKERFILE = ROOT / "Dockerfile"


def _load(path):
    return yaml.safe_load(path.read_text())


def _gpu_reserved(service: dict) -> bool:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_scale_out_compose_has_api_gpu_worker_redis_and_volumes():
    spec = _load(COMPOSE)
    services = spec["services"]
    assert set(services) == {"api", "worker", "redis"}
    assert _gpu_reserved(services["worker"])
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["ONNXZIP_QUEUE_URL"].startswith("redis://redis:")
        assert any(v.endswith(":/data") for v in services[name]["volumes"])
    assert services["api"]["command"][:2] == ["onnxzip", "serve"]
    assert services["worker"]["command"] == ["onnxzip", "worker"]
    assert services["api"]["environment"]["ONNXZIP_WORKERS"] == "0"
    # every named volume used is declared, every depends_on names a service
    declared = set(spec["volumes"])
    for name, service in services.items():
        for mount in service.get("volumes", []):
            assert mount.split(":")[0] in declared, (name, mount)
        for dep in service.get("depends_on", {}):
            assert dep in services
    build = services["api"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_files_publish_the_api_on_loopback_unless_told_otherwise():
    """Issue 16: no token by default, so the published port binds to 127.0.0.1 (ONNXZIP_BIND widens it),
    the token passes through, and the Host allow-list names the service as clients reach it."""
    for path, name in ((COMPOSE, "api"), (EMBEDDED, "onnxzip")):
        service = _load(path)["services"][name]
        assert service["ports"] == ["${ONNXZIP_BIND:-127.0.0.1}:8000:8000"]
        env = service["environment"]
        assert env["ONNXZIP_API_TOKEN"] == "${ONNXZIP_API_TOKEN:-}"
        default = env["ONNXZIP_ALLOWED_HOSTS"].split(":-", 1)[1].rstrip("}")
        assert {"localhost", "127.0.0.1", name} <= set(json.loads(default))


def test_embedded_compose_is_one_gpu_container_with_a_data_volume():
    spec = _load(EMBEDDED)
    (name, service), = spec["services"].items()
    assert _gpu_reserved(service)
    assert service["command"][:2] == ["onnxzip", "serve"]
    assert service["volumes"][0].split(":")[0] in spec["volumes"]
    assert "ONNXZIP_QUEUE_URL" not in service["environment"]  # SQLite store, workers in the container
    build = service["build"]
    assert (EMBEDDED.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_dockerfile_installs_as_the_readme_says_and_runs_as_non_root_with_a_healthcheck():
    text = DOCKERFILE.read_text()
    readme = (ROOT / "README.md").read_text()
    extras = re.search(r"^ARG ONNXZIP_EXTRAS=(\S+)", text, re.M)
    assert extras and f'pip install ".[{extras.group(1)}]"' in readme  # the default build: the README's install
    assert 'pip install ".[${ONNXZIP_EXTRAS}]"' in text and "ONNXZIP_EXTRAS=scale,distill" in readme
    assert re.search(r"^FROM nvidia/cuda:13\.\d+\.\d+-cudnn-runtime", text, re.M)  # CUDA 13 + cuDNN 9
    assert "onnxruntime-gpu==" in text and not re.search(r"pip install[^\n]*\bonnxruntime[=> ]", text)
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / copied).exists(), copied

"""The OpenAPI document clients are generated from: FastAPI's, completed where FastAPI cannot say enough.

FastAPI (on pydantic 2, OpenAPI 3.1) describes a file part as a string with `contentMediaType`, which
client generators read as text, and a JSON form part as an opaque string. Here the document is finished
so that `openapi-python-client` (and its kind) generate a client that runs a job with nothing patched:
file parts are `format: binary`, the `options` part is the `MergeOptions` schema sent as
`application/json`, requests need two or more models, the bearer scheme is declared, and every 422 has
the service's one error shape. Everything else (status codes, headers, the event stream, typed bodies)
is declared on the routes themselves.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .auth import OPEN_PATHS

# Multipart text parts that carry JSON: {operationId: {part: schema (a component's name, or inline)}}.
JSON_PARTS = {"create_merge": {
    "options": "MergeOptions",
    "metadata": {"type": "object", "title": "JobMetadata", "additionalProperties": {"type": "string"},
                 "maxProperties": 16},
}}
# Named request-body schemas, in place of FastAPI's "Body_<operationId>".
BODY_NAMES = {"create_merge": "MergeRequest", "upload_file": "FileUpload"}
MIN_ITEMS = {"create_merge": {"models": 2, "model_ids": 2}}


def install(app: FastAPI, token_required: bool) -> None:
    """Replace `app.openapi` by one that completes FastAPI's document (built once, then cached)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes)
            complete(doc, token_required)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def complete(doc: dict, token_required: bool) -> None:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            op_id = operation.get("operationId", "")
            content = operation.get("requestBody", {}).get("content", {})
            form = content.get("multipart/form-data")
            if form is not None:
                _complete_form(form, op_id, schemas)
            if "422" in operation.get("responses", {}):  # this service's 422s have the one error shape too
                operation["responses"]["422"] = {
                    "description": operation["responses"]["422"].get("description", "Invalid request"),
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
            if path not in OPEN_PATHS:
                operation["security"] = [{"bearer": []}] if token_required else [{"bearer": []}, {}]
    for schema in schemas.values():
        _consts_as_enums(schema)
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 shape, never sent here
        schemas.pop(unused, None)
    doc["components"]["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "The value of the service's ONNXZIP_API_TOKEN; every path but /healthz needs it when "
                       "one is set. Without a token configured, requests need none."}}


def _complete_form(form: dict, op_id: str, schemas: dict) -> None:
    ref = form["schema"].get("$ref", "")
    old = ref.rsplit("/", 1)[-1]
    body = schemas.pop(old, None) if old else None
    if body is None:
        return
    name = BODY_NAMES.get(op_id, old)
    body["title"] = name
    schemas[name] = body
    form["schema"] = {"$ref": f"#/components/schemas/{name}"}
    for part, schema in body.get("properties", {}).items():
        body["properties"][part] = _binary(schema)
    for part, schema in JSON_PARTS.get(op_id, {}).items():
        if part in body.get("properties", {}):
            description = body["properties"][part].get("description")
            schema = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else dict(schema)
            body["properties"][part] = {**schema, **({"description": description} if description else {})}
            form.setdefault("encoding", {})[part] = {"contentType": "application/json"}
    for part, count in MIN_ITEMS.get(op_id, {}).items():
        prop = body.get("properties", {}).get(part)
        if prop is not None:
            for variant in [prop, *prop.get("anyOf", [])]:
                if variant.get("type") == "array":
                    variant["minItems"] = count


def _consts_as_enums(schema) -> None:
    """`{"const": "auto"}` as a one-value enum, everywhere: pydantic writes Literal["auto"] as a const, and
    openapi-python-client parses a union holding a const by checking the const first and raising for
    every other member (hessian_rows: int | "auto" | null could not read 32768)."""
    if isinstance(schema, dict):
        if "const" in schema and schema.get("type") == "string":
            schema["enum"] = [schema.pop("const")]
        for value in schema.values():
            _consts_as_enums(value)
    elif isinstance(schema, list):
        for value in schema:
            _consts_as_enums(value)


def _binary(schema: dict) -> dict:
    """A file part (`contentMediaType`, anywhere inside anyOf/items) as `type: string, format: binary`."""
    if "contentMediaType" in schema and schema.get("type") == "string":
        rest = {k: v for k, v in schema.items() if k != "contentMediaType"}
        return {**rest, "format": "binary"}
    out = dict(schema)
    if "items" in out:
        out["items"] = _binary(out["items"])
    if "anyOf" in out:
        out["anyOf"] = [_binary(s) for s in out["anyOf"]]
    return out

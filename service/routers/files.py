"""/v1/files: upload a model or a calibration set once, then name it by id in many merges."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from anyio import to_thread
from fastapi import APIRouter, Depends, File, Form, Response, UploadFile

from ..deps import FilesDep, SettingsDep
from ..errors import ApiError
from ..schemas import FileList, FilePublic
from .common import error_responses, require_multipart

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FilePublic, status_code=201, dependencies=[Depends(require_multipart)],
             responses={**error_responses(409, 413, 415, 422, 507),
                        200: {"model": FilePublic,
                              "description": "The same bytes were uploaded before: that file."},
                        201: {"description": "Stored.", "headers": {"Location": {"schema": {"type": "string"}}}}},
             summary="Upload a model or calibration set once, to name it by id in merges",
             description="Multipart fields: `file` and `purpose` (model or calibration). The file passes the "
                         "same limits and checks as a merge's uploads; its id is the sha256 of its bytes, so "
                         "uploading the same bytes again stores nothing new (200 with the file). Name it in "
                         "POST /v1/merges as `model_ids` or `calibration_id`.")
def upload_file(response: Response, files: FilesDep, settings: SettingsDep,
                file: Annotated[UploadFile, File(description="An .onnx model or an .npz calibration set.")],
                purpose: Annotated[Literal["model", "calibration"], Form(description="model or calibration")]
                ) -> FilePublic:
    limit, env = ((settings.max_model_bytes, "ONNXZIP_MAX_MODEL_BYTES") if purpose == "model"
                  else (settings.max_calibration_bytes, "ONNXZIP_MAX_CALIBRATION_BYTES"))
    stored, new = files.add(file, purpose, limit, env)
    response.status_code = 201 if new else 200
    response.headers["Location"] = f"/v1/files/{stored.id}"
    return FilePublic.of(stored)


@router.get("", response_model=FileList, responses=error_responses(422), summary="List uploaded files, newest first")
async def list_files(files: FilesDep, purpose: Optional[Literal["model", "calibration"]] = None) -> FileList:
    stored = await to_thread.run_sync(files.list, purpose)
    return FileList(items=[FilePublic.of(f) for f in stored])


@router.get("/{file_id}", response_model=FilePublic, responses=error_responses(404),
            summary="An uploaded file's record")
def get_file(file_id: str, files: FilesDep) -> FilePublic:
    stored = files.get(file_id.lower())
    if stored is None:
        raise _not_found(file_id)
    return FilePublic.of(stored)


@router.delete("/{file_id}", status_code=204, responses={**error_responses(404), 204: {"description": "Deleted."}},
               summary="Delete an uploaded file (jobs that used it keep their own copy)")
def delete_file(file_id: str, files: FilesDep) -> Response:
    if not files.delete(file_id.lower()):
        raise _not_found(file_id)
    return Response(status_code=204)


def _not_found(file_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no file '{file_id[:80]}': it was never uploaded or was deleted; a file id "
                                      "is the sha256 that POST /v1/files answered (list them with GET /v1/files)")

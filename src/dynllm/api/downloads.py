"""XandRouting's download routes (admin routes: see ``api.access``).

    POST   /v1/models/download            start a job: {"url" | "repo_id", "destination",
                                          "quantization", "include", "exclude", "revision"}
    GET    /v1/models/download            every job
    GET    /v1/models/download/{job_id}   one job: status, bytes done and total, speed, files
    DELETE /v1/models/download/{job_id}   cancel: answers once the transfer has stopped
                                          and its files are removed
    POST   /v1/models/verify-repo         {"url" | "repo_id", "revision"}: exists, gated,
                                          private, files, sizes, GGUF quantizations

A job answers XandRouting's ``{"job_id", "status", "destination", "message"}``
plus dynllm's progress fields (``DownloadManager``'s ``Job.view``).  The
routes must come before ``/v1/models/{model:path}`` (``api.openai``), which
would otherwise take ``GET /v1/models/download``: ``install`` is called
before ``openai.install``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from dynllm.api.bodies import parse_json_object
from dynllm.downloadjob import DownloadRequest, utf8_text
from dynllm.downloads import DownloadManager
from dynllm.errors import BadRequest, invalid_request
from dynllm.hubfiles import MISSING_REPO


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str | None = None
    repo_id: str | None = None
    revision: str | None = None

    @field_validator("*", mode="after")
    @classmethod
    def _utf8(cls, value: Any) -> Any:
        return utf8_text(value)


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    # The bodies are read by hand (one JSON error vocabulary with the other
    # routes); this shows them in /docs and /openapi.json.
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


router = APIRouter()


def _manager(request: Request) -> DownloadManager:
    manager: DownloadManager = request.app.state.services.downloads
    return manager


M = TypeVar("M", bound=BaseModel)


async def _body(request: Request, model: type[M]) -> M:
    data = parse_json_object(await request.body())
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None


@router.post("/v1/models/download", openapi_extra=_json_body(DownloadRequest.model_json_schema()))
async def start_download(request: Request) -> dict[str, Any]:
    body = await _body(request, DownloadRequest)
    job = await _manager(request).submit(body)
    return job.view()


@router.get("/v1/models/download")
async def list_downloads(request: Request) -> dict[str, Any]:
    jobs = [job.view() for job in _manager(request).jobs()]
    return {"downloads": jobs, "total_count": len(jobs)}


@router.get("/v1/models/download/{job_id}")
async def get_download(request: Request, job_id: str) -> dict[str, Any]:
    return _manager(request).job(job_id).view()


@router.delete("/v1/models/download/{job_id}")
async def cancel_download(request: Request, job_id: str) -> dict[str, Any]:
    job = await _manager(request).cancel(job_id)
    return job.view()


@router.post("/v1/models/verify-repo", openapi_extra=_json_body(VerifyRequest.model_json_schema()))
async def verify_repo(request: Request) -> dict[str, Any]:
    body = await _body(request, VerifyRequest)
    repo = body.url or body.repo_id
    if not repo:
        raise BadRequest(MISSING_REPO)
    return await _manager(request).verify(repo, body.revision)


def install(app: FastAPI) -> None:
    app.include_router(router)

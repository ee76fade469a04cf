"""One exception tree for everything dynllm reports to a client.

    DynllmError                      status  type                     code
    ├── BadRequest                   400     invalid_request_error    invalid_request
    │   ├── InvalidJSON              400     invalid_request_error    invalid_json
    │   ├── InvalidMultipart         400     invalid_request_error    invalid_multipart
    │   ├── InvalidConfig            400     invalid_request_error    invalid_config
    │   ├── WrongModelType           400     invalid_request_error    model_type_mismatch
    │   └── ModelTooLarge            400     invalid_request_error    model_too_large
    ├── Unauthorized                 401     authentication_error     invalid_api_key (+challenge)
    ├── Forbidden                    403     permission_error         forbidden
    ├── ModelNotFound                404     invalid_request_error    model_not_found
    │   ├── RepoNotFound             404     invalid_request_error    repo_not_found
    │   ├── QuantizationNotFound     404     invalid_request_error    quantization_not_found
    │   └── DownloadNotFound         404     invalid_request_error    download_not_found
    ├── RepoGated                    403     permission_error         repo_gated
    ├── MethodNotAllowed             405     invalid_request_error    method_not_allowed (+Allow)
    ├── ModelBusy                    409     conflict_error           model_busy
    ├── PayloadTooLarge              413     invalid_request_error    payload_too_large
    ├── UnsupportedMediaType         415     invalid_request_error    unsupported_media_type
    ├── RequestTimeout               408     invalid_request_error    request_timeout
    ├── MisdirectedRequest           421     invalid_request_error    host_not_allowed
    ├── BackendError                 502     backend_error            ...
    │   ├── BackendStartFailed       502     backend_error            backend_start_failed
    │   ├── BackendExited            502     backend_error            backend_exited
    │   ├── MidStreamFailure         502     backend_error            backend_failed_mid_stream
    │   └── ModelFileMissing         502     backend_error            model_file_missing
    ├── Unavailable                  503     unavailable_error        ...
    │   ├── QueueTimeout             503     unavailable_error        queue_timeout (+Retry-After)
    │   ├── InsufficientVRAM         503     unavailable_error        insufficient_vram
    │   ├── BackendMissing           503     unavailable_error        backend_not_installed
    │   ├── ShuttingDown             503     unavailable_error        shutting_down
    │   ├── CoolingDown              503     unavailable_error        load_cooldown (+Retry-After)
    │   └── TooManyConnections       503     unavailable_error        too_many_connections
    ├── HubUnavailable               502     backend_error            hub_unavailable
    ├── InsufficientStorage          507     server_error             insufficient_storage
    ├── LoadTimeout                  504     timeout_error            load_timeout
    └── TooManyRequests              429     rate_limit_error         too_many_requests +Retry-After

Each class maps once to an HTTP status and, through ``render``, to the
error shape of the route that failed: the OpenAI body
``{"error": {"message", "type", "code"}}`` on ``/v1``, KServe's
``{"error": "..."}`` on ``/v2``; after a stream has started the OpenAI body is
sent as one SSE ``data:`` event instead (see ``sse_event``).  A backend's own
error bodies are translated into the same shapes by ``from_backend``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any


class Shape(Enum):
    """The error body a route's clients expect."""

    OPENAI = "openai"
    KSERVE = "kserve"


class DynllmError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}

    def render(self, shape: Shape = Shape.OPENAI) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and JSON body of this error for a route of ``shape``."""
        body = {"error": self.message} if shape is Shape.KSERVE else self.body()
        return self.status, self.headers(), json.dumps(body).encode()

    def sse_event(self) -> bytes:
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def error_body(message: str, type_: str, code: str | int | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


class BadRequest(DynllmError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


def invalid_request(problems: Iterable[Mapping[str, Any]]) -> BadRequest:
    """A BadRequest listing pydantic validation problems as ``loc: msg``."""
    text = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
        for e in problems
    )
    return BadRequest(f"Invalid request: {text}")


class InvalidJSON(BadRequest):
    code = "invalid_json"


class InvalidConfig(BadRequest):
    """A reloaded config that does not validate (the running one stays)."""

    code = "invalid_config"


class InvalidMultipart(BadRequest):
    code = "invalid_multipart"


class WrongModelType(BadRequest):
    code = "model_type_mismatch"


class ModelTooLarge(BadRequest):
    code = "model_too_large"


class Unauthorized(DynllmError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="dynllm"'}


class Forbidden(DynllmError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class ModelNotFound(DynllmError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RepoNotFound(ModelNotFound):
    code = "repo_not_found"


class DownloadNotFound(ModelNotFound):
    code = "download_not_found"


class QuantizationNotFound(ModelNotFound):
    """No file of the requested quantization (the message lists those there are)."""

    code = "quantization_not_found"


class RepoGated(DynllmError):
    """The Hub refused the repo: gated or private, and no (or a wrong) token."""

    status = 403
    type = "permission_error"
    code = "repo_gated"


class HubUnavailable(DynllmError):
    """The Hub could not be reached or answered with an error of its own."""

    status = 502
    type = "backend_error"
    code = "hub_unavailable"


class InsufficientStorage(DynllmError):
    """A download that does not fit on the disk of its destination."""

    status = 507
    type = "server_error"
    code = "insufficient_storage"


class MethodNotAllowed(DynllmError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class PayloadTooLarge(DynllmError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaType(DynllmError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class MisdirectedRequest(DynllmError):
    status = 421
    type = "invalid_request_error"
    code = "host_not_allowed"


class ModelBusy(DynllmError):
    status = 409
    type = "conflict_error"
    code = "model_busy"


class BackendError(DynllmError):
    status = 502
    type = "backend_error"
    code = "backend_error"


class BackendStartFailed(BackendError):
    code = "backend_start_failed"


class BackendExited(BackendError):
    code = "backend_exited"

    def __init__(self, message: str, *, exit_code: int | None, stderr_tail: list[str]) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail


class MidStreamFailure(BackendError):
    code = "backend_failed_mid_stream"


class ModelFileMissing(BackendError):
    code = "model_file_missing"


class Unavailable(DynllmError):
    status = 503
    type = "unavailable_error"
    code = "unavailable"


class QueueTimeout(Unavailable):
    code = "queue_timeout"


class InsufficientVRAM(Unavailable):
    code = "insufficient_vram"


class BackendMissing(Unavailable):
    code = "backend_not_installed"


class ShuttingDown(Unavailable):
    code = "shutting_down"


class CoolingDown(Unavailable):
    """The model's last loads failed; it is not tried again before ``retry_after``."""

    code = "load_cooldown"


class TooManyConnections(Unavailable):
    code = "too_many_connections"


class RequestTimeout(DynllmError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class LoadTimeout(DynllmError):
    status = 504
    type = "timeout_error"
    code = "load_timeout"


class TooManyRequests(DynllmError):
    """A model's ``max_concurrent_requests`` are busy and its
    ``max_queued_requests`` already wait: refused at once, to be retried."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)


class BackendAnswer(DynllmError):
    """An error the backend itself answered with, in the route's shape: its
    status is kept, its message is taken out of whatever shape it used."""

    def __init__(self, status: int, message: str, type_: str, code: str | int) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = str(code)


MAX_BACKEND_MESSAGE = 2000


def _message_of(data: Any) -> str | None:
    """The human message inside the error shapes backends use: llama.cpp's and
    vLLM's ``{"error": {"message"}}``, OVMS's ``{"error": "..."}``, FastAPI's
    (transformers serve) ``{"detail": "..."}`` or its 422 list of problems,
    and a top-level ``{"message"}`` (older vLLM, many others)."""
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, str):
        return error
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    detail = data.get("detail")
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        return invalid_request(
            {"loc": d.get("loc") or (), "msg": str(d.get("msg", d))} for d in detail
        ).message
    message = data.get("message")
    return message if isinstance(message, str) else None


def from_backend(status: int, body: bytes, model: str) -> BackendAnswer:
    """A backend's error response (status >= 400) as a dynllm error."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    message = _message_of(data)
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        message = text or f"the backend for '{model}' answered HTTP {status} with no message"
    code: str | int = status
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        inner = data["error"].get("code")
        if isinstance(inner, str) and inner:
            code = inner
    type_ = "invalid_request_error" if status < 500 else "backend_error"
    if len(message) > MAX_BACKEND_MESSAGE:
        message = message[:MAX_BACKEND_MESSAGE] + "..."
    return BackendAnswer(status, message, type_, code)

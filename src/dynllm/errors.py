"""One exception tree for everything dynllm reports to a client.

    DynllmError                      status  type                     code
    ├── BadRequest                   400     invalid_request_error    invalid_request
    │   ├── InvalidJSON              400     invalid_request_error    invalid_json
    │   ├── WrongModelType           400     invalid_request_error    model_type_mismatch
    │   └── ModelTooLarge            400     invalid_request_error    model_too_large
    ├── ModelNotFound                404     invalid_request_error    model_not_found
    ├── ModelBusy                    409     conflict_error           model_busy
    ├── BackendError                 502     backend_error            ...
    │   ├── BackendStartFailed       502     backend_error            backend_start_failed
    │   ├── BackendExited            502     backend_error            backend_exited
    │   ├── MidStreamFailure         502     backend_error            backend_failed_mid_stream
    │   └── ModelFileMissing         502     backend_error            model_file_missing
    ├── Unavailable                  503     unavailable_error        ...
    │   ├── QueueTimeout             503     unavailable_error        queue_timeout (+Retry-After)
    │   ├── InsufficientVRAM         503     unavailable_error        insufficient_vram
    │   └── ShuttingDown             503     unavailable_error        shutting_down
    └── LoadTimeout                  504     timeout_error            load_timeout

Each class maps once to an HTTP status and to the OpenAI error body
``{"error": {"message", "type", "code"}}``; after a stream has started the
same body is sent as one SSE ``data:`` event instead (see ``sse_event``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any


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


class WrongModelType(BadRequest):
    code = "model_type_mismatch"


class ModelTooLarge(BadRequest):
    code = "model_too_large"


class ModelNotFound(DynllmError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


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


class ShuttingDown(Unavailable):
    code = "shutting_down"


class LoadTimeout(DynllmError):
    status = 504
    type = "timeout_error"
    code = "load_timeout"

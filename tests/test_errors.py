"""The one error vocabulary: rendering per route shape, and backends' own
error bodies translated into it with their status kept."""

from __future__ import annotations

import json

import pytest

from dynllm.errors import MethodNotAllowed, QueueTimeout, Shape, from_backend


@pytest.mark.parametrize(
    ("status", "body", "message", "code"),
    [
        # llama.cpp
        (400, b'{"error":{"code":400,"message":"the request exceeds the context",'
              b'"type":"exceed_context_size_error"}}', "the request exceeds the context", "400"),
        # OVMS
        (412, b'{"error":"The file is not valid json - model field is missing in JSON body"}',
         "The file is not valid json - model field is missing in JSON body", "412"),
        # transformers serve (FastAPI): a message, and a 422 list of problems
        (400, b'{"detail":"Server is pinned to /m"}', "Server is pinned to /m", "400"),
        (422, b'{"detail":[{"loc":["body","temperature"],"msg":"Input should be a number"}]}',
         "Invalid request: temperature: Input should be a number", "422"),
        # vLLM, both of its shapes
        (404, b'{"error":{"message":"The model `x` does not exist.","type":"NotFoundError",'
              b'"code":"model_not_found"}}', "The model `x` does not exist.", "model_not_found"),
        (400, b'{"object":"error","message":"max_tokens too large","type":"BadRequestError",'
              b'"code":400}', "max_tokens too large", "400"),
        # anything else
        (503, b"Service Unavailable", "Service Unavailable", "503"),
        (500, b"", "the backend for 'm' answered HTTP 500 with no message", "500"),
    ],
)  # fmt: skip
def test_backend_error_bodies_are_translated(
    status: int, body: bytes, message: str, code: str
) -> None:
    error = from_backend(status, body, "m")
    assert (error.status, error.message, error.code) == (status, message, code)
    assert error.type == ("invalid_request_error" if status < 500 else "backend_error")
    got_status, _, payload = error.render(Shape.OPENAI)
    assert got_status == status
    assert json.loads(payload) == {"error": {"message": message, "type": error.type, "code": code}}
    assert json.loads(error.render(Shape.KSERVE)[2]) == {"error": message}


def test_a_huge_backend_message_is_cut() -> None:
    error = from_backend(400, json.dumps({"error": "x" * 10_000}).encode(), "m")
    assert len(error.message) == 2003 and error.message.endswith("...")


def test_headers_travel_with_every_shape() -> None:
    status, headers, _ = QueueTimeout("busy", retry_after=4.6).render(Shape.KSERVE)
    assert (status, headers) == (503, {"Retry-After": "5"})
    status, headers, _ = MethodNotAllowed("no", allow="POST").render()
    assert (status, headers) == (405, {"Allow": "POST"})

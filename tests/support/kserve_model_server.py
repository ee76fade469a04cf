"""A tiny real KServe v2 server: a numpy "classifier" behind ``kserve.ModelServer``.

Run with the kserve venv's python (tests/support/env_kserve.py)::

    python kserve_model_server.py --http_port P --model_name NAME [--host 127.0.0.1]

The model takes one FP32 tensor ``scores`` of shape [batch, classes] and
answers ``probabilities`` (FP32 softmax per row) and ``label`` (INT64 argmax
per row).  Ask for binary outputs with ``"parameters": {"binary_data_output":
true}``; binary inputs (``Inference-Header-Content-Length``) are decoded by
kserve itself.

Deviations from kserve's defaults, each on purpose: REST only (gRPC off),
one uvicorn worker, and bound to ``--host`` (kserve hard-codes 0.0.0.0 in its
uvicorn config; a test backend must not listen on every interface).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve import model_server as kserve_model_server

INPUT = "scores"


class SoftmaxClassifier(Model):  # type: ignore[misc]
    def load(self) -> bool:
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": INPUT, "datatype": "FP32", "shape": [-1, -1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ]

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        scores = payload.inputs[0].as_numpy().astype(np.float32)
        if scores.ndim == 1:
            scores = scores[None, :]
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        probabilities = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
        label = probabilities.argmax(axis=1).astype(np.int64)
        binary = payload.use_binary_outputs
        outputs = []
        for name, value, datatype in (
            ("probabilities", probabilities, "FP32"),
            ("label", label, "INT64"),
        ):
            out = InferOutput(name=name, shape=list(value.shape), datatype=datatype)
            out.set_data_from_numpy(value, binary_data=binary)
            outputs.append(out)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=binary,
        )


class LoopbackModelServer(ModelServer):  # type: ignore[misc]
    """kserve's ModelServer with its REST server bound to ``host``."""

    def __init__(self, host: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bind_host = host

    async def _serve(self) -> None:
        # start() builds the RESTServer (uvicorn.Config(host="0.0.0.0")) and
        # then runs this coroutine; uvicorn reads config.host only when it
        # binds, which happens inside the coroutines gathered below.  If a
        # kserve upgrade moves this, fail rather than listen on every interface.
        rest = getattr(self, "_rest_server", None)
        if rest is None or not hasattr(rest, "config"):
            raise SystemExit("kserve internals changed: cannot bind the REST server to loopback")
        rest.config.host = self.bind_host
        await super()._serve()


def main() -> None:
    # kserve parses sys.argv itself at import (--http_port, --model_name, ...);
    # its parser is the parent so both agree.
    parser = argparse.ArgumentParser(parents=[kserve_model_server.parser])
    parser.add_argument("--host", default="127.0.0.1")
    args, _ = parser.parse_known_args()
    model = SoftmaxClassifier(args.model_name)
    model.load()
    server = LoopbackModelServer(
        host=args.host, http_port=args.http_port, enable_grpc=False, workers=1
    )
    server.start([model])


if __name__ == "__main__":
    main()

"""A stand-in for OpenVINO Model Server's ``ovms`` executable, doing real inference.

OVMS has no package that installs on our machines (Docker images and release
tarballs only), so the tests run this instead.  It mirrors OVMS 2026.3, as read
in openvinotoolkit/model_server (main, 2026-08): the CLI and its checks
(``src/cli_parser.cpp``, ``src/config.cpp``), the REST routing, content-type and
``model`` rules of ``src/http_rest_api_handler.cpp`` (``parseRequestComponents``,
``createV3HttpPayload``, ``processV3``, the KServe handlers and the binary
extension in ``handleBinaryInputs``), the status strings and HTTP codes of
``src/status.cpp``, the KServe readiness of ``src/kfs_frontend/kfs_grpc_inference_service.cpp``,
and the request/response shapes of the docs (``docs/model_server_rest_api_*.md``:
chat, completions, embeddings, rerank, image generation, speech to text, text
to speech, KServe).  Inference is real: openvino-genai pipelines for every
``--task`` and the OpenVINO runtime for a plain model served over KServe.

CLI (the subset dynllm uses; unknown flags are rejected as OVMS does, exit 64):
  ovms --rest_port P [--rest_bind_address A] [--port G] --model_path DIR --model_name NAME
       [--task text_generation|embeddings|rerank|image_generation|speech2text|text2speech]
       [--target_device CPU] [--shape S] [--plugin_config JSON] [--log_level L]
``--port`` is gRPC (0 = off; the stand-in only holds the port, it speaks no
gRPC).  Without ``--task`` DIR must hold numeric version folders with
``model.xml`` (a plain model, served over KServe only).

Readiness, as OVMS: the REST port opens first; ``GET /v2/health/ready`` is 503
``{"error": "Server is not ready"}`` until the configuration is loaded, then 200;
``GET /v2/models/NAME/ready`` is 404 while the model loads and 200 once it is
available.  A model that fails to load ends the process with exit code 1.

Routes: OpenAI-style under ``/v3/`` and the same under ``/v1/``; KServe v2
(``/v2``, ``/v2/health/{live,ready}``, ``/v2/models/NAME[/versions/V][/ready|/infer]``);
``/v1/config``; ``/v1/models`` and ``/v3/models`` (OpenAI list).  Errors are
``{"error": "<string>"}``: 400 unknown URL or a failed execution, 406 a method
other than GET/POST or the wrong one of the two, 412 a JSON body that is not
valid or lacks a string ``model``, 404 an unknown servable.

Test knobs (environment; dynllm scrubs ``OVMS_*`` unless a model sets them):
  OVMS_STANDIN_CONFIG_GATE=FILE  hold "config loaded" until FILE exists
  OVMS_STANDIN_LOAD_GATE=FILE    hold "model available" until FILE exists
  OVMS_STANDIN_TOKEN_DELAY_MS=N  pause N ms after each generated text chunk
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

EX_USAGE = 64
OVMS_VERSION = "2026.3.0"
TASKS = (
    "text_generation",
    "embeddings",
    "rerank",
    "image_generation",
    "speech2text",
    "text2speech",
)

# ---------------------------------------------------------------- status strings
# src/status.cpp: message and HTTP code per StatusCode.
REST_INVALID_URL = (400, "Invalid request URL")
REST_UNSUPPORTED_METHOD = (406, "Unsupported method")
PATH_INVALID = (400, "The provided base path is invalid or doesn't exists")
JSON_INVALID = (412, "The file is not valid json")
MODEL_NAME_MISSING = (404, "Model with requested name is not found")
MODEL_VERSION_MISSING = (404, "Model with requested version is not found")
MODEL_VERSION_NOT_LOADED_YET = (503, "Model with requested version is not loaded yet")
MEDIAPIPE_DEFINITION_NAME_MISSING = (
    404,
    "Mediapipe graph definition with requested name is not found",
)
MEDIAPIPE_EXECUTION_ERROR = (400, "Mediapipe execution failed")
FAILED_TO_PARSE_MULTIPART = (400, "Failed to parse multipart content type request")
SERVER_NOT_READY = (503, "Server is not ready")
REST_NO_INPUTS_FOUND = (400, "Invalid JSON structure, missing inputs")
INVALID_MISSING_INPUT = (400, "Missing input with specific name")
INVALID_NO_OF_INPUTS = (400, "Invalid number of inputs")
INVALID_SHAPE = (400, "Invalid input shape")
INVALID_PRECISION = (400, "Invalid input precision")
INVALID_CONTENT_SIZE = (400, "Invalid content size of tensor proto")
INVALID_VALUE_COUNT = (400, "Invalid number of values in tensor proto container")
REST_BINARY_BUFFER_EXCEEDED = (400, "Received binary buffer size is smaller than declared")
REST_CONTENTS_FIELD_NOT_EMPTY = (400, "Input contents field is not empty while binary data is sent")
INFERENCE_HEADER_INVALID = (400, "Inference header content length is invalid")
INFERENCE_HEADER_EXCEEDED = (400, "Inference header content length exceeded JSON size")


class OvmsError(Exception):
    def __init__(self, status: tuple[int, str], detail: str = "") -> None:
        self.code, message = status
        self.message = f"{message} - {detail}" if detail else message
        super().__init__(self.message)


def error_response(code: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=code)


# --------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # cxxopts' wording, OVMS's exit code
        sys.stderr.write(f"error parsing options: {message}\n")
        sys.exit(EX_USAGE)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="ovms", add_help=False, allow_abbrev=False)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rest_port", type=int, default=0)
    p.add_argument("--grpc_bind_address", default="0.0.0.0")
    p.add_argument("--rest_bind_address", default="0.0.0.0")
    p.add_argument("--rest_workers", type=int)
    p.add_argument("--model_path")
    p.add_argument("--model_name")
    p.add_argument("--config_path")
    p.add_argument("--task")
    p.add_argument("--target_device", default="CPU")
    p.add_argument("--shape")
    p.add_argument("--batch_size")
    p.add_argument("--plugin_config")
    p.add_argument("--log_level", default="INFO")
    p.add_argument("--metrics_enable", action="store_true")
    args, unmatched = p.parse_known_args(argv)
    if unmatched:
        sys.stderr.write(f"error parsing options - unmatched arguments: {', '.join(unmatched)}, \n")
        sys.exit(EX_USAGE)
    return args


HOST_RE = re.compile(
    r"^(([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*"
    r"([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])$"
)
IP_RE = re.compile(r"^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$")


def _valid_host(text: str) -> bool:
    if len(text) > 255:
        return False
    if all(c.isdigit() or c == "." for c in text):
        return bool(IP_RE.match(text))
    return bool(HOST_RE.match(text))


def validate(args: argparse.Namespace) -> str | None:
    """src/config.cpp Config::validate and the task check of cli_parser.cpp."""
    if args.config_path and (args.model_name or args.model_path):
        return "Use either config_path or model_path with model_name"
    if not args.config_path and not (args.model_name and args.model_path):
        return "Use config_path or model_path with model_name"
    if args.config_path:
        return "config_path is not supported by this stand-in"
    if args.task is not None and args.task not in TASKS:
        return f"error parsing options - --task parameter unsupported value: {args.task}"
    if args.rest_workers is not None and args.rest_port == 0:
        return (
            "rest_workers is set but rest_port is not set. rest_port is required to start "
            "rest servers"
        )
    if not 0 <= args.port <= 65535:
        return "port number out of range from 0 to 65535"
    if not 0 <= args.rest_port <= 65535:
        return "rest_port number out of range from 0 to 65535"
    if not _valid_host(args.rest_bind_address):
        return "rest_bind_address has invalid format: proper hostname or IP address expected."
    if not _valid_host(args.grpc_bind_address):
        return "grpc_bind_address has invalid format: proper hostname or IP address expected."
    if args.port == args.rest_port:
        return "port and rest_port cannot have the same values"
    if args.log_level not in ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"):
        return "log_level should be one of: TRACE, DEBUG, INFO, WARNING, ERROR"
    return None


# ----------------------------------------------------------------- knobs & gates
def _wait_gate(variable: str) -> None:
    gate = os.environ.get(variable)
    if not gate:
        return
    while not Path(gate).exists():  # a test holds this phase open on purpose
        time.sleep(0.02)


def _token_delay() -> float:
    return float(os.environ.get("OVMS_STANDIN_TOKEN_DELAY_MS", "0")) / 1000


def _properties(args: argparse.Namespace) -> dict[str, Any]:
    if not args.plugin_config:
        return {}
    return {
        k: (str(v) if isinstance(v, bool) else v) for k, v in json.loads(args.plugin_config).items()
    }


# -------------------------------------------------------------------- servables
@dataclass
class Request:
    """One V3 request after OVMS's payload checks: the endpoint (``chat/completions``)
    and either the parsed JSON body or the multipart form."""

    endpoint: str
    body: dict[str, Any] = field(default_factory=dict)
    form: dict[str, Any] = field(default_factory=dict)


def wrong_endpoint(endpoint: str, allowed: tuple[str, ...]) -> OvmsError:
    return OvmsError(
        MEDIAPIPE_EXECUTION_ERROR,
        f"Wrong endpoint /v3/{endpoint}; this graph serves "
        + ", ".join(f"/v3/{a}" for a in allowed),
    )


def bad_request(detail: str) -> OvmsError:
    return OvmsError(MEDIAPIPE_EXECUTION_ERROR, detail)


class Servable:
    endpoints: tuple[str, ...] = ()

    def __init__(self, name: str, path: Path, device: str, props: dict[str, Any]) -> None:
        self.name, self.path, self.device, self.props = name, path, device, props
        self.lock = threading.Lock()  # one inference at a time per pipeline

    def load(self) -> None:
        raise NotImplementedError

    async def handle(self, req: Request, http: web.Request) -> web.StreamResponse:
        raise NotImplementedError


def _now() -> int:
    return int(time.time())


class TextGeneration(Servable):
    endpoints = ("chat/completions", "completions")

    def load(self) -> None:
        import openvino_genai as genai

        self.genai = genai
        self.pipe = genai.LLMPipeline(str(self.path), self.device, **self.props)
        self.tokenizer = self.pipe.get_tokenizer()

    def _config(self, body: dict[str, Any], prompt_tokens: int) -> Any:
        config = self.pipe.get_generation_config()
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise bad_request("max_tokens value should be greater than 0")
        config.max_new_tokens = (
            max_tokens if max_tokens is not None else max(1, 4096 - prompt_tokens)
        )
        temperature = body.get("temperature")
        config.do_sample = bool(temperature)
        if temperature:
            config.temperature = float(temperature)
            if body.get("top_p") is not None:
                config.top_p = float(body["top_p"])
            if body.get("seed") is not None:
                config.rng_seed = int(body["seed"])
        stop = body.get("stop")
        if stop:
            config.stop_strings = {stop} if isinstance(stop, str) else set(stop)
        config.apply_chat_template = False  # the prompt below is already templated
        return config

    def _prompt(self, req: Request) -> str:
        body = req.body
        if req.endpoint == "chat/completions":
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise bad_request("Messages missing in request")
            if not messages:
                raise bad_request("Messages array cannot be empty")
            history = []
            for message in messages:
                content = message.get("content")
                if isinstance(content, list):  # [{"type": "text", "text": ...}]
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                history.append({"role": message.get("role", "user"), "content": content or ""})
            return self.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad_request("prompt is missing or is not a string")
        return prompt

    async def handle(self, req: Request, http: web.Request) -> web.StreamResponse:
        if req.endpoint not in self.endpoints:
            raise wrong_endpoint(req.endpoint, self.endpoints)
        prompt = self._prompt(req)
        prompt_tokens = int(self.tokenizer.encode(prompt).input_ids.get_shape()[-1])
        config = self._config(req.body, prompt_tokens)
        chat = req.endpoint == "chat/completions"
        if req.body.get("stream"):
            return await self._stream(req, http, prompt, config, chat)
        result = await asyncio.to_thread(self._generate, prompt, config, None)
        text = result.texts[0]
        generated = result.perf_metrics.get_num_generated_tokens()
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
        }
        finish = "length" if generated >= config.max_new_tokens else "stop"
        if chat:
            choice = {
                "finish_reason": finish,
                "index": 0,
                "logprobs": None,
                "message": {"content": text, "role": "assistant", "tool_calls": []},
            }
            kind = "chat.completion"
        else:
            choice = {"finish_reason": finish, "index": 0, "logprobs": None, "text": text}
            kind = "text_completion"
        return web.json_response(
            {
                "choices": [choice],
                "created": _now(),
                "model": self.name,
                "object": kind,
                "usage": usage,
            }
        )

    def _generate(self, prompt: str, config: Any, streamer: Callable[[str], Any] | None) -> Any:
        with self.lock:
            return self.pipe.generate([prompt], config, streamer)

    async def _stream(
        self, req: Request, http: web.Request, prompt: str, config: Any, chat: bool
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        gone = threading.Event()
        delay = _token_delay()
        status = self.genai.StreamingStatus

        def streamer(piece: str) -> Any:
            loop.call_soon_threadsafe(queue.put_nowait, piece)
            if delay:
                time.sleep(delay)
            return status.CANCEL if gone.is_set() else status.RUNNING

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(http)
        created = _now()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any], **extra: Any) -> bytes:
            event = {
                "choices": [choice] if choice else [],
                "created": created,
                "model": self.name,
                "object": kind,
                **extra,
            }
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        def on_done(fut: asyncio.Future[Any]) -> None:
            queue.put_nowait(None)

        job = asyncio.ensure_future(asyncio.to_thread(self._generate, prompt, config, streamer))
        job.add_done_callback(on_done)
        try:
            while (piece := await queue.get()) is not None:
                if not piece:
                    continue
                if chat:
                    choice = {
                        "delta": {"content": piece},
                        "finish_reason": None,
                        "index": 0,
                        "logprobs": None,
                    }
                else:
                    choice = {"finish_reason": None, "index": 0, "logprobs": None, "text": piece}
                await response.write(chunk(choice))
            try:
                result = job.result()
            except Exception as exc:  # an execution failure after the 200 went out
                await response.write(b"data: " + json.dumps({"error": str(exc)}).encode() + b"\n\n")
                await response.write(b"data: [DONE]\n\n")
                return response
            generated = result.perf_metrics.get_num_generated_tokens()
            finish = "length" if generated >= config.max_new_tokens else "stop"
            last = {"finish_reason": finish, "index": 0, "logprobs": None}
            last.update({"delta": {}} if chat else {"text": ""})
            await response.write(chunk(last))
            options = req.body.get("stream_options") or {}
            if options.get("include_usage"):
                prompt_tokens = result.perf_metrics.get_num_input_tokens()
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": generated,
                    "total_tokens": prompt_tokens + generated,
                }
                await response.write(chunk({}, usage=usage))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            gone.set()  # the client left: stop generating at the next token
            raise
        finally:
            gone.set()
        return response


class Embeddings(Servable):
    endpoints = ("embeddings",)

    def load(self) -> None:
        import openvino_genai as genai

        config = genai.TextEmbeddingPipeline.Config()
        config.pooling_type = genai.TextEmbeddingPipeline.PoolingType.CLS
        config.normalize = True
        self.pipe = genai.TextEmbeddingPipeline(str(self.path), self.device, config, **self.props)
        self.tokenizer = genai.Tokenizer(str(self.path))

    async def handle(self, req: Request, http: web.Request) -> web.StreamResponse:
        if req.endpoint not in self.endpoints:
            raise wrong_endpoint(req.endpoint, self.endpoints)
        texts = req.body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise bad_request("input field is required and must be a string or array of strings")
        fmt = req.body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise bad_request("encoding_format should either base64 or float")

        def run() -> tuple[list[Any], int]:
            with self.lock:
                vectors = self.pipe.embed_documents(texts)
            mask = self.tokenizer.encode(texts).attention_mask.data
            return vectors, int(np.asarray(mask).sum())

        vectors, tokens = await asyncio.to_thread(run)
        data = []
        for index, vector in enumerate(vectors):
            array = np.asarray(vector, dtype=np.float32)
            value: Any = (
                base64.b64encode(array.tobytes()).decode() if fmt == "base64" else array.tolist()
            )
            data.append({"embedding": value, "index": index, "object": "embedding"})
        return web.json_response(
            {
                "data": data,
                "model": self.name,
                "object": "list",
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


class Rerank(Servable):
    endpoints = ("rerank",)

    def load(self) -> None:
        import openvino_genai as genai

        config = genai.TextRerankPipeline.Config()
        config.top_n = 4096  # trimmed per request
        self.pipe = genai.TextRerankPipeline(str(self.path), self.device, config, **self.props)

    async def handle(self, req: Request, http: web.Request) -> web.StreamResponse:
        if req.endpoint not in self.endpoints:
            raise wrong_endpoint(req.endpoint, self.endpoints)
        query, documents = req.body.get("query"), req.body.get("documents")
        if not isinstance(query, str):
            raise bad_request("query is missing or is not a string")
        if not isinstance(documents, list) or not documents:
            raise bad_request("documents is missing or is not an array")
        texts = [d if isinstance(d, str) else str(d.get("text", "")) for d in documents]
        top_n = req.body.get("top_n", len(texts))
        if not isinstance(top_n, int) or top_n < 1:
            raise bad_request("top_n accepts integer values greater than 0")

        def run() -> list[tuple[int, float]]:
            with self.lock:
                return list(self.pipe.rerank(query, texts))

        ranked = sorted(await asyncio.to_thread(run), key=lambda r: -r[1])[:top_n]
        results = []
        for index, score in ranked:
            item: dict[str, Any] = {"index": int(index), "relevance_score": float(score)}
            if req.body.get("return_documents"):
                item["document"] = {"text": texts[index]}
            results.append(item)
        return web.json_response({"results": results})


def _decode_audio(data: bytes) -> np.ndarray:
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise bad_request(f"Received input file is not valid audio: {exc}") from None
    mono = samples.mean(axis=1)
    if rate != 16000 and len(mono):
        positions = np.arange(0, len(mono), rate / 16000)
        mono = np.interp(positions, np.arange(len(mono)), mono).astype(np.float32)
    return mono


class SpeechToText(Servable):
    endpoints = ("audio/transcriptions", "audio/translations")

    def load(self) -> None:
        import openvino_genai as genai

        self.pipe = genai.WhisperPipeline(str(self.path), self.device, **self.props)

    async def handle(self, req: Request, http: web.Request) -> web.StreamResponse:
        if req.endpoint not in self.endpoints:
            raise wrong_endpoint(req.endpoint, self.endpoints)
        upload = req.form.get("file")
        if not isinstance(upload, web.FileField):
            raise bad_request("File parsing fails")
        audio = _decode_audio(upload.file.read())
        kwargs: dict[str, Any] = {"return_timestamps": False}
        if req.endpoint == "audio/translations":
            kwargs["task"] = "translate"
        else:
            kwargs["task"] = "transcribe"
            language = req.form.get("language")
            if isinstance(language, str) and language:
                kwargs["language"] = f"<|{language}|>"
        temperature = req.form.get("temperature")
        if isinstance(temperature, str) and temperature and float(temperature) > 0:
            kwargs.update(do_sample=True, temperature=float(temperature))

        def run() -> str:
            with self.lock:
                return str(self.pipe.generate(audio.tolist(), **kwargs).texts[0])

        try:
            text = await asyncio.to_thread(run)
        except RuntimeError as exc:
            raise bad_request(str(exc).strip().splitlines()[0]) from None
        if req.form.get("response_format") == "text":
            return web.Response(text=text, content_type="text/plain")
        return web.json_response({"text": text})


class TextToSpeech(Servable):
    endpoints = ("audio/speech",)

    def load(self) -> None:
        import openvino_genai as genai

        self.pipe = genai.Text2SpeechPipeline(str(self.path), self.device, **self.props)

    async def handle(self, req: Request, http: web.Request) -> web.StreamResponse:
        import soundfile

        if req.endpoint not in self.endpoints:
            raise wrong_endpoint(req.endpoint, self.endpoints)
        text = req.body.get("input")
        if not isinstance(text, str) or not text:
            raise bad_request("input field is missing or is not a string")
        fmt = req.body.get("response_format", "wav")
        if fmt != "wav":
            raise bad_request(f"Unsupported response_format: {fmt}; only wav is supported")

        def run() -> tuple[np.ndarray, int]:
            with self.lock:
                result = self.pipe.generate(text)
            samples = np.asarray(result.speeches[0].data, dtype=np.float32).reshape(-1)
            return samples, int(getattr(result, "output_sample_rate", 16000) or 16000)

        samples, rate = await asyncio.to_thread(run)
        out = io.BytesIO()
        soundfile.write(out, np.clip(samples, -1, 1), rate, format="WAV", subtype="PCM_16")
        return web.Response(body=out.getvalue(), content_type="audio/wav")


class ImageGeneration(Servable):
    endpoints = ("images/generations",)

    def load(self) -> None:
        import openvino_genai as genai

        self.pipe = genai.Text2ImagePipeline(str(self.path), self.device, **self.props)

    async def handle(self, req: Request, http: web.Request) -> web.StreamResponse:
        from PIL import Image

        if req.endpoint not in self.endpoints:
            raise wrong_endpoint(req.endpoint, self.endpoints)
        body = req.body
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise bad_request("prompt field is missing or is not a string")
        kwargs: dict[str, Any] = {}
        size = body.get("size")
        if size is not None and size != "auto":
            match = re.fullmatch(r"(\d+)x(\d+)", str(size))
            if not match:
                raise bad_request("size field is not in WxH format")
            kwargs["width"], kwargs["height"] = int(match[1]), int(match[2])
        n = body.get("n", 1)
        if not isinstance(n, int) or n < 1:
            raise bad_request("n field must be a positive integer")
        kwargs["num_images_per_prompt"] = n
        for key in ("num_inference_steps", "rng_seed", "guidance_scale"):
            if body.get(key) is not None:
                kwargs[key] = body[key]
        if body.get("seed") is not None:
            kwargs["rng_seed"] = int(body["seed"])
        if body.get("response_format", "b64_json") != "b64_json":
            raise bad_request("Only b64_json response_format is supported")

        def run() -> list[bytes]:
            with self.lock:
                tensor = self.pipe.generate(prompt, **kwargs)
            images = []
            for array in np.asarray(tensor.data):
                png = io.BytesIO()
                Image.fromarray(array.astype(np.uint8)).save(png, format="PNG")
                images.append(png.getvalue())
            return images

        try:
            images = await asyncio.to_thread(run)
        except RuntimeError as exc:
            raise bad_request(str(exc).strip().splitlines()[0]) from None
        data = [{"b64_json": base64.b64encode(png).decode()} for png in images]
        return web.json_response({"created": _now(), "data": data})


# ------------------------------------------------------------------- KServe model
KFS_TYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
}


def _kfs_type(dtype: np.dtype[Any]) -> str:
    for name, np_type in KFS_TYPES.items():
        if np.dtype(np_type) == dtype:
            return name
    raise ValueError(f"no KServe type for {dtype}")


class PlainModel(Servable):
    """A model in OVMS's plain layout, DIR/<version>/model.xml, served over KServe."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        versions = sorted(
            int(p.name)
            for p in self.path.iterdir()
            if p.name.isdigit() and (p / "model.xml").is_file()
        )
        if not versions:
            raise OvmsError((500, "Not a single model version directory has valid numeric name"))
        self.version = versions[-1]

    def load(self) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(self.path / str(self.version) / "model.xml")
        self.compiled = core.compile_model(model, self.device, self.props)
        self.inputs = [
            (i.get_any_name(), i.get_element_type().to_dtype(), list(i.get_shape()))
            for i in self.compiled.inputs
        ]
        self.outputs = [
            (o.get_any_name(), o.get_element_type().to_dtype(), list(o.get_shape()))
            for o in self.compiled.outputs
        ]

    def metadata(self) -> dict[str, Any]:
        def spec(items: list[tuple[str, Any, list[int]]]) -> list[dict[str, Any]]:
            return [
                {"name": n, "datatype": _kfs_type(np.dtype(t)), "shape": s} for n, t, s in items
            ]

        return {
            "name": self.name,
            "versions": [str(self.version)],
            "platform": "OpenVINO",
            "inputs": spec(self.inputs),
            "outputs": spec(self.outputs),
        }

    def infer(self, body: bytes, header_length: int | None) -> tuple[bytes, int | None]:
        """KServe v2 infer with the binary extension: the first ``header_length``
        bytes are JSON, the rest raw tensors in input order."""
        end = len(body) if header_length is None else header_length
        if end > len(body):
            raise OvmsError(INFERENCE_HEADER_EXCEEDED)
        try:
            request = json.loads(body[:end])
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise OvmsError(JSON_INVALID) from None
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
            raise OvmsError(REST_NO_INPUTS_FOUND)
        binary, offset = body[end:], 0
        feeds: dict[str, np.ndarray] = {}
        expected = {name: (np.dtype(t), shape) for name, t, shape in self.inputs}
        if len(request["inputs"]) != len(expected):
            raise OvmsError(
                INVALID_NO_OF_INPUTS, f"Expected: {len(expected)}; Actual: {len(request['inputs'])}"
            )
        for item in request["inputs"]:
            name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
            if name not in expected:
                raise OvmsError(INVALID_MISSING_INPUT, f"Required input: {next(iter(expected))}")
            dtype, want_shape = expected[name]
            if datatype not in KFS_TYPES or np.dtype(KFS_TYPES[datatype]) != dtype:
                raise OvmsError(
                    INVALID_PRECISION, f"Expected: {_kfs_type(dtype)}; Actual: {datatype}"
                )
            if list(shape or []) != want_shape:
                raise OvmsError(
                    INVALID_SHAPE,
                    f"Expected shape: {tuple(want_shape)}; Actual: {tuple(shape or [])}",
                )
            count = int(np.prod(want_shape))
            size = (item.get("parameters") or {}).get("binary_data_size")
            if size is not None or ("data" not in item and header_length is not None):
                if "data" in item:
                    raise OvmsError(REST_CONTENTS_FIELD_NOT_EMPTY)
                size = count * dtype.itemsize if size is None else int(size)
                if offset + size > len(binary):
                    raise OvmsError(REST_BINARY_BUFFER_EXCEEDED)
                if size != count * dtype.itemsize:
                    raise OvmsError(
                        INVALID_CONTENT_SIZE,
                        f"Expected: {count * dtype.itemsize} bytes; Actual: {size} bytes",
                    )
                array = np.frombuffer(binary[offset : offset + size], dtype=dtype)
                offset += size
            else:
                flat = np.asarray(item.get("data", []), dtype=dtype).reshape(-1)
                if flat.size != count:
                    raise OvmsError(INVALID_VALUE_COUNT, f"Expected: {count}; Actual: {flat.size}")
                array = flat
            feeds[name] = array.reshape(want_shape)
        with self.lock:
            results = self.compiled(feeds)
        return self._response(request, results)

    def _response(self, request: dict[str, Any], results: Any) -> tuple[bytes, int | None]:
        params = request.get("parameters") or {}
        binary_default = bool(params.get("binary_data_output", False))
        wanted = {
            o.get("name"): bool((o.get("parameters") or {}).get("binary_data", binary_default))
            for o in request.get("outputs") or []
        }
        outputs, raw = [], b""
        for port in self.compiled.outputs:
            name = port.get_any_name()
            if wanted and name not in wanted:
                continue
            array = np.ascontiguousarray(results[port])
            entry: dict[str, Any] = {
                "name": name,
                "shape": list(array.shape),
                "datatype": _kfs_type(array.dtype),
            }
            if wanted.get(name, False):
                data = array.tobytes()
                entry["parameters"] = {"binary_data_size": len(data)}
                raw += data
            else:
                entry["data"] = array.reshape(-1).tolist()
            outputs.append(entry)
        response: dict[str, Any] = {
            "model_name": self.name,
            "model_version": str(self.version),
            "outputs": outputs,
        }
        if "id" in request:
            response["id"] = request["id"]
        head = json.dumps(response).encode()
        return head + raw, (len(head) if raw else None)


SERVABLES: dict[str | None, type[Servable]] = {
    "text_generation": TextGeneration,
    "embeddings": Embeddings,
    "rerank": Rerank,
    "speech2text": SpeechToText,
    "text2speech": TextToSpeech,
    "image_generation": ImageGeneration,
    None: PlainModel,
}

# ------------------------------------------------------------------------ server
V1_OPENAI = re.compile(
    r"^/v1/(chat/completions|completions|embeddings|rerank|images/generations"
    r"|images/edits|audio/transcriptions|audio/translations|audio/speech"
    r"|responses|tokenize)$"
)
V3 = re.compile(r"^/v3/.+")
KFS_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([0-9]+))?/infer$")
KFS_READY = re.compile(r"^/v2/models/([^/]+)(?:/versions/([0-9]+))?/ready$")
KFS_META = re.compile(r"^/v2/models/([^/]+)(?:/versions/([0-9]+))?/?$")
TFS_STATUS = re.compile(r"^/v1/models(?:/([^/:]+))?(?:/versions/(\d+))?(?:/(metadata))?$")
TFS_PREDICT = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:(classify|regress|predict)$")
GET_ONLY = [
    re.compile(p)
    for p in (
        r"^/v2/health/(live|ready)$",
        r"^/v2$",
        r"^/v1/config$",
        r"^/metrics$",
    )
] + [KFS_READY, KFS_META, TFS_STATUS]
# A GET on these is 406; a GET on any other path, /v3/... included, is 400 (as OVMS).
POST_ONLY = [KFS_INFER, TFS_PREDICT, re.compile(r"^/v1/config/reload$")]


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name: str = args.model_name
        self.config_loaded = threading.Event()
        self.available = threading.Event()
        self.servable: Servable | None = None
        self.load_error: str | None = None

    # Loading runs in a thread so the REST port answers during it, as OVMS's does.
    def load(self) -> None:
        try:
            _wait_gate("OVMS_STANDIN_CONFIG_GATE")
            path = Path(self.args.model_path)
            if not path.is_dir():
                raise OvmsError(PATH_INVALID, str(path))
            servable = SERVABLES[self.args.task](
                self.name, path, self.args.target_device, _properties(self.args)
            )
            self.servable = servable
            self.config_loaded.set()
            print(f"[serving][info] Loading model: {self.name}, path: {path}", flush=True)
            _wait_gate("OVMS_STANDIN_LOAD_GATE")
            servable.load()
            self.available.set()
            print(f"[modelmanager][info] Model {self.name} state changed to: AVAILABLE", flush=True)
        except Exception as exc:  # OVMS logs the failure; the stand-in then exits
            self.load_error = f"{type(exc).__name__}: {exc}"
            print(
                f"[modelmanager][error] Loading model {self.name} failed: {self.load_error}",
                file=sys.stderr,
                flush=True,
            )

    async def dispatch(self, http: web.Request) -> web.StreamResponse:
        try:
            return await self._dispatch(http)
        except OvmsError as exc:
            return error_response(exc.code, exc.message)
        except RuntimeError as exc:  # OpenVINO reports a failed execution this way
            traceback.print_exc()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return error_response(400, f"{MEDIAPIPE_EXECUTION_ERROR[1]} - {first}")

    async def _dispatch(self, http: web.Request) -> web.StreamResponse:
        method, path = http.method, http.path
        if method not in ("GET", "POST"):
            raise OvmsError(REST_UNSUPPORTED_METHOD)
        if ".." in path.split("/"):
            raise OvmsError(PATH_INVALID)
        if method == "POST":
            if V1_OPENAI.match(path):
                path = "/v3/" + path[len("/v1/") :]
            if m := KFS_INFER.match(path):
                return await self.kfs_infer(http, m[1], m[2])
            if V3.match(path):
                return await self.v3(http, path[len("/v3/") :])
            if path == "/v1/config/reload":
                return web.json_response(self.config_status())
            if any(p.match(path) for p in GET_ONLY):
                raise OvmsError(REST_UNSUPPORTED_METHOD)
            raise OvmsError(REST_INVALID_URL)
        if path in ("/v1/models", "/v3/models"):
            return web.json_response(self.openai_models())
        if path == "/v1/config":
            return web.json_response(self.config_status())
        if path == "/v2/health/live":
            return web.Response(status=200)
        if path == "/v2/health/ready":
            if not self.config_loaded.is_set():
                raise OvmsError(SERVER_NOT_READY)
            return web.Response(status=200)
        if path == "/v2":
            return web.json_response({"name": "OpenVINO Model Server", "version": OVMS_VERSION})
        if m := KFS_READY.match(path):
            self._servable_for(m[1], m[2])
            return web.Response(status=200)
        if m := KFS_META.match(path):
            return web.json_response(self.kfs_metadata(m[1], m[2]))
        if m := TFS_STATUS.match(path):
            self._servable_for(m[1] or "", m[2])
            return web.json_response(self.config_status()[self.name])
        if any(p.match(path) for p in POST_ONLY):
            raise OvmsError(REST_UNSUPPORTED_METHOD)
        raise OvmsError(REST_INVALID_URL)

    def _servable_for(self, name: str, version: str | None) -> Servable:
        """The servable behind a KServe path: 404 while unknown or still loading."""
        servable = self.servable
        if servable is None or name != self.name or not self.available.is_set():
            raise OvmsError(MODEL_NAME_MISSING)
        if version is not None and int(version) != getattr(servable, "version", 1):
            raise OvmsError(MODEL_VERSION_MISSING)
        return servable

    def kfs_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        servable = self._servable_for(name, version)
        if isinstance(servable, PlainModel):
            return servable.metadata()
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "OpenVINO",
            "inputs": [],
            "outputs": [],
        }

    async def kfs_infer(self, http: web.Request, name: str, version: str | None) -> web.Response:
        header = http.headers.get("Inference-Header-Content-Length")
        length = None
        if header is not None:
            if not header.strip().isdigit():
                raise OvmsError(INFERENCE_HEADER_INVALID)
            length = int(header)
        body = await http.read()
        servable = self._servable_for(name, version)
        if not isinstance(servable, PlainModel):
            raise OvmsError(MEDIAPIPE_EXECUTION_ERROR, "this graph takes no KServe requests")
        payload, head = await asyncio.to_thread(servable.infer, body, length)
        if head is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload,
            headers={
                "Inference-Header-Content-Length": str(head),
                "Content-Type": "application/octet-stream",
            },
        )

    async def v3(self, http: web.Request, endpoint: str) -> web.StreamResponse:
        """createV3HttpPayload + processV3: the model name comes from the JSON
        body, else the multipart form, else the URI after /v3/."""
        ctype = http.headers.get("Content-Type", "")
        req = Request(endpoint)
        model = ""
        if "multipart/form-data" in ctype:
            try:
                form = await http.post()
            except Exception:
                raise OvmsError(FAILED_TO_PARSE_MULTIPART) from None
            req.form = dict(form)
            model = form.get("model") if isinstance(form.get("model"), str) else ""
        elif "application/json" in ctype:
            raw = await http.read()
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise OvmsError(JSON_INVALID, "Cannot parse JSON body") from None
            if not isinstance(body, dict):
                raise OvmsError(JSON_INVALID, "JSON body must be an object")
            if "model" not in body:
                raise OvmsError(JSON_INVALID, "model field is missing in JSON body")
            if not isinstance(body["model"], str):
                raise OvmsError(JSON_INVALID, "model field is not a string")
            if (
                "completions" in endpoint
                and "stream" in body
                and not isinstance(body["stream"], bool)
            ):
                raise OvmsError(JSON_INVALID, "stream field is not a boolean")
            req.body, model = body, body["model"]
        if not model:
            model = endpoint  # URI-based routing: whatever follows /v3/
        servable = self.servable
        if (
            servable is None
            or model != self.name
            or not self.available.is_set()
            or isinstance(servable, PlainModel)
        ):
            raise OvmsError(MEDIAPIPE_DEFINITION_NAME_MISSING)
        return await servable.handle(req, http)

    def openai_models(self) -> dict[str, Any]:
        data = []
        if self.available.is_set():
            data.append({"id": self.name, "object": "model", "created": _now(), "owned_by": "OVMS"})
        return {"object": "list", "data": data}

    def config_status(self) -> dict[str, Any]:
        state = "AVAILABLE" if self.available.is_set() else "LOADING"
        version = str(getattr(self.servable, "version", 1))
        return {
            self.name: {
                "model_version_status": [
                    {
                        "version": version,
                        "state": state,
                        "status": {"error_code": "OK", "error_message": "OK"},
                    }
                ]
            }
        }


async def serve(args: argparse.Namespace) -> int:
    server = Server(args)
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", server.dispatch)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    grpc = None
    try:
        if args.port:
            grpc = socket.create_server((args.grpc_bind_address, args.port))  # held, not served
        if args.rest_port:
            await web.TCPSite(runner, args.rest_bind_address, args.rest_port).start()
    except OSError as exc:
        print(
            f"[server][error] Failed to start REST server at {args.rest_bind_address}:"
            f"{args.rest_port}: {exc.strerror or exc} (address already in use?)",
            file=sys.stderr,
            flush=True,
        )
        await runner.cleanup()
        return 1
    print(
        f"[server][info] REST server listening on port {args.rest_port} with 1 threads", flush=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def load() -> None:
        server.load()
        if server.load_error is not None:
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=load, name="loader", daemon=True).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if grpc is not None:
            grpc.close()
    if server.load_error is not None:
        return 1
    print("[server][info] Stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = validate(args)
    if problem is not None:
        sys.stderr.write(problem + "\n")
        return EX_USAGE
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())

"""The HTTP client behind ``dynllm status``, ``load``, ``unload``, ``logs``,
``reload`` and ``pull``.

It speaks to a running dynllm's admin routes and turns every way that can
fail into one of three exceptions, each with a message for a person:

    ClientError                 exit 1
    ├── Unreachable             nothing answers at the URL, or the connection broke
    ├── ServiceError            dynllm answered with an error (its own message kept)
    │   └── ConfigRejected      exit 2: POST /admin/reload refused the new config
    └── NotSupported            the running dynllm is older than the command

The admin key travels in ``Authorization: Bearer`` and appears in no message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from dynllm.api.access import is_loopback

# A request that should answer at once (state, logs); loads, unloads and
# reloads wait as long as the service takes (its own load_timeout_seconds
# and stop_timeout_seconds bound them).
QUICK = httpx.Timeout(30.0, connect=5.0)
PATIENT = httpx.Timeout(None, connect=5.0)
# The log stream carries a keepalive comment every 15 s: four missed ones
# mean the connection is gone even if no error reached this end.
FOLLOW_READ_TIMEOUT_S = 60.0


class ClientError(Exception):
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unreachable(ClientError):
    pass


class ServiceError(ClientError):
    def __init__(self, message: str, status: int, code: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ConfigRejected(ServiceError):
    exit_code = 2


class NotSupported(ClientError):
    pass


def url_for(host: str, port: int) -> str:
    """The URL a client on this machine uses for a service bound to ``host``:
    the wildcard addresses are not connectable, so they mean loopback."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}"


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    key: str | None
    source: str
    """Where the URL came from (``--url``, ``DYNLLM_URL``, the config file), for messages."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str


def sse_events(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Server-sent events from a stream's lines (the WHATWG rules dynllm's
    streams use: comments start with ``:``, ``data`` lines of one event are
    joined by newlines, a blank line ends the event)."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield SseEvent(event, "\n".join(data))
            event, data = "message", list[str]()
            continue
        if line.startswith(":"):
            continue  # ": connected", ": keepalive"
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value


class AdminClient:
    """One connection pool to one dynllm; ``with AdminClient(target) as c: c.models()``."""

    def __init__(self, target: Target, transport: httpx.BaseTransport | None = None) -> None:
        self.target = target
        headers = {"Authorization": f"Bearer {target.key}"} if target.key else {}
        host = httpx.URL(target.url).host
        self._http = httpx.Client(
            base_url=target.url,
            headers=headers,
            timeout=QUICK,
            transport=transport,
            # A proxy from the environment must not sit between a command and
            # the dynllm on this machine; a remote --url may need one.
            trust_env=not is_loopback(host),
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- the routes ---------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def models(self) -> dict[str, Any]:
        return self._json("GET", "/admin/models")

    def load(self, model: str, force: bool = False) -> dict[str, Any]:
        body = {"model": model, "force": force}
        return self._json("POST", "/admin/models/load", json=body, timeout=PATIENT)

    def unload(self, model: str, force: bool = False) -> dict[str, Any]:
        body = {"model": model, "force": force}
        return self._json("POST", "/admin/models/unload", json=body, timeout=PATIENT)

    def logs(self, model: str, lines: int) -> dict[str, Any]:
        return self._json("GET", _logs_path(model), params={"lines": lines})

    def reload(self) -> dict[str, Any]:
        try:
            return self._json("POST", "/admin/reload", json={}, timeout=PATIENT)
        except ServiceError as exc:
            if exc.status in (404, 405):  # a dynllm from before reload existed
                raise NotSupported(
                    f"this dynllm does not support reload ({self.target.url}/admin/reload "
                    f"answered {exc.status}); restart the service to apply the config"
                ) from None
            if exc.status == 400:
                raise ConfigRejected(
                    f"the service at {self.target.url} refused the new config and keeps running "
                    f"the old one:\n{exc.message}",
                    exc.status,
                    exc.code,
                ) from None
            raise

    # ---- downloads (XandRouting's routes) -------------------------------------------
    def download(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start a download job (the service asks the Hub first: PATIENT)."""
        return self._json("POST", "/v1/models/download", json=body, timeout=PATIENT)

    def download_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", _download_path(job_id))

    def cancel_download(self, job_id: str) -> dict[str, Any]:
        return self._json("DELETE", _download_path(job_id), timeout=PATIENT)

    def follow_logs(self, model: str, lines: int = 200) -> Iterator[dict[str, Any]]:
        """The model's last ``lines`` lines, then each new one as it comes
        (``{"model", "line"}``); returns when the service ends the stream."""
        timeout = httpx.Timeout(5.0, read=FOLLOW_READ_TIMEOUT_S)
        path = _logs_path(model)
        with (
            self._guard(path),
            self._http.stream(
                "GET", path, params={"follow": "true", "lines": lines}, timeout=timeout
            ) as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise self._error(response)
            kind = response.headers.get("content-type", "").split(";")[0].strip()
            if kind != "text/event-stream":  # an older dynllm ignores ?follow
                raise NotSupported(
                    f"this dynllm does not stream logs ({self.target.url}{path}"
                    "?follow=true answered without an event stream); "
                    "use `dynllm logs` without -f"
                )
            for event in sse_events(response.iter_lines()):
                try:
                    item = json.loads(event.data)
                except ValueError:
                    raise ServiceError(
                        f"{self.target.url}{path} sent an event that is not JSON",
                        response.status_code,
                        None,
                    ) from None
                if isinstance(item, dict):
                    yield item

    # ---- plumbing -----------------------------------------------------------------
    def _json(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout: httpx.Timeout = QUICK,
    ) -> dict[str, Any]:
        with self._guard(path):
            response = self._http.request(method, path, json=json, params=params, timeout=timeout)
        if response.status_code >= 400:
            raise self._error(response)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ServiceError(
                f"{self.target.url}{path} answered {response.status_code} without dynllm's "
                "JSON; is it a dynllm?",
                response.status_code,
                None,
            )
        return data

    def _guard(self, path: str) -> _Translate:
        return _Translate(self.target, path)

    def _error(self, response: httpx.Response) -> ServiceError:
        message, code = _error_message(response)
        where = self.target.url
        if response.status_code == 401:
            message += (
                "; set DYNLLM_ADMIN_API_KEY (or admin_api_keys in the config the command "
                "reads with -c)"
            )
        return ServiceError(f"{where} answered {response.status_code}: {message}",
                            response.status_code, code)  # fmt: skip


class _Translate:
    """Turns httpx's transport exceptions into ``Unreachable`` with the URL
    and where it came from, so the admin can tell a stopped service from a
    wrong address."""

    def __init__(self, target: Target, path: str) -> None:
        self.target = target
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        if exc is None or not isinstance(exc, httpx.TransportError):
            return
        url, source = self.target.url, self.target.source
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            reason = str(exc) or type(exc).__name__
            raise Unreachable(
                f"cannot reach the service at {url} ({reason}); is it running? "
                f"(the address comes from {source}; --url or DYNLLM_URL sets another)"
            ) from None
        if isinstance(exc, httpx.TimeoutException):
            raise Unreachable(f"the service at {url} stopped answering ({self.path})") from None
        raise Unreachable(f"the connection to the service at {url} failed: {exc}") from None


def _download_path(job_id: str) -> str:
    return f"/v1/models/download/{quote(job_id, safe='')}"


def _logs_path(model: str) -> str:
    # A model name may hold '/', '?' or '#': escaped, it stays one path segment.
    return f"/admin/models/{quote(model, safe='')}/logs"


def _error_message(response: httpx.Response) -> tuple[str, str | None]:
    """dynllm's message from an error body (``{"error": {"message", "code"}}``),
    else the start of whatever the server sent."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            code = error.get("code")
            return error["message"], code if isinstance(code, str) else None
        if isinstance(error, str):
            return error, None
        if isinstance(body.get("detail"), str):
            return body["detail"], None
    text = response.text.strip()[:200]
    return text or response.reason_phrase or "no message", None

"""The download routes of a real dynllm process (``python -m dynllm``) against
the stand-in Hub: XandRouting's README calls unchanged, progress and cancel
over HTTP, the Hub's refusals as clear errors, and a restart of dynllm in the
middle of a download.

The dynllm process gets ``HF_ENDPOINT`` pointing at a second stand-in (a
decoy) while its config names the real one: any request that reaches the
decoy is one that did not use the configured endpoint (huggingface_hub falls
back to ``HF_ENDPOINT``, then huggingface.co, wherever it is not told).
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import poll
from tests.support.fake_hub import (
    GATED_REPO,
    GGUF_REPO,
    HUGE_REPO,
    FakeHub,
    HubRepo,
    standard_repos,
)
from tests.support.hub_helpers import (
    Dynllm,
    files_under,
    hub_env,
    repo_of,
    sha256,
    start,
    stop,
    write_config,
)
from tests.support.tiny_gguf import write_tiny_llama

QWEN = "Qwen/Qwen2.5-Coder-7B-Instruct-GGUF"  # the README's quick start
ORG = "org/model-name"  # the README's API reference
BIG = "tiny-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> list[HubRepo]:
    scratch = tmp_path_factory.mktemp("hub")
    q4 = write_tiny_llama(scratch / "q4.gguf", seed=21).read_bytes()
    q8 = write_tiny_llama(scratch / "q8.gguf", seed=22).read_bytes()
    readme = b"# model\n"
    return [
        *standard_repos(scratch, pad_mb=2),
        HubRepo(
            QWEN,
            {
                "README.md": readme,
                "qwen2.5-coder-7b-instruct-q4_k_m.gguf": q4,
                "qwen2.5-coder-7b-instruct-q8_0.gguf": q8,
            },
        ),
        HubRepo(
            ORG,
            {
                "README.md": readme,
                "model-name-Q4_K_M.gguf": q4,
                "model-name-Q8_0.gguf": q8,
                "pytorch_model.bin": b"\0" * 1000,
            },
        ),
    ]


@pytest.fixture(scope="module")
def hubs(repos: list[HubRepo]) -> Iterator[tuple[FakeHub, FakeHub]]:
    with FakeHub(repos) as hub, FakeHub([]) as decoy:
        yield hub, decoy


@pytest.fixture(scope="module")
def dynllm(tmp_path_factory: pytest.TempPathFactory, hubs: tuple[FakeHub, FakeHub]) -> Any:
    hub, decoy = hubs
    tmp = tmp_path_factory.mktemp("dynllm")
    running = start(write_config(tmp, hub), hub_env(tmp, decoy))
    yield running
    children = stop(running)
    assert running.proc.returncode in (0, -signal.SIGTERM), running.log.read_text()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert decoy.requests == [], decoy.requests


@pytest.fixture
def hub(hubs: tuple[FakeHub, FakeHub]) -> Iterator[FakeHub]:
    hub, _ = hubs
    hub.throttle = None
    yield hub
    hub.throttle = None


# ---- done when 2: XandRouting's README calls, unchanged ------------------------------------


def test_xandroutings_download_calls_work_unchanged(
    dynllm: Dynllm, hub: FakeHub, repos: list[HubRepo]
) -> None:
    http = dynllm.http
    # The quick start, byte for byte: the Hub's address as the user knows it.
    started = http.post(
        "/v1/models/download",
        headers={"Content-Type": "application/json"},
        content=b"""{
    "url": "https://huggingface.co/Qwen/Qwen2.5-Coder-7B-Instruct-GGUF",
    "quantization": "Q4_K_M"
  }""",
    )
    assert started.status_code == 200, started.text
    job = started.json()
    assert {"job_id", "status", "destination", "message"} <= set(job)
    assert re.fullmatch(r"download_\d{13}_[0-9a-f]{6}", job["job_id"])
    assert job["status"] == "downloading"
    assert job["message"] == "Downloading model files..."
    assert job["destination"] == str(dynllm.models_dir.resolve() / "qwen2.5-coder-7b-instruct-gguf")
    done = dynllm.finished(job["job_id"])  # GET /v1/models/download/{job_id}
    assert done["status"] == "completed", done
    name = "qwen2.5-coder-7b-instruct-q4_k_m.gguf"
    assert [f["name"] for f in done["files"]] == [name]
    assert (Path(done["destination"]) / name).read_bytes() == repo_of(repos, QWEN).files[name]

    # The API reference's body, every field.
    reference = {
        "url": "https://huggingface.co/org/model-name",
        "destination": "custom-name",
        "quantization": "Q4_K_M",
        "include": ["*.gguf"],
        "exclude": ["*.bin"],
    }
    custom = http.post("/v1/models/download", json=reference).json()
    assert custom["destination"] == str(dynllm.models_dir.resolve() / "custom-name")
    assert dynllm.finished(custom["job_id"])["status"] == "completed"
    assert files_under(Path(custom["destination"]))[-1:] == ["model-name-Q4_K_M.gguf"]
    # The stand-in's own address works as the url too.
    direct = http.post(
        "/v1/models/download",
        json={"url": f"{hub.url}/org/model-name", "quantization": "Q8_0", "destination": "q8"},
    ).json()
    assert dynllm.finished(direct["job_id"])["status"] == "completed"

    # GET /v1/models/download: every job.
    listing = http.get("/v1/models/download").json()
    ids = [j["job_id"] for j in listing["downloads"]]
    assert {job["job_id"], custom["job_id"], direct["job_id"]} <= set(ids)
    assert listing["total_count"] == len(ids)

    # POST /v1/models/verify-repo, before downloading.
    verified = http.post("/v1/models/verify-repo", json={"url": reference["url"]}).json()
    assert verified["exists"] is True and verified["gated"] is False
    assert verified["gguf_quantizations"] == ["Q4_K_M", "Q8_0"]
    assert {"repo_id", "files", "total_size", "private"} <= set(verified)

    # Discoverable at once: listed by /v1/models (the lead's catalog) without a YAML entry.
    def listed() -> list[str]:
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
        return [i for i in ids if i.startswith("custom-name/")]

    assert poll(listed, timeout=5) == ["custom-name/model-name-Q4_K_M"]
    assert not [m for m in http.get("/v1/models").json()["data"] if ".cache" in m["id"]]
    print(f"\nXandRouting's POST answered: {job}")


# ---- done when 4: progress while it runs, cancel within 1 s, no partial file left ---------


def test_progress_then_cancel_over_http(dynllm: Dynllm, hub: FakeHub) -> None:
    hub.throttle = 300_000
    body = {"repo_id": GGUF_REPO, "quantization": "Q4_K_M", "destination": "cancelled"}
    job = dynllm.http.post("/v1/models/download", json=body).json()
    seen: list[int] = []

    def progressed() -> bool:
        view = dynllm.job(job["job_id"])
        if not seen or view["bytes_done"] != seen[-1]:
            seen.append(view["bytes_done"])
        return len([b for b in seen if b > 0]) >= 3

    poll(progressed, timeout=30, interval=0.1)
    view = dynllm.job(job["job_id"])
    assert view["status"] == "downloading" and 0 < view["progress"] < 1
    assert view["speed_bytes_per_s"] > 0 and view["bytes_total"] == 2_423_744 + 247_200
    asked = time.time()
    cancelled = dynllm.http.delete(f"/v1/models/download/{job['job_id']}")
    answered = time.time()
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    transfer = hub.transfers_of(BIG)[-1]
    assert transfer.ended == "client_gone" and transfer.ended_at is not None, hub.transfers_of(BIG)
    seen_by_hub = transfer.ended_at - asked
    assert seen_by_hub < 1.0
    assert not Path(job["destination"]).exists()
    assert dynllm.job(job["job_id"])["status"] == "cancelled"
    print(
        f"\nprogress over HTTP: {seen}; DELETE answered in {(answered - asked) * 1000:.0f} ms; "
        f"the stand-in saw the connection end {seen_by_hub * 1000:.0f} ms after the DELETE; "
        "no file left under the destination"
    )


# ---- done when 4: 401, 404 and not-enough-disk as clear errors ----------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"repo_id": GATED_REPO}, 403, "repo_gated", "hf_token"),
        ({"url": "https://huggingface.co/nobody/nothing"}, 404, "repo_not_found", "nobody/nothing"),
        ({"repo_id": HUGE_REPO}, 507, "insufficient_storage", "Not enough disk space"),
        ({"repo_id": GGUF_REPO, "quantization": "Q3_K_S"}, 404, "quantization_not_found",
         "quantizations available: IQ4_XS, Q2_K, Q4_K_M, Q5_K_M, Q8_0"),
        ({"repo_id": GGUF_REPO, "destination": "../../etc"}, 400, "invalid_request",
         "outside models_dir"),
        ({"repo_id": GGUF_REPO, "quantisation": "Q4_K_M"}, 400, "invalid_request", "quantisation"),
        ({"url": "https://example.com/a/b"}, 400, "invalid_request", "not a Hugging Face repo"),
        ({"repo_id": GGUF_REPO, "destination": "d" * 300}, 400, "invalid_request",
         "longer than 255 bytes"),
        ({"repo_id": GGUF_REPO, "revision": "\ud800"}, 400, "invalid_request", "lone surrogate"),
    ],
)  # fmt: skip
def test_refusals_are_clear_errors(
    dynllm: Dynllm, hub: FakeHub, body: dict[str, Any], status: int, code: str, words: str
) -> None:
    # json.dumps escapes a lone surrogate as JSON allows (httpx's json= cannot send one)
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    response = dynllm.http.post("/v1/models/download", content=raw, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"]
    assert "Traceback" not in error["message"] and "huggingface_hub" not in error["message"]
    print(f"\n{status} {code}: {error['message']}")


def test_unknown_jobs_and_checks_of_gated_or_missing_repos(dynllm: Dynllm, hub: FakeHub) -> None:
    for method in ("GET", "DELETE"):
        response = dynllm.http.request(method, "/v1/models/download/download_1_abcdef")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "download_not_found"
    gated = dynllm.http.post("/v1/models/verify-repo", json={"repo_id": GATED_REPO})
    assert gated.status_code == 200
    assert gated.json()["exists"] is True and gated.json()["gated"] is True
    missing = dynllm.http.post(
        "/v1/models/verify-repo", json={"url": "https://huggingface.co/nobody/nothing"}
    )
    assert missing.status_code == 200 and missing.json()["exists"] is False
    assert dynllm.http.post("/v1/models/verify-repo", json={}).status_code == 400


def test_the_routes_are_admin_routes(dynllm: Dynllm, hub: FakeHub) -> None:
    # Admin routes refuse a web page of another origin (the model routes do not).
    page = {"Origin": "http://evil.example"}
    for method, path in (("GET", "/v1/models/download"), ("POST", "/v1/models/verify-repo")):
        response = dynllm.http.request(method, path, headers=page, json={"repo_id": GGUF_REPO})
        assert response.status_code == 403, (path, response.text)
        assert "cross-origin" in response.json()["error"]["message"]
    assert dynllm.http.get("/v1/models", headers=page).status_code == 200
    form = dynllm.http.post(
        "/v1/models/download", content=b"url=x", headers={"Content-Type": "text/plain"}
    )
    assert form.status_code == 415


# ---- done when 4: a restart of dynllm resumes the download where it stopped ----------------


def test_a_restart_of_dynllm_resumes_the_download(
    tmp_path: Path, hubs: tuple[FakeHub, FakeHub], repos: list[HubRepo]
) -> None:
    hub, decoy = hubs
    hub.throttle = 400_000
    size = len(repo_of(repos, GGUF_REPO).files[BIG])
    before = hub.served_bytes(GGUF_REPO, BIG)
    env = hub_env(tmp_path, decoy)
    config = write_config(tmp_path, hub)
    first = start(config, env)
    try:
        body = {"repo_id": GGUF_REPO, "quantization": "Q4_K_M", "destination": "resumed"}
        job = first.http.post("/v1/models/download", json=body).json()
        poll(lambda: first.job(job["job_id"])["files"][0]["bytes_done"] > size * 0.4, timeout=30)
    finally:
        children = stop(first)
    assert first.proc.returncode in (0, -signal.SIGTERM), first.log.read_text()
    assert children and not [c for c in children if c.is_running()]  # the transfer is gone
    partials = list(Path(job["destination"]).rglob("*.incomplete"))
    assert len(partials) == 1
    stopped_at = partials[0].stat().st_size

    hub.throttle = None
    second = start(config, env)
    try:
        done = second.finished(job["job_id"])
    finally:
        stop(second)
        hub.throttle = None
    assert done["status"] == "completed", done
    data = (Path(done["destination"]) / BIG).read_bytes()
    assert sha256(data) == sha256(repo_of(repos, GGUF_REPO).files[BIG])
    served = hub.served_bytes(GGUF_REPO, BIG) - before
    assert hub.transfers_of(BIG)[-1].offset == stopped_at
    again = served - size
    assert again < size * 0.1
    print(
        f"\ndynllm stopped (SIGTERM) at {stopped_at} of {size} bytes and started again: the "
        f"job resumed with Range {stopped_at}-, {served} bytes served in all: {again} bytes "
        "fetched again"
    )

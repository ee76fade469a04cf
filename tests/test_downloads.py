"""The download manager against the stand-in Hub: real child processes
(``python -m dynllm.hubio``), a real store, real HTTP on loopback.

Figures printed (``-s``): the progress values seen while a download ran, how
long after a cancel the stand-in saw the connection end, and how many bytes a
resumed download fetched again.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from dynllm.config import Config
from dynllm.downloads import DownloadManager, DownloadRequest, Job, JobStatus
from dynllm.errors import (
    BadRequest,
    DynllmError,
    HubUnavailable,
    InsufficientStorage,
    QuantizationNotFound,
    RepoGated,
    RepoNotFound,
)
from dynllm.store import Store
from tests.conftest import apoll
from tests.support.fake_hub import (
    GATED_REPO,
    GGUF_REPO,
    GOOD_TOKEN,
    HUGE_REPO,
    PRIVATE_REPO,
    FakeHub,
    HubRepo,
    standard_repos,
)
from tests.support.hub_helpers import files_under, repo_of, sha256
from tests.support.net import free_port

BIG = "tiny-Q4_K_M.gguf"  # padded to ~2.4 MB: a throttled transfer of it takes seconds
CHUNK = 64 << 10  # the child's read size in these tests (production: 1 MiB)


@pytest.fixture(autouse=True)
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's cache and token away from the user's; the stand-in is
    named by the config only (no HF_ENDPOINT: the manager must pass it on)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> list[HubRepo]:
    return standard_repos(tmp_path_factory.mktemp("hub"), pad_mb=2)


@pytest.fixture
def hub(repos: list[HubRepo]) -> Any:
    with FakeHub(repos) as running:
        yield running


def config_for(tmp_path: Path, hub: FakeHub, **settings: Any) -> Config:
    values: dict[str, Any] = {
        "models_dir": str(tmp_path / "models"),
        "db_path": str(tmp_path / "state.db"),
        "hf_endpoint": hub.url,
        **settings,
    }
    return Config(**values)


class Finished:
    """The on_finished callback: the folders, and the job's status at the call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, float]] = []

    def __call__(self, folder: Path) -> None:
        self.calls.append((folder, time.monotonic()))


@asynccontextmanager
async def manager_for(
    config: Config, **options: Any
) -> AsyncIterator[tuple[DownloadManager, Finished]]:
    store = Store(config.db_file, "test")
    await store.open()
    finished = Finished()
    manager = DownloadManager(config, store, finished, chunk_bytes=CHUNK, **options)
    await manager.start()
    try:
        yield manager, finished
    finally:
        await manager.close()
        await store.close()


async def until_done(job: Job, timeout: float = 60) -> Job:
    await apoll(lambda: job.status not in (JobStatus.QUEUED, JobStatus.DOWNLOADING), timeout)
    return job


@asynccontextmanager
async def started(
    tmp_path: Path, hub: FakeHub, *, past: int = 0, throttle: int = 300_000, **settings: Any
) -> AsyncIterator[tuple[DownloadManager, Job]]:
    """A manager with the Q4_K_M download of the tiny repo under way: the hub
    throttled, the job past ``past`` bytes."""
    hub.throttle = throttle
    async with manager_for(config_for(tmp_path, hub, **settings)) as (manager, _):
        job = await manager.submit(DownloadRequest(repo_id=GGUF_REPO, quantization="Q4_K_M"))
        await apoll(lambda: job.view()["bytes_done"] > past, timeout=30)
        yield manager, job


# ---- done when: one quantization, byte-identical, progress, discoverable at once --------


async def test_one_quantization_downloads_byte_identical_with_progress(
    tmp_path: Path, hub: FakeHub, repos: list[HubRepo]
) -> None:
    hub.throttle = 1_000_000
    repo = repo_of(repos, GGUF_REPO)
    async with manager_for(config_for(tmp_path, hub)) as (manager, finished):
        job = await manager.submit(DownloadRequest(repo_id=GGUF_REPO, quantization="Q4_K_M"))
        assert job.view()["status"] == "downloading"
        seen: list[int] = []

        def ended() -> bool:  # the progress seen while it runs, sampled on the way
            if job.status is not JobStatus.DOWNLOADING:
                return True
            done = job.view()["bytes_done"]
            if not seen or done != seen[-1]:
                seen.append(done)
            return False

        await apoll(ended, timeout=60, interval=0.05)
        view = job.view()
    assert view["status"] == "completed", view
    assert [f["name"] for f in view["files"]] == [BIG, "mmproj-F16.gguf"]
    for name in (BIG, "mmproj-F16.gguf"):
        assert sha256((job.destination / name).read_bytes()) == sha256(repo.files[name])
    total = len(repo.files[BIG]) + len(repo.files["mmproj-F16.gguf"])
    assert view["bytes_done"] == view["bytes_total"] == total and view["progress"] == 1.0
    middle = [b for b in seen if 0 < b < total]
    assert seen == sorted(seen) and len(middle) >= 3, seen
    # Discoverable at once: the callback ran with the folder, once, as the job completed.
    assert [folder for folder, _ in finished.calls] == [job.destination]
    assert job.destination == (tmp_path / "models" / "tiny-chat-gguf").resolve()
    # Only what llama.cpp needs: no README, LICENSE, other quantizations or partial files.
    assert files_under(job.destination) == sorted(
        [
            BIG,
            "mmproj-F16.gguf",
            ".cache/huggingface/.gitignore",
            ".cache/huggingface/CACHEDIR.TAG",
            f".cache/huggingface/download/{BIG}.lock",
            f".cache/huggingface/download/{BIG}.metadata",
            ".cache/huggingface/download/mmproj-F16.gguf.lock",
            ".cache/huggingface/download/mmproj-F16.gguf.metadata",
        ]
    )
    print(
        f"\nprogress seen while downloading {total} bytes: {len(middle)} distinct values "
        f"between 0 and the total: {middle}; sha256 identical for both files"
    )


async def test_a_split_quantization_and_a_folder_layout_download_whole(
    tmp_path: Path, hub: FakeHub, repos: list[HubRepo]
) -> None:
    repo = repo_of(repos, GGUF_REPO)
    async with manager_for(config_for(tmp_path, hub, max_concurrent_downloads=2)) as (manager, _):
        split = await manager.submit(
            DownloadRequest(repo_id=GGUF_REPO, quantization="q2_k", destination="split")
        )
        folder = await manager.submit(
            DownloadRequest(
                url=f"https://huggingface.co/{GGUF_REPO}",  # the id is taken, the endpoint kept
                quantization="Q5_K_M",
                exclude=["mmproj*"],
                destination="nested/q5",
            )
        )
        await until_done(split)
        await until_done(folder)
    assert split.status is folder.status is JobStatus.COMPLETED, (split.error, folder.error)
    shards = ["tiny-Q2_K-00001-of-00002.gguf", "tiny-Q2_K-00002-of-00002.gguf"]
    assert [f.name for f in split.files] == [*shards, "mmproj-F16.gguf"]
    q5 = [f"Q5_K_M/tiny-Q5_K_M-0000{i}-of-00002.gguf" for i in (1, 2)]
    assert [f.name for f in folder.files] == q5
    for job in (split, folder):
        for f in job.files:
            assert (job.destination / f.name).read_bytes() == repo.files[f.name]
    assert folder.destination == (tmp_path / "models" / "nested" / "q5").resolve()


async def test_files_already_there_are_not_fetched_again(
    tmp_path: Path, hub: FakeHub, repos: list[HubRepo]
) -> None:
    repo = repo_of(repos, GGUF_REPO)
    config = config_for(tmp_path, hub)
    async with manager_for(config) as (manager, _):
        first = await until_done(
            await manager.submit(DownloadRequest(repo_id=GGUF_REPO, quantization="Q8_0"))
        )
        served = hub.served_bytes(GGUF_REPO, "tiny-Q8_0.gguf")
        again = await until_done(
            await manager.submit(DownloadRequest(repo_id=GGUF_REPO, quantization="Q8_0"))
        )
    assert first.status is again.status is JobStatus.COMPLETED
    assert [f.status.value for f in again.files] == ["present", "present"]
    assert (
        hub.served_bytes(GGUF_REPO, "tiny-Q8_0.gguf") == served == len(repo.files["tiny-Q8_0.gguf"])
    )


# ---- done when: cancel stops the transfer within 1 s and leaves no partial file -------


async def test_cancel_stops_the_transfer_within_a_second_and_removes_every_partial_file(
    tmp_path: Path, hub: FakeHub
) -> None:
    async with started(tmp_path, hub, past=300_000) as (manager, job):  # ~8 s for the big file
        pid = manager.transfer_pid(job.job_id)
        assert pid is not None
        assert job.destination.exists()
        before = job.view()["bytes_done"]
        asked = time.time()
        cancelled = await manager.cancel(job.job_id)
        returned = time.time()
        # The process is gone (reaped) when cancel returns, not later.
        assert not psutil.pid_exists(pid)
    transfers = hub.transfers_of(BIG)
    assert len(transfers) == 1 and transfers[0].ended == "client_gone"
    assert transfers[0].ended_at is not None
    seen_by_hub = transfers[0].ended_at - asked
    assert cancelled.status is JobStatus.CANCELLED
    assert seen_by_hub < 1.0, seen_by_hub
    # No partial (or finished) file anywhere under the destination, .cache included:
    # the job created the folder, so the folder is gone.
    assert not job.destination.exists(), files_under(job.destination)
    assert not list((tmp_path / "hf-home").rglob("*.incomplete"))
    view = cancelled.view()
    assert view["bytes_done"] == 0 and view["speed_bytes_per_s"] == 0
    # It stays cancelled (XandRouting's job later reported "completed").
    assert job.status is JobStatus.CANCELLED and hub.open_transfers() == []
    print(
        f"\ncancel at {before} of {job.bytes_total} bytes: the stand-in saw the connection "
        f"end {seen_by_hub * 1000:.0f} ms after cancel was asked; cancel returned after "
        f"{(returned - asked) * 1000:.0f} ms with the process reaped; no file left under "
        f"{job.destination.name}"
    )


async def test_cancel_keeps_files_that_were_there_before(
    tmp_path: Path, hub: FakeHub, repos: list[HubRepo]
) -> None:
    hub.throttle = 300_000
    destination = tmp_path / "models" / "mine"
    destination.mkdir(parents=True)
    (destination / "notes.txt").write_text("mine")
    (destination / "mmproj-F16.gguf").write_bytes(
        repo_of(repos, GGUF_REPO).files["mmproj-F16.gguf"]
    )
    async with manager_for(config_for(tmp_path, hub)) as (manager, _):
        job = await manager.submit(
            DownloadRequest(repo_id=GGUF_REPO, quantization="Q4_K_M", destination="mine")
        )
        assert [f.status.value for f in job.files] == ["pending", "present"]
        await apoll(lambda: job.view()["bytes_done"] > 100_000 + 247_200, timeout=30)
        await manager.cancel(job.job_id)
    assert files_under(destination) == ["mmproj-F16.gguf", "notes.txt"]


async def test_a_queued_job_cancels_at_once(tmp_path: Path, hub: FakeHub) -> None:
    hub.throttle = 300_000
    async with manager_for(config_for(tmp_path, hub, max_concurrent_downloads=1)) as (manager, _):
        running = await manager.submit(DownloadRequest(repo_id=GGUF_REPO, quantization="Q4_K_M"))
        queued = await manager.submit(
            DownloadRequest(repo_id=GGUF_REPO, quantization="Q8_0", destination="q8")
        )
        assert queued.status is JobStatus.QUEUED
        assert (await manager.cancel(queued.job_id)).status is JobStatus.CANCELLED
        assert running.status is JobStatus.DOWNLOADING
        await manager.cancel(running.job_id)
    assert hub.transfers_of("tiny-Q8_0.gguf") == []


# ---- done when: a restart resumes from where it stopped --------------------------------


async def test_a_restart_resumes_the_download_where_it_stopped(
    tmp_path: Path, hub: FakeHub, repos: list[HubRepo]
) -> None:
    hub.throttle = 400_000
    size = len(repo_of(repos, GGUF_REPO).files[BIG])
    config = config_for(tmp_path, hub)
    async with manager_for(config) as (manager, finished):
        job = await manager.submit(DownloadRequest(repo_id=GGUF_REPO, quantization="Q4_K_M"))
        job_id = job.job_id
        await apoll(lambda: job.view()["files"][0]["bytes_done"] > size * 0.4, timeout=30)
        pid = manager.transfer_pid(job_id)
        # (leaving the block closes the manager, then the store: dynllm stopping)
    assert pid is not None and not psutil.pid_exists(pid)
    assert finished.calls == []
    stopped_at = job.view()["files"][0]["bytes_done"]
    partials = list(job.destination.rglob("*.incomplete"))
    assert len(partials) == 1 and partials[0].stat().st_size == stopped_at
    assert job.status is JobStatus.QUEUED

    hub.throttle = 2_000_000
    async with manager_for(config) as (manager, finished):
        resumed = manager.job(job_id)  # the same job, from the store
        await until_done(resumed)
        assert [folder for folder, _ in finished.calls] == [resumed.destination]
    assert resumed.status is JobStatus.COMPLETED, resumed.error
    data = (resumed.destination / BIG).read_bytes()
    assert sha256(data) == sha256(repo_of(repos, GGUF_REPO).files[BIG])
    transfers = hub.transfers_of(BIG)
    assert [t.offset for t in transfers] == [0, stopped_at]  # the second asked for the rest
    served = hub.served_bytes(GGUF_REPO, BIG)
    again = served - size
    assert again < size * 0.1, (served, size)
    print(
        f"\nrestart at {stopped_at} of {size} bytes: the resumed transfer asked for bytes "
        f"{stopped_at}- (Range); the stand-in served {served} bytes in all for a {size}-byte "
        f"file: {again} bytes fetched again"
    )


async def test_a_job_recorded_as_downloading_by_a_crashed_dynllm_is_resumed(
    tmp_path: Path, hub: FakeHub
) -> None:
    config = config_for(tmp_path, hub)
    async with started(tmp_path, hub, past=200_000) as (_, job):
        record = job.record()
    # What a kill -9 leaves: the record still says "downloading" (the close above
    # wrote "queued"; put back what the crash would have left).
    store = Store(config.db_file, "test")
    await store.open()
    store.record_download(job.job_id, {**record, "status": "downloading"})
    await store.close()
    hub.throttle = None
    async with manager_for(config) as (manager, _):
        resumed = await until_done(manager.job(job.job_id))
    assert resumed.status is JobStatus.COMPLETED
    assert [t.offset > 0 for t in hub.transfers_of(BIG)] == [False, True]


async def test_a_job_that_cannot_resume_is_marked_interrupted_not_lost(
    tmp_path: Path, hub: FakeHub
) -> None:
    config = config_for(tmp_path, hub)
    async with started(tmp_path, hub, past=100_000) as (_, job):
        pass  # stopped (the manager closes) 100 kB in
    moved = config.model_copy(update={"models_dir": str(tmp_path / "other-models")})
    async with manager_for(moved) as (manager, _):
        found = manager.job(job.job_id)
        assert found.status is JobStatus.INTERRUPTED
        assert "no longer under models_dir" in found.message
        assert found.view()["finished_at"] is not None
    no_dir = config.model_copy(update={"models_dir": None})
    async with manager_for(no_dir) as (manager, _):
        assert manager.job(job.job_id).status is JobStatus.INTERRUPTED  # recorded as such
    print(f"\nafter a restart with models_dir moved: {found.status.value}: {found.message}")


# ---- a limit on concurrent jobs --------------------------------------------------------


async def test_with_a_limit_of_one_the_second_job_waits_for_the_first(
    tmp_path: Path, hub: FakeHub
) -> None:
    hub.throttle = 1_500_000
    config = config_for(tmp_path, hub, max_concurrent_downloads=1)
    async with manager_for(config) as (manager, _):
        first = await manager.submit(DownloadRequest(repo_id=GGUF_REPO, quantization="Q4_K_M"))
        second = await manager.submit(
            DownloadRequest(repo_id=GGUF_REPO, quantization="Q8_0", destination="q8")
        )
        assert first.status is JobStatus.DOWNLOADING
        assert second.status is JobStatus.QUEUED
        assert second.view()["message"] == "Waiting for a download slot (0 queued ahead)"
        statuses = set()

        def first_ended() -> bool:  # the second's statuses while the first runs
            if first.status is not JobStatus.DOWNLOADING:
                return True
            statuses.add(second.status)
            return False

        await apoll(first_ended, timeout=60, interval=0.05)
        await until_done(second)
    assert statuses == {JobStatus.QUEUED}
    assert first.status is second.status is JobStatus.COMPLETED
    assert first.finished_at is not None and second.started_at is not None
    assert second.started_at >= first.finished_at
    assert hub.transfers_of("tiny-Q8_0.gguf")[0].started_at >= first.finished_at


# ---- done when: 401, 404 and not-enough-disk give clear errors ---------------------------


async def rejected(manager: DownloadManager, **request: Any) -> DynllmError:
    with pytest.raises(DynllmError) as caught:
        await manager.submit(DownloadRequest(**request))
    return caught.value


async def test_hub_refusals_are_clear_errors(tmp_path: Path, hub: FakeHub) -> None:
    async with manager_for(config_for(tmp_path, hub)) as (manager, _):
        gated = await rejected(manager, repo_id=GATED_REPO)
        missing = await rejected(manager, url=f"{hub.url}/nobody/nothing")
        private = await rejected(manager, repo_id=PRIVATE_REPO)
        quant = await rejected(manager, repo_id=GGUF_REPO, quantization="Q3_K_S")
        revision = await rejected(manager, repo_id=GGUF_REPO, revision="v9")
        assert manager.jobs() == []
    assert isinstance(gated, RepoGated) and (gated.status, gated.code) == (403, "repo_gated")
    assert "gated" in gated.message and "hf_token" in gated.message and "HF_TOKEN" in gated.message
    assert isinstance(missing, RepoNotFound) and missing.status == 404
    assert "nobody/nothing" in missing.message
    assert isinstance(private, RepoNotFound) and "private" in private.message
    assert isinstance(quant, QuantizationNotFound) and "Q4_K_M" in quant.message
    assert isinstance(revision, RepoNotFound) and "'v9'" in revision.message
    for error in (gated, missing, private, quant, revision):
        assert "huggingface_hub" not in error.message and "Traceback" not in error.message
        print(f"\n{error.status} {error.code}: {error.message}")


async def test_the_token_from_the_config_opens_gated_and_private_repos(
    tmp_path: Path, hub: FakeHub, repos: list[HubRepo]
) -> None:
    async with manager_for(config_for(tmp_path, hub, hf_token=GOOD_TOKEN)) as (manager, _):
        gated = await manager.submit(DownloadRequest(repo_id=GATED_REPO))
        private = await manager.submit(DownloadRequest(repo_id=PRIVATE_REPO))
        await until_done(gated)
        await until_done(private)
    for job, repo_id in ((gated, GATED_REPO), (private, PRIVATE_REPO)):
        assert job.status is JobStatus.COMPLETED, job.error
        name = job.files[0].name
        assert (job.destination / name).read_bytes() == repo_of(repos, repo_id).files[name]


async def test_the_token_from_hf_token_in_the_environment_is_used(
    tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    async with manager_for(config_for(tmp_path, hub)) as (manager, _):
        job = await until_done(await manager.submit(DownloadRequest(repo_id=GATED_REPO)))
    assert job.status is JobStatus.COMPLETED, job.error


async def test_not_enough_disk_is_507_naming_both_figures(tmp_path: Path, hub: FakeHub) -> None:
    free = 1_000_000
    checked: list[Path] = []

    def free_bytes(path: Path) -> int:
        checked.append(path)
        return free

    async with manager_for(config_for(tmp_path, hub), free_bytes=free_bytes) as (manager, _):
        error = await rejected(manager, repo_id=GGUF_REPO, quantization="Q4_K_M")
        small = await manager.submit(DownloadRequest(repo_id=GGUF_REPO, quantization="Q8_0"))
        await until_done(small)
        assert manager.jobs() == [small]
    need = 2_423_744 + 247_200
    assert isinstance(error, InsufficientStorage) and error.status == 507
    assert f"({need} bytes)" in error.message and f"({free} bytes) free" in error.message
    assert checked[0] == (tmp_path / "models" / "tiny-chat-gguf").resolve()
    assert small.status is JobStatus.COMPLETED
    print(f"\n507 {error.code}: {error.message}")


async def test_a_repo_bigger_than_the_real_disk_is_507(tmp_path: Path, hub: FakeHub) -> None:
    async with manager_for(config_for(tmp_path, hub)) as (manager, _):
        error = await rejected(manager, repo_id=HUGE_REPO)
    assert isinstance(error, InsufficientStorage)
    assert f"({1 << 50} bytes)" in error.message


async def test_requests_dynllm_refuses_before_asking_the_hub(tmp_path: Path, hub: FakeHub) -> None:
    async with manager_for(config_for(tmp_path, hub)) as (manager, _):
        for request in (
            {"repo_id": GGUF_REPO, "destination": "../outside"},
            {"repo_id": GGUF_REPO, "destination": "/etc"},
            {"url": "https://example.com/org/model"},
            {},
        ):
            error = await rejected(manager, **request)
            assert isinstance(error, BadRequest), request
    assert hub.requests == []
    async with manager_for(config_for(tmp_path, hub, models_dir=None)) as (manager, _):
        error = await rejected(manager, repo_id=GGUF_REPO)
    assert isinstance(error, BadRequest) and "models_dir" in error.message
    print(f"\n400 without models_dir: {error.message}")


async def test_an_unreachable_hub_is_502(tmp_path: Path, hub: FakeHub) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    config = config_for(tmp_path, hub, hf_endpoint=closed)
    async with manager_for(config) as (manager, _):
        error = await rejected(manager, repo_id=GGUF_REPO)
        with pytest.raises(HubUnavailable):
            await manager.verify(GGUF_REPO)
    assert isinstance(error, HubUnavailable) and error.status == 502
    assert error.message == f"Cannot reach the Hub at {closed}"


async def test_a_second_job_into_the_same_folder_is_refused_while_the_first_runs(
    tmp_path: Path, hub: FakeHub
) -> None:
    async with started(tmp_path, hub) as (manager, first):
        error = await rejected(manager, repo_id=GGUF_REPO, quantization="Q8_0")
        assert error.status == 409 and first.job_id in error.message
        await manager.cancel(first.job_id)


# ---- verify-repo -------------------------------------------------------------------------


async def test_verify_reports_files_sizes_and_quantizations(
    tmp_path: Path, hub: FakeHub, repos: list[HubRepo]
) -> None:
    repo = repo_of(repos, GGUF_REPO)
    async with manager_for(config_for(tmp_path, hub)) as (manager, _):
        ok = await manager.verify(f"https://huggingface.co/{GGUF_REPO}")
        gated = await manager.verify(GATED_REPO)
        missing = await manager.verify("nobody/nothing")
    assert ok["exists"] and not ok["gated"] and not ok["private"] and ok["accessible"]
    assert ok["gguf_quantizations"] == ["IQ4_XS", "Q2_K", "Q4_K_M", "Q5_K_M", "Q8_0"]
    assert {f["name"]: f["size"] for f in ok["files"]} == {n: len(d) for n, d in repo.files.items()}
    assert ok["total_size"] == sum(len(d) for d in repo.files.values())
    assert "error" not in ok
    assert gated["exists"] and gated["gated"] and not gated["accessible"]
    assert "hf_token" in gated["error"]
    assert (
        missing["exists"] is False
        and missing["files"] == []
        and "nobody/nothing" in missing["error"]
    )


def test_requests_take_a_single_pattern_as_a_list() -> None:
    request = DownloadRequest.model_validate({"repo_id": "a/b", "include": "*.gguf"})
    assert request.include == ["*.gguf"]


def test_job_ids_look_like_xandroutings_and_never_repeat() -> None:
    from dynllm.downloadjob import new_job_id

    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    sample = ids.pop()
    prefix, millis, suffix = sample.split("_")
    assert prefix == "download" and abs(int(millis) - time.time() * 1000) < 60_000
    assert len(suffix) == 6


# ---- a Hub that goes away mid-transfer; the stand-in itself ------------------------------


async def test_a_hub_that_goes_away_mid_transfer_fails_the_job_clearly(
    tmp_path: Path, repos: list[HubRepo]
) -> None:
    hub = FakeHub(repos, throttle=300_000).start()
    try:
        async with manager_for(config_for(tmp_path, hub)) as (manager, finished):
            job = await manager.submit(DownloadRequest(repo_id=GGUF_REPO, quantization="Q8_0"))
            await apoll(lambda: job.view()["bytes_done"] > 0, timeout=30)
            hub.close()  # the connection drops; huggingface_hub retries, then gives up
            await until_done(job, timeout=90)
    finally:
        if not hub.closing.is_set():  # the test failed before it closed the hub
            hub.close()
    assert job.status is JobStatus.FAILED
    assert job.error_code == "hub_unavailable"
    assert job.error == f"tiny-Q8_0.gguf: Cannot reach the Hub at {hub.url}"
    assert finished.calls == []
    # The partial file stays: submitting the same download again resumes it.
    assert len(list(job.destination.rglob("*.incomplete"))) == 1
    print(f"\nfailed: {job.error_code}: {job.error} ({job.view()['bytes_done']} bytes kept)")


def test_the_stand_in_speaks_huggingface_hubs_own_download_path(
    tmp_path: Path, hub: FakeHub, repos: list[HubRepo]
) -> None:
    """The stand-in's fidelity: the library's own hf_hub_download, snapshot and
    tree listing work against it as against the Hub."""
    from huggingface_hub import HfApi, hf_hub_download

    repo = repo_of(repos, GGUF_REPO)
    path = hf_hub_download(
        GGUF_REPO, "Q5_K_M/tiny-Q5_K_M-00001-of-00002.gguf", endpoint=hub.url,
        local_dir=tmp_path / "lib",
    )  # fmt: skip
    assert Path(path).read_bytes() == repo.files["Q5_K_M/tiny-Q5_K_M-00001-of-00002.gguf"]
    api = HfApi(endpoint=hub.url)
    tree = {e.path for e in api.list_repo_tree(GGUF_REPO, recursive=True)}
    assert tree >= set(repo.files)
    top = {e.path for e in api.list_repo_tree(GGUF_REPO)}
    assert "Q5_K_M" in top and "Q5_K_M/tiny-Q5_K_M-00001-of-00002.gguf" not in top
    info = api.model_info(GGUF_REPO, files_metadata=True)
    assert info.sha == repo.sha and info.siblings is not None
    assert {s.rfilename: s.size for s in info.siblings} == {
        n: len(d) for n, d in repo.files.items()
    }

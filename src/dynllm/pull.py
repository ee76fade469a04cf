"""``dynllm pull REPO[:QUANT]``: a download through the running service, with progress.

The job runs in the service (``POST /v1/models/download``), like any other;
this command submits it, polls it and draws its progress on stderr: one line
redrawn in place on a terminal, otherwise (a log, a pipe) a line every
``LINE_EVERY`` seconds.  The destination is printed on stdout at the end
(with ``--json``, the job).  Ctrl-C cancels the job (it is the command's
download) and exits 130.

Exit status: 0 completed; 1 failed, cancelled elsewhere, or refused by the
service (its message printed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from dynllm.client import AdminClient, ClientError, Target
from dynllm.downloadjob import ACTIVE
from dynllm.hubfiles import human_size, looks_like_url, parse_pull_spec
from dynllm.manage import duration

POLL_SECONDS = 0.5
LINE_EVERY = 5.0
"""Seconds between progress lines when stderr is not a terminal."""
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    repo, quantization = parse_pull_spec(args.repo)
    body: dict[str, Any] = {"url": repo} if looks_like_url(repo) else {"repo_id": repo}
    for key, value in (
        ("quantization", quantization),
        ("destination", args.destination),
        ("revision", args.revision),
        ("include", args.include),
        ("exclude", args.exclude),
    ):
        if value:
            body[key] = value
    return body


def progress_line(job: dict[str, Any]) -> str:
    done, total = job.get("bytes_done") or 0, job.get("bytes_total") or 0
    status = job.get("status", "?")
    if status == "queued":
        return f"{job.get('repo_id')}: {job.get('message') or 'queued'}"
    share = f"{100 * done / total:5.1f}%" if total else "  ?  %"
    line = f"{job.get('repo_id')}: {share}  {human_size(done)} of {human_size(total)}"
    speed = job.get("speed_bytes_per_s") or 0
    if status == "downloading" and speed:
        line += f"  {human_size(speed)}/s"
        if job.get("eta_seconds") is not None:
            line += f"  ETA {duration(job['eta_seconds'])}"
    return line


class Bar:
    """The progress display on ``out``."""

    def __init__(self, out: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.clock = clock
        self.tty = out.isatty()
        self.last_line: float | None = None
        self.width = 0

    def show(self, job: dict[str, Any]) -> None:
        line = progress_line(job)
        if self.tty:
            self.out.write("\r" + line.ljust(self.width))
            self.width = len(line)
        elif self.last_line is None or self.clock() - self.last_line >= LINE_EVERY:
            self.out.write(line + "\n")
            self.last_line = self.clock()
        self.out.flush()

    def end(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()
            self.width = 0


def run(args: argparse.Namespace, target: Target) -> int:
    body = request_body(args)
    with AdminClient(target) as client:
        try:
            job = client.download(body)
        except ClientError as exc:
            print(f"dynllm: {exc.message}", file=sys.stderr)
            return exc.exit_code
        if args.detach:
            print(json.dumps(job) if args.json else job["job_id"], flush=True)
            return EXIT_OK
        return follow(client, job, args.json)


def follow(client: AdminClient, job: dict[str, Any], as_json: bool) -> int:
    bar = Bar(sys.stderr)
    job_id = job["job_id"]
    print(f"dynllm: download {job_id} into {job['destination']}", file=sys.stderr, flush=True)
    try:
        while job.get("status") in ACTIVE:
            bar.show(job)
            time.sleep(POLL_SECONDS)
            job = client.download_job(job_id)
    except KeyboardInterrupt:
        bar.end()
        return cancel(client, job_id)
    except ClientError as exc:
        bar.end()
        print(f"dynllm: {exc.message} (the download {job_id} may go on)", file=sys.stderr)
        return exc.exit_code
    bar.last_line = None  # the final figures, whatever the interval
    bar.show(job)
    bar.end()
    status = job.get("status")
    if as_json:
        print(json.dumps(job), flush=True)
    if status == "completed":
        print(f"dynllm: {job.get('message')}", file=sys.stderr)
        if not as_json:
            print(job["destination"], flush=True)
        return EXIT_OK
    reason = job.get("error") or job.get("message") or status
    print(f"dynllm: download {job_id} {status}: {reason}", file=sys.stderr)
    return EXIT_FAILED


def cancel(client: AdminClient, job_id: str) -> int:
    print(f"dynllm: interrupted; cancelling download {job_id}", file=sys.stderr, flush=True)
    try:
        job = client.cancel_download(job_id)
    except ClientError as exc:
        print(f"dynllm: the cancel failed: {exc.message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"dynllm: download {job_id} {job.get('status')}", file=sys.stderr)
    return EXIT_INTERRUPTED

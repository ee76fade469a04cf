"""The benchmark suite: `uv run python -m bench` runs every scenario and prints
a Markdown table (also written to bench/results/latest.md).

Each proxy scenario runs the same load, interleaved in rounds, against the
same backend process three ways: direct, through dynllm, through LiteLLM's
proxy.  Cold-start scenarios use the real llama-server with a generated F16
model of a few hundred MB, against a by-hand baseline (spawn, poll /health
every 50 ms).  Bounded: every load has a fixed request count and a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import uvloop
from tests.support.binaries import llama_server_binary

from bench.loadgen import ANY_CONTENT, CONTENT, Result, Target, open_loop
from bench.stats import ms, pct, table
from bench.targets import (
    ROOT,
    Dynllm,
    LiteLLM,
    cpu_seconds,
    ensure_litellm,
    free_port,
    paced_wrapper,
)

CHAT = "/v1/chat/completions"
STALL = 0.2


@dataclass
class Row:
    scenario: str
    metric: str
    values: dict[str, str]
    target: str
    ok: bool | None
    note: str = ""


@dataclass
class Env:
    dynllm: Dynllm
    litellm: LiteLLM | None
    targets: dict[str, dict[str, Target]] = field(default_factory=dict)

    def for_model(self, model: str) -> dict[str, Target]:
        if model not in self.targets:
            ts = {
                "direct": Target("direct", "127.0.0.1", self.dynllm.backend_port(model), CHAT),
                "dynllm": Target("dynllm", "127.0.0.1", self.dynllm.port, CHAT),
            }
            if self.litellm is not None:
                ts["litellm"] = Target("litellm", "127.0.0.1", self.litellm.port, CHAT)
            self.targets[model] = ts
        return self.targets[model]

    def proc(self, name: str) -> psutil.Process | None:
        if name == "dynllm":
            return self.dynllm.process
        if name == "litellm" and self.litellm is not None:
            return self.litellm.process
        return None


def payload(model: str, tokens: int, stream: bool) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "bench"}],
            "max_tokens": tokens, "stream": stream}  # fmt: skip


async def interleaved(
    env: Env, model: str, body: dict[str, object], starts: list[float], rounds: int, timeout: float
) -> tuple[dict[str, list[Result]], dict[str, float]]:
    """Run the same schedule ``rounds`` times per target, targets shuffled each
    round; also returns each proxy's CPU seconds over its runs."""
    targets = env.for_model(model)
    results: dict[str, list[Result]] = {name: [] for name in targets}
    cpu: dict[str, float] = {name: 0.0 for name in targets}
    rng = random.Random(7)
    for _ in range(rounds):
        order = list(targets)
        rng.shuffle(order)
        for name in order:
            proc = env.proc(name)
            before = cpu_seconds(proc, tree=name == "litellm") if proc else 0.0
            results[name] += await open_loop(targets[name], body, starts, timeout)
            if proc:
                cpu[name] += cpu_seconds(proc, tree=name == "litellm") - before
    return results, cpu


def ok_latencies(results: list[Result]) -> list[float]:
    return [r.latency for r in results if r.status == 200 and not r.error and r.latency is not None]


def added(results: dict[str, list[Result]], name: str, q: float) -> float:
    return pct(ok_latencies(results[name]), q) - pct(ok_latencies(results["direct"]), q)


def failures(results: list[Result]) -> int:
    return sum(1 for r in results if r.status != 200 or r.error)


# ---- scenarios 1 and 2: added latency, non-streaming ------------------------------
async def latency(env: Env, quick: bool) -> list[Row]:
    rows = []
    n = 100 if quick else 300
    for lanes, period in ((1, 0.05), (8, 0.05), (64, 0.1)):
        # ``lanes`` open-loop request streams, each sending one request every
        # ``period`` seconds, evenly staggered: up to ``lanes`` in flight.
        per_lane = max(10, n // lanes) if lanes > 1 else n
        starts = sorted(
            i * period + lane * period / lanes for lane in range(lanes) for i in range(per_lane)
        )
        results, _ = await interleaved(env, "paced", payload("paced", 4, False), starts, 3, 60)
        name = "1" if lanes == 1 else "2"
        values: dict[str, str] = {}
        for who, res in results.items():
            lat = ok_latencies(res)
            values[who] = (
                f"p50 {ms(pct(lat, 50))} / p90 {ms(pct(lat, 90))} / p99 {ms(pct(lat, 99))} ms"
                + (f" ({failures(res)} failed)" if failures(res) else "")
            )
        dyn50, dyn99 = added(results, "dynllm", 50), added(results, "dynllm", 99)
        added_text = f"dynllm +{ms(dyn50)} / +{ms(dyn99)} ms"
        if "litellm" in results:
            lit50, lit99 = added(results, "litellm", 50), added(results, "litellm", 99)
            added_text += f"; litellm +{ms(lit50)} / +{ms(lit99)} ms"
        if lanes == 1:
            limit = "<= 1 ms p50, <= 3 ms p99, <= 1/4 of LiteLLM's"
            ok = (
                dyn50 <= 0.001
                and dyn99 <= 0.003
                and ("litellm" not in results or dyn50 <= lit50 / 4)
            )
        else:
            cap = 0.005 if lanes == 8 else 0.010
            limit = f"p99 added <= {cap * 1000:.0f} ms"
            ok = dyn99 <= cap
        rows.append(Row(name, f"non-streaming latency, {lanes} lane(s) x 1 req/{period * 1000:.0f} ms",
                        values, limit, ok, added_text))  # fmt: skip
    return rows


# ---- scenario 3: one paced stream ---------------------------------------------------------
async def one_stream(env: Env, quick: bool) -> Row:
    chunks = 64 if quick else 256
    rounds = 3 if quick else 9  # one stream per round: the ttfc median is over the rounds
    results, _ = await interleaved(env, "paced", payload("paced", chunks, True), [0.0], rounds, 60)
    values, ttfc, gaps, lost = {}, {}, {}, {}
    for who, res in results.items():
        ttfc[who] = pct([r.ttfc for r in res if r.ttfc is not None], 50)
        gaps[who] = pct([g for r in res for g in r.gaps()], 99)
        lost[who] = sum(chunks - r.chunks for r in res)
        values[who] = f"ttfc p50 {ms(ttfc[who])} ms, gap p99 {ms(gaps[who])} ms, lost {lost[who]}"
    d_ttfc = ttfc["dynllm"] - ttfc["direct"]
    d_gap = gaps["dynllm"] - gaps["direct"]
    ok = d_ttfc <= 0.002 and d_gap <= 0.001 and lost["dynllm"] == 0
    return Row("3", f"1 stream, {chunks} chunks every 20 ms", values,
               "ttfc +<= 2 ms p50, gaps +<= 1 ms p99, 0 lost", ok,
               f"dynllm ttfc +{ms(d_ttfc)} ms, gap p99 +{ms(d_gap)} ms")  # fmt: skip


# ---- scenario 4: many paced streams -----------------------------------------------------------
@dataclass
class StreamLoad:
    streams: int
    chunks: int
    model: str
    interval_ms: float
    floor: float


async def many_streams(env: Env, load: StreamLoad, quick: bool, rss: RssSampler | None) -> Row:
    ramp = 1.0
    starts = [i * ramp / load.streams for i in range(load.streams)]
    body = payload(load.model, load.chunks, True)
    rounds = 1 if quick else 2
    if rss is not None:
        rss.mark("start")
    results, cpu = await interleaved(env, load.model, body, starts, rounds, 120)
    if rss is not None:
        rss.mark("end")
    rates, values = {}, {}
    for who, res in results.items():
        got = sum(r.chunks for r in res)
        expected = load.chunks * len(res)
        span = sum(
            max(r.end or 0 for r in batch) - min(r.scheduled for r in batch)
            for batch in _batches(res, load.streams)
        )
        rates[who] = got / span if span else 0.0
        stalls = sum(1 for r in res for g in r.gaps() if g > STALL)
        per_chunk = f", CPU {cpu[who] / max(got, 1) * 1e6:.0f} us/chunk" if who != "direct" else ""
        values[who] = (f"{rates[who]:.0f} chunks/s, lost {expected - got}, stalls {stalls}, "
                       f"errors {failures(res)}{per_chunk}")  # fmt: skip
    ratio = rates["dynllm"] / rates["direct"] if rates["direct"] else 0.0
    dyn = results["dynllm"]
    ok = (ratio >= load.floor and sum(load.chunks - r.chunks for r in dyn) == 0
          and not any(g > STALL for r in dyn for g in r.gaps()) and failures(dyn) == 0)  # fmt: skip
    note = f"dynllm {ratio:.3f}x direct"
    if "litellm" in rates and rates["direct"]:
        note += f"; litellm {rates['litellm'] / rates['direct']:.3f}x"
    return Row("4", f"{load.streams} streams x {load.chunks} chunks every {load.interval_ms:g} ms",
               values, f">= {load.floor}x direct, 0 lost, 0 stalls > 200 ms", ok, note)  # fmt: skip


def _batches(results: list[Result], size: int) -> list[list[Result]]:
    return [results[i : i + size] for i in range(0, len(results), size)]


# ---- scenario 5: unpaced ceiling --------------------------------------------------------------
async def ceiling(env: Env, quick: bool) -> list[Row]:
    rows = []
    chunks = 500 if quick else 2000
    for streams in (1, 16):
        results, cpu = await interleaved(
            env, "unpaced", payload("unpaced", chunks, True), [0.0] * streams, 2, 120
        )
        rates, values = {}, {}
        for who, res in results.items():
            got = sum(r.chunks for r in res)
            span = sum(
                max(r.end or 0 for r in b) - min(r.scheduled for r in b)
                for b in _batches(res, streams)
            )
            rates[who] = got / span if span else 0.0
            per_chunk = (
                f", CPU {cpu[who] / max(got, 1) * 1e6:.0f} us/chunk" if who != "direct" else ""
            )
            values[who] = f"{rates[who]:.0f} chunks/s{per_chunk}"
        note = f"dynllm {rates['dynllm'] / rates['direct']:.2f}x direct"
        if "litellm" in rates:
            note += f"; litellm {rates['litellm'] / rates['direct']:.2f}x"
        rows.append(
            Row(
                "5", f"unpaced, {streams} stream(s) x {chunks} chunks", values, "report", None, note
            )
        )
    return rows


# ---- scenarios 6-8: cold start and swap with the real llama-server ------------------------------
LLAMA_ARGS = ["-c", "256", "-ngl", "0", "-t", "1", "--no-webui"]


async def first_tokens_async(
    port: int, model: str, n: int = 1, content: re.Pattern[bytes] = ANY_CONTENT
) -> list[float]:
    """Seconds to the first streamed content chunk of ``n`` chat requests sent
    at once, each on a fresh connection (the raw async client: its own cost
    is small, where 50 threads of a sync client took hundreds of ms)."""
    target = Target("t", "127.0.0.1", port, CHAT, content)
    try:
        results = await open_loop(target, payload(model, 4, True), [0.0] * n, 300)
    finally:
        target.close()
    bad = [r for r in results if r.status != 200 or r.error or r.first_token is None]
    if bad:
        raise RuntimeError(f"{model}: {len(bad)}/{n} failed: {bad[0].status} {bad[0].error}")
    return [r.first_token for r in results if r.first_token is not None]


def first_token(port: int, model: str) -> float:
    return uvloop.run(first_tokens_async(port, model))[0]


def manual_start(model_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [llama_server_binary(), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port),
         "--alias", "manual", *LLAMA_ARGS],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    with httpx.Client(timeout=2, trust_env=False) as client:  # one client: a poll costs ~0.2 ms
        while time.monotonic() < deadline:
            try:
                if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    return proc, port
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("manual llama-server never became healthy")


def manual_stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def manual_cold(model_path: Path) -> float:
    start = time.perf_counter()
    proc, port = manual_start(model_path)
    try:
        return time.perf_counter() - start + first_token(port, "manual")
    finally:
        manual_stop(proc)


def manual_swap(path_a: Path, path_b: Path) -> float:
    proc_a, _ = manual_start(path_a)
    start = time.perf_counter()
    manual_stop(proc_a)
    proc_b, port = manual_start(path_b)
    try:
        return time.perf_counter() - start + first_token(port, "manual")
    finally:
        manual_stop(proc_b)


def cold_and_swap(dyn: Dynllm, path_a: Path, path_b: Path, reps: int) -> list[Row]:
    """Scenarios 6 and 7, each side in turn so both see the same page cache."""
    rows = []
    size_mb = path_a.stat().st_size / 2**20
    manual_cold(path_a)  # warm the page cache for both sides
    cold_manual, cold_dyn, swap_manual, swap_dyn = [], [], [], []
    for _ in range(reps):
        cold_manual.append(manual_cold(path_a))
        dyn.unload_all()
        cold_dyn.append(first_token(dyn.port, "big-a"))
        swap_manual.append(manual_swap(path_a, path_b))
        dyn.unload_all()
        first_token(dyn.port, "big-a")
        swap_dyn.append(first_token(dyn.port, "big-b"))  # evicts big-a
    m, d = pct(cold_manual, 50), pct(cold_dyn, 50)
    rows.append(Row("6", f"cold start to first token ({size_mb:.0f} MB F16 GGUF, median of {reps})",
                    {"manual": f"{ms(m)} ms", "dynllm": f"{ms(d)} ms"},
                    "<= 1.05x manual + 100 ms", d <= 1.05 * m + 0.1, f"{d / m:.3f}x manual"))  # fmt: skip
    m, d = pct(swap_manual, 50), pct(swap_dyn, 50)
    rows.append(Row("7", f"swap A -> B, budget fits one (median of {reps})",
                    {"manual": f"{ms(m)} ms (stop A + start B + first token)", "dynllm": f"{ms(d)} ms"},
                    "<= 1.10x manual + 100 ms", d <= 1.10 * m + 0.1, f"{d / m:.3f}x manual"))  # fmt: skip
    return rows


def cold_scenarios(work: Path, quick: bool, only: set[str]) -> list[Row]:
    from tests.support.tiny_gguf import write_tiny_llama

    pad = 50 if quick else 300
    path_a, path_b = work / "big-a.gguf", work / "big-b.gguf"
    for path, seed in ((path_a, 1), (path_b, 2)):
        if only & {"6", "7"} and not path.exists():
            write_tiny_llama(path, pad_mb=pad, seed=seed)
    models = [
        {"name": n, "path": str(p), "backend": "llamacpp", "vram_mb": 6000, "unload_time": -1,
         "context_size": 256, "n_gpu_layers": 0, "extra_args": ["-t", "1", "--no-webui"]}
        for n, p in (("big-a", path_a), ("big-b", path_b))
    ]  # fmt: skip
    small = work / "small.gguf"
    if not small.exists():
        write_tiny_llama(small, seed=3)
    models.append({"name": "small", "path": str(small), "backend": "llamacpp", "vram_mb": 6000,
                   "unload_time": -1, "context_size": 2048, "n_gpu_layers": 0,
                   "extra_args": ["-t", "1", "--no-webui"]})  # fmt: skip
    reps = 2 if quick else 5
    rows = []
    with Dynllm(
        work, models, total_vram_mb=8000, backend={"llamacpp_binary": llama_server_binary()}
    ) as dyn:
        if only & {"6", "7"}:
            rows += cold_and_swap(dyn, path_a, path_b, reps)
        if "8" in only:
            label = "real llama-server, small model"
            rows.append(uvloop.run(cold_burst(dyn, "small", reps, ANY_CONTENT, label)))
    return rows


async def cold_burst(
    dyn: Dynllm, model: str, reps: int, content: re.Pattern[bytes], label: str
) -> Row:
    """Scenario 8: 50 requests at once for an unloaded model, against the same
    request alone (median of ``reps``), plus the same burst warm through
    dynllm and direct, which shows what the backend itself needs for 50."""
    singles = []
    for _ in range(reps):
        dyn.unload(model)
        singles += await first_tokens_async(dyn.port, model, 1, content)
    single = pct(singles, 50)
    dyn.unload(model)
    before = dyn.models()[model]["load_count"]
    cold = await first_tokens_async(dyn.port, model, 50, content)
    spawns = dyn.models()[model]["load_count"] - before
    warm = await first_tokens_async(dyn.port, model, 50, content)
    direct = await first_tokens_async(dyn.backend_port(model), model, 50, content)
    p99 = pct(cold, 99)
    return Row("8", f"50 concurrent cold requests, first token ({label})",
               {"direct": f"warm burst p99 {ms(pct(direct, 99))} ms",
                "dynllm": f"{spawns} spawn(s); single cold {ms(single)} ms; cold burst p99 "
                          f"{ms(p99)} ms; warm burst p99 {ms(pct(warm, 99))} ms"},
               "1 spawn; p99 <= single + 100 ms", spawns == 1 and p99 <= single + 0.1,
               f"cold burst +{ms(p99 - single)} ms over single, "
               f"{ms(p99 - single - pct(direct, 99))} ms more than the backend's own warm burst")  # fmt: skip


# ---- scenario 9: memory ----------------------------------------------------------------------------
class RssSampler:
    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.samples: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._label = ""

    def mark(self, label: str) -> None:
        self._label = label

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(
                    (time.monotonic(), self.process.memory_info().rss / 2**20, self._label)
                )
            except psutil.Error:
                return
            self._stop.wait(0.1)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, label: str) -> float:
        return max((mb for _, mb, lab in self.samples if lab == label), default=float("nan"))


def rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / 2**20


# ---- the run -----------------------------------------------------------------------------------------
async def proxy_scenarios(env: Env, quick: bool, only: set[str]) -> list[Row]:
    rows: list[Row] = []
    if only & {"1", "2"}:
        rows += await latency(env, quick)
    if "3" in only:
        rows.append(await one_stream(env, quick))
    if only & {"4", "9"}:
        idle = rss_mb(env.dynllm.process)
        with RssSampler(env.dynllm.process) as sampler:
            rows.append(
                await many_streams(env, StreamLoad(64, 100, "paced", 20, 0.99), quick, None)
            )
            big = StreamLoad(512, 50 if quick else 100, "slow", 100, 0.97)
            rows.append(await many_streams(env, big, quick, sampler))
            sampler.mark("after")
        under = sampler.peak("start")  # samples taken while the 512 streams ran
        if "9" in only:
            settle = 10 if quick else 60
            await asyncio.sleep(settle)
            after = rss_mb(env.dynllm.process)
            ok = idle <= 80 and under - idle <= 150 and after <= idle * 1.2
            rows.append(Row("9", "dynllm RSS: idle / peak during 512 streams / 60 s after",
                            {"dynllm": f"{idle:.1f} / {under:.1f} / {after:.1f} MiB"},
                            "idle <= 80 MiB, +<= 150 MiB, back within 20%", ok,
                            f"+{under - idle:.1f} MiB under load; after {after / idle:.2f}x idle"))  # fmt: skip
    if "5" in only:
        rows += await ceiling(env, quick)
    if "8" in only:
        load = "paced stand-in, 500 ms load"
        rows.append(await cold_burst(env.dynllm, "coldpaced", 3 if quick else 5, CONTENT, load))

    return rows


def render(rows: list[Row], header_note: str) -> str:
    names = ["direct", "manual", "dynllm", "litellm"]
    used = [n for n in names if any(n in r.values for r in rows)]
    body = []
    for r in rows:
        verdict = "report" if r.ok is None else ("met" if r.ok else "MISSED")
        body.append(
            [r.scenario, r.metric, *[r.values.get(n, "") for n in used], r.note, r.target, verdict]
        )
    return (
        header_note
        + "\n\n"
        + table(["#", "scenario", *used, "difference", "target", "result"], body)
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{psutil.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "--quick", action="store_true", help="smaller loads (a smoke run of the harness)"
    )
    parser.add_argument("--scenarios", default="1,2,3,4,5,6,7,8,9")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.md")
    args = parser.parse_args(argv)
    only = set(args.scenarios.split(","))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dynllm-bench-") as tmp:
        work = Path(tmp)
        (work / "m.gguf").write_text("paced backends read no model")
        wrapper = str(paced_wrapper(work))
        paced = lambda name, *extra: {  # noqa: E731
            "name": name, "path": str(work / "m.gguf"), "backend": "llamacpp", "vram_mb": 1,
            "unload_time": -1, "extra_args": list(extra)}  # fmt: skip
        models = [
            paced("paced", "--chunk-interval-ms", "20"),
            paced("slow", "--chunk-interval-ms", "100"),
            paced("unpaced", "--chunk-interval-ms", "0"),
            paced("coldpaced", "--chunk-interval-ms", "20", "--load-ms", "500"),
        ]
        if only - {"6", "7"}:
            litellm_bin = (
                None if args.no_litellm or not only - {"6", "7", "8"} else ensure_litellm()
            )
            with Dynllm(work, models, backend={"llamacpp_binary": wrapper},
                        preload_models=["paced", "slow", "unpaced"]) as dyn:  # fmt: skip
                upstreams = {m["name"]: dyn.backend_port(m["name"]) for m in models[:3]}
                lite = LiteLLM(work, litellm_bin, upstreams) if litellm_bin else None
                if lite is not None:
                    lite.__enter__()
                try:
                    env = Env(dyn, lite)
                    rows += uvloop.run(proxy_scenarios(env, args.quick, only))
                finally:
                    if lite is not None:
                        lite.__exit__()
        if only & {"6", "7", "8"}:
            rows += cold_scenarios(work, args.quick, only)
    rows.sort(key=lambda r: r.scenario)
    note = (f"dynllm bench, {time.strftime('%Y-%m-%d')}, {'quick' if args.quick else 'full'} run on "
            f"{machine()}; all processes on loopback on this one machine.")  # fmt: skip
    report = render(rows, note)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

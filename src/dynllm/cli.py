"""The ``dynllm`` command: parse arguments, load the config, run uvicorn."""

from __future__ import annotations

import argparse
import logging
import resource
import shlex
import signal
import sys
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from dynllm import __version__
from dynllm.backends import adapter_for, command_line, missing_binary
from dynllm.config import LOG_LEVELS, Config, ConfigError, LogLevel, load_config

EXIT_CONFIG = 2
EXIT_STARTUP = 1  # e.g. the state file is held by another dynllm


class EnvSettings(BaseSettings):
    """Environment overrides, e.g. from a systemd drop-in (``DYNLLM_CONFIG=...``)."""

    model_config = SettingsConfigDict(env_prefix="DYNLLM_")
    config: Path = Path("config.yaml")
    host: str | None = None
    port: int | None = None
    log_level: LogLevel | None = None
    api_keys: str | None = None  # comma-separated, added to the config's
    admin_api_keys: str | None = None


def _env_settings() -> EnvSettings:
    try:
        return EnvSettings()
    except ValidationError as exc:
        for err in exc.errors():
            name = f"DYNLLM_{str(err['loc'][0]).upper()}" if err["loc"] else "DYNLLM_*"
            print(f"dynllm: invalid environment variable {name}: {err['msg']}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = _env_settings()
    parser = argparse.ArgumentParser(
        prog="dynllm",
        description="OpenAI-compatible proxy that starts and stops local inference backends.",
    )
    parser.add_argument("--config", "-c", type=Path, default=env.config,
                        help="config file (default: $DYNLLM_CONFIG or ./config.yaml)")  # fmt: skip
    parser.add_argument("--host", default=env.host, help="override server.host")
    parser.add_argument("--port", type=int, default=env.port, help="override server.port")
    parser.add_argument("--log-level", default=env.log_level, type=str.lower, choices=LOG_LEVELS,
                        help="override log_level")  # fmt: skip
    parser.add_argument("--check-config", type=Path, metavar="PATH",
                        help="validate PATH, print each model's command line, exit")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"dynllm {__version__}")
    return parser.parse_args(argv)


def raise_open_file_limit() -> None:
    """Every client connection, backend connection and backend pipe is a file
    descriptor; the usual soft limit (1024) is low for hundreds of streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logging.getLogger("dynllm").warning("cannot raise the open-file limit: %s", exc)


def _split_keys(text: str | None) -> list[str]:
    return [key.strip() for key in (text or "").split(",") if key.strip()]


def effective_config(config: Config, args: argparse.Namespace, env: EnvSettings) -> Config:
    """The config with what the command line and environment add or override:
    the listen address (so startup checks see the real one) and API keys."""
    server = config.server.model_copy(
        update={
            "host": args.host or config.server.host,
            "port": config.server.port if args.port is None else args.port,
        }
    )
    return config.model_copy(
        update={
            "server": server,
            "api_keys": [*config.api_keys, *_split_keys(env.api_keys)],
            "admin_api_keys": [*config.admin_api_keys, *_split_keys(env.admin_api_keys)],
        }
    )


def _load_or_exit(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"dynllm: invalid config {path}:", file=sys.stderr)
        for line in str(exc).splitlines():
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def check_config(path: Path) -> int:
    config = _load_or_exit(path)
    print(f"{path}: OK, {len(config.models)} model(s), VRAM budget {config.total_vram_mb} MB")
    missing = {m.name for m in config.missing_model_files()}
    for model in config.models:
        argv = command_line(config, model, config.backend.port_range_start)
        flags = [f"vram {model.vram_mb} MB", f"probe {adapter_for(model).probe(model)}"]
        if model.pinned:
            flags.append("pinned")
        if model.name in missing:
            flags.append(f"WARNING: file not found: {config.model_path(model)}")
        if (problem := missing_binary(config, model)) is not None:
            flags.append(f"WARNING: {problem}")
        kind = f"{model.backend.value}, {model.model_type.value}"
        print(f"\n{model.name} ({kind}; {', '.join(flags)})")
        print(f"  {shlex.join(argv)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check_config is not None:
        return check_config(args.check_config)
    config = effective_config(_load_or_exit(args.config), args, _env_settings())
    level = (args.log_level or config.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # one line per upstream request / job run is noise
        for noisy in ("httpx", "httpcore", "apscheduler"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    else:  # debug is for dynllm and its backends; the SQLite driver logs every statement
        for noisy in ("aiosqlite",):
            logging.getLogger(noisy).setLevel(logging.WARNING)

    import uvicorn

    from dynllm.app import create_app
    from dynllm.server import uvicorn_config
    from dynllm.store import StateError, Store

    raise_open_file_limit()
    try:  # a clear refusal here; the lifespan's open() still guards against a race
        Store(config.db_file, "").ensure_free()
    except StateError as exc:
        print(f"dynllm: {exc}", file=sys.stderr)
        return EXIT_STARTUP

    server: uvicorn.Server | None = None
    app = create_app(config, stopping=lambda: server is not None and server.should_exit)
    server = uvicorn.Server(
        uvicorn_config(  # with the header/body timeouts and max_connections
            app,
            config,
            log_level=level.lower(),
            timeout_graceful_shutdown=int(config.stop_timeout_seconds) + 5,
            access_log=level == "DEBUG",
            server_header=False,  # the backend's own Server header passes through
            proxy_headers=False,  # nothing reads the client address; saves a middleware
        )
    )
    # A terminal hang-up (or a habit from other daemons) must not stop the
    # service and its models; reloading on SIGHUP is not implemented yet.
    signal.signal(
        signal.SIGHUP,
        lambda *_: logging.getLogger("dynllm").warning("SIGHUP ignored (no reload yet)"),
    )
    server.run()
    return 0 if server.started else EXIT_STARTUP


if __name__ == "__main__":
    sys.exit(main())

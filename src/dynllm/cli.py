"""The ``dynllm`` command: serve, check a config, or manage a running service.

    dynllm [-c PATH] [--host H] [--port P] [--log-level L]    serve (no command)
    dynllm serve ...                                          the same
    dynllm check-config [PATH]  /  dynllm --check-config PATH
    dynllm status | models | load M | unload M | logs M [-f] | reload
    dynllm pull REPO[:QUANT] [-d DEST]                        download through the service
    dynllm demo ...                                           dynllm.demo.main

Exit status: 0 done; 1 the service answered an error or could not be
reached (or, for ``serve``, could not start); 2 the config is invalid (or a
``--host``/``--port``/``--log-level`` override is); 64 the command line is
wrong (EX_USAGE from sysexits.h: argparse's own 2 would read as "invalid
config").
"""

from __future__ import annotations

import argparse
import importlib
import logging
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from dynllm import __version__, manage
from dynllm.client import Target, url_for
from dynllm.config import LOG_LEVELS, Config, LogLevel, ServerConfig
from dynllm.configcheck import check_config, load_or_exit
from dynllm.logsetup import configure_logging, uvicorn_log_options

EXIT_OK = 0
EXIT_STARTUP = 1  # e.g. the state file is held by another dynllm
EXIT_SERVICE = 1  # the service answered an error, or could not be reached
EXIT_CONFIG = 2
EXIT_USAGE = 64  # EX_USAGE
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it

CLIENT_COMMANDS = ("status", "models", "load", "unload", "logs", "reload")


class EnvSettings(BaseSettings):
    """Environment overrides, e.g. from a systemd drop-in (``DYNLLM_CONFIG=...``)."""

    model_config = SettingsConfigDict(env_prefix="DYNLLM_")
    config: Path = Path("config.yaml")
    host: str | None = None
    port: int | None = None
    log_level: LogLevel | None = None
    api_keys: str | None = None  # comma-separated, added to the config's
    admin_api_keys: str | None = None
    url: str | None = None
    """The running service, for the client commands (default: from the config)."""
    admin_api_key: str | None = None
    """The key the client commands send (default: the first admin key known)."""


def _env_settings() -> EnvSettings:
    try:
        return EnvSettings()
    except ValidationError as exc:
        for err in exc.errors():
            name = f"DYNLLM_{str(err['loc'][0]).upper()}" if err["loc"] else "DYNLLM_*"
            print(f"dynllm: invalid environment variable {name}: {err['msg']}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


class UsageParser(argparse.ArgumentParser):
    """argparse with exit status 64 for a wrong command line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _serve_options(parser: argparse.ArgumentParser, env: EnvSettings | None) -> None:
    """On the top level (defaults from the environment) and on ``serve``
    (defaults suppressed, so ``dynllm -c x serve`` keeps the top level's -c)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if env is None else value

    parser.add_argument("--config", "-c", type=Path, default=default(None),
                        help="config file (default: $DYNLLM_CONFIG or ./config.yaml)")  # fmt: skip
    # --port and --log-level are checked after parsing, like DYNLLM_PORT and
    # DYNLLM_LOG_LEVEL: a wrong value overrides the config, so it is a config
    # error (2), not a usage error.
    parser.add_argument("--host", default=default(env and env.host), help="override server.host")
    parser.add_argument("--port", default=default(env and env.port), help="override server.port")
    parser.add_argument("--log-level", default=default(env and env.log_level), metavar="LEVEL",
                        help=f"override log_level ({', '.join(LOG_LEVELS)})")  # fmt: skip


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def build_parser(env: EnvSettings) -> UsageParser:
    parser = UsageParser(
        prog="dynllm",
        description="OpenAI-compatible proxy that starts and stops local inference backends.",
        epilog="Without a command, dynllm serves. `dynllm COMMAND -h` describes a command.",
    )
    _serve_options(parser, env)
    # Without PATH (`dynllm --check-config -c x`) the config -c names.
    parser.add_argument("--check-config", nargs="?", const="", metavar="PATH",
                        help="the same as `dynllm check-config [PATH]`")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"dynllm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    _serve_options(commands.add_parser("serve", help="run the service (the default)"), None)

    check = commands.add_parser(
        "check-config",
        help="validate a config, print each model's command line and what would go wrong",
    )
    check.add_argument("path", nargs="?", type=Path, help="the config (default: -c's)")
    check.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS)

    client = UsageParser(add_help=False)
    client.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS,
                        help="the config naming the service's address and admin key")  # fmt: skip
    client.add_argument("--url", default=argparse.SUPPRESS,
                        help="the service (default: $DYNLLM_URL, else the config's)")  # fmt: skip
    client.add_argument("--json", action="store_true", help="print JSON (for scripts)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[client], help=help, description=help)

    command("status", "the service and each model's state, port, pid and requests")
    command("models", "the configured models: aliases, backend, type, VRAM, state")
    load = command("load", "load a model now (waits until it is ready)")
    load.add_argument("model")
    load.add_argument("--force", action="store_true",
                      help="load even while the model cools down after failed loads")  # fmt: skip
    unload = command("unload", "unload a model")
    unload.add_argument("model")
    unload.add_argument("--force", action="store_true",
                        help="stop it even while it serves requests (they fail)")  # fmt: skip
    logs = command("logs", "a model's backend output")
    logs.add_argument("model")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=_count, default=200, metavar="N",
                      help="recent lines to show first (default 200)")  # fmt: skip
    command("reload", "re-read the config file in the running service")
    pull = command(
        "pull",
        "download a model from Hugging Face through the service, with a progress bar "
        "(Ctrl-C cancels it)",
    )
    pull.add_argument("repo", metavar="REPO[:QUANT]",
                      help="ORG/NAME or https://huggingface.co/ORG/NAME, optionally :QUANT "
                           "(a GGUF quantization such as Q4_K_M)")  # fmt: skip
    pull.add_argument("--destination", "-d", help="folder under models_dir (default: the repo's "
                      "name, lower-cased)")  # fmt: skip
    pull.add_argument("--revision", help="branch, tag or commit (default: main)")
    pull.add_argument("--include", action="append", metavar="GLOB", help="files to take (repeat)")
    pull.add_argument("--exclude", action="append", metavar="GLOB", help="files to skip (repeat)")
    pull.add_argument("--server", dest="url", default=argparse.SUPPRESS,
                      help="the same as --url: the dynllm service")  # fmt: skip
    pull.add_argument("--api-key", help="the admin key to send (default: as for status)")
    pull.add_argument("--detach", action="store_true",
                      help="print the job id and return; the download goes on")  # fmt: skip

    # Every word after `demo` is dynllm.demo's, options and --help included: with
    # no prefix character that can occur in an argument, argparse sees no option.
    demo = commands.add_parser(
        "demo", add_help=False, prefix_chars="\0", help="start a first model and chat with it"
    )
    demo.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = _env_settings()
    return build_parser(env).parse_args(argv)


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


def _override_error(message: str) -> NoReturn:
    print(f"dynllm: {message}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


def _port(value: str | int | None) -> int | None:
    if value is None:
        return None
    try:
        port = int(value)
    except ValueError:
        _override_error(f"invalid --port {value!r}: not a number")
    if not 1 <= port <= 65535:
        _override_error(f"invalid --port {value!r}: a port is 1-65535")
    return port


def _log_level(value: str | None) -> str | None:
    if value is None or value.lower() in LOG_LEVELS:
        return None if value is None else value.lower()
    _override_error(f"invalid --log-level {value!r}: one of {', '.join(LOG_LEVELS)}")


def effective_config(config: Config, args: argparse.Namespace, env: EnvSettings) -> Config:
    """The config with what the command line and environment add or override:
    the listen address (so startup checks see the real one) and API keys."""
    port = _port(args.port)
    server = config.server.model_copy(
        update={
            "host": args.host or config.server.host,
            "port": config.server.port if port is None else port,
        }
    )
    return config.model_copy(
        update={
            "server": server,
            "api_keys": [*config.api_keys, *_split_keys(env.api_keys)],
            "admin_api_keys": [*config.admin_api_keys, *_split_keys(env.admin_api_keys)],
        }
    )


def _config_path(args: argparse.Namespace, env: EnvSettings) -> Path:
    path: Path | None = args.config
    return env.config if path is None else path


# ---- serve -----------------------------------------------------------------------------


def serve(args: argparse.Namespace, env: EnvSettings) -> int:
    level_override = _log_level(args.log_level)
    _port(args.port)  # a wrong override is named before the config is read
    path = _config_path(args, env)
    config = effective_config(load_or_exit(path), args, env)
    level = (level_override or config.log_level).upper()
    configure_logging(level, config.log_format)

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
    app = create_app(
        config,
        stopping=lambda: server is not None and server.should_exit,
        config_path=path,
        adjust=lambda new: effective_config(new, args, env),  # the same overrides on reload
        reload_on_sighup=True,
    )
    server = uvicorn.Server(
        uvicorn_config(  # with the header/body timeouts and max_connections
            app,
            config,
            log_level=level.lower(),
            timeout_graceful_shutdown=int(config.stop_timeout_seconds) + 5,
            access_log=level == "DEBUG",
            server_header=False,  # the backend's own Server header passes through
            proxy_headers=False,  # nothing reads the client address; saves a middleware
            **uvicorn_log_options(),  # uvicorn's lines in log_format too
        )
    )
    # SIGHUP reloads the config once the app has started (its lifespan takes
    # the signal over); one that comes before must not stop the service.
    signal.signal(
        signal.SIGHUP,
        lambda *_: logging.getLogger("dynllm").warning("SIGHUP before startup finished: ignored"),
    )
    server.run()
    return EXIT_OK if server.started else EXIT_STARTUP


# ---- the client commands ------------------------------------------------------------


class _ClientFile(BaseModel):
    """The parts of a config file the client commands read.  Only these, so
    ``dynllm reload`` can still reach the service while the rest of the file
    is being edited (and is the service's to judge)."""

    model_config = ConfigDict(extra="ignore")
    server: ServerConfig = Field(default_factory=ServerConfig)
    admin_api_keys: list[str] = Field(default_factory=list)
    api_keys: list[str] = Field(default_factory=list)


def _read_client_file(path: Path) -> _ClientFile:
    hint = "give the service's address with --url or DYNLLM_URL"
    try:
        data = yaml.safe_load(path.expanduser().read_text(encoding="utf-8"))
        return _ClientFile.model_validate(data or {})
    except OSError as exc:
        reason = f"cannot read it: {exc.strerror or exc}"
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValidationError is a ValueError: a wrong server.port or key list.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = f"cannot find server.host/port and the keys in it: {first}"
    print(f"dynllm: invalid config {path}: {reason}; {hint}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


def client_target(args: argparse.Namespace, env: EnvSettings) -> Target:
    """Where the service is and which key to send.

    URL: ``--url``, else ``DYNLLM_URL``, else the config's ``server.host``/``port``
    (with ``--host``/``--port``/``DYNLLM_HOST``/``DYNLLM_PORT`` applied, as
    ``serve`` applies them; 0.0.0.0 and :: mean this machine).  Key:
    ``--api-key`` (``pull`` has it), else ``DYNLLM_ADMIN_API_KEY``, else the
    first of ``DYNLLM_ADMIN_API_KEYS``, else the config's first
    ``admin_api_keys``; with no admin key anywhere, the
    first API key (admin routes then take any valid key from this machine).
    The config is read only when the URL or the key must come from it.
    """
    url: str | None = getattr(args, "url", None)
    source = "--url"
    if url is None and env.url:
        url, source = env.url, "DYNLLM_URL"
    given: list[str] = [k for k in (getattr(args, "api_key", None), env.admin_api_key) if k]
    admin_keys = [*given, *_split_keys(env.admin_api_keys)]
    api_keys = _split_keys(env.api_keys)
    path = _config_path(args, env)
    named = args.config is not None or "config" in env.model_fields_set
    # Without --url there must be a config; for a key only, one that exists.
    if url is None or (not admin_keys and (named or path.exists())):
        found = _read_client_file(path)
        admin_keys += found.admin_api_keys
        api_keys += found.api_keys
        if url is None:
            host = args.host or found.server.host
            port = _port(args.port)
            url = url_for(host, found.server.port if port is None else port)
            source = f"{path} (server.host/port)"
    keys = admin_keys or api_keys
    return Target(url.rstrip("/"), keys[0] if keys else None, source)


def run_client(args: argparse.Namespace, env: EnvSettings) -> int:
    return manage.run(args, client_target(args, env))


def run_pull(args: argparse.Namespace, env: EnvSettings) -> int:
    from dynllm import pull

    return pull.run(args, client_target(args, env))


# ---- demo ------------------------------------------------------------------------------


def run_demo(argv: list[str]) -> int:
    try:  # imported only when asked for: it is not needed to serve
        module = importlib.import_module("dynllm.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "dynllm.demo":
            raise
        print("dynllm: this build of dynllm has no demo command", file=sys.stderr)
        return EXIT_SERVICE
    demo_main: Callable[[list[str]], int] = module.main
    return demo_main(argv)


# ---- main ------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    env = _env_settings()
    parser = build_parser(env)
    args = parser.parse_args(argv)
    if args.check_config is not None:
        if args.command is not None:
            parser.error(f"--check-config cannot be combined with the command {args.command!r}")
        path = Path(args.check_config) if args.check_config else _config_path(args, env)
        return check_config(path)
    if args.command == "check-config":
        if args.path is not None and args.config is not None and args.path != args.config:
            parser.error("check-config: give the config once (PATH or -c PATH)")
        return check_config(args.path or _config_path(args, env))
    if args.command == "demo":
        return run_demo(args.args)
    if args.command == "pull":
        return run_pull(args, env)
    if args.command in CLIENT_COMMANDS:
        return run_client(args, env)
    return serve(args, env)


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return EXIT_OK
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return EXIT_SERVICE


def main(argv: list[str] | None = None) -> int:
    """The exit status; argparse's and the config loader's SystemExit become
    their status, so the function can be called from tests too."""
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return _exit_status(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

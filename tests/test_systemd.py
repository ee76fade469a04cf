"""The systemd unit (systemd/dynllm.service) and its installer (systemd/install.sh).

Nothing here touches the host: the unit is checked by parsing it (and with
``systemd-analyze verify`` when that is installed), and install.sh only runs
with ``--print-unit`` or in its ``DYNLLM_DRY_RUN=1`` mode.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dynllm.cli import EXIT_CONFIG, parse_args
from dynllm.config import Config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "dynllm.service"
INSTALL = ROOT / "systemd" / "install.sh"
PREFIX = "/opt/dynllm"

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="systemd is Linux-only")

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """section -> key -> every value assigned, in order (keys may repeat)."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep, f"line {number} is not a setting in a section: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """systemd time span ("30", "30s", "1min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key} should be set exactly once, got {values}"
    return values[0]


def words(unit: Unit, section: str, key: str) -> list[str]:
    return [w for value in unit.get(section, {}).get(key, []) for w in shlex.split(value)]


# ---------------------------------------------------------------- the unit --


def test_execstart_runs_the_venv_console_script_with_config(unit: Unit) -> None:
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("dynllm") == "dynllm.cli:main"
    assert argv[0] == f"{PREFIX}/.venv/bin/dynllm"
    assert argv[1:] == ["--config", f"{PREFIX}/config.yaml"]
    # ...and the CLI really understands those arguments.
    assert parse_args(argv[1:]).config == Path(f"{PREFIX}/config.yaml")


def test_runs_as_dynllm_in_the_install_dir(unit: Unit) -> None:
    assert one(unit, "Service", "User") == "dynllm"
    assert one(unit, "Service", "Group") == "dynllm"
    assert one(unit, "Service", "WorkingDirectory") == PREFIX
    assert "PYTHONUNBUFFERED=1" in words(unit, "Service", "Environment")


def test_restarts_on_failure_but_not_on_bad_config(unit: Unit) -> None:
    assert one(unit, "Service", "Restart") == "on-failure"
    assert str(EXIT_CONFIG) in words(unit, "Service", "RestartPreventExitStatus")


def test_stop_lets_dynllm_stop_backends_then_kills_the_cgroup(unit: Unit) -> None:
    assert one(unit, "Service", "KillMode") == "mixed"
    assert unit["Service"].get("KillSignal", ["SIGTERM"]) == ["SIGTERM"]
    assert unit["Service"].get("SendSIGKILL", ["yes"]) == ["yes"]
    # cli.py gives uvicorn stop_timeout_seconds + 5 s to shut down gracefully;
    # systemd must not SIGKILL everything before that window is over.
    graceful = Config.model_fields["stop_timeout_seconds"].default + 5
    assert seconds(one(unit, "Service", "TimeoutStopSec")) > graceful


def test_waits_for_the_network_and_is_enabled_for_multi_user(unit: Unit) -> None:
    assert "network-online.target" in words(unit, "Unit", "After")
    assert "network-online.target" in words(unit, "Unit", "Wants")
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_file_limit_allows_many_streams(unit: Unit) -> None:
    assert int(one(unit, "Service", "LimitNOFILE")) >= 16384


def test_hardening_keeps_gpus_and_the_state_db_usable(unit: Unit) -> None:
    service = unit["Service"]
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "PrivateTmp") == "yes"
    # Homes readable (models live there) but not writable.
    assert one(unit, "Service", "ProtectHome") == "read-only"
    if one(unit, "Service", "ProtectSystem") == "strict":
        # db_path defaults to dynllm_state.db next to the config file.
        db_dir = str(Path(f"{PREFIX}/config.yaml").parent)
        assert db_dir in words(unit, "Service", "ReadWritePaths")
    else:
        assert one(unit, "Service", "ProtectSystem") in {"full", "yes"}
    # These would hide or break the GPU.
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert service.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    assert "DeviceAllow" not in service  # no allow-list: nothing is locked out
    assert {"video", "render"} <= set(words(unit, "Service", "SupplementaryGroups"))


def test_commented_nvidia_allow_list_does_not_lock_out_dri() -> None:
    commented = [
        line[1:] for line in UNIT.read_text().splitlines() if line.startswith("#DeviceAllow=")
    ]
    assert any("nvidia-frontend" in line for line in commented)
    assert any("nvidia-uvm" in line for line in commented)
    # Uncommenting the block makes it an allow-list, so /dev/dri must be in it.
    assert "DeviceAllow=char-drm rw" in commented


# ---------------------------------------------------- systemd-analyze verify --

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (Debian/Ubuntu: apt-get install -y systemd)",
)


def verify(text: str, tmp_path: Path) -> tuple[int, list[str]]:
    """Run ``systemd-analyze verify`` on ``text``; return (exit code, its
    complaints about this unit).  ExecStart points at this Python, because
    verify rejects a binary that does not exist and /opt/dynllm is not
    installed here; every other setting is checked as written."""
    assert SYSTEMD_ANALYZE is not None
    python = f'"{sys.executable}"' if " " in sys.executable else sys.executable
    text, n = re.subn(r"^ExecStart=\S+", f"ExecStart={python} -c pass", text, count=1, flags=re.M)
    assert n == 1
    path = tmp_path / "dynllm.service"
    path.write_text(text)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = (proc.stdout + proc.stderr).splitlines()
    # Other units on the host may draw warnings of their own; only ours count.
    return proc.returncode, [line for line in output if "dynllm.service" in line]


def gpu_block_enabled(text: str) -> str:
    return re.sub(r"^#((?:DevicePolicy|DeviceAllow|LimitMEMLOCK)=)", r"\1", text, flags=re.M)


@needs_systemd_analyze
@linux_only
@pytest.mark.parametrize(
    "variant",
    ["as shipped", "NVIDIA block uncommented", "rendered for /srv/llm"],
)
def test_systemd_analyze_verify_is_clean(variant: str, tmp_path: Path) -> None:
    text = UNIT.read_text()
    if variant == "NVIDIA block uncommented":
        text = gpu_block_enabled(text)
        assert "\nDeviceAllow=char-nvidia-frontend rw\n" in text
    elif variant == "rendered for /srv/llm":
        text = print_unit("/srv/llm")
    code, complaints = verify(text, tmp_path)
    assert complaints == []
    assert code == 0


@needs_systemd_analyze
@linux_only
def test_systemd_analyze_check_catches_a_bad_setting(tmp_path: Path) -> None:
    """The verify check above can fail: systemd only warns on bad values."""
    text = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd")
    _, complaints = verify(text, tmp_path)
    assert any("mixd" in line for line in complaints)


# ------------------------------------------------------------- install.sh --


def install_sh(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DYNLLM_")}
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def print_unit(prefix: str) -> str:
    proc = install_sh("--print-unit", DYNLLM_PREFIX=prefix)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def dry_run(prefix: Path, *args: str, systemd: str = "yes") -> list[str]:
    """install.sh's dry-run output: the commands it would run, one per line."""
    proc = install_sh(*args, DYNLLM_DRY_RUN="1", DYNLLM_PREFIX=str(prefix), DYNLLM_SYSTEMD=systemd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def commands(output: list[str]) -> list[list[str]]:
    return [shlex.split(line.removeprefix("[dry-run]")) for line in output if line.startswith("[")]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_install_sh_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert INSTALL.read_text().splitlines()[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in INSTALL.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_install_sh_is_shellcheck_clean() -> None:
    proc = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@linux_only
def test_print_unit_rewrites_the_prefix_and_drops_missing_groups() -> None:
    rendered = print_unit("/srv/llm/")  # trailing slash is ignored
    assert rendered == print_unit("/srv/llm")
    settings = [line for line in rendered.splitlines() if not line.startswith("#")]
    assert not [line for line in settings if PREFIX in line]
    unit = parse_unit(rendered)
    assert one(unit, "Service", "WorkingDirectory") == "/srv/llm"
    assert shlex.split(one(unit, "Service", "ExecStart")) == [
        "/srv/llm/.venv/bin/dynllm",
        "--config",
        "/srv/llm/config.yaml",
    ]
    assert "/srv/llm" in words(unit, "Service", "ReadWritePaths")
    existing = set()
    for group in ("video", "render"):
        try:
            grp.getgrnam(group)
            existing.add(group)
        except KeyError:
            pass
    assert set(words(unit, "Service", "SupplementaryGroups")) == existing
    assert len(rendered.splitlines()) == len(UNIT.read_text().splitlines())


@linux_only
@pytest.mark.parametrize("prefix", ["relative/dir", "/has space", "/a&b", "/", "/x;rm"])
def test_rejects_unsafe_prefix(prefix: str) -> None:
    proc = install_sh("--print-unit", DYNLLM_PREFIX=prefix)
    assert proc.returncode != 0
    assert "DYNLLM_PREFIX" in proc.stderr
    assert proc.stdout == ""


def test_rejects_unknown_argument() -> None:
    proc = install_sh("--bogus", DYNLLM_DRY_RUN="1")
    assert proc.returncode != 0
    assert "--bogus" in proc.stderr


@linux_only
@pytest.mark.skipif(os.geteuid() == 0, reason="the root check cannot fail for root")
def test_refuses_to_run_without_root() -> None:
    proc = install_sh("--no-start", DYNLLM_PREFIX="/nonexistent/dynllm-test")
    assert proc.returncode != 0
    assert "root" in proc.stderr
    assert "[dry-run]" not in proc.stdout


@linux_only
def test_dry_run_plans_an_upgrade_and_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "opt" / "dynllm"
    prefix.mkdir(parents=True)
    (prefix / "config.yaml").write_text("models: []\n")
    (prefix / "dynllm_state.db").write_bytes(b"state")
    before = snapshot(tmp_path)

    output = dry_run(prefix)
    cmds = commands(output)
    assert snapshot(tmp_path) == before

    # user: created only if missing, with no login shell and the prefix as home
    try:
        pwd.getpwnam("dynllm")
    except KeyError:
        useradd = next(c for c in cmds if c[0] == "useradd")
        assert "--system" in useradd and useradd[-1] == "dynllm"
        assert useradd[useradd.index("--home-dir") + 1] == str(prefix)
        assert useradd[useradd.index("--shell") + 1].endswith(("nologin", "false"))
    else:
        assert not [c for c in cmds if c[0] == "useradd"]

    # copy: the project, minus the installation's own state
    copies = [c for c in cmds if c[0] in ("rsync", "tar")]
    assert len(copies) == 1
    line = next(line for line in output if line.startswith(("[dry-run] rsync", "[dry-run] tar")))
    for excluded in (".venv", ".git", "__pycache__", r"\*.db"):
        assert f"--exclude={excluded}" in line
    assert "--exclude=/config.yaml" in line or "--exclude=./config.yaml" in line
    assert str(ROOT) in line and str(prefix) in line

    # venv: built from the lock file, without dev dependencies, in the prefix
    sync = next(c for c in cmds if "sync" in c)
    assert sync[sync.index("sync") :] == [
        "sync",
        "--frozen",
        "--no-dev",
        "--directory",
        str(prefix),
    ]
    assert f"UV_PROJECT_ENVIRONMENT={prefix}/.venv" in sync

    # the existing config is kept, the directory handed to the service user
    assert "keeping existing" in "\n".join(output)
    assert not [c for c in cmds if c[0] == "cp" and str(prefix / "config.yaml") in c]
    assert ["chown", "-R", "dynllm:", str(prefix)] in cmds

    # systemd: unit installed (or already identical), reloaded, enabled, started
    assert any("/etc/systemd/system/dynllm.service" in line for line in output)
    assert ["systemctl", "daemon-reload"] in cmds
    start = [c for c in cmds if c[0] == "systemctl" and c[1] != "daemon-reload"]
    assert start in (
        [["systemctl", "enable", "--now", "dynllm"]],
        [["systemctl", "enable", "dynllm"], ["systemctl", "restart", "dynllm"]],  # was running
    )


@linux_only
def test_dry_run_creates_config_only_from_the_example(tmp_path: Path) -> None:
    prefix = tmp_path / "dynllm"
    output = dry_run(prefix)
    cmds = commands(output)
    assert not prefix.exists()
    assert ["cp", "-n", f"{prefix}/config.example.yaml", f"{prefix}/config.yaml"] in cmds


@linux_only
def test_no_start_only_enables(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("models: []\n")
    systemctl = [c for c in commands(dry_run(tmp_path, "--no-start")) if c[0] == "systemctl"]
    assert systemctl == [["systemctl", "daemon-reload"], ["systemctl", "enable", "dynllm"]]


@linux_only
def test_without_running_systemd_only_enables(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("models: []\n")
    output = dry_run(tmp_path, systemd="no")
    systemctl = [c for c in commands(output) if c[0] == "systemctl"]
    if shutil.which("systemctl"):
        assert systemctl == [["systemctl", "enable", "dynllm"]]
    else:
        assert systemctl == []

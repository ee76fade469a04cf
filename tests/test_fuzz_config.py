"""Fuzzing config loading (issue 8, item 6): any input loads or raises
ConfigError naming the key, never another exception.

Two entry points: ``parse_config`` with the Python structures YAML can
produce (mappings of known keys with plausible or arbitrary values, unknown
keys, non-string keys, nested lists, wrong types, huge and non-finite
numbers, unicode, bytes, dates), and ``load_config`` with YAML text written
to a file (those structures dumped, and raw YAML-ish text: deep nesting,
numbers with hundreds of digits, invalid UTF-8).

Deterministic for CI: derandomized, no example database.
"""

from __future__ import annotations

import datetime
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynllm.config import (
    BackendName,
    BackendSettings,
    Config,
    ConfigError,
    EvictionPolicy,
    ModelConfig,
    ModelType,
    ServerConfig,
    load_config,
    parse_config,
)

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
BASE_DIR = Path("/nonexistent/dynllm-fuzz")  # parse_config is pure: never read

# ---- strategies -----------------------------------------------------------

ODD_NUMBERS = st.one_of(
    # 10**5000 is past Python's 4300-digit cap: repr() and str() of it raise.
    st.sampled_from([400, 5000]).map(lambda digits: 10**digits),
    st.sampled_from([-(2**64), 2**63, 2**64, -1, 0, math.inf, -math.inf, math.nan, 1e308, 5e-324]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    ODD_NUMBERS,
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=8),  # YAML's !!binary
    st.dates(),  # YAML turns 2024-01-01 into a date
)
ANY_KEY = st.one_of(st.text(max_size=12), st.integers(), st.none(), st.booleans())
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_KEY, inner, max_size=4),
    max_leaves=12,
)


def either(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right kind (so validation goes deeper), else anything."""
    return st.one_of(plausible, plausible, plausible, VALUES)


NAMES = st.sampled_from(["a", "b", "c", "a", "", "ü/ñ%20", "x" * 300])
SECONDS = st.one_of(
    st.floats(allow_nan=True), st.integers(), st.sampled_from(["inf", "-1", "never", "5", "x"])
)
TEXTS = st.lists(st.text(max_size=10), max_size=4)


def mapping(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[Any, Any]]:
    """A mapping with any subset of ``fields`` and sometimes unknown keys."""
    known = st.fixed_dictionaries({}, optional={k: either(v) for k, v in fields.items()})
    unknown = st.dictionaries(ANY_KEY, VALUES, max_size=2)
    return st.builds(lambda a, b: {**b, **a}, known, st.one_of(*[st.just({})] * 3, unknown))


MODEL = mapping(
    {
        "name": NAMES,
        "path": st.sampled_from(["", "m.gguf", "/abs/m.gguf", "~/m", "{model_path}"]),
        "backend": st.sampled_from([b.value for b in BackendName] + ["LLAMACPP", "nope"]),
        "model_type": st.sampled_from([t.value for t in ModelType] + ["nope"]),
        "vram_mb": st.integers(min_value=-10, max_value=20000),
        "n_gpu_layers": st.integers(),
        "context_size": st.integers(),
        "mmproj": st.text(max_size=8),
        "target_device": st.text(max_size=8),
        "quantization": st.sampled_from(["none", "bnb-4bit", "bnb-8bit", "x"]),
        "trust_remote_code": st.booleans(),
        "gpu_memory_utilization": st.floats(),
        "command": TEXTS,
        "health_path": st.sampled_from(["/health", "health", ""]),
        "upstream_paths": st.dictionaries(
            st.sampled_from(["chat", "embeddings", "kserve", "nope"]),
            st.sampled_from(["/v1/x", "x"]),
            max_size=2,
        ),
        "unload_time": SECONDS,
        "pinned": st.booleans(),
        "load_timeout_seconds": SECONDS,
        "extra_args": st.lists(VALUES, max_size=3),
        "env": st.dictionaries(ANY_KEY, VALUES, max_size=3),
        "aliases": st.lists(NAMES, max_size=3),
    }
)
CONFIG = mapping(
    {
        "server": mapping(
            {"host": st.sampled_from(["127.0.0.1", "0.0.0.0", "::1"]), "port": st.integers()}
        ),
        "total_vram_mb": st.integers(min_value=-10, max_value=40000),
        "idle_timeout_seconds": SECONDS,
        "enabled_backends": st.lists(st.sampled_from([b.value for b in BackendName]), max_size=5),
        "backend": mapping(
            {
                "llamacpp_binary": st.text(max_size=8),
                "port_range_start": st.integers(min_value=-5, max_value=70000),
                "port_range_end": st.integers(min_value=-5, max_value=70000),
            }
        ),
        "models_dir": st.text(max_size=8),
        "db_path": st.text(max_size=8),
        "log_level": st.sampled_from(["debug", "INFO", "warning", "loud"]),
        "preload_models": st.lists(NAMES, max_size=3),
        "models": st.lists(MODEL, max_size=4),
        "eviction_policy": st.sampled_from([p.value for p in EvictionPolicy] + ["fifo"]),
        "load_timeout_seconds": SECONDS,
        "health_poll_interval_ms": st.integers(),
        "max_body_mb": SECONDS,
        "max_upload_mb": SECONDS,
        "api_keys": TEXTS,
        "admin_api_keys": TEXTS,
        "allowed_hosts": TEXTS,
        "cors_origins": TEXTS,
        "max_connections": st.integers(),
        "load_failure_cooldown_seconds": SECONDS,
    }
)
DOCUMENTS = st.one_of(CONFIG, CONFIG, VALUES)

# ---- the property ---------------------------------------------------------

FIELDS_TOP = set(Config.model_fields) - {"base_dir"}
FIELDS = {
    "": set(Config.model_fields),
    "server": set(ServerConfig.model_fields),
    "backend": set(BackendSettings.model_fields),
    "model": set(ModelConfig.model_fields),
}
NAME_NOTE = re.compile(r"^ \('.*?'\)")  # "models[0] ('chat')": the model's name, for people


def _key_texts(keys: Any, fields: set[str]) -> list[str]:
    """How a key can appear in a message: as written, or as an index ``[5]``."""
    texts = {str(k) for k in keys} | {repr(k) for k in keys if isinstance(k, str)} | fields
    texts |= {f"[{k}]" for k in keys if isinstance(k, int)}
    return sorted(texts, key=len, reverse=True)


def names_a_key(line: str, data: Any) -> bool:
    """Whether a ConfigError line starts with the key it is about: one of the
    input's own keys or a known field (a missing one), and for a model entry,
    also a key of that entry (or the entry itself)."""
    if line.startswith("(top level): "):
        return not isinstance(data, dict) or not data
    if not isinstance(data, dict):
        return False
    for key in _key_texts(data, FIELDS[""]):
        if not line.startswith(key):
            continue
        rest = line[len(key) :]
        if rest.startswith(": "):
            return True
        if key == "models" and (index := re.match(r"^\[(\d+)\]", rest)):
            models = data.get("models")
            if not isinstance(models, list) or int(index[1]) >= len(models):
                return False
            rest = NAME_NOTE.sub("", rest[index.end() :])
            entry = models[int(index[1])]
            if rest.startswith(": "):
                return True
            keys = entry if isinstance(entry, dict) else {}
            return any(
                rest.startswith("." + k) or rest.startswith(k)
                for k in _key_texts(keys, FIELDS["model"])
            )
        if rest[:1] in (".", "["):
            return True  # inside server/backend/a list: the top key is named
    return False


def check(data: Any) -> Config | None:
    try:
        return parse_config(data, base_dir=BASE_DIR)
    except ConfigError as exc:
        message = str(exc)
        assert message, data
        for line in message.splitlines():
            assert names_a_key(line, data), (line, data)
        return None


INFINITE_MEANS_NEVER = {"idle_timeout_seconds", "unload_time"}


def check_usable(config: Config) -> None:
    """A config that loads must not crash dynllm later: the values it turns
    into integers and timers are finite and in range (as app.py uses them)."""
    int(config.max_body_mb * (1 << 20))
    int(config.max_upload_mb * (1 << 20))
    datetime.timedelta(seconds=config.idle_check_interval_seconds)  # the idle job's timer
    for owner in (config, *config.models):
        for key, value in owner:
            if isinstance(value, float) and key not in INFINITE_MEANS_NEVER:
                assert math.isfinite(value), key
    for model in config.models:
        assert config.unload_after(model) >= 0
        assert math.isfinite(config.load_timeout(model)) and config.load_timeout(model) > 0


@FUZZ
@given(data=DOCUMENTS)
def test_parse_config_loads_or_names_the_key(data: Any) -> None:
    config = check(data)
    if config is not None:
        check_usable(config)


def test_the_fuzzing_reaches_both_outcomes() -> None:
    """Not only errors: a fuzz whose every input is refused tests little."""
    outcomes = {"loaded": 0, "refused": 0}

    @settings(FUZZ, max_examples=200)
    @given(data=CONFIG)
    def count(data: Any) -> None:
        outcomes["loaded" if check(data) is not None else "refused"] += 1

    count()
    print(f"parse_config outcomes: {outcomes}")
    assert outcomes["loaded"] >= 10 and outcomes["refused"] >= 10, outcomes


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config")


def _load(config_dir: Path, content: bytes) -> Config | None:
    path = config_dir / "config.yaml"
    path.write_bytes(content)
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert str(exc)
        return None
    check_usable(config)
    return config


@FUZZ
@given(data=DOCUMENTS)
def test_load_config_of_dumped_structures(config_dir: Path, data: Any) -> None:
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError):  # YAML cannot write it (nor can a file hold it)
        return
    _load(config_dir, text.encode())


# PyYAML recurses: ~1000 levels is too deep, and each such example costs ~1 s,
# so the fuzz stays below it and test_odd_yaml_found_by_fuzzing goes past it.
DEPTHS = st.sampled_from([1, 50, 300])
DIGITS = st.sampled_from([1, 20, 308, 309, 400, 4299, 4300, 6000])  # float and int limits
YAML_TEXT = st.one_of(
    st.text(alphabet=st.sampled_from(list("[]{}:,-?!&*|>'\"#% \n\tab1.e+")), max_size=60),
    st.text(max_size=60),
    st.builds(lambda n: "a: " + "[" * n + "]" * n, DEPTHS),
    st.builds(lambda n: "models: " + "[" * n, DEPTHS),
    st.builds(lambda key, n: f"{key}: 1" + "0" * n, st.sampled_from(sorted(FIELDS_TOP)), DIGITS),
    st.builds(lambda n: "max_body_mb: 1" + "0" * n + ".5", DIGITS),
    st.builds(lambda a: f"a: &a [*a]\nmodels: {a}", st.sampled_from(["*a", "[*a]", "[{env: *a}]"])),
)


@FUZZ
@given(text=YAML_TEXT)
def test_load_config_of_yaml_text(config_dir: Path, text: str) -> None:
    _load(config_dir, text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(raw=st.binary(max_size=40))
def test_load_config_of_any_bytes(config_dir: Path, raw: bytes) -> None:
    _load(config_dir, raw)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("idle_timeout_seconds: 1" + "0" * 400, "idle_timeout_seconds"),
        (
            "models: [{name: a, backend: llamacpp, path: x, vram_mb: 1, unload_time: 1"
            + "0" * 400
            + "}]",
            "models[0] ('a').unload_time",
        ),
        ("total_vram_mb: 1" + "0" * 5000, 'too many digits\n  in "<unicode string>", line 1'),
        ("a: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ],
)
def test_odd_yaml_found_by_fuzzing(config_dir: Path, text: str, key: str) -> None:
    """Examples the fuzzing found: a ConfigError naming the key, not a crash."""
    path = config_dir / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert key in str(raised.value), str(raised.value)[:300]


def test_odd_python_values_found_by_fuzzing() -> None:
    """A value whose text is too long to print (an int past Python's digit
    cap) is still reported by key."""
    with pytest.raises(ConfigError, match=r"^models\[0\] \('a'\)\.backend: "):
        parse_config(
            {"models": [{"name": "a", "backend": 10**5000, "vram_mb": 1, "path": "x"}]},
            base_dir=BASE_DIR,
        )
    with pytest.raises(ConfigError, match=r"^idle_timeout_seconds: "):
        parse_config({"idle_timeout_seconds": 10**400}, base_dir=BASE_DIR)

"""The route table and the KServe URL parser."""

from __future__ import annotations

import pytest

from dynllm.api.routes import BY_PATH, KSERVE_INFER, ROUTES, KServePath, parse_kserve
from dynllm.config import ModelType
from dynllm.errors import Shape
from dynllm.registry import SERVES, ApiFamily


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/models/clf", KServePath("clf", None, "")),
        ("/v2/models/clf/ready", KServePath("clf", None, "/ready")),
        ("/v2/models/clf/infer", KServePath("clf", None, "/infer")),
        ("/v2/models/clf/versions/2", KServePath("clf", "2", "")),
        ("/v2/models/clf/versions/2/ready", KServePath("clf", "2", "/ready")),
        ("/v2/models/clf/versions/2/infer", KServePath("clf", "2", "/infer")),
        ("/v2/models/org/clf/infer", KServePath("org/clf", None, "/infer")),  # names with /
        ("/v2/models/org/clf/versions/1/infer", KServePath("org/clf", "1", "/infer")),
        ("/v2/models/", None),
        ("/v2/models//infer", None),
        ("/v2/health/ready", None),
        ("/v1/models/clf", None),
    ],
)
def test_kserve_paths(path: str, expected: KServePath | None) -> None:
    assert parse_kserve(path) == expected


def test_model_part_rebuilds_what_follows_the_name() -> None:
    parsed = parse_kserve("/v2/models/a/versions/7/infer")
    assert parsed is not None and parsed.model_part == "/versions/7/infer"


def test_every_family_has_a_route_and_every_route_a_model_type() -> None:
    families = {r.family for r in ROUTES}
    assert families == set(ApiFamily)
    for route in ROUTES:
        assert any(route.family in SERVES[t] for t in ModelType), route
    assert all(r.shape is Shape.KSERVE for r in ROUTES if r.path.startswith("/v2"))
    assert all(r.shape is Shape.OPENAI for r in BY_PATH.values())
    assert KSERVE_INFER.methods == {"POST"}
    assert set(BY_PATH) >= {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/rerank",
        "/rerank",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/audio/speech",
        "/v1/images/generations",
    }

"""Schema fuzzing: schemathesis generates requests (valid and invalid) from /openapi.json and
sends them to a real uvicorn on loopback; no response may be a 5xx (the tiny model, a short
context so every generated request is cheap)."""

from __future__ import annotations

pytestmark = __import__("pytest").mark.skip(reason="schemathesis pytest plugin breaks on a clean install (Function._nodeid); re-enable after pinning")
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from server_fixtures import LiveServer, make_app, tiny_chat_ckpt, tiny_loaded  # noqa: E402, F401


@pytest.fixture(scope="module")
def fuzz_schema(tiny_loaded):
    app = make_app(tiny_loaded, max_model_len=24, max_n=2, default_max_tokens=4, max_queue=4)
    with LiveServer(app) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_is_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error])

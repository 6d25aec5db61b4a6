"""Schema fuzzing: schemathesis generates requests (valid and invalid) from /openapi.json and
sends them to a real uvicorn on loopback; no response may be a 5xx (the tiny model, a short
context so every generated request is cheap).

Hypothesis drives each API operation's strategy directly rather than through schemathesis's
pytest plugin, whose parametrisation reaches into pytest internals that change between pytest
releases (``Function._nodeid`` is gone in pytest 9.2)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from server_fixtures import LiveServer, make_app, tiny_chat_ckpt, tiny_loaded  # noqa: E402, F401


def test_no_request_is_a_server_error(tiny_loaded) -> None:
    app = make_app(tiny_loaded, max_model_len=24, max_n=2, default_max_tokens=4, max_queue=4)
    with LiveServer(app) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 8, [op.label for op in operations]
        for op in operations:

            @given(case=op.as_strategy())
            @settings(max_examples=25, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                case.call_and_validate(checks=[not_a_server_error])

            check()

"""Every error case answers the OpenAI envelope with the right status, names the field, and
leaves the server serving: validation (400, not 422), context and max_tokens limits, bad n /
logprobs, unsupported features, token ids outside the vocabulary, API key, load failure,
a model that fails mid-generation (stream and not)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_fixtures import SlowModel, make_app, tiny_chat_ckpt, tiny_loaded, wait_ready, with_model  # noqa: F401
from test_server_api import events


@pytest.fixture(scope="module")
def client(tiny_loaded):
    with TestClient(make_app(tiny_loaded, served_model_name="tiny")) as c:
        wait_ready(c)
        yield c


def err(r, status: int, param: str | None = None, contains: str = ""):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    e = body["error"]
    assert set(e) >= {"message", "type", "param", "code"} and e["code"] == status
    if param is not None:
        assert e["param"] == param, e
        assert param.split(".")[0] in e["message"], e
    assert contains in e["message"], e
    return e


LONG = " ".join(["the"] * 300)


@pytest.mark.parametrize("path,payload,param", [
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "the", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "the", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "the", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "the", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "the", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "the", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "the", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "the", "stop": 3}, "stop"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 30}, "top_logprobs"),
    ("/tokenize", {"prompt": 3}, "prompt"),
    ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
    ("/generate", {"parameters": {}}, "inputs"),
    ("/generate", {"inputs": "the", "parameters": {"top_p": 2}}, "parameters.top_p"),
])
def test_validation_errors_are_400_naming_the_field(client, path, payload, param):
    err(client.post(path, json=payload), 400, param)


def test_union_field_message_says_what_is_accepted(client):
    e = err(client.post("/v1/completions", json={"prompt": 5}), 400, "prompt")
    assert "string" in e["message"] and "token ids" in e["message"]


def test_malformed_json_and_non_object(client):
    err(client.post("/v1/completions", content=b"{bad", headers={"content-type": "application/json"}), 400,
        contains="JSON")
    err(client.post("/v1/completions", json=[1, 2]), 400)


def test_context_and_max_tokens_limits(client):
    err(client.post("/v1/completions", json={"prompt": LONG}), 400, "prompt", "context")
    err(client.post("/v1/completions", json={"prompt": "the", "max_tokens": 10_000}), 400, "max_tokens", "at most")
    err(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                   "max_completion_tokens": 10_000}), 400, "max_completion_tokens")
    err(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": LONG}]}), 400, "messages")
    err(client.post("/generate", json={"inputs": "the", "parameters": {"max_new_tokens": 10_000}}), 400,
        "parameters.max_new_tokens")
    # truncate keeps the last tokens, as TGI does: no error
    assert client.post("/generate", json={"inputs": LONG, "parameters": {"max_new_tokens": 2, "truncate": 10}}).status_code == 200


def test_bad_n_and_logprobs(client):
    err(client.post("/v1/completions", json={"prompt": "the", "n": 17}), 400, "n", "at most 16")
    err(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 99}), 400, "n")
    err(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
        400, "top_logprobs", "logprobs")


def test_empty_prompts_and_token_ids_outside_vocab(client):
    err(client.post("/v1/completions", json={"prompt": []}), 400, "prompt", "empty")
    err(client.post("/v1/completions", json={"prompt": [[]]}), 400, "prompt", "empty")
    err(client.post("/v1/completions", json={"prompt": [1, 99999]}), 400, "prompt", "vocabulary")
    err(client.post("/v1/completions", json={"prompt": [-3]}), 400, "prompt", "vocabulary")
    err(client.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens", "vocabulary")
    err(client.post("/tokenize", json={}), 400, "prompt")


def test_unsupported_features(client):
    msgs = [{"role": "user", "content": "x"}]
    err(client.post("/v1/chat/completions", json={"messages": msgs, "tools": [{"type": "function"}]}), 400, "tools")
    err(client.post("/v1/chat/completions", json={"messages": msgs, "response_format": {"type": "json_object"}}),
        400, "response_format")
    assert client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1,
                                                     "response_format": {"type": "text"}}).status_code == 200
    err(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "messages.0.content.0.type")
    err(client.post("/v1/completions", json={"prompt": "the", "suffix": "x"}), 400, "suffix")


def test_unknown_fields_are_ignored(client):
    r = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 1, "frobnicate": True, "user": "u"})
    assert r.status_code == 200


def test_unknown_route_and_method(client):
    err(client.get("/v2/nothing"), 404)
    err(client.get("/v1/completions"), 405)


def test_strict_model_name(tiny_loaded):
    with TestClient(make_app(tiny_loaded, served_model_name="tiny", strict_model_name=True)) as c:
        wait_ready(c)
        err(c.post("/v1/completions", json={"prompt": "the", "model": "gpt-4"}), 404, "model")
        assert c.post("/v1/completions", json={"prompt": "the", "model": "tiny", "max_tokens": 1}).status_code == 200


def test_api_key_on_every_route_but_health(tiny_loaded):
    with TestClient(make_app(tiny_loaded, api_key="sekret")) as c:
        wait_ready(c)
        assert c.get("/health").status_code == 200
        for method, path in [("get", "/v1/models"), ("get", "/metrics"), ("get", "/version"), ("get", "/info"),
                             ("post", "/v1/completions"), ("post", "/generate"), ("get", "/openapi.json"),
                             ("get", "/v1/cache"), ("get", "/tokenizer_info")]:
            e = err(getattr(c, method)(path), 401)
            assert "Authorization" in e["message"]
        err(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, contains="invalid")
        ok = {"Authorization": "Bearer sekret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        r = c.post("/v1/completions", headers=ok, json={"prompt": "the", "max_tokens": 2, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


def test_load_failure_is_reported_not_crashed(tiny_loaded):
    from thawed.codecs.errors import ThawedError

    with TestClient(make_app(tiny_loaded, fail=ThawedError("checkpoint /x is truncated"))) as c:
        for _ in range(100):
            r = c.get("/health")
            if "failed" in r.json()["error"]["message"]:
                break
        assert r.status_code == 503 and "truncated" in r.json()["error"]["message"]  # /health's own shape
        e = err(c.post("/v1/completions", json={"prompt": "the"}), 503)
        assert "truncated" in e["message"]


def test_model_failure_mid_generation(tiny_loaded):
    failing = SlowModel(tiny_loaded.model, fail_after=3)
    with TestClient(make_app(with_model(tiny_loaded, failing))) as c:
        wait_ready(c)
        r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 10, "stream": True, "ignore_eos": True})
        assert r.status_code == 200
        evs = events(r.text)
        assert "error" in evs[-1] and "injected failure" in evs[-1]["error"]["message"]
        assert len(evs) >= 2  # some tokens made it out before the failure
        failing.fail_after = failing.forwards  # fail at the next forward
        e = err(c.post("/v1/completions", json={"prompt": "the", "max_tokens": 3}), 500)
        assert e["type"] == "server_error"
        failing.fail_after = None  # the server keeps serving
        r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 3})
        assert r.status_code == 200 and c.get("/health").status_code == 200
        assert 'thawed_request_errors_total{model_name="tiny"} 2.0' in c.get("/metrics").text


def test_request_body_too_large(tiny_loaded):
    with TestClient(make_app(tiny_loaded, max_request_bytes=2048)) as c:
        wait_ready(c)
        big = {"prompt": "the " * 2000, "max_tokens": 1}
        e = err(c.post("/v1/completions", json=big), 413)
        assert "THAWED_MAX_REQUEST_BYTES" in e["message"]

        def chunks():  # no Content-Length: counted while reading
            yield b'{"prompt": "'
            for _ in range(100):
                yield b"the " * 10
            yield b'"}'

        err(c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
        assert c.post("/v1/completions", json={"prompt": "the", "max_tokens": 1}).status_code == 200


def test_extreme_sampling_values_found_by_the_fuzzer(client):
    """temperature 1e-300 (logits overflow), top_p 5e-324 (below float32), repetition penalty out
    of [0.01, 100]: greedy / top token / 400, never a 500."""
    base = {"prompt": "the", "max_tokens": 3, "ignore_eos": True}
    greedy = client.post("/v1/completions", json=base | {"temperature": 0}).json()["choices"][0]["text"]
    for extra in ({"temperature": 1e-300}, {"temperature": 1.0, "top_p": 5e-324}):
        r = client.post("/v1/completions", json=base | extra)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy
    err(client.post("/v1/completions", json=base | {"repetition_penalty": 1e-300}), 400, "repetition_penalty")
    err(client.post("/generate", json={"inputs": "the", "parameters": {"repetition_penalty": 1e6}}), 400,
        "parameters.repetition_penalty")

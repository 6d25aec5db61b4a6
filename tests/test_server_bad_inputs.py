"""A bad-input suite over every route: each case gets its 4xx in the OpenAI envelope (never a 5xx,
never a silent 200 for a parameter that cannot have its effect), and the server keeps serving."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_fixtures import make_app, tiny_chat_ckpt, tiny_loaded, wait_ready  # noqa: F401

M = [{"role": "user", "content": "the"}]
C, CH, TOK, DETOK, GEN, GENS, ROOT = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                                      "/generate", "/generate_stream", "/")
HUGE = 2**200

# (method, path, json body or raw bytes, status)
CASES = [
    # ---- /v1/completions: types, ranges, non-finite numbers, unsupported parameters
    ("post", C, {}, 400),
    ("post", C, {"prompt": None}, 400),
    ("post", C, {"prompt": 5}, 400),
    ("post", C, {"prompt": {"a": 1}}, 400),
    ("post", C, {"prompt": [1.5, 2]}, 400),
    ("post", C, {"prompt": [[1], "x"]}, 400),
    ("post", C, {"prompt": [HUGE]}, 400),
    ("post", C, {"prompt": [-1]}, 400),
    ("post", C, {"prompt": ""}, 400),
    ("post", C, {"prompt": [[]]}, 400),
    ("post", C, {"prompt": "the", "max_tokens": -1}, 400),
    ("post", C, {"prompt": "the", "max_tokens": HUGE}, 400),
    ("post", C, {"prompt": "the", "max_tokens": 1.5}, 400),
    ("post", C, {"prompt": "the", "max_tokens": True}, 200),  # JSON true is 1 for pydantic's lax int
    ("post", C, {"prompt": "the", "temperature": -0.1}, 400),
    ("post", C, {"prompt": "the", "temperature": "hot"}, 400),
    ("post", C, {"prompt": "the", "temperature": "Infinity"}, 400),
    ("post", C, {"prompt": "the", "temperature": "-inf"}, 400),
    ("post", C, {"prompt": "the", "top_p": 0}, 400),
    ("post", C, {"prompt": "the", "top_p": 1.01}, 400),
    ("post", C, {"prompt": "the", "top_p": "nan"}, 400),
    ("post", C, {"prompt": "the", "top_k": -2}, 400),
    ("post", C, {"prompt": "the", "top_k": 2**63}, 400),
    ("post", C, {"prompt": "the", "top_k": 10**6}, 400),
    ("post", C, {"prompt": "the", "min_p": -0.1}, 400),
    ("post", C, {"prompt": "the", "n": 0}, 400),
    ("post", C, {"prompt": "the", "n": 10**9}, 400),
    ("post", C, {"prompt": "the", "seed": -1}, 400),
    ("post", C, {"prompt": "the", "seed": 2**63}, 400),
    ("post", C, {"prompt": "hi", "n": 2, "seed": 18446744073709551615, "temperature": 1}, 400),
    ("post", C, {"prompt": "the", "seed": "abc"}, 400),
    ("post", C, {"prompt": "the", "logprobs": 21}, 400),
    ("post", C, {"prompt": "the", "stop": 3}, 400),
    ("post", C, {"prompt": "the", "stop": ["a"] * 17}, 400),
    ("post", C, {"prompt": "the", "stream": "maybe"}, 400),
    ("post", C, {"prompt": "the", "stream_options": {"include_usage": True}}, 400),
    ("post", C, {"prompt": "the", "stream": True, "stream_options": {"include_usage": "x"}}, 400),
    ("post", C, {"prompt": "the", "repetition_penalty": 0}, 400),
    ("post", C, {"prompt": "the", "repetition_penalty": 1e9}, 400),
    ("post", C, {"prompt": "the", "frequency_penalty": -2.01}, 400),
    ("post", C, {"prompt": "the", "frequency_penalty": "NaN"}, 400),
    ("post", C, {"prompt": "the", "presence_penalty": 2.01}, 400),
    ("post", C, {"prompt": "the", "logit_bias": {"1": 100.5}}, 400),
    ("post", C, {"prompt": "the", "logit_bias": {"-1": 1}}, 400),
    ("post", C, {"prompt": "the", "logit_bias": {"x": 1}}, 400),
    ("post", C, {"prompt": "the", "logit_bias": {"1": "Infinity"}}, 400),
    ("post", C, {"prompt": "the", "logit_bias": [1, 2]}, 400),
    ("post", C, {"prompt": "the", "logit_bias": {str(i): 1 for i in range(1025)}}, 400),
    ("post", C, {"prompt": "the", "best_of": 2}, 400),
    ("post", C, {"prompt": "the", "suffix": "x"}, 400),
    ("post", C, {"prompt": "the", "echo": 2}, 400),
    ("post", C, {"prompt": "the", "use_beam_search": True}, 400),
    ("post", C, {"prompt": "the", "min_tokens": 3}, 400),
    ("post", C, {"prompt": "the", "stop_token_ids": [1]}, 400),
    ("post", C, {"prompt": "the", "guided_regex": "a+"}, 400),
    ("post", C, {"prompt": "the", "prompt_logprobs": 1}, 400),
    ("post", C, {"prompt": "the", "truncate_prompt_tokens": 5}, 400),
    ("post", C, {"prompt": [[1]] * 1100, "max_tokens": 1}, 400),
    ("post", C, b'{"prompt": "\\ud800 hi"}', 400),
    ("post", C, b'{"prompt": "the", "temperature": NaN}', 400),
    ("post", C, b'{"prompt": "the",}', 400),
    ("post", C, b'\xff\xfe{"prompt": 1}', 400),
    ("post", C, b"[]", 400),
    ("post", C, b"null", 400),
    ("post", C, b'"just a string"', 400),
    # ---- /v1/chat/completions
    ("post", CH, {}, 400),
    ("post", CH, {"messages": []}, 400),
    ("post", CH, {"messages": "hi"}, 400),
    ("post", CH, {"messages": [{"content": "hi"}]}, 400),
    ("post", CH, {"messages": [{"role": "user", "content": 5}]}, 400),
    ("post", CH, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("post", CH, {"messages": M, "max_tokens": 0}, 400),
    ("post", CH, {"messages": M, "max_completion_tokens": 10**6}, 400),
    ("post", CH, {"messages": M, "top_logprobs": 3}, 400),
    ("post", CH, {"messages": M, "logprobs": True, "top_logprobs": 21}, 400),
    ("post", CH, {"messages": M, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ("post", CH, {"messages": M, "tool_choice": {"type": "function"}}, 400),
    ("post", CH, {"messages": M, "response_format": {"type": "json_schema"}}, 400),
    ("post", CH, {"messages": M, "functions": [{"name": "f"}]}, 400),
    ("post", CH, {"messages": M, "function_call": {"name": "f"}}, 400),
    ("post", CH, {"messages": M, "modalities": ["text", "audio"]}, 400),
    ("post", CH, {"messages": M, "audio": {"voice": "x"}}, 400),
    ("post", CH, {"messages": M, "prediction": {"type": "content", "content": "x"}}, 400),
    ("post", CH, {"messages": M, "reasoning_effort": "high"}, 400),
    ("post", CH, {"messages": M, "n": 17}, 400),
    ("post", CH, {"messages": M, "seed": 2**64}, 400),
    ("post", CH, {"messages": M, "temperature": "Infinity"}, 400),
    ("post", CH, {"messages": M, "logit_bias": {"999999": 5}}, 400),
    ("post", CH, {"messages": M, "presence_penalty": 3}, 400),
    ("post", CH, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    ("post", CH, b'{"messages": [{"role": "\\ud800", "content": "x"}]}', 400),
    ("post", CH, {"messages": [{"role": "user", "content": "the " * 400}]}, 400),
    # ---- /tokenize, /detokenize
    ("post", TOK, {}, 400),
    ("post", TOK, {"prompt": "a", "messages": M}, 400),
    ("post", TOK, {"prompt": 3}, 400),
    ("post", TOK, {"messages": []}, 400),
    ("post", TOK, b'{"prompt": "\\ud800"}', 400),
    ("post", DETOK, {}, 400),
    ("post", DETOK, {"tokens": ["a"]}, 400),
    ("post", DETOK, {"tokens": [10**12]}, 400),
    ("post", DETOK, {"tokens": [-5]}, 400),
    ("post", DETOK, {"tokens": [1] * 5000}, 400),
    # ---- TGI: /generate, /generate_stream, /
    ("post", GEN, {}, 400),
    ("post", GEN, {"inputs": 5}, 400),
    ("post", GEN, {"inputs": ""}, 400),
    ("post", GEN, {"inputs": "the", "parameters": "x"}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"max_new_tokens": -1}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"max_new_tokens": 10**6}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"typical_p": 5}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"typical_p": 0}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"temperature": "Infinity"}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"top_k": 2**63}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"top_n_tokens": 50}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"best_of": 2}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"watermark": True}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"grammar": {"type": "regex", "value": "a"}}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"adapter_id": "lora"}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"seed": 2**64 - 1}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"stop": ["a"] * 17}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"truncate": 0}}, 400),
    ("post", GEN, {"inputs": "the", "parameters": {"frequency_penalty": 9}}, 400),
    ("post", GEN, b'{"inputs": "\\ud800"}', 400),
    ("post", GENS, {"inputs": "the", "parameters": {"grammar": {"type": "json", "value": {}}}}, 400),
    ("post", GENS, {"inputs": "the", "parameters": {"typical_p": 1.5}}, 400),
    ("post", GENS, {"parameters": {}}, 400),
    ("post", ROOT, {"inputs": "the", "parameters": {"watermark": True}}, 400),
    ("post", ROOT, {"inputs": None}, 400),
    ("post", ROOT, b"{", 400),
    # ---- every other route: wrong method or path
    ("get", C, None, 405),
    ("get", CH, None, 405),
    ("post", "/v1/models", {}, 405),
    ("delete", "/health", None, 405),
    ("put", "/metrics", None, 405),
    ("post", "/version", None, 405),
    ("post", "/info", None, 405),
    ("post", "/tokenizer_info", None, 405),
    ("post", "/v1/cache", None, 405),
    ("get", "/v1/embeddings", None, 404),
    ("get", "/v2/models", None, 404),
    ("get", "/%ff", None, 404),
]


@pytest.fixture(scope="module")
def client(tiny_loaded):
    with TestClient(make_app(tiny_loaded, served_model_name="tiny", max_model_len=256),
                    raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def test_the_suite_is_large_and_covers_every_route(client):
    assert len(CASES) >= 80
    spec = client.get("/openapi.json").json()
    covered = {path for _, path, _, _ in CASES}
    missing = [p for p in spec["paths"] if p not in covered and p not in ("/health", "/ping", "/metrics")]
    assert not missing, missing


@pytest.mark.parametrize("method,path,body,status", CASES,
                         ids=[f"{i}-{m}{p}" for i, (m, p, _, _) in enumerate(CASES)])
def test_bad_input(client, method, path, body, status):
    kwargs = {}
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    r = client.request(method.upper(), path, **kwargs)
    assert r.status_code < 500, r.text
    assert r.status_code == status, r.text[:500]
    if status >= 400:
        e = r.json()["error"]
        assert e["code"] == status and e["message"] and e["type"]


def test_server_still_serves_after_the_suite(client):
    assert client.get("/health").status_code == 200
    r = client.post(C, json={"prompt": "the", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert 'thawed_request_errors_total{model_name="tiny"} 0.0' in client.get("/metrics").text

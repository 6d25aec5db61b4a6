"""Server shapes with FastAPI's TestClient on the tiny model: every route, echo + logprobs as
lm-eval reads them, n / stop / seed, streaming framing, TGI shapes, metrics, cache, loading."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from server_fixtures import direct_logprob, greedy_reference, make_app, tiny_chat_ckpt, tiny_loaded, wait_ready  # noqa: F401


@pytest.fixture(scope="module")
def client(tiny_loaded):
    with TestClient(make_app(tiny_loaded, served_model_name="tiny")) as c:
        wait_ready(c)
        yield c


def events(text: str, done: bool = True) -> list:
    """Parse an SSE body: every event is `data: <json>` and the last is `data: [DONE]` (OpenAI
    routes; ``done=False``: TGI's /generate_stream, which has none)."""
    if done:
        assert text.endswith("data: [DONE]\n\n"), text[-200:]
    else:
        assert "[DONE]" not in text, text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    out = []
    for block in blocks[:-2] if done else blocks[:-1]:
        assert block.startswith("data: "), block
        out.append(json.loads(block[len("data: "):]))
    return out


def test_health_loading_then_ready(tiny_loaded):
    gate = threading.Event()
    with TestClient(make_app(tiny_loaded, gate=gate)) as c:
        r = c.get("/health")
        assert r.status_code == 503
        assert r.json() == {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
        r = c.post("/v1/completions", json={"prompt": "the"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["message"] == "Loading model"
        assert c.get("/version").status_code == 200  # no model needed
        gate.set()
        wait_ready(c)
        assert c.get("/health").json() == {"status": "ok"}


def test_models_and_version(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    (m,) = body["data"]
    assert m["id"] == "tiny" and m["object"] == "model" and m["owned_by"] == "thawed"
    assert m["max_model_len"] == 256 and isinstance(m["created"], int)
    assert isinstance(client.get("/version").json()["version"], str)


def test_completion_shape_and_greedy_equals_model(client, tiny_loaded):
    ids = client.post("/tokenize", json={"prompt": "the capital of france"}).json()["tokens"]
    r = client.post("/v1/completions", json={"model": "anything", "prompt": ids, "max_tokens": 6,
                                             "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}
    want = greedy_reference(tiny_loaded.model, ids, 6)
    tok = tiny_loaded.tokenizer
    full = tok.decode(ids + want, skip_special_tokens=True)
    assert choice["text"] == full[len(tok.decode(ids, skip_special_tokens=True)):]


def test_echo_logprobs_as_lm_eval_reads_them(client, tiny_loaded):
    ctx = client.post("/tokenize", json={"prompt": "the capital of", "add_special_tokens": False}).json()["tokens"]
    cont = client.post("/tokenize", json={"prompt": "france is paris", "add_special_tokens": False}).json()["tokens"]
    prompts = [ctx + cont, cont + ctx]
    r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                                             "echo": True, "seed": 1234})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for c, p in zip(choices, prompts):
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(p) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
        assert len(lp["text_offset"]) == len(p) + 1
        for tok_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert len(top) == 1 and max(top.values()) >= tok_lp - 1e-6
        # the generated (greedy) token is the top alternative: lm-eval's is_greedy check
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    got = sum(choices[0]["logprobs"]["token_logprobs"][len(ctx):-1])
    want = direct_logprob(tiny_loaded.model, ctx, cont)
    assert abs(got - want) < 1e-3, (got, want)


def test_echo_max_tokens_zero_scores_prompt_only(client):
    r = client.post("/v1/completions", json={"prompt": [[1, 5, 9, 3], [1, 4]], "max_tokens": 0, "echo": True,
                                             "logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    for c, n in zip(body["choices"], (4, 2)):
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == n and lp["token_logprobs"][0] is None
        assert all(len(t) == 3 for t in lp["top_logprobs"][1:])
        assert c["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == 6


def test_n_seed_and_index_order(client):
    req = {"prompt": ["the of", "city river"], "n": 3, "max_tokens": 5, "temperature": 1.0, "top_p": 0.9,
           "top_k": 20, "seed": 7, "ignore_eos": True}
    a = client.post("/v1/completions", json=req).json()
    b = client.post("/v1/completions", json=req).json()
    assert [c["index"] for c in a["choices"]] == list(range(6))
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # reproducible per request
    assert len({c["text"] for c in a["choices"][:3]}) > 1, "the n choices of one prompt should differ"
    c = client.post("/v1/completions", json=req | {"seed": 8}).json()
    assert [x["text"] for x in c["choices"]] != [x["text"] for x in a["choices"]]


def test_stop_string_truncates_and_streams_identically(client):
    base = {"prompt": "the", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    words = full.split()
    stop = words[3]
    cut = full[:full.index(" " + stop)] if (" " + stop) in full else full[:full.index(stop)]
    r = client.post("/v1/completions", json=base | {"stop": [" " + stop, "zzz"]}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["text"] == cut
    s = client.post("/v1/completions", json=base | {"stop": " " + stop, "stream": True})
    evs = events(s.text)
    assert "".join(e["choices"][0]["text"] for e in evs) == cut
    assert evs[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(" " + stop not in e["choices"][0]["text"] for e in evs)


def test_completion_stream_framing_and_usage(client):
    r = client.post("/v1/completions", json={"prompt": "the of", "max_tokens": 8, "temperature": 0, "stream": True,
                                             "stream_options": {"include_usage": True}, "ignore_eos": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    evs = events(r.text)
    assert all(e["object"] == "text_completion" for e in evs)
    *chunks, usage = evs
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    non_stream = client.post("/v1/completions", json={"prompt": "the of", "max_tokens": 8, "temperature": 0,
                                                      "ignore_eos": True}).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == non_stream["choices"][0]["text"]


def test_completion_stream_echo_and_logprobs(client):
    r = client.post("/v1/completions", json={"prompt": "the of", "max_tokens": 2, "temperature": 0, "stream": True,
                                             "echo": True, "logprobs": 2, "ignore_eos": True})
    evs = events(r.text)
    first = evs[0]["choices"][0]
    assert first["text"] == "the of" and first["logprobs"]["token_logprobs"][0] is None
    toks = [e for e in evs if e["choices"][0]["logprobs"]]
    assert len(toks) == 3  # the echoed prompt, then one chunk per new token
    assert all(len(t["choices"][0]["logprobs"]["top_logprobs"][0]) == 2 for t in toks[1:])


def test_chat_completion_and_stream(client, tiny_loaded):
    msgs = [{"role": "system", "content": "the model"}, {"role": "user", "content": [{"type": "text", "text": "paris"}]}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 5, "temperature": 0,
                                                  "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (c,) = body["choices"]
    assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
    entries = c["logprobs"]["content"]
    assert 1 <= len(entries) <= 5
    assert set(entries[0]) == {"token", "logprob", "bytes", "top_logprobs"} and len(entries[0]["top_logprobs"]) == 2
    prompt_ids = client.post("/tokenize", json={"messages": msgs}).json()["tokens"]
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    s = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 5, "temperature": 0, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    evs = events(s.text)
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in evs)
    finals = [e for e in evs if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and evs[-1]["choices"] == [] and evs[-1]["usage"]["prompt_tokens"] == len(prompt_ids)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in evs if e["choices"])
    assert text == c["message"]["content"]


def test_tokenize_detokenize_tokenizer_info(client, tiny_loaded):
    tok = tiny_loaded.tokenizer
    r = client.post("/tokenize", json={"prompt": "the city", "add_special_tokens": False}).json()
    assert r["tokens"] == tok("the city", add_special_tokens=False)["input_ids"]
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "the city"}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "paris"}]}).json()
    assert chat["count"] > 2
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and "tokenizer_class" in info
    assert "messages" in info["chat_template"]


def test_tgi_generate_stream_and_info(client):
    r = client.post("/generate", json={"inputs": "the of", "parameters": {"max_new_tokens": 4, "details": True,
                                                                           "decoder_input_details": True,
                                                                           "top_n_tokens": 2}})
    assert r.status_code == 200, r.text
    body = r.json()
    d = body["details"]
    assert d["finish_reason"] in ("length", "eos_token") and d["generated_tokens"] == len(d["tokens"])
    assert [t["logprob"] for t in d["prefill"]][0] is None and len(d["prefill"]) == 2
    assert set(d["tokens"][0]) == {"id", "text", "logprob", "special"} and len(d["top_tokens"][0]) == 2
    assert "".join(t["text"] for t in d["tokens"]) == body["generated_text"]
    s = client.post("/generate_stream", json={"inputs": "the of", "parameters": {"max_new_tokens": 4, "details": True}})
    evs = events(s.text, done=False)  # TGI frames no [DONE] on /generate_stream
    assert all(e["generated_text"] is None for e in evs[:-1])
    assert evs[-1]["generated_text"] == body["generated_text"] and evs[-1]["details"]["generated_tokens"] == len(evs)
    compat = client.post("/", json={"inputs": "the of", "parameters": {"max_new_tokens": 4}}).json()
    assert compat == [{"generated_text": body["generated_text"]}]
    full = client.post("/generate", json={"inputs": "the of", "parameters": {"max_new_tokens": 4,
                                                                              "return_full_text": True}}).json()
    assert full["generated_text"] == "the of" + body["generated_text"]
    info = client.get("/info").json()
    assert info["model_id"] == "tiny" and info["max_total_tokens"] == 256 and info["model_device_type"] == "cpu"


def test_tgi_stop_sequence_kept_in_text(client):
    base = {"inputs": "the", "parameters": {"max_new_tokens": 20}}
    text = client.post("/generate", json=base).json()["generated_text"]
    words = text.split()
    if len(words) < 3:
        pytest.skip("the tiny model ended early")
    stop = " " + words[2]
    r = client.post("/generate", json={"inputs": "the", "parameters": {"max_new_tokens": 20, "stop": [stop],
                                                                         "details": True}}).json()
    assert r["generated_text"].endswith(stop) and r["details"]["finish_reason"] == "stop_sequence"


def test_metrics_and_cache(client):
    client.post("/v1/completions", json={"prompt": "the", "max_tokens": 2})
    text = client.get("/metrics").text
    for name in ("thawed_num_requests_running", "thawed_num_requests_waiting", "thawed_prompt_tokens_total",
                 "thawed_generation_tokens_total", "thawed_request_success_total",
                 "thawed_time_to_first_token_seconds_bucket", "thawed_inter_token_latency_seconds_bucket",
                 "thawed_e2e_request_latency_seconds_bucket", "thawed_cache_hits_total", "thawed_cache_misses_total",
                 "thawed_cache_evictions_total", "thawed_cache_bytes",
                 'thawed_layer_decode_seconds_total{codec="rtn",device="cpu",model_name="tiny"}',
                 "thawed_model_load_seconds", "thawed_request_prompt_tokens_bucket",
                 "thawed_request_generation_tokens_bucket", "thawed_request_prefill_time_seconds_bucket",
                 "thawed_request_decode_time_seconds_bucket", "process_resident_memory_bytes",
                 "python_gc_collections_total"):
        assert name in text, name
    # every thawed_ series carries the model name (as vLLM's do); the process ones do not
    thawed = [line for line in text.splitlines() if line.startswith("thawed_")]
    assert thawed and all('model_name="tiny"' in line for line in thawed), [x for x in thawed if "model_name" not in x]
    assert 'thawed_request_generation_tokens_count{model_name="tiny"} ' in text
    assert ":" not in "".join(line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#"))
    cache = client.get("/v1/cache").json()
    assert cache["lazy"] is True and cache["decoded_layers"] >= 1 and cache["misses"] >= 1
    assert set(cache) >= {"bytes_used", "budget_bytes", "hits", "misses", "evictions", "decode_seconds"}
    assert cache["decode_seconds"]["rtn"] > 0


def test_openapi_schema_is_served(client):
    spec = client.get("/openapi.json").json()
    assert "/v1/completions" in spec["paths"] and "/generate" in spec["paths"]


def test_sampling_reproduces_runtime_generate_tokens(client, tiny_loaded):
    """seed=7 through the server gives the tokens runtime.generate_tokens gives with seed=7."""
    from thawed.runtime.generate import SamplingParams, generate_tokens

    ids = [1, 5, 9]
    p = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=10, seed=7, ignore_eos=True)
    want = [s.token for s in generate_tokens(tiny_loaded.model, ids, p)]
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0.8, "top_p": 0.9,
                                             "top_k": 10, "seed": 7, "ignore_eos": True, "logprobs": 0}).json()
    got = r["choices"][0]["logprobs"]["tokens"]
    assert got == [tiny_loaded.tokenizer.decode([t]) for t in want]
    assert torch.get_num_threads() >= 1

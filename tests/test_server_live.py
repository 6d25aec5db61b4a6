"""A real uvicorn on 127.0.0.1 with real clients, tiny model: incremental SSE delivery,
disconnect cancellation (stream and not) within one token, queue full -> 429 + Retry-After,
the openai SDK (completions, chat, both streaming, models.list) and huggingface_hub's
InferenceClient (chat_completion streaming, text_generation with details, streaming)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from server_fixtures import LiveServer, SlowModel, make_app, tiny_chat_ckpt, tiny_loaded, with_model  # noqa: F401

DELAY = 0.05  # seconds per forward of the slowed model


def metric(url: str, name: str) -> float:
    """The value of ``name`` (``thawed_x`` or ``thawed_x{label="v"}``: those labels among others,
    such as the model_name every series carries)."""
    base, _, labels = name.partition("{")
    want = [f"{kv}" for kv in labels.rstrip("}").split(",") if kv]
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] == base and all(kv in head for kv in want):
            return float(value)
    return 0.0


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def live(tiny_loaded):
    with LiveServer(make_app(tiny_loaded, served_model_name="tiny")) as url:
        yield url


@pytest.fixture()
def slow(tiny_loaded):
    model = SlowModel(tiny_loaded.model, delay=DELAY)
    with LiveServer(make_app(with_model(tiny_loaded, model), max_running=1, max_queue=1)) as url:
        yield url, model


def test_stream_arrives_incrementally(slow):
    url, _ = slow
    n = 20
    t0 = time.monotonic()
    arrivals = []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json={"prompt": "the", "max_tokens": n, "stream": True, "ignore_eos": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append(time.monotonic() - t0)
    total = time.monotonic() - t0
    assert total >= n * DELAY
    assert arrivals[0] < total / 3, (arrivals[0], total)  # the first token long before the last


def test_stream_disconnect_cancels_within_one_token(slow):
    url, model = slow
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json={"prompt": "the", "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
            if got == 3:
                break
        at_close = model.forwards
    # leaving the block closed the connection: the worker must stop before its next token or so
    wait_for(lambda: metric(url, "thawed_num_requests_running") == 0, 5)
    after = model.forwards
    time.sleep(5 * DELAY)
    assert model.forwards == after, "generation went on after the request finished"
    assert after - at_close <= 2, (at_close, after)  # the token in flight, at most one more
    assert metric(url, "thawed_requests_cancelled_total") >= 1
    # the slot is free: with max_running=1 a new request runs at once
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "the", "max_tokens": 2}, timeout=10)
    assert r.status_code == 200 and time.monotonic() - t0 < 2


def test_non_stream_disconnect_cancels(slow):
    url, model = slow
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "the", "max_tokens": 200, "ignore_eos": True},
                   timeout=httpx.Timeout(10, read=0.5))
    at_close = model.forwards
    wait_for(lambda: metric(url, "thawed_num_requests_running") == 0, 5)
    assert model.forwards - at_close <= 2
    assert model.forwards < 50


def test_queue_full_answers_429_with_retry_after(slow):
    url, _ = slow

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"prompt": "the", "max_tokens": 15, "ignore_eos": True}
            first = asyncio.create_task(c.post("/v1/completions", json=body))  # runs (max_running=1)
            await asyncio.sleep(0.3)
            second = asyncio.create_task(c.post("/v1/completions", json=body))  # waits (max_queue=1)
            await asyncio.sleep(0.3)
            third = await c.post("/v1/completions", json=body)  # refused
            return await first, await second, third

    first, second, third = asyncio.run(run())
    assert first.status_code == 200 and second.status_code == 200
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    e = third.json()["error"]
    assert e["type"] == "rate_limit_error" and e["code"] == 429 and "max_queue" in e["message"]
    assert metric(url, 'thawed_requests_rejected_total{reason="queue_full"}') >= 1


def test_openai_sdk(live):
    from openai import OpenAI

    client = OpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    c = client.completions.create(model="tiny", prompt="the capital of", max_tokens=5, temperature=0, logprobs=2)
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage.prompt_tokens >= 3
    assert len(c.choices[0].logprobs.top_logprobs[0]) == 2
    chunks = list(client.completions.create(model="tiny", prompt="the capital of", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
    assert chunks[-1].usage.completion_tokens == c.usage.completion_tokens
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "paris"}],
                                          max_tokens=6, temperature=0, seed=3)
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "paris"}],
                                            max_tokens=6, temperature=0, stream=True)
    parts = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(parts) == chat.choices[0].message.content


def test_openai_sdk_error_types(live):
    import openai

    client = openai.OpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="the", max_tokens=100_000)
    assert "max_tokens" in str(info.value)


def test_huggingface_inference_client(live):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=live)
    out = client.text_generation("the capital of", max_new_tokens=5, details=True, decoder_input_details=True)
    assert out.details.generated_tokens == len(out.details.tokens) >= 1
    assert out.details.finish_reason in ("length", "eos_token", "stop_sequence")
    assert "".join(t.text for t in out.details.tokens) == out.generated_text
    assert out.details.prefill[0].logprob is None
    plain = client.text_generation("the capital of", max_new_tokens=5)
    assert plain == out.generated_text
    streamed = "".join(client.text_generation("the capital of", max_new_tokens=5, stream=True))
    assert streamed == out.generated_text
    parts = []
    for chunk in client.chat_completion(messages=[{"role": "user", "content": "paris"}], max_tokens=6,
                                        temperature=0, stream=True):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
    whole = client.chat_completion(messages=[{"role": "user", "content": "paris"}], max_tokens=6, temperature=0)
    assert "".join(parts) == whole.choices[0].message.content


def test_bad_requests_never_break_the_live_server(live):
    for payload in (b"\x00\xff", b"[]", b"{}", json.dumps({"prompt": [[1, 2], "x"]}).encode(),
                    json.dumps({"prompt": "the", "max_tokens": 2**40}).encode(),
                    json.dumps({"prompt": "the", "temperature": 1e308, "max_tokens": 2}).encode(),
                    json.dumps({"prompt": "the", "seed": -1, "temperature": 1, "max_tokens": 2}).encode(),
                    json.dumps({"prompt": "the", "seed": 2**70, "temperature": 1, "max_tokens": 2}).encode(),
                    b'{"prompt": "the", "temperature": Infinity, "max_tokens": 2}',
                    b'{"prompt": "the", "temperature": NaN, "top_p": NaN, "max_tokens": 2}',
                    json.dumps({"prompt": [[1]] * 2000, "max_tokens": 1}).encode(),
                    json.dumps({"prompt": "the", "stop": ["x" * 10_000], "max_tokens": 2}).encode(),
                    json.dumps({"messages": [{"role": "user", "content": None}]}).encode()):
        r = httpx.post(f"{live}/v1/completions", content=payload, headers={"content-type": "application/json"})
        assert r.status_code in (200, 400), (payload, r.status_code, r.text)
        assert "error" in r.json() or "choices" in r.json()
    assert httpx.get(f"{live}/health").status_code == 200


def test_batched_decoding_matches_each_request_alone(tiny_loaded):
    """Ragged continuous batching: requests of different prompt lengths and lengths, arriving at
    different times, decode together and give the tokens and logprobs each gives alone."""
    model = SlowModel(tiny_loaded.model, delay=0.01)
    prompts = [[1, 5], [1, 4, 9, 3, 17], [1, 22, 8, 11, 2, 6, 30, 7, 12], [1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 9]]
    lengths = [12, 4, 20, 9]

    async def run(url: str, stagger: float):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def one(i):
                await asyncio.sleep(stagger * i)
                r = await c.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": lengths[i],
                                                          "temperature": 0, "ignore_eos": True, "logprobs": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["logprobs"]
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    with LiveServer(make_app(with_model(tiny_loaded, model), batching=False)) as url:
        alone = asyncio.run(run(url, 0.0))
    with LiveServer(make_app(with_model(tiny_loaded, model))) as url:
        together = asyncio.run(run(url, 0.03))
        rows = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
                if line.startswith("thawed_decode_batch_rows_bucket")]
    single = float(next(r for r in rows if 'le="1.0"' in r).rsplit(" ", 1)[1])
    total = float(next(r for r in rows if 'le="+Inf"' in r).rsplit(" ", 1)[1])
    assert total - single > 5, "the requests were not decoded together"
    for a, b in zip(alone, together):
        assert a["tokens"] == b["tokens"]
        for x, y in zip(a["token_logprobs"], b["token_logprobs"]):
            assert abs(x - y) < 1e-4


def test_lm_eval_local_completions_tiny(live, tiny_loaded):
    """lm-eval's own model class, remote tokenizer: loglikelihood equals direct scoring (1e-3)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from server_fixtures import direct_logprob

    lm = LocalCompletionsAPI(base_url=f"{live}/v1/completions", model="tiny", num_concurrent=1, max_retries=1,
                             max_length=256, batch_size=2)
    assert lm.tokenizer_backend == "remote"
    pairs = [("the capital of", " france"), ("paris is the", " capital city"), ("the king", " and the queen")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (lp, _) in zip(pairs, got):
        ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        assert abs(lp - direct_logprob(tiny_loaded.model, ctx_ids, cont_ids)) < 1e-3
    (text,) = lm.generate_until([Instance("generate_until", {}, ("the capital of", {"until": ["city"],
                                                                                   "max_gen_toks": 8}), 0)])
    assert isinstance(text, str) and "city" not in text


def test_load_script_overload_is_429_never_5xx(tiny_chat_ckpt, capsys):
    """benchmarks/load.py end to end, small: more clients than slots + queue on the tiny model."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "load.py"
    spec = importlib.util.spec_from_file_location("thawed_load_benchmark", path)
    load = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = load  # its dataclasses look their module up
    spec.loader.exec_module(load)
    rc = load.main([str(tiny_chat_ckpt), "--clients", "6", "--seconds", "3", "--max-running", "2",
                    "--max-queue", "1", "--max-tokens", "8", "--max-rss-mib", "2048"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report
    assert report["5xx"] == 0 and report["malformed"] == 0 and report["429"] > 0
    assert report["statuses"]["200"] >= 2 and report["rss_mib"]["peak"] > 0

"""The real clients against a real uvicorn serving the real SmolLM2 checkpoint (rtn 8-bit):
the openai SDK (streamed chat answer), huggingface_hub's InferenceClient (chat_completion
streaming, text_generation with details), and lm-eval's own LocalCompletionsAPI model class
(loglikelihood equal to scoring the model directly within 1e-3; generate_until)."""

from __future__ import annotations

import time

import pytest
from server_fixtures import LiveServer, direct_logprob, make_app, real_ckpt_dir, real_model_dir  # noqa: F401

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real_loaded(real_ckpt_dir):
    from thawed.runtime.loading import load_for_inference
    from thawed.runtime.model import RuntimeConfig

    loaded = load_for_inference(real_ckpt_dir, RuntimeConfig(device="cpu"))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def real_live(real_loaded):
    with LiveServer(make_app(real_loaded, served_model_name="smollm2")) as url:
        yield url


def test_openai_sdk_streamed_chat_answer(real_live):
    from openai import OpenAI

    client = OpenAI(base_url=f"{real_live}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    t0 = time.perf_counter()
    first = None
    parts, finish = [], None
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices:
            if chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                parts.append(chunk.choices[0].delta.content)
            finish = chunk.choices[0].finish_reason or finish
    answer = "".join(parts)
    print(f"\nstreamed answer ({len(parts)} chunks, first after {first - t0:.2f} s): {answer!r}")
    assert "Paris" in answer and finish in ("stop", "length") and usage.completion_tokens >= len(parts)
    completion = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5,
                                           temperature=0)
    assert "Paris" in completion.choices[0].text


def test_huggingface_inference_client(real_live):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=real_live)
    parts = []
    for chunk in client.chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                        max_tokens=30, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "Paris" in "".join(parts)
    out = client.text_generation("The capital of France is", max_new_tokens=6, details=True)
    assert "Paris" in out.generated_text
    assert out.details.generated_tokens == len(out.details.tokens) == 6
    assert out.details.finish_reason == "length"
    assert all(t.logprob <= 0 for t in out.details.tokens)


def test_lm_eval_local_completions(real_live, real_loaded):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=f"{real_live}/v1/completions", model="smollm2", tokenizer_backend="auto",
                             num_concurrent=1, max_retries=1, max_length=2048)
    assert lm.tokenizer_backend == "remote"  # /tokenizer_info + /tokenize: no local tokenizer needed
    pairs = [("The capital of France is", " Paris"), ("The capital of France is", " London"),
             ("2 + 2 =", " 4"), ("The quick brown fox jumps over the", " lazy dog.")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    assert len(got) == len(pairs)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        want = direct_logprob(real_loaded.model, ctx_ids, cont_ids)
        assert abs(lp - want) < 1e-3, (ctx, cont, lp, want)
    assert got[0][0] > got[1][0]  # Paris is likelier than London
    assert got[0][1] is True  # and the greedy continuation
    gens = lm.generate_until([Instance("generate_until", {}, ("The capital of France is",
                                                              {"until": ["."], "max_gen_toks": 12}), 0)])
    assert len(gens) == 1 and "Paris" in gens[0] and "." not in gens[0]

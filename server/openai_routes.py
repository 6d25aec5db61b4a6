"""OpenAI-compatible routes (and vLLM's tokenizer routes): shapes copied from OpenAI / vLLM.

``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/tokenize``, ``/detokenize``,
``/tokenizer_info``. Streams are Server-Sent Events (``data: <json>\\n\\n`` ... ``data: [DONE]``).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from thawed.runtime.generate import SamplingParams

from .app import ServerState, ready_state
from .engine import (ClientGone, EngineClosed, Failed, Finished, Job, PromptScores, QueueFull, SeqSpec,
                     TokenEvent, job_events)
from .errors import APIError, bad_request, envelope
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest, TokenizeRequest

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
NEG_INF = -9999.0  # JSON has no -inf
MAX_SEQS = 1024  # prompts x n in one request


# ---- shared helpers (the TGI routes use them too) ------------------------------------------------
def num(x: float) -> float:
    return x if math.isfinite(x) else NEG_INF


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def check_model(st: ServerState, name: str | None) -> None:
    if st.settings.strict_model_name and name not in (None, st.model_name):
        raise APIError(404, f"model {name!r} is not served here; use {st.model_name!r} (see /v1/models)",
                       param="model", type="not_found_error")


def check_ids(st: ServerState, ids: Sequence[int], field: str) -> None:
    for t in ids:
        if not 0 <= t < st.vocab_size:
            raise bad_request(f"{field}: token id {t} is outside the vocabulary [0, {st.vocab_size})", field)


def check_length(st: ServerState, prompt_len: int, max_tokens: int, *, field_tokens: str = "max_tokens",
                 field_prompt: str = "prompt") -> None:
    if prompt_len == 0:
        raise bad_request(f"{field_prompt}: the prompt is empty; give at least one token", field_prompt)
    if prompt_len > st.max_model_len:
        raise bad_request(f"{field_prompt}: the prompt has {prompt_len} tokens but this model's context is "
                          f"{st.max_model_len} tokens; shorten it", field_prompt)
    if prompt_len + max_tokens > st.max_model_len:
        raise bad_request(f"{field_tokens}: {max_tokens} new tokens + {prompt_len} prompt tokens exceed the "
                          f"context of {st.max_model_len} tokens; ask for at most "
                          f"{st.max_model_len - prompt_len}", field_tokens)


def normalize_stop(stop: str | list[str] | None, field: str = "stop") -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 16:
        raise bad_request(f"{field}: at most 16 stop strings, got {len(items)}", field)
    return tuple(s for s in items if s)


def sampling(max_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None,
             seed: int | None, repetition_penalty: float | None, ignore_eos: bool | None,
             default_temperature: float = 1.0) -> SamplingParams:
    # runtime.next_token treats temperatures below 1e-5 as greedy and always keeps the top token
    # under top_p (both found by the schema fuzzer here)
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=default_temperature if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        top_k=0 if top_k is None or top_k < 0 else int(top_k),
        seed=seed,
        repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
        ignore_eos=bool(ignore_eos),
    )


def with_seed(params: SamplingParams, j: int) -> SamplingParams:
    """Choice ``j`` of ``n`` samples with ``seed + j``: reproducible per request, not identical."""
    if params.seed is None or j == 0:
        return params
    from dataclasses import replace

    return replace(params, seed=params.seed + j)


def submit(st: ServerState, seqs: list[SeqSpec]) -> Job:
    job = Job(seqs)
    try:
        st.engine.submit(job)
    except QueueFull as exc:
        raise APIError(429, f"the server is busy: {exc}; retry after a second", retry_after=1) from None
    except EngineClosed as exc:
        raise APIError(503, f"{exc}; retry later", retry_after=5) from None
    return job


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def message_text(msg: ChatMessage, i: int) -> str:
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    parts = []
    for j, part in enumerate(msg.content):
        if part.type != "text":
            raise bad_request(f"messages.{i}.content.{j}.type: {part.type!r} parts are not supported; "
                              "send text parts only", f"messages.{i}.content.{j}.type")
        parts.append(part.text or "")
    return "\n".join(parts)


def chat_prompt(st: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    tok = st.tokenizer
    if not getattr(tok, "chat_template", None):
        raise bad_request("messages: this model's tokenizer has no chat template; use /v1/completions with a "
                          "plain prompt", "messages")
    convo = []
    for i, m in enumerate(messages):
        entry = {"role": m.role, "content": message_text(m, i)}
        if m.name:
            entry["name"] = m.name
        convo.append(entry)
    try:
        text = tok.apply_chat_template(convo, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:  # jinja raise_exception (e.g. roles out of order), bad content
        raise bad_request(f"messages: the chat template rejected these messages: {exc}", "messages") from None
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _collect(st: ServerState, job: Job, request: Request) -> dict[int, dict] | None:
    """Run a job to the end; per choice index: prompt scores, token events, finish event.
    None if the client went away."""
    out: dict[int, dict] = {s.index: {"prompt": None, "tokens": [], "finish": None} for s in job.seqs}
    try:
        async with aclosing(job_events(st.engine, job, request.receive)) as events:
            async for ev in events:
                if isinstance(ev, Failed):
                    raise APIError(500, ev.message)
                if isinstance(ev, PromptScores):
                    out[ev.index]["prompt"] = ev
                elif isinstance(ev, TokenEvent):
                    out[ev.index]["tokens"].append(ev)
                elif isinstance(ev, Finished):
                    out[ev.index]["finish"] = ev
    except ClientGone:
        return None
    return out


# ---- /v1/models, tokenizer routes ----------------------------------------------------------------
@router.get("/v1/models")
async def models(request: Request):
    st = ready_state(request)
    return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                        "owned_by": "thawed", "root": st.model_name,
                                        "max_model_len": st.max_model_len}]}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    st = ready_state(request)
    check_model(st, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("prompt: give exactly one of `prompt` or `messages`", "prompt")
    if body.messages is not None:
        if not body.messages:
            raise bad_request("messages: give at least one message", "messages")
        ids = chat_prompt(st, body.messages, body.add_generation_prompt is not False)
    else:
        ids = list(st.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False)["input_ids"])
    return {"count": len(ids), "max_model_len": st.max_model_len, "tokens": ids}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    st = ready_state(request)
    check_model(st, body.model)
    check_ids(st, body.tokens, "tokens")
    return {"prompt": st.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    st = ready_state(request)
    tok = st.tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "eos_token": tok.eos_token,
        "bos_token": tok.bos_token,
        "pad_token": tok.pad_token,
        "unk_token": getattr(tok, "unk_token", None),
        "chat_template": getattr(tok, "chat_template", None),
        "model_max_length": st.max_model_len,
        "vocab_size": st.vocab_size,
    }


# ---- /v1/completions -----------------------------------------------------------------------------
def _prompts(st: ServerState, prompt) -> tuple[list[list[int]], list[str]]:
    tok = st.tokenizer
    if isinstance(prompt, str):
        items: list = [prompt]
    elif not prompt:
        raise bad_request("prompt: the prompt is empty; give a string, a list of strings or token ids", "prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    ids_list, texts = [], []
    for item in items:
        if isinstance(item, str):
            ids = list(tok(item, add_special_tokens=True)["input_ids"])
            texts.append(item)
        else:
            ids = list(item)
            check_ids(st, ids, "prompt")
            texts.append(tok.decode(ids))
        ids_list.append(ids)
    return ids_list, texts


def _completion_logprobs(tok, choice: dict, prompt_ids: list[int], echo: bool, k: int, start: int = 0) -> dict:
    tokens, lps, tops = [], [], []
    if echo and choice["prompt"] is not None:
        ps: PromptScores = choice["prompt"]
        for t, lp, top in zip(prompt_ids, ps.logprobs, ps.top):
            tokens.append(token_text(tok, t))
            lps.append(None if lp is None else num(lp))
            if lp is None:
                tops.append(None)
            else:
                tops.append({token_text(tok, i): num(v) for i, v in top} if k else {tokens[-1]: num(lp)})
    for ev in choice["tokens"]:
        tokens.append(token_text(tok, ev.token))
        lps.append(num(ev.logprob))
        tops.append({token_text(tok, i): num(v) for i, v in ev.top} if k else {tokens[-1]: num(ev.logprob)})
    offsets, pos = [], start
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = ready_state(request)
    check_model(st, body.model)
    if body.suffix:
        raise bad_request("suffix: insertion (suffix) is not supported", "suffix")
    n = body.n or 1
    if n > st.settings.max_n:
        raise bad_request(f"n: at most {st.settings.max_n} choices per prompt, got {n}", "n")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    echo = bool(body.echo)
    prompts, texts = _prompts(st, body.prompt)
    for ids in prompts:
        check_length(st, len(ids), max_tokens)
    stop = normalize_stop(body.stop)
    params = sampling(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, body.repetition_penalty,
                      body.ignore_eos)
    k = body.logprobs
    if len(prompts) * n > MAX_SEQS:
        raise bad_request(f"prompt: {len(prompts)} prompts x n={n} is more than {MAX_SEQS} sequences in one "
                          "request; split it", "prompt")
    seqs = [SeqSpec(index=i * n + j, prompt_ids=tuple(ids), params=with_seed(params, j), stop=stop,
                    prompt_logprobs=k if (echo and k is not None) else None, logprobs=k,
                    max_model_len=st.max_model_len)
            for i, ids in enumerate(prompts) for j in range(n)]
    job = submit(st, seqs)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = sum(len(p) for p in prompts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _completion_stream(st, job, request, rid, created, n, prompts, texts, echo, k, include_usage,
                               prompt_tokens),
            media_type="text/event-stream", headers=SSE_HEADERS)
    result = await _collect(st, job, request)
    if result is None:
        return Response(status_code=499)
    tok = st.tokenizer
    choices, completion_tokens = [], 0
    for idx in sorted(result):
        c = result[idx]
        fin: Finished = c["finish"]
        p = idx // n
        prefix = texts[p] if echo else ""
        completion_tokens += fin.completion_tokens
        choices.append({
            "index": idx,
            "text": prefix + fin.text,
            "logprobs": None if k is None else _completion_logprobs(tok, c, prompts[p], echo, k),
            "finish_reason": _finish_reason(fin.reason),
            "stop_reason": None,
        })
    return {"id": rid, "object": "text_completion", "created": created, "model": st.model_name,
            "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


async def _completion_stream(st, job, request, rid, created, n, prompts, texts, echo, k, include_usage,
                             prompt_tokens) -> AsyncIterator[str]:
    tok = st.tokenizer
    base = {"id": rid, "object": "text_completion", "created": created, "model": st.model_name}

    def chunk(index: int, text: str, logprobs=None, finish=None) -> str:
        return sse(base | {"choices": [{"index": index, "text": text, "logprobs": logprobs,
                                        "finish_reason": finish, "stop_reason": None}]})

    completion_tokens = 0
    offsets = {s.index: 0 for s in job.seqs}
    try:
        if echo and k is None:
            for s in job.seqs:
                yield chunk(s.index, texts[s.index // n])
        async with aclosing(job_events(st.engine, job, request.receive)) as events:
            async for ev in events:
                if isinstance(ev, Failed):
                    yield sse({"error": envelope(500, ev.message)["error"]})
                    break
                if isinstance(ev, PromptScores):
                    if echo:
                        lp = _completion_logprobs(tok, {"prompt": ev, "tokens": []}, prompts[ev.index // n], True, k)
                        offsets[ev.index] = sum(len(t) for t in lp["tokens"])
                        yield chunk(ev.index, texts[ev.index // n], lp)
                elif isinstance(ev, TokenEvent):
                    if k is not None:
                        lp = _completion_logprobs(tok, {"prompt": None, "tokens": [ev]}, [], False, k,
                                                  start=offsets[ev.index])
                        offsets[ev.index] += len(lp["tokens"][0])
                        yield chunk(ev.index, ev.delta, lp)
                    elif ev.delta:
                        yield chunk(ev.index, ev.delta)
                elif isinstance(ev, Finished):
                    completion_tokens += ev.completion_tokens
                    yield chunk(ev.index, ev.delta, None, _finish_reason(ev.reason))
        if include_usage:
            yield sse(base | {"choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield SSE_DONE
    except ClientGone:
        return


# ---- /v1/chat/completions ------------------------------------------------------------------------
def _chat_logprob_entry(tok, ev: TokenEvent, k: int) -> dict:
    text = token_text(tok, ev.token)
    return {"token": text, "logprob": num(ev.logprob), "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": (t := token_text(tok, i)), "logprob": num(v), "bytes": list(t.encode("utf-8"))}
                             for i, v in ev.top[:k]]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = ready_state(request)
    check_model(st, body.model)
    if body.tools:
        raise bad_request("tools: tool calling is not supported yet; send the request without `tools`", "tools")
    rf = body.response_format
    if rf is not None and rf.get("type", "text") != "text":
        raise bad_request(f"response_format: type {rf.get('type')!r} is not supported yet; only 'text'",
                          "response_format")
    n = body.n or 1
    if n > st.settings.max_n:
        raise bad_request(f"n: at most {st.settings.max_n} choices per prompt, got {n}", "n")
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs: needs `logprobs: true`", "top_logprobs")
    ids = chat_prompt(st, body.messages, body.add_generation_prompt is not False)
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = max(1, min(st.settings.default_max_tokens, st.max_model_len - len(ids)))
    check_length(st, len(ids), max_tokens, field_tokens=field, field_prompt="messages")
    params = sampling(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, body.repetition_penalty,
                      body.ignore_eos)
    k = (body.top_logprobs or 0) if body.logprobs else None
    seqs = [SeqSpec(index=j, prompt_ids=tuple(ids), params=with_seed(params, j), stop=normalize_stop(body.stop),
                    logprobs=k, max_model_len=st.max_model_len) for j in range(n)]
    job = submit(st, seqs)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chat_stream(st, job, request, rid, created, k, include_usage, len(ids)),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    result = await _collect(st, job, request)
    if result is None:
        return Response(status_code=499)
    tok = st.tokenizer
    choices, completion_tokens = [], 0
    for idx in sorted(result):
        c = result[idx]
        fin: Finished = c["finish"]
        completion_tokens += fin.completion_tokens
        logprobs = None
        if k is not None:
            logprobs = {"content": [_chat_logprob_entry(tok, ev, k) for ev in c["tokens"]]}
        choices.append({"index": idx, "message": {"role": "assistant", "content": fin.text},
                        "logprobs": logprobs, "finish_reason": _finish_reason(fin.reason)})
    return {"id": rid, "object": "chat.completion", "created": created, "model": st.model_name,
            "choices": choices, "usage": _usage(len(ids), completion_tokens)}


async def _chat_stream(st, job, request, rid, created, k, include_usage, prompt_tokens) -> AsyncIterator[str]:
    tok = st.tokenizer
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": st.model_name}

    def chunk(index: int, delta: dict, logprobs=None, finish=None) -> str:
        return sse(base | {"choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish}]})

    completion_tokens = 0
    try:
        for s in job.seqs:
            yield chunk(s.index, {"role": "assistant", "content": ""})
        async with aclosing(job_events(st.engine, job, request.receive)) as events:
            async for ev in events:
                if isinstance(ev, Failed):
                    yield sse({"error": envelope(500, ev.message)["error"]})
                    break
                if isinstance(ev, TokenEvent):
                    if k is not None:
                        yield chunk(ev.index, {"content": ev.delta},
                                    {"content": [_chat_logprob_entry(tok, ev, k)]})
                    elif ev.delta:
                        yield chunk(ev.index, {"content": ev.delta})
                elif isinstance(ev, Finished):
                    completion_tokens += ev.completion_tokens
                    yield chunk(ev.index, {"content": ev.delta} if ev.delta else {}, None,
                                _finish_reason(ev.reason))
        if include_usage:
            yield sse(base | {"choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield SSE_DONE
    except ClientGone:
        return

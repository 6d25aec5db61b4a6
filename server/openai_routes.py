"""OpenAI-compatible routes (and vLLM's tokenizer routes): shapes copied from OpenAI / vLLM.

``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/tokenize``, ``/detokenize``,
``/tokenizer_info``. Streams are Server-Sent Events (``data: <json>\\n\\n`` ... ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from contextlib import aclosing
from dataclasses import replace
from typing import Any, AsyncIterator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from thawed.runtime.generate import SamplingParams

from .app import ServerState, ready_state
from .engine import (ClientGone, EngineClosed, Failed, Finished, Job, PromptScores, QueueFull, SeqSpec,
                     TokenEvent, job_events)
from .errors import APIError, bad_request, envelope
from .offloop import OffLoopRoute, off_loop
from .schemas import (SEED_LIMIT, ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                      TokenizeRequest)

router = APIRouter(route_class=OffLoopRoute)  # bodies parsed and validated off the event loop

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
NEG_INF = -9999.0  # JSON has no -inf
MAX_SEQS = 1024  # prompts x n in one request


# ---- shared helpers (the TGI routes use them too) ------------------------------------------------
def num(x: float) -> float:
    return x if math.isfinite(x) else NEG_INF


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: every client skips it; proxies see traffic

class _KeepAlive:
    pass


KEEPALIVE = _KeepAlive()


async def with_keepalive(events: AsyncIterator, interval: float | None) -> AsyncIterator:
    """Yield ``events``' items, and ``KEEPALIVE`` whenever none came for ``interval`` seconds (a
    long queue or prefill), so a stream sends SSE comments instead of silence."""
    if not interval:
        async for ev in events:
            yield ev
        return
    it = events.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEPALIVE
                continue
            task, pending = pending, None
            try:
                ev = task.result()
            except StopAsyncIteration:
                return
            yield ev
    finally:
        if pending is not None:
            pending.cancel()
            try:
                await pending
            except BaseException:  # noqa: BLE001 - the cancellation (or the inner generator's end)
                pass


def check_text_length(st: ServerState, chars: int, field: str) -> None:
    """Refuse text that cannot fit the context before tokenising it: a prompt of ``max_model_len``
    tokens holds at most ``max_model_len x`` (the longest token's bytes) bytes, doubled for
    normalisation. Cheap (a length), so a 10 MB prompt is refused at once."""
    if chars > st.max_prompt_chars:  # characters <= UTF-8 bytes: this is the cheap first test
        raise bad_request(f"{field}: the text has {chars} characters or more, more than a prompt of at most "
                          f"{st.max_model_len} tokens can hold ({st.max_prompt_chars} characters); shorten it",
                          field)


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


def default_max_tokens(st: ServerState, prompt_len: int) -> int:
    """New tokens for a chat / TGI request that gives no limit: the server's default (or the
    checkpoint's generation_config max_new_tokens), never more than the context leaves."""
    return max(1, min(st.default_max_tokens, st.max_model_len - prompt_len))


def normalize_stop(stop: str | list[str] | None, field: str = "stop") -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 16:
        raise bad_request(f"{field}: at most 16 stop strings, got {len(items)}", field)
    return tuple(s for s in items if s)


def sampling(st: ServerState, max_tokens: int, body, *, prefix: str = "", defaults: bool = True,
             temperature: float | None = None) -> SamplingParams:
    """SamplingParams from a request's fields (``body``: an OpenAI request or TGI parameters;
    fields it lacks count as not given). Fields the request leaves out come from the checkpoint's
    generation_config.json (``defaults``, as vLLM does), else the neutral value."""
    given = {name: getattr(body, name, None) for name in (
        "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "frequency_penalty",
        "presence_penalty")}
    if temperature is not None:
        given["temperature"] = temperature
    if defaults:
        for name, value in st.generation_defaults.items():
            if given.get(name) is None:
                given[name] = value
    top_k = given["top_k"]
    if top_k is not None and top_k > st.vocab_size:
        raise bad_request(f"{prefix}top_k: {top_k} is more than the vocabulary ({st.vocab_size} tokens); use at most "
                          f"{st.vocab_size}, or 0 to turn top-k off", f"{prefix}top_k")
    bias: list[tuple[int, float]] = []
    for key, value in (getattr(body, "logit_bias", None) or {}).items():
        token = int(key)
        if token >= st.vocab_size:
            raise bad_request(f"{prefix}logit_bias: token id {token} is outside the vocabulary [0, {st.vocab_size})",
                              f"{prefix}logit_bias")
        bias.append((token, float(value)))

    def pick(name: str, neutral: float) -> float:
        v = given.get(name)
        return neutral if v is None else float(v)

    seed = getattr(body, "seed", None)
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=0 if top_k is None or top_k < 0 else int(top_k),
        seed=None if seed is None else int(seed),
        repetition_penalty=pick("repetition_penalty", 1.0),
        ignore_eos=bool(getattr(body, "ignore_eos", False)),
        frequency_penalty=pick("frequency_penalty", 0.0),
        presence_penalty=pick("presence_penalty", 0.0),
        logit_bias=tuple(sorted(bias)),
        min_p=pick("min_p", 0.0),
        typical_p=pick("typical_p", 1.0),
    )


def with_seed(params: SamplingParams, j: int) -> SamplingParams:
    """Choice ``j`` of ``n`` samples with ``(seed + j) mod 2**63``: reproducible per request, not
    identical, and never out of a seed's range."""
    if params.seed is None or j == 0:
        return params
    return replace(params, seed=(params.seed + j) % SEED_LIMIT)


def check_supported(body) -> None:
    found = body.unsupported()
    if found is not None:
        raise bad_request(found[1], found[0])
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options: only allowed with `stream: true`", "stream_options")


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


def chat_prompt(st: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True,
                bounded: bool = True) -> list[int]:
    """The chat template's token ids. ``bounded``: refuse a conversation longer than the context
    early (``encode_prompt``); /tokenize counts any length."""
    tok = st.tokenizer
    if not getattr(tok, "chat_template", None):
        raise bad_request("messages: this model's tokenizer has no chat template; use /v1/completions with a "
                          "plain prompt", "messages")
    convo = []
    total = 0
    for i, m in enumerate(messages):
        entry = {"role": m.role, "content": message_text(m, i)}
        total += len(entry["content"])
        check_text_length(st, total, "messages")
        if m.name:
            entry["name"] = m.name
        convo.append(entry)
    try:
        text = tok.apply_chat_template(convo, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:  # jinja raise_exception (e.g. roles out of order), bad content
        raise bad_request(f"messages: the chat template rejected these messages: {exc}", "messages") from None
    if not bounded:
        return encode(st, text, add_special_tokens=False)
    return encode_prompt(st, text, "messages", add_special_tokens=False)


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
        ids = await off_loop(st, chat_prompt, st, body.messages, body.add_generation_prompt is not False, False)
    else:
        check_text_length(st, len(body.prompt), "prompt")
        ids = await off_loop(st, encode, st, body.prompt, body.add_special_tokens is not False)
    return {"count": len(ids), "max_model_len": st.max_model_len, "tokens": ids}


def encode(st: ServerState, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(st.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


PREFIX_CHARS_PER_TOKEN = 8  # a probe prefix of this many characters per context token
PREFIX_MARGIN = 16  # tokens a cut at a space can add at the boundary


def encode_prompt(st: ServerState, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenise a prompt that must fit the context. A long text is probed first: its prefix of
    ``8 x max_model_len`` characters (cut at a space, so no word is split) is tokenised, and if
    that alone has more than ``max_model_len`` tokens the text is refused without tokenising the
    rest (a 1 MB prompt costs a 64 KB tokenisation, not a 1 MB one)."""
    probe = PREFIX_CHARS_PER_TOKEN * st.max_model_len
    if len(text) > 2 * probe:
        cut = text.rfind(" ", probe // 2, probe)
        head = text[:cut if cut > 0 else probe]
        n = len(encode(st, head, add_special_tokens))
        if n > st.max_model_len + PREFIX_MARGIN:
            raise bad_request(f"{field}: the prompt has more than {n - PREFIX_MARGIN} tokens (its first {len(head)} "
                              f"of {len(text)} characters alone) but this model's context is {st.max_model_len} "
                              "tokens; shorten it", field)
    return encode(st, text, add_special_tokens)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    st = ready_state(request)
    check_model(st, body.model)

    def work() -> dict:
        if len(body.tokens) > st.max_model_len:
            raise bad_request(f"tokens: {len(body.tokens)} tokens is more than this model's context "
                              f"({st.max_model_len}); detokenize at most that many at once", "tokens")
        check_ids(st, body.tokens, "tokens")
        return {"prompt": st.tokenizer.decode(body.tokens)}

    return await off_loop(st, work)


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
    """Token ids and text of every prompt; run off the event loop (``off_loop``). Each prompt is
    refused before tokenising if it is too long to fit the context (by characters, then tokens)."""
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
            check_text_length(st, len(item), "prompt")
            ids = encode_prompt(st, item, "prompt")
            texts.append(item)
        else:
            ids = list(item)
            if len(ids) > st.max_model_len:
                check_length(st, len(ids), 0)
            check_ids(st, ids, "prompt")
            texts.append(tok.decode(ids))
        if len(ids) > st.max_model_len:
            check_length(st, len(ids), 0)
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
    check_supported(body)
    if body.suffix:
        raise bad_request("suffix: insertion (suffix) is not supported", "suffix")
    n = body.n or 1
    if n > st.settings.max_n:
        raise bad_request(f"n: at most {st.settings.max_n} choices per prompt, got {n}", "n")
    if body.best_of is not None and body.best_of != n:
        raise bad_request(f"best_of: only best_of = n is supported (no server-side ranking), got best_of="
                          f"{body.best_of} with n={n}; leave best_of out", "best_of")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    echo = bool(body.echo)
    stop = normalize_stop(body.stop)
    params = sampling(st, max_tokens, body)
    k = body.logprobs
    prompts, texts = await off_loop(st, _prompts, st, body.prompt)
    for ids in prompts:
        check_length(st, len(ids), max_tokens)
    if len(prompts) * n > MAX_SEQS:
        raise bad_request(f"prompt: {len(prompts)} prompts x n={n} is more than {MAX_SEQS} sequences in one "
                          "request; split it", "prompt")
    seqs = [SeqSpec(index=i * n + j, prompt_ids=tuple(ids), params=with_seed(params, j), stop=stop,
                    include_stop=bool(body.include_stop_str_in_output),
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

    def build() -> dict:  # logprobs of a long echoed prompt decode thousands of tokens: off the loop
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

    return await off_loop(st, build)


async def _completion_stream(st, job, request, rid, created, n, prompts, texts, echo, k, include_usage,
                             prompt_tokens) -> AsyncIterator[str]:
    tok = st.tokenizer
    base = {"id": rid, "object": "text_completion", "created": created, "model": st.model_name}

    if include_usage:  # OpenAI: with include_usage every chunk carries "usage": null but the last
        base["usage"] = None

    def chunk(index: int, text: str, logprobs=None, finish=None) -> str:
        return sse(base | {"choices": [{"index": index, "text": text, "logprobs": logprobs,
                                        "finish_reason": finish, "stop_reason": None}]})

    completion_tokens = 0
    offsets = {s.index: 0 for s in job.seqs}
    try:
        if echo and k is None:
            for s in job.seqs:
                yield chunk(s.index, texts[s.index // n])
        async with aclosing(job_events(st.engine, job, request.receive)) as inner, \
                aclosing(with_keepalive(inner, st.settings.sse_keepalive)) as events:
            async for ev in events:
                if ev is KEEPALIVE:
                    yield SSE_KEEPALIVE
                    continue
                if isinstance(ev, Failed):
                    yield sse({"error": envelope(500, ev.message)["error"]})
                    break
                if isinstance(ev, PromptScores):
                    if echo:
                        lp = await off_loop(st, _completion_logprobs, tok, {"prompt": ev, "tokens": []},
                                            prompts[ev.index // n], True, k)
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
    check_supported(body)
    if body.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice: tool calling is not supported yet; leave tool_choice out", "tool_choice")
    if body.modalities not in (None, [], ["text"]):
        raise bad_request(f"modalities: only [\"text\"] is supported, got {body.modalities}", "modalities")
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
    stop = normalize_stop(body.stop)
    sampling(st, 1, body)  # check the sampling fields before the (costly) chat template
    ids = await off_loop(st, chat_prompt, st, body.messages, body.add_generation_prompt is not False)
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens(st, len(ids))
    check_length(st, len(ids), max_tokens, field_tokens=field, field_prompt="messages")
    params = sampling(st, max_tokens, body)
    k = (body.top_logprobs or 0) if body.logprobs else None
    seqs = [SeqSpec(index=j, prompt_ids=tuple(ids), params=with_seed(params, j), stop=stop,
                    include_stop=bool(body.include_stop_str_in_output),
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

    def build() -> dict:
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

    return await off_loop(st, build)


async def _chat_stream(st, job, request, rid, created, k, include_usage, prompt_tokens) -> AsyncIterator[str]:
    tok = st.tokenizer
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": st.model_name}

    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict, logprobs=None, finish=None) -> str:
        return sse(base | {"choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish}]})

    completion_tokens = 0
    try:
        for s in job.seqs:
            yield chunk(s.index, {"role": "assistant", "content": ""})
        async with aclosing(job_events(st.engine, job, request.receive)) as inner, \
                aclosing(with_keepalive(inner, st.settings.sse_keepalive)) as events:
            async for ev in events:
                if ev is KEEPALIVE:
                    yield SSE_KEEPALIVE
                    continue
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

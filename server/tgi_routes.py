"""Text Generation Inference (TGI) routes, for ``huggingface_hub.InferenceClient.text_generation``.

``POST /generate`` -> ``{"generated_text", "details"?}``; ``POST /generate_stream`` -> SSE token
events, the last one with ``generated_text`` (and ``details``), and no ``data: [DONE]`` (TGI sends
none there; its own client fails on one); ``POST /`` dispatches on
``stream`` (the route ``InferenceClient(base_url).text_generation`` posts to); ``GET /info``.
TGI keeps the stop sequence in the generated text and names finish reasons ``length``,
``eos_token``, ``stop_sequence``.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from .app import ServerState, ready_state, thawed_version
from .engine import ClientGone, Failed, Finished, Job, PromptScores, SeqSpec, TokenEvent, job_events
from .errors import bad_request
from .offloop import OffLoopRoute
from .openai_routes import (KEEPALIVE, SSE_HEADERS, SSE_KEEPALIVE, _collect, check_length, check_text_length,
                            default_max_tokens, encode, encode_prompt, num, off_loop, sampling, sse, submit,
                            token_text, with_keepalive)
from .schemas import TGIParameters, TGIRequest

router = APIRouter(route_class=OffLoopRoute)  # bodies parsed and validated off the event loop

_REASONS = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}


def _check(st: ServerState, body: TGIRequest) -> TGIParameters:
    """Everything about the request that needs no tokenizer (cheap, on the event loop)."""
    p = body.parameters or TGIParameters()
    if p.watermark:
        raise bad_request("parameters.watermark: watermarking is not supported; leave it out or false",
                          "parameters.watermark")
    if p.grammar is not None:
        raise bad_request("parameters.grammar: grammar-constrained generation is not supported; leave it out",
                          "parameters.grammar")
    if p.adapter_id:
        raise bad_request("parameters.adapter_id: LoRA adapters are not supported; leave it out",
                          "parameters.adapter_id")
    if p.truncate is None:
        check_text_length(st, len(body.inputs), "inputs")
    stop = tuple(s for s in (p.stop or []) if s)
    if len(stop) > 16:
        raise bad_request(f"parameters.stop: at most 16 stop sequences, got {len(stop)}", "parameters.stop")
    return p


def _input_ids(st: ServerState, inputs: str, truncate: int | None) -> list[int]:
    if truncate is not None:  # only the last tokens count: tokenise only the text they can come from
        keep = 2 * (truncate + 1) * max(1, st.max_prompt_chars // max(1, 2 * st.max_model_len))
        inputs = inputs[-keep:]
        return encode(st, inputs)[-truncate:]
    return encode_prompt(st, inputs, "inputs")


async def _job(st: ServerState, body: TGIRequest) -> tuple[Job, TGIParameters, list[int]]:
    p = _check(st, body)
    do_sample = bool(p.do_sample) or any(v is not None for v in (p.temperature, p.top_p, p.top_k, p.typical_p))
    temperature = (1.0 if p.temperature is None else p.temperature) if do_sample else 0.0
    sampling(st, 1, p, prefix="parameters.", defaults=False, temperature=temperature)  # fail before tokenising
    ids = await off_loop(st, _input_ids, st, body.inputs, p.truncate)
    if not ids:
        raise bad_request("inputs: the prompt is empty; give at least one token", "inputs")
    max_new = p.max_new_tokens
    if max_new is None:
        max_new = default_max_tokens(st, len(ids))
    check_length(st, len(ids), max_new, field_tokens="parameters.max_new_tokens", field_prompt="inputs")
    stop = tuple(s for s in (p.stop or []) if s)
    params = sampling(st, max_new, p, prefix="parameters.", defaults=False, temperature=temperature)
    spec = SeqSpec(index=0, prompt_ids=tuple(ids), params=params, stop=stop, include_stop=True,
                   prompt_logprobs=0 if (p.details and p.decoder_input_details) else None,
                   logprobs=p.top_n_tokens or 0, max_model_len=st.max_model_len)
    return submit(st, [spec]), p, ids


def _token(tok, ev: TokenEvent) -> dict:
    return {"id": ev.token, "text": ev.piece, "logprob": num(ev.logprob), "special": ev.special}


def _top(tok, ev: TokenEvent, special_ids) -> list[dict]:
    return [{"id": i, "text": token_text(tok, i), "logprob": num(v), "special": i in special_ids} for i, v in ev.top]


async def _generate(st: ServerState, body: TGIRequest, request: Request):
    job, p, ids = await _job(st, body)
    result = await _collect(st, job, request)
    if result is None:
        return None
    c = result[0]
    fin: Finished = c["finish"]
    text = (body.inputs if p.return_full_text else "") + fin.text
    out: dict = {"generated_text": text}
    if p.details:
        tok = st.tokenizer
        prefill = []
        if c["prompt"] is not None:
            ps: PromptScores = c["prompt"]
            prefill = [{"id": t, "text": token_text(tok, t), "logprob": None if lp is None else num(lp)}
                       for t, lp in zip(ids, ps.logprobs)]
        details = {"finish_reason": _REASONS[fin.reason], "generated_tokens": fin.completion_tokens,
                   "seed": p.seed, "prefill": prefill, "tokens": [_token(tok, ev) for ev in c["tokens"]]}
        if p.top_n_tokens:
            details["top_tokens"] = [_top(tok, ev, st.engine.special_ids) for ev in c["tokens"]]
        out["details"] = details
    return out


async def _stream(st: ServerState, body: TGIRequest, request: Request) -> StreamingResponse:
    job, p, ids = await _job(st, body)

    async def events() -> AsyncIterator[str]:
        tok = st.tokenizer
        pending: TokenEvent | None = None
        n = 0
        try:
            async with aclosing(job_events(st.engine, job, request.receive)) as inner, \
                    aclosing(with_keepalive(inner, st.settings.sse_keepalive)) as evs:
                async for ev in evs:
                    if ev is KEEPALIVE:
                        yield SSE_KEEPALIVE
                        continue
                    if isinstance(ev, Failed):  # TGI's stream error: a string and its type
                        yield sse({"error": ev.message, "error_type": "generation"})
                        break
                    if isinstance(ev, TokenEvent):
                        if pending is not None:  # the last token event carries the final text: hold one back
                            n += 1
                            yield sse({"index": n, "token": _token(tok, pending), "generated_text": None,
                                       "details": None, "top_tokens": _top(tok, pending, st.engine.special_ids)
                                       if p.top_n_tokens else None})
                        pending = ev
                    elif isinstance(ev, Finished):
                        n += 1
                        text = (body.inputs if p.return_full_text else "") + ev.text
                        details = None
                        if p.details:
                            details = {"finish_reason": _REASONS[ev.reason], "generated_tokens": ev.completion_tokens,
                                       "seed": p.seed, "input_length": len(ids)}
                        token = _token(tok, pending) if pending is not None else \
                            {"id": 0, "text": "", "logprob": 0.0, "special": True}
                        yield sse({"index": n, "token": token, "generated_text": text, "details": details,
                                   "top_tokens": _top(tok, pending, st.engine.special_ids)
                                   if (p.top_n_tokens and pending is not None) else None})
            # TGI ends /generate_stream with the event that carries generated_text: no [DONE]
        except ClientGone:
            return

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/generate")
async def generate(body: TGIRequest, request: Request):
    st = ready_state(request)
    out = await _generate(st, body, request)
    return Response(status_code=499) if out is None else out


@router.post("/generate_stream")
async def generate_stream(body: TGIRequest, request: Request):
    return await _stream(ready_state(request), body, request)


@router.post("/")
async def compat_generate(body: TGIRequest, request: Request):
    st = ready_state(request)
    if body.stream:
        return await _stream(st, body, request)
    out = await _generate(st, body, request)
    return Response(status_code=499) if out is None else [out]


@router.get("/info")
async def info(request: Request):
    st = ready_state(request)
    loaded = st.loaded
    dtype = str(getattr(loaded.model, "dtype", "")).replace("torch.", "")
    return {
        "model_id": st.model_name,
        "model_sha": None,
        "model_dtype": dtype,
        "model_device_type": loaded.device.type,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": st.settings.max_running + st.settings.max_queue,
        "max_best_of": 1,
        "max_stop_sequences": 16,
        "max_input_tokens": st.max_model_len - 1,
        "max_total_tokens": st.max_model_len,
        "max_input_length": st.max_model_len - 1,
        "waiting_served_ratio": 1.2,
        "max_batch_total_tokens": st.max_model_len * st.settings.max_running,
        "max_waiting_tokens": 20,
        "max_batch_size": st.settings.max_running,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "thawed",
        "version": thawed_version(),
        "sha": None,
        "docker_label": None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.started)),
    }

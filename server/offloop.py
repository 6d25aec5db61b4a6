"""Request bodies parsed and validated off the event loop, with an early refusal of huge input.

FastAPI parses a JSON body (``json.loads``) and validates it (pydantic) on the event loop: a 10 MB
prompt holds the loop for tens of milliseconds, 300,000 token ids for more. ``OffLoopRoute`` (the
``route_class`` of the OpenAI and TGI routers) reads the body, then in the server's CPU threads:

1. parses the JSON;
2. refuses, before any validation or tokenising, input that cannot fit the context: a token-id
   list longer than ``max_model_len``, text longer than ``max_prompt_chars`` (what a prompt of
   ``max_model_len`` tokens can hold), more token ids to detokenize than the context;
3. validates the body model, and hands FastAPI the validated instance (which pydantic accepts
   as it is, so FastAPI's own validation costs nothing).

Errors come back exactly as FastAPI's would (``RequestValidationError`` -> 400 naming the field).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import typing
from typing import Any, Callable, TypeVar

import pydantic_core
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from .errors import bad_request

__all__ = ["OffLoopRoute", "early_refusal", "off_loop"]

T = TypeVar("T")


async def off_loop(st, fn: Callable[..., T], *args) -> T:
    """Run CPU work (parsing, tokenising, chat templating, detokenising, building large responses)
    in the server's worker threads, never on the event loop: /health keeps answering meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(st.cpu_pool, fn, *args)


def _body_model(endpoint: Callable) -> type[BaseModel] | None:
    try:
        hints = typing.get_type_hints(endpoint)
    except Exception:  # noqa: BLE001 - unresolvable annotations: FastAPI parses as usual
        return None
    for name in inspect.signature(endpoint).parameters:
        hint = hints.get(name)
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            return hint
    return None


def _too_long_text(st, text: Any, field: str) -> None:
    if isinstance(text, str) and len(text) > st.max_prompt_chars:
        raise bad_request(f"{field}: the text has {len(text)} characters, more than a prompt of at most "
                          f"{st.max_model_len} tokens can hold ({st.max_prompt_chars} characters); shorten it", field)


def _too_many_ids(st, ids: Any, field: str, what: str = "the prompt") -> None:
    if isinstance(ids, list) and len(ids) > st.max_model_len and ids and isinstance(ids[0], int):
        raise bad_request(f"{field}: {what} has {len(ids)} tokens but this model's context is {st.max_model_len} "
                          "tokens; shorten it", field)


def early_refusal(st, body: Any) -> None:
    """Cheap checks on the parsed JSON (lengths only) before validation and tokenising."""
    if not isinstance(body, dict) or not st.max_model_len:
        return
    prompt = body.get("prompt")
    _too_long_text(st, prompt, "prompt")
    _too_many_ids(st, prompt, "prompt")
    if isinstance(prompt, list):
        for item in prompt[:4096]:
            _too_long_text(st, item, "prompt")
            _too_many_ids(st, item, "prompt")
    params = body.get("parameters")
    truncating = isinstance(params, dict) and params.get("truncate") is not None
    if not truncating:
        _too_long_text(st, body.get("inputs"), "inputs")
    _too_many_ids(st, body.get("tokens"), "tokens", "the token list")
    messages = body.get("messages")
    if isinstance(messages, list):
        total = 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(p.get("text") or "") for p in content
                             if isinstance(p, dict) and isinstance(p.get("text"), str))
        if total > st.max_prompt_chars:
            raise bad_request(f"messages: the messages hold {total} characters, more than a prompt of at most "
                              f"{st.max_model_len} tokens can hold ({st.max_prompt_chars} characters); shorten "
                              "them", "messages")


def _loads(raw: bytes) -> Any:
    """pydantic-core's JSON parser (4x faster than ``json`` on a long string: it holds the GIL for
    less time); ``json`` for what it refuses but JSON allows (lone surrogate escapes, which the
    validators then answer with a 400 naming the field)."""
    try:
        return pydantic_core.from_json(raw)
    except ValueError:
        return json.loads(raw)


def _parse(st, raw: bytes, model: type[BaseModel]) -> BaseModel:
    try:
        data = _loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        pos = getattr(exc, "pos", getattr(exc, "start", 0))
        msg = getattr(exc, "msg", str(exc))
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": msg}}]) from None
    early_refusal(st, data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = []
        for e in exc.errors(include_url=False):
            e = dict(e)
            e["loc"] = ("body", *e.get("loc", ()))
            errors.append(e)
        raise RequestValidationError(errors) from None


def _is_json(request: Request) -> bool:
    ctype = request.headers.get("content-type")
    if not ctype:
        return True
    main = ctype.split(";")[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


class OffLoopRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        model = _body_model(self.endpoint)
        if model is None:
            return handler

        async def parse_off_loop(request: Request):
            st = request.app.state.thawed
            if st.status == "ready" and request.method == "POST" and _is_json(request):
                raw = await request.body()
                if raw:
                    request._json = await off_loop(st, _parse, st, raw, model)  # FastAPI takes it as is
            return await handler(request)

        return parse_off_loop

"""``create_app(settings)``: the FastAPI application. No module-level model.

The lifespan starts loading the checkpoint in a background thread and returns at once, so the
server answers ``/health`` with 503 "Loading model" until the model is ready (and every model
route with 503 + ``Retry-After``). When the model is loaded the generation worker starts.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from thawed.codecs.errors import ThawedError

from .engine import Engine
from .errors import APIError, envelope, install_error_handlers
from .metrics import CONTENT_TYPE, Metrics
from .settings import Settings

__all__ = ["create_app", "ServerState", "state_of", "ready_state", "thawed_version"]

log = logging.getLogger(__name__)

Loader = Callable[[Settings], Any]  # returns a thawed.runtime.loading.Loaded


def thawed_version() -> str:
    try:
        return metadata.version("thawed")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


class ServerState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.model_name)
        self.status = "loading"  # loading | ready | failed | stopping
        self.error: str | None = None
        self.loaded = None
        self.engine: Engine | None = None
        self.model_name = settings.model_name
        self.max_model_len = 0
        self.vocab_size = 0
        self.max_prompt_chars = 0  # longer text cannot fit the context: refused before tokenising
        self.generation_defaults: dict[str, float] = {}  # from the checkpoint's generation_config.json
        self.default_max_tokens = settings.default_max_tokens
        self.created = int(time.time())
        self.started = time.time()
        # tokenising, chat templates, detokenising and large responses run here, never on the
        # event loop (the tokenizers release the GIL while they encode)
        self.cpu_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="thawed-cpu")
        self.metrics.watch_cache(self.cache_info)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def cache_info(self) -> dict | None:
        lazy = getattr(self.loaded, "lazy", None)
        if lazy is None:
            return None
        stats = lazy.cache.stats().as_dict()
        stats.pop("keys", None)
        return {"stats": stats, "device": self.loaded.device.type}


def state_of(request: Request) -> ServerState:
    return request.app.state.thawed


def ready_state(request: Request) -> ServerState:
    st = state_of(request)
    if st.status == "ready" and st.engine is not None and st.engine.alive:
        return st
    if st.status == "loading":
        raise APIError(503, "Loading model", retry_after=5)
    if st.status == "failed":
        raise APIError(503, f"the model failed to load: {st.error}; fix the checkpoint or settings and restart",
                       retry_after=60)
    raise APIError(503, "the server is shutting down", retry_after=5)


def _default_loader(settings: Settings):
    from thawed.runtime.loading import load_for_inference
    from thawed.runtime.model import RuntimeConfig, parse_budget

    if not settings.checkpoint:
        raise ThawedError("no checkpoint given: pass CKPT to `thawed serve` or set THAWED_CHECKPOINT")
    config = RuntimeConfig(device=settings.device, dtype=settings.dtype,
                           cache_budget=parse_budget(settings.cache_budget), prefetch_layers=settings.prefetch,
                           direct=settings.direct, compile=settings.compile, ring=settings.ring,
                           kernels=settings.kernels)
    loaded = load_for_inference(settings.checkpoint, config)
    if settings.preload and loaded.lazy is not None:
        t0 = time.perf_counter()
        loaded.lazy.warm()
        log.info("decoded every layer in %.1f s (--preload)", time.perf_counter() - t0)
    return loaded


def _context_length(model, settings: Settings) -> int:
    cfg = getattr(model, "config", None)
    native = None
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        native = getattr(cfg, name, None)
        if isinstance(native, int) and native > 0:
            break
        native = None
    if settings.max_model_len is not None:
        if native is not None and settings.max_model_len > native:
            raise ThawedError(f"--max-model-len {settings.max_model_len} is longer than the model's context "
                              f"({native} positions); use at most {native}")
        return settings.max_model_len
    return native or 2048


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty")


def generation_defaults(model) -> tuple[dict[str, float], int | None]:
    """Sampling defaults and max_new_tokens set by the checkpoint's generation_config.json (only
    values that differ from transformers' defaults, as vLLM's ``--generation-config auto``)."""
    cfg = getattr(model, "generation_config", None)
    if cfg is None:
        return {}, None
    try:
        diff = cfg.to_diff_dict()
    except Exception:  # noqa: BLE001 - an odd config: no defaults rather than no server
        log.warning("cannot read the checkpoint's generation_config; using the API defaults", exc_info=True)
        return {}, None
    values = {k: diff[k] for k in SAMPLING_DEFAULTS if isinstance(diff.get(k), (int, float))
              and not isinstance(diff.get(k), bool)}
    max_new = diff.get("max_new_tokens")
    return values, (max_new if isinstance(max_new, int) and max_new > 0 else None)


def longest_token_chars(tokenizer) -> int:
    """Characters of the vocabulary's longest token string (an upper bound on the characters of
    text one token stands for: byte-level BPE spells each byte as one character)."""
    try:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return max((len(p) for p in pieces if isinstance(p, str)), default=16) or 16
    except Exception:  # noqa: BLE001 - a tokenizer without a readable vocabulary
        return 256


def _start_model(st: ServerState, loaded) -> None:
    st.loaded = loaded
    model = loaded.model
    st.max_model_len = _context_length(model, st.settings)
    st.vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", 0) or len(loaded.tokenizer))
    # 2x margin for normalisers that merge characters, plus room for a chat template
    st.max_prompt_chars = 2 * st.max_model_len * longest_token_chars(loaded.tokenizer) + 4096
    st.generation_defaults, max_new = generation_defaults(model)
    if max_new is not None and "default_max_tokens" not in st.settings.model_fields_set:
        st.default_max_tokens = max_new
    if st.generation_defaults:
        log.info("sampling defaults from the checkpoint's generation_config.json: %s", st.generation_defaults)
    st.metrics.load_seconds.set(getattr(loaded, "load_seconds", 0.0))
    st.engine = Engine(model, loaded.tokenizer, loaded.eos_token_ids, loaded.device,
                       max_queue=st.settings.max_queue, max_running=st.settings.max_running, metrics=st.metrics,
                       batching=st.settings.batching, max_model_len=st.max_model_len,
                       fast=st.settings.batching, compile=st.settings.compile,
                       prefill_chunk=st.settings.prefill_chunk)
    st.engine.start()


class APIKeyMiddleware:
    """Pure ASGI (streaming-safe): every route but /health and /ping needs ``Authorization: Bearer KEY``."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in ("/health", "/ping"):
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            msg = ("missing API key: send the header `Authorization: Bearer <key>`" if not given
                   else "invalid API key in the Authorization header")
            response = JSONResponse(envelope(401, msg), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413 (by Content-Length, or while reading),
    and bodies that pause for more than ``timeout`` seconds with 408 (a slow client holds no
    connection for ever)."""

    def __init__(self, app, limit: int, timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                response = JSONResponse(envelope(413, self._message()), status_code=413)
                return await response(scope, receive, send)
        seen = 0
        exceeded = False
        timed_out = False
        body_done = False

        async def limited_receive():
            nonlocal seen, exceeded, timed_out, body_done
            if body_done or self.timeout is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.timeout)
                except asyncio.TimeoutError:
                    timed_out = True
                    return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.limit:  # no Content-Length (chunked): stop reading, answer 413 below
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not (exceeded or timed_out):
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not (exceeded or timed_out):
                raise
        if exceeded:
            await JSONResponse(envelope(413, self._message()), status_code=413)(scope, receive, send)
        elif timed_out:
            msg = (f"the request body stalled for more than {self.timeout:g} s; send it at once or raise "
                   "--timeout-body (THAWED_TIMEOUT_BODY)")
            response = JSONResponse(envelope(408, msg), status_code=408, headers={"Connection": "close"})
            await response(scope, receive, send)

    def _message(self) -> str:
        return (f"the request body is larger than {self.limit} bytes; send less or raise "
                "--max-request-bytes (THAWED_MAX_REQUEST_BYTES)")


def create_app(settings: Settings | None = None, *, loader: Loader | None = None) -> FastAPI:
    """Build the app. ``loader(settings) -> Loaded`` replaces the default checkpoint loader (tests
    use it to share one model between apps); a model it returns is not closed by the app."""
    settings = settings or Settings()
    st = ServerState(settings)
    owns_model = loader is None
    load = loader or _default_loader

    async def _load() -> None:
        try:
            loaded = await asyncio.to_thread(load, settings)
            await asyncio.to_thread(_start_model, st, loaded)
        except Exception as exc:  # reported by /health and every route; the process stays up
            st.status, st.error = "failed", str(exc)
            log.error("cannot load the model: %s", exc, exc_info=not isinstance(exc, ThawedError))
            return
        st.status = "ready"
        st.metrics.ready.set(1)
        log.info("model %s ready: max_model_len=%d device=%s", st.model_name, st.max_model_len,
                 getattr(st.loaded, "device", "?"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_load())
        try:
            yield
        finally:
            st.status = "stopping"
            st.metrics.ready.set(0)
            if not task.done():
                await asyncio.wait({task}, timeout=None)
            if st.engine is not None:
                await asyncio.to_thread(st.engine.shutdown)
            if owns_model and st.loaded is not None:
                st.loaded.close()
            st.cpu_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="thawed", version=thawed_version(), lifespan=lifespan,
                  description="OpenAI- and TGI-compatible server over a lazily decoded thawed checkpoint")
    app.state.thawed = st
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes, timeout=settings.timeout_body)
    if settings.api_key:  # added last = runs first: no body is read for an unauthenticated request
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)

    async def health(request: Request):
        s = state_of(request)
        if s.status == "ready" and s.engine is not None and s.engine.alive:
            return {"status": "ok"}
        if s.status == "loading":
            message = "Loading model"
        elif s.status == "failed":
            message = f"the model failed to load: {s.error}"
        else:
            message = "the server is shutting down"
        return JSONResponse({"error": {"code": 503, "message": message, "type": "unavailable_error"}},
                            status_code=503, headers={"Retry-After": "5"})

    # HEAD for load balancers and `curl -I`; /ping is SageMaker's (and vLLM's) readiness route
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/ping", health, methods=["GET"], operation_id="ping_get")
    app.add_api_route("/ping", health, methods=["POST"], operation_id="ping_post", include_in_schema=False)
    app.add_api_route("/ping", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/version")
    async def version():
        return {"version": thawed_version()}

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/cache")
    async def cache(request: Request):
        s = ready_state(request)
        lazy = getattr(s.loaded, "lazy", None)
        if lazy is None:
            return {"lazy": False, "detail": "a dense model directory is served; there is no decoded-weight cache"}
        stats = lazy.cache.stats().as_dict()
        keys = stats.pop("keys", [])
        budget = stats.get("budget_bytes")
        return {
            "lazy": True,
            "device": s.loaded.device.type,
            "decoded_layers": len(keys),
            "compressed_weights": len(set(lazy.lazy_keys)),
            "bytes_used": stats["bytes_used"],
            "budget_bytes": budget,
            "decoded_model_bytes": lazy.decoded_nbytes,
            "peak_bytes": stats["peak_bytes"],
            "hits": stats["hits"],
            "misses": stats["misses"],
            "evictions": stats["evictions"],
            "prefetched": stats["prefetched"],
            "decodes": stats["decodes"],
            "decode_seconds": stats.get("decode_seconds", {}),
            "load_seconds": round(getattr(s.loaded, "load_seconds", 0.0), 3),
        }

    from .openai_routes import router as openai_router
    from .tgi_routes import router as tgi_router

    app.include_router(openai_router)
    app.include_router(tgi_router)
    return app

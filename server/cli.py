"""The ``thawed`` console script: the runtime's subcommands plus ``serve``.

``thawed serve CKPT [--host] [--port] [--device] ...``: every option is also a ``THAWED_*``
environment variable (pydantic-settings); a flag given on the command line wins over the
environment, the environment over the defaults. The server builds on the runtime, never the
reverse: this module extends ``thawed.runtime.cli.build_parser()``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from pydantic import ValidationError

from thawed.codecs.errors import ThawedError
from thawed.runtime import cli as runtime_cli

__all__ = ["main", "build_parser", "settings_from_args"]

log = logging.getLogger("thawed")

# flag -> settings field; every flag defaults to "not given" so the environment can fill it in
_SERVE_FLAGS = [
    ("--host", "host", str, "address to bind (default 127.0.0.1; 0.0.0.0 in a container) [THAWED_HOST]"),
    ("--port", "port", int, "port (default 8000; 0 = any free port) [THAWED_PORT]"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N (default auto) [THAWED_DEVICE]"),
    ("--dtype", "dtype", str, "auto | float32 | bfloat16 | float16 (default auto) [THAWED_DTYPE]"),
    ("--cache-budget", "cache_budget", str,
     "decoded-weight cache budget: auto, bytes, 512MiB, 2G or 25%% (default auto) [THAWED_CACHE_BUDGET]"),
    ("--prefetch", "prefetch", int, "layers decoded ahead (default 1) [THAWED_PREFETCH]"),
    ("--max-queue", "max_queue", int,
     "requests that may wait for a slot; more are answered 429 (default 32) [THAWED_MAX_QUEUE]"),
    ("--max-running", "max_running", int,
     "sequences decoded at once, token by token in turn (default 8) [THAWED_MAX_RUNNING]"),
    ("--max-model-len", "max_model_len", int, "context length (default: the model's) [THAWED_MAX_MODEL_LEN]"),
    ("--direct", "direct", str,
     "auto | on | off: run linears from packed codes where a fused kernel runs (CPU: rtn <=4 bits; CUDA: rtn, "
     "cvxq, hyperc) [THAWED_DIRECT]"),
    ("--kernels", "kernels", str,
     "auto | off: the Triton kernels on CUDA (off = the PyTorch decoders) [THAWED_KERNELS]"),
    ("--ring", "ring", str,
     "auto | on | off: under a budget, stream decoder layers through a ring of slots (auto = on CUDA) [THAWED_RING]"),
    ("--prefill-chunk", "prefill_chunk", int, "prompt tokens per prefill forward (default 512) [THAWED_PREFILL_CHUNK]"),
    ("--default-max-tokens", "default_max_tokens", int,
     "new tokens for chat/TGI requests that give no limit (default 512) [THAWED_DEFAULT_MAX_TOKENS]"),
    ("--max-request-bytes", "max_request_bytes", int,
     "largest request body accepted; larger ones get 413 (default 32 MiB) [THAWED_MAX_REQUEST_BYTES]"),
    ("--api-key", "api_key", str, "require `Authorization: Bearer KEY` on every route but /health [THAWED_API_KEY]"),
    ("--served-model-name", "served_model_name", str,
     "model id in /v1/models (default: the checkpoint folder name) [THAWED_SERVED_MODEL_NAME]"),
    ("--log-level", "log_level", str, "debug | info | warning | error (default info) [THAWED_LOG_LEVEL]"),
    ("--sse-keepalive", "sse_keepalive", float,
     "seconds of silence after which a stream sends `: keep-alive` (default 15; 0 = never) [THAWED_SSE_KEEPALIVE]"),
    ("--timeout-header", "timeout_header", float,
     "seconds a client may take to send a request's line and headers; slower connections are closed "
     "(default 10) [THAWED_TIMEOUT_HEADER]"),
    ("--timeout-body", "timeout_body", float,
     "longest pause while a request body is read; answered 408 (default 30) [THAWED_TIMEOUT_BODY]"),
    ("--timeout-keep-alive", "timeout_keep_alive", float,
     "seconds an idle keep-alive connection stays open (uvicorn; default 5) [THAWED_TIMEOUT_KEEP_ALIVE]"),
    ("--limit-concurrency", "limit_concurrency", int,
     "open connections + running requests before uvicorn answers 503 (default 256) [THAWED_LIMIT_CONCURRENCY]"),
]


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (OpenAI- and TGI-compatible)",
                       description="Serve a thawed checkpoint. Every option is also an environment variable THAWED_<NAME>.")
    p.add_argument("ckpt", nargs="?", default=argparse.SUPPRESS,
                   help="thawed checkpoint directory (or an HF model directory) [THAWED_CHECKPOINT]")
    for flag, dest, typ, help_ in _SERVE_FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=argparse.SUPPRESS, help=help_)
    add_serve_switches(p)
    return p


def add_serve_switches(p: argparse.ArgumentParser,
                       preload_help: str = "decode every layer before reporting ready") -> None:
    """The on/off flags of `serve` (also used by `serve-cluster`, server/cluster/cli.py)."""
    p.add_argument("--preload", dest="preload", action="store_true", default=argparse.SUPPRESS,
                   help=f"{preload_help} [THAWED_PRELOAD]")
    p.add_argument("--no-batching", dest="batching", action="store_false", default=argparse.SUPPRESS,
                   help="decode each sequence alone through transformers' forward, without the fast path "
                        "[THAWED_BATCHING=false]")
    p.add_argument("--compile", dest="compile", action="store_true", default=argparse.SUPPRESS,
                   help="torch.compile the batched decode step (a compile on first use) [THAWED_COMPILE]")
    p.add_argument("--strict-model-name", dest="strict_model_name", action="store_true", default=argparse.SUPPRESS,
                   help="reject requests naming another model [THAWED_STRICT_MODEL_NAME]")


def settings_error(exc: ValidationError, command: str) -> ThawedError:
    """A pydantic settings error as one line naming the setting, its flag and its variable."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ()))
    where = f"setting {field!r} (flag --{field.replace('_', '-')} or THAWED_{field.upper()})" if field else "settings"
    return ThawedError(f"{command} {where}: {first.get('msg')}")


def build_parser() -> argparse.ArgumentParser:
    parser = runtime_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    add_serve_parser(sub)
    return parser


def settings_from_args(args: argparse.Namespace):
    from .settings import Settings

    given = {dest: getattr(args, dest) for _, dest, _, _ in _SERVE_FLAGS if hasattr(args, dest)}
    for dest in ("preload", "strict_model_name", "batching"):
        if hasattr(args, dest):
            given[dest] = getattr(args, dest)
    if hasattr(args, "ckpt"):
        given["checkpoint"] = args.ckpt
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise settings_error(exc, "serve") from None


def serve(settings) -> int:
    import uvicorn

    from .app import create_app

    if not settings.checkpoint:
        raise ThawedError("no checkpoint given: `thawed serve CKPT` or set THAWED_CHECKPOINT")
    if not Path(settings.checkpoint).exists():
        raise ThawedError(f"checkpoint {settings.checkpoint} does not exist; give a directory written by "
                          "`thawed compress` (mounted read-only in a container)")
    from .connections import MAX_HEADER_BYTES, bind_socket, protocol_class

    level = settings.log_level
    logging.getLogger("thawed").setLevel("DEBUG" if level == "trace" else level.upper())
    sock = bind_socket(settings.host, settings.port)  # bind first: a busy port fails before the model loads
    port = sock.getsockname()[1]
    app = create_app(settings)
    log.info("serving %s on http://%s:%d", settings.checkpoint, settings.host, port)
    config = uvicorn.Config(app, log_level=level, timeout_graceful_shutdown=10,
                            http=protocol_class(settings.timeout_header),
                            timeout_keep_alive=settings.timeout_keep_alive,
                            limit_concurrency=settings.limit_concurrency,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        return runtime_cli.main(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=min(level, logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    try:
        return serve(settings_from_args(args))
    except ThawedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

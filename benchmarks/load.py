"""Bounded load test for ``thawed serve``: N concurrent clients for T seconds, loopback only.

Starts ``thawed serve CKPT`` on 127.0.0.1 (a free port) as a subprocess, waits for /health, then
runs N asyncio/httpx clients that each send requests back to back until T seconds have passed (or
until each has sent --requests). By default every request is a streaming chat request; with
``--mix`` the clients cycle through four kinds: streaming chat, non-streaming completion,
TGI ``/generate_stream``, and a streaming chat that disconnects after its first token. Every
response is checked (status; SSE framing: each event ``data: <json>`` or a ``:`` comment, chunk
shape, ``[DONE]`` last on OpenAI routes and none on TGI's; usage present). A 429 is counted and
the client waits ``Retry-After`` before trying again. The server's RSS is sampled every 0.2 s and
``/health`` is polled every 0.25 s throughout (its latency and any non-200 are reported).

Prints one JSON report: requests by kind, statuses, 429s, 5xx, malformed, time to first token and
per-stream tokens/s (p50/p95), aggregate tokens/s, /health latency, RSS at ready and peak. Exits 1
when any response was 5xx or malformed, /health ever failed, or the peak RSS exceeds --max-rss-mib.

    python benchmarks/load.py CKPT --clients 32 --seconds 60 --mix --max-running 8 --max-queue 16
    python benchmarks/load.py CKPT --clients 16 --seconds 60 --max-running 8 --max-queue 4
    python benchmarks/load.py CKPT --clients 1 --requests 3 --max-tokens 64      # one stream
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Give three tips for learning to code.",
    "Describe a cat to someone who has never seen one.",
    "What does a compiler do?",
    "Summarise the water cycle.",
    "Name some uses of copper.",
]


@dataclass
class Stats:
    statuses: dict[int, int] = field(default_factory=dict)
    malformed: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tok_per_s: list[float] = field(default_factory=list)
    tokens: int = 0
    completed: int = 0
    transport_errors: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    disconnects: int = 0
    health_ms: list[float] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def check_chunk(obj: dict) -> str | None:
    if "error" in obj:
        return f"error event: {obj['error']}"
    if obj.get("object") != "chat.completion.chunk" or not isinstance(obj.get("id"), str):
        return f"bad chunk header: {str(obj)[:200]}"
    if not isinstance(obj.get("choices"), list):
        return "chunk without choices"
    for c in obj["choices"]:
        if not isinstance(c.get("delta"), dict) or c.get("index") != 0:
            return f"bad choice: {str(c)[:200]}"
        if c.get("finish_reason") not in (None, "stop", "length"):
            return f"bad finish_reason {c.get('finish_reason')!r}"
    return None


async def one_request(client: httpx.AsyncClient, stats: Stats, args, i: int, disconnect: bool = False) -> float:
    """One streaming chat request; returns seconds to wait before the next (Retry-After on 429).
    ``disconnect``: close the connection after the first token (the server must cancel it)."""
    body = {"model": "x", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": args.max_tokens, "temperature": 0.7, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    finished = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            stats.statuses[r.status_code] = stats.statuses.get(r.status_code, 0) + 1
            if r.status_code != 200:
                raw = await r.aread()
                try:
                    err = json.loads(raw)["error"]
                    assert {"message", "type", "code"} <= set(err)
                except Exception:
                    stats.malformed.append(f"status {r.status_code} without the error envelope: {raw[:200]!r}")
                if r.status_code == 429:
                    return float(r.headers.get("retry-after", "1"))
                return 0.5
            if not r.headers.get("content-type", "").startswith("text/event-stream"):
                stats.malformed.append(f"content-type {r.headers.get('content-type')}")
            buf = ""
            done = False
            async for text in r.aiter_text():
                buf += text
                while "\n\n" in buf:
                    event, buf = buf.split("\n\n", 1)
                    if event.startswith(":"):  # an SSE comment (keep-alive)
                        continue
                    if done:
                        stats.malformed.append("data after [DONE]")
                    if not event.startswith("data: "):
                        stats.malformed.append(f"event without 'data: ': {event[:100]!r}")
                        continue
                    payload = event[len("data: "):]
                    if payload == "[DONE]":
                        done = True
                        continue
                    obj = json.loads(payload)
                    problem = check_chunk(obj)
                    if problem:
                        stats.malformed.append(problem)
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for c in obj.get("choices", []):
                        if c["delta"].get("content"):
                            now = time.perf_counter()
                            first = first or now
                            last = now
                        if c.get("finish_reason"):
                            finished = True
                if disconnect and first is not None:
                    break
            if disconnect:
                stats.disconnects += 1
                return 0.0
            if not done or buf.strip():
                stats.malformed.append("stream did not end with data: [DONE]")
            if not finished or not usage:
                stats.malformed.append("no finish_reason or no usage chunk")
    except (httpx.TransportError, json.JSONDecodeError) as exc:
        stats.transport_errors.append(f"{type(exc).__name__}: {exc}")
        return 0.5
    stats.completed += 1
    if first is not None:
        stats.ttft.append(first - t0)
    if usage:
        n = usage["completion_tokens"]
        stats.tokens += n
        if first is not None and last is not None and n > 1 and last > first:
            stats.tok_per_s.append((n - 1) / (last - first))
    return 0.0


def _refused(stats: Stats, r: httpx.Response, raw: bytes) -> float:
    try:
        err = json.loads(raw)["error"]
        assert {"message", "type", "code"} <= set(err)
    except Exception:
        stats.malformed.append(f"status {r.status_code} without the error envelope: {raw[:200]!r}")
    return float(r.headers.get("retry-after", "1")) if r.status_code == 429 else 0.5


async def completion_request(client: httpx.AsyncClient, stats: Stats, args, i: int) -> float:
    """One non-streaming /v1/completions request."""
    body = {"model": "x", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
            "temperature": 0.7, "seed": i, "ignore_eos": args.ignore_eos}
    try:
        r = await client.post("/v1/completions", json=body)
    except httpx.TransportError as exc:
        stats.transport_errors.append(f"{type(exc).__name__}: {exc}")
        return 0.5
    stats.statuses[r.status_code] = stats.statuses.get(r.status_code, 0) + 1
    if r.status_code != 200:
        return _refused(stats, r, r.content)
    try:
        obj = r.json()
        assert obj["object"] == "text_completion" and isinstance(obj["choices"][0]["text"], str)
        stats.tokens += obj["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001
        stats.malformed.append(f"bad completion: {type(exc).__name__}: {r.text[:200]}")
        return 0.0
    stats.completed += 1
    return 0.0


async def tgi_stream_request(client: httpx.AsyncClient, stats: Stats, args, i: int) -> float:
    """One TGI /generate_stream request: token events, the last with generated_text, no [DONE]."""
    body = {"inputs": PROMPTS[i % len(PROMPTS)],
            "parameters": {"max_new_tokens": args.max_tokens, "do_sample": True, "seed": i, "details": True}}
    events = []
    try:
        async with client.stream("POST", "/generate_stream", json=body) as r:
            stats.statuses[r.status_code] = stats.statuses.get(r.status_code, 0) + 1
            if r.status_code != 200:
                return _refused(stats, r, await r.aread())
            buf = ""
            async for text in r.aiter_text():
                buf += text
                while "\n\n" in buf:
                    event, buf = buf.split("\n\n", 1)
                    if event.startswith(":"):
                        continue
                    if not event.startswith("data:") or "[DONE]" in event:
                        stats.malformed.append(f"TGI event {event[:80]!r}")
                        continue
                    events.append(json.loads(event[5:]))
    except (httpx.TransportError, json.JSONDecodeError) as exc:
        stats.transport_errors.append(f"{type(exc).__name__}: {exc}")
        return 0.5
    if not events or events[-1].get("generated_text") is None or any(e.get("generated_text") is not None
                                                                      for e in events[:-1]):
        stats.malformed.append(f"TGI stream without a final generated_text: {str(events[-1:])[:200]}")
        return 0.0
    stats.completed += 1
    stats.tokens += len(events)
    return 0.0


KINDS = ("chat_stream", "completion", "tgi_stream", "disconnect")


async def client_loop(url: str, stats: Stats, args, k: int, deadline: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.request_timeout)) as client:
        i = k
        sent = 0
        while time.monotonic() < deadline and (args.requests is None or sent < args.requests):
            kind = KINDS[(i // args.clients + k) % len(KINDS)] if args.mix else "chat_stream"
            stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
            if kind == "completion":
                wait = await completion_request(client, stats, args, i)
            elif kind == "tgi_stream":
                wait = await tgi_stream_request(client, stats, args, i)
            else:
                wait = await one_request(client, stats, args, i, disconnect=kind == "disconnect")
            sent += 1
            i += args.clients
            if wait:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))


_HEALTH_POLLER = """
import json, sys, time, httpx
url, deadline = sys.argv[1], time.time() + float(sys.argv[2])
ms, failures = [], []
with httpx.Client(base_url=url, timeout=10) as c:
    while time.time() < deadline:
        t0 = time.perf_counter()
        try:
            r = c.get("/health")
            if r.status_code != 200:
                failures.append(f"status {r.status_code}")
        except httpx.TransportError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        ms.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.25)
print(json.dumps({"ms": ms, "failures": failures}))
"""


def start_health_poller(url: str, seconds: float) -> subprocess.Popen:
    """/health polled every 0.25 s from its own process (the clients' event loop and GIL would
    otherwise add their own delays to the figure)."""
    return subprocess.Popen([sys.executable, "-c", _HEALTH_POLLER, url, str(seconds)], stdout=subprocess.PIPE,
                            text=True)


def collect_health(poller: subprocess.Popen, stats: Stats) -> None:
    out, _ = poller.communicate(timeout=60)
    try:
        got = json.loads(out)
    except ValueError:
        stats.health_failures.append(f"the /health poller printed {out[:200]!r}")
        return
    stats.health_ms.extend(got["ms"])
    stats.health_failures.extend(got["failures"])


def sample_rss(proc: psutil.Process, out: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            return
        out["peak"] = max(out.get("peak", 0), rss)
        out["last"] = rss
        stop.wait(0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="?", help="checkpoint to serve (omit with --url)")
    p.add_argument("--url", help="use an already running server instead (no RSS figures)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--requests", type=int, default=None, help="requests per client (default: until --seconds)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--mix", action="store_true",
                   help="cycle through streaming chat, completion, TGI stream and disconnect-after-first-token")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--max-running", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--max-rss-mib", type=float, default=4096.0)
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for thawed serve")
    args = p.parse_args(argv)
    if not args.url and not args.ckpt:
        p.error("give CKPT or --url")

    proc = None
    rss: dict = {}
    stop = threading.Event()
    if args.url:
        url = args.url.rstrip("/")
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "thawed.server.cli", "serve", args.ckpt, "--host", "127.0.0.1",
               "--port", str(port), "--max-running", str(args.max_running), "--max-queue", str(args.max_queue),
               "--log-level", "warning", *args.server_arg]
        proc = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc is not None and proc.poll() is not None:
                print(f"the server exited with {proc.returncode}", file=sys.stderr)
                return 1
            if time.monotonic() - t0 > 300:
                print("the server did not become ready in 300 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        ready_s = time.monotonic() - t0
        if proc is not None:
            ps = psutil.Process(proc.pid)
            rss["ready"] = ps.memory_info().rss
            threading.Thread(target=sample_rss, args=(ps, rss, stop), daemon=True).start()

        stats = Stats()
        start = time.monotonic()
        deadline = start + args.seconds

        async def run():
            await asyncio.gather(*(client_loop(url, stats, args, k, deadline) for k in range(args.clients)))

        poller = start_health_poller(url, args.seconds)
        asyncio.run(run())
        wall = time.monotonic() - start
        collect_health(poller, stats)
        stop.set()
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        stop.set()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    five = sum(v for k, v in stats.statuses.items() if k >= 500)
    report = {
        "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]),
        "clients": args.clients, "seconds": round(wall, 1), "max_tokens": args.max_tokens,
        "server": {"max_running": args.max_running, "max_queue": args.max_queue, "ready_seconds": round(ready_s, 1)},
        "requests": sum(stats.statuses.values()) + len(stats.transport_errors),
        "kinds": stats.kinds, "disconnects": stats.disconnects,
        "health": {"polls": len(stats.health_ms), "failures": len(stats.health_failures),
                   "failure_examples": stats.health_failures[:3], "p50_ms": pct(stats.health_ms, 0.5),
                   "p99_ms": pct(stats.health_ms, 0.99), "max_ms": pct(stats.health_ms, 1.0)},
        "completed_streams": stats.completed,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "429": stats.statuses.get(429, 0), "5xx": five,
        "malformed": len(stats.malformed), "malformed_examples": stats.malformed[:5],
        "transport_errors": len(stats.transport_errors), "transport_examples": stats.transport_errors[:3],
        "ttft_s": {"p50": pct(stats.ttft, 0.5), "p95": pct(stats.ttft, 0.95), "max": pct(stats.ttft, 1.0)},
        "stream_tokens_per_s": {"p50": pct(stats.tok_per_s, 0.5), "p5": pct(stats.tok_per_s, 0.05),
                                "mean": round(statistics.fmean(stats.tok_per_s), 2) if stats.tok_per_s else None},
        "generated_tokens": stats.tokens,
        "aggregate_tokens_per_s": round(stats.tokens / wall, 2) if wall else None,
        "rss_mib": {"ready": round(rss.get("ready", 0) / 2**20, 1), "peak": round(rss.get("peak", 0) / 2**20, 1)},
        "server_metrics": {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                           if line.startswith(("thawed_requests_rejected_total", "thawed_requests_cancelled_total",
                                               "thawed_generation_tokens_total", "thawed_request_errors_total"))},
    }
    print(json.dumps(report, indent=1))
    bad = five > 0 or stats.malformed or stats.transport_errors or stats.health_failures
    if rss.get("peak", 0) / 2**20 > args.max_rss_mib:
        print(f"peak RSS {rss['peak'] / 2**20:.0f} MiB is over --max-rss-mib {args.max_rss_mib}", file=sys.stderr)
        bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

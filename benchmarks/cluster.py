"""thawed on Ray Serve, end to end on a real checkpoint: correctness, spread, failover, throughput.

Starts a local Ray cluster in this process (``thawed.server.cluster.cli.serve_cluster``, what
``thawed serve-cluster`` runs) and, through Serve's HTTP proxy:
1. checks the answers: the OpenAI SDK completion and a streamed chat say "Paris" for the capital of
   France, ``/metrics`` answers with thawed's metrics;
2. sends 32 requests, 8 at a time, and counts them per replica (``X-Thawed-Replica``);
3. runs ``--clients`` streaming chat clients back to back for ``--seconds`` (60) and SIGKILLs the
   process of a replica that is streaming at ``--kill-at`` seconds. Checks: every stream in flight on
   it ends with an error event (no hang, no truncated body), no request that starts after its death
   gets a 5xx or a transport error, and Serve brings a new replica up that takes traffic;
4. measures throughput for ``--throughput-seconds`` each: plain ``thawed serve`` (no Ray), one
   replica with every CPU, two replicas with half each. Same clients, same requests.

Prints a JSON report; exits 1 when a check fails. The figures in docs/CLUSTER.md came from:

    python benchmarks/cluster.py ~/.cache/thawed/smollm2-135m-instruct-rtn-bits8-group_size64
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import psutil

QUESTION = "What is the capital of France?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    start: float
    end: float
    status: int
    replica: str
    outcome: str  # done | error_event | http | transport:<exception> | cut
    tokens: int


def stream_chat(client: httpx.Client, max_tokens: int, inflight: dict, key: int) -> Result:
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0.7, "ignore_eos": True}
    t0 = time.monotonic()
    replica, status, tokens, outcome = "", 0, 0, "cut"
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            status, replica = r.status_code, r.headers.get("x-thawed-replica", "")
            if status != 200:
                r.read()
                return Result(t0, time.monotonic(), status, replica, "http", 0)
            inflight[key] = replica
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    outcome = "done"
                    continue
                event = json.loads(data)
                if "error" in event:
                    outcome = "error_event"
                elif event.get("choices") and event["choices"][0]["delta"].get("content"):
                    tokens += 1
    except httpx.HTTPError as exc:
        outcome = f"transport:{type(exc).__name__}"
    finally:
        inflight.pop(key, None)
    return Result(t0, time.monotonic(), status, replica, outcome, tokens)


def run_load(url: str, clients: int, seconds: float, max_tokens: int, on_tick=None) -> list[Result]:
    """``clients`` threads streaming back to back for ``seconds``; ``on_tick(elapsed, inflight)``
    is called every 0.1 s from the main thread."""
    results: list[Result] = []
    inflight: dict[int, str] = {}
    counter = iter(range(10**9))
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker():
        with httpx.Client(base_url=url, timeout=httpx.Timeout(60)) as c:
            while time.monotonic() < deadline:
                with lock:
                    key = next(counter)
                res = stream_chat(c, max_tokens, inflight, key)
                with lock:
                    results.append(res)
                if res.status == 429:
                    time.sleep(0.5)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if on_tick is not None:
            on_tick(time.monotonic() - t0, dict(inflight))
        time.sleep(0.1)
    return results


def summary(results: list[Result], seconds: float) -> dict:
    ok = [r for r in results if r.outcome == "done"]
    lat = sorted(r.end - r.start for r in ok)
    return {"requests": len(results), "completed": len(ok), "statuses": dict(Counter(r.status for r in results)),
            "outcomes": dict(Counter(r.outcome for r in results)),
            "tokens_per_s": round(sum(r.tokens for r in ok) / seconds, 1),
            "requests_per_s": round(len(ok) / seconds, 2),
            "latency_p50_s": round(statistics.median(lat), 2) if lat else None,
            "per_replica": dict(Counter(r.replica for r in ok))}


class Cluster:
    """serve_cluster in a thread: ``with Cluster(settings, cluster) as url``."""

    def __init__(self, settings, cluster) -> None:
        self.settings, self.cluster = settings, cluster
        self.stop, self.ready, self.failure = threading.Event(), threading.Event(), []

    def __enter__(self) -> str:
        from thawed.server.cluster.cli import serve_cluster

        def run():
            try:
                serve_cluster(self.settings, self.cluster, stop=self.stop, ready=self.ready)
            except BaseException as exc:  # noqa: BLE001
                self.failure.append(exc)
                self.ready.set()

        self.thread = threading.Thread(target=run, daemon=True)
        t0 = time.monotonic()
        self.thread.start()
        if not self.ready.wait(600) or self.failure:
            raise RuntimeError(f"the cluster did not start: {self.failure}")
        self.start_s = time.monotonic() - t0
        return f"http://127.0.0.1:{self.settings.port}"

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)


def check_answers(url: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model="m", prompt="The capital of France is", max_tokens=8, temperature=0)
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0, stream=True)
        if c.choices]
    metrics = httpx.get(f"{url}/metrics", timeout=30)
    out = {"completion": done.choices[0].text, "streamed_chat": "".join(chunks), "stream_chunks": len(chunks),
           "metrics_status": metrics.status_code, "metrics_replica": metrics.headers.get("x-thawed-replica")}
    assert "Paris" in out["completion"], out
    assert "Paris" in out["streamed_chat"] and len(chunks) > 2, out
    assert metrics.status_code == 200 and "thawed_num_requests_running" in metrics.text, metrics.text[:300]
    return out


def spread(url: str, n: int = 32) -> dict:
    def one(i):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": f"Count to {i}:", "max_tokens": 16}, timeout=120)
        assert r.status_code == 200, r.text
        return r.headers["x-thawed-replica"]

    with ThreadPoolExecutor(8) as pool:
        counts = Counter(pool.map(one, range(n)))
    assert len(counts) == 2, counts
    return dict(counts)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def failover(url: str, app: str, args) -> dict:
    from thawed.server.cluster.deployment import replica_ids, replica_pid, wait_replaced

    before = replica_ids(app)
    kill: dict = {}

    def tick(elapsed, inflight):
        if "pid" in kill or elapsed < args.kill_at or not inflight:
            return
        victim = Counter(inflight.values()).most_common(1)[0][0]
        pid = replica_pid(victim)
        streams = [k for k, r in inflight.items() if r == victim]
        os.kill(pid, signal.SIGKILL)
        kill.update(victim=victim, pid=pid, streams=set(streams), at=time.monotonic())
        while alive(pid):
            time.sleep(0.005)
        kill["dead"] = time.monotonic()

    back: dict = {}

    def watch():
        while "dead" not in kill:
            time.sleep(0.1)
        try:
            back["new"], _ = wait_replaced(app, before, timeout=600)
            back["at"] = time.monotonic()
        except TimeoutError as exc:
            back["error"] = str(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results = run_load(url, args.clients, args.seconds, args.max_tokens, tick)
    watcher.join(600)
    assert "dead" in kill, "no replica was killed"
    after = [r for r in results if r.start > kill["dead"]]
    on_victim = [r for r in results if r.replica == kill["victim"] and r.start < kill["at"] < r.end]
    report = {
        "killed": {"replica": kill["victim"], "pid": kill["pid"], "at_s": args.kill_at},
        "streams_on_killed_replica": dict(Counter(r.outcome for r in on_victim)),
        "after_death": {"requests": len(after), "statuses": dict(Counter(r.status for r in after)),
                        "outcomes": dict(Counter(r.outcome for r in after)),
                        "per_replica": dict(Counter(r.replica for r in after))},
        "replacement": {"replica": back.get("new"), "healthy_after_death_s": round(back["at"] - kill["dead"], 1)}
        if "at" in back else back.get("error"),
        "whole_run": summary(results, args.seconds),
    }
    if "at" in back:  # the replacement takes traffic: 16 more requests, 8 at a time
        report["after_recovery_per_replica"] = spread(url, 16)
    assert on_victim and all(r.outcome == "error_event" for r in on_victim), report
    assert after and all(r.status < 500 and r.outcome in ("done", "http") for r in after), report
    assert "at" in back, report
    assert set(report["after_recovery_per_replica"]) == (before - {kill["victim"]}) | {back["new"]}, report
    return report


def plain_serve(ckpt: str, args) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "thawed.server.cli", "serve", ckpt, "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "thawed serve did not start"
            time.sleep(0.2)
        return summary(run_load(url, args.clients, args.throughput_seconds, args.max_tokens), args.throughput_seconds)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=60.0, help="failover load length")
    p.add_argument("--kill-at", type=float, default=15.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--throughput-seconds", type=float, default=30.0)
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)

    from thawed.server.cluster.settings import ClusterSettings
    from thawed.server import Settings

    cpus = os.cpu_count() or 1
    settings = Settings(checkpoint=args.ckpt, device="cpu", port=free_port(), log_level="warning")
    report: dict = {"command": "python benchmarks/cluster.py " + " ".join(argv or sys.argv[1:]), "cpus": cpus}
    ok = True
    cluster = Cluster(settings, ClusterSettings(num_replicas=2, replica_cpus=cpus / 2, app_name="bench"))
    with cluster as url:
        report["ray_and_two_replicas_ready_s"] = round(cluster.start_s, 1)
        try:
            report["answers"] = check_answers(url)
            report["spread_32_requests"] = spread(url)
            report["failover"] = failover(url, "bench", args)
        except AssertionError as exc:
            ok = False
            report["failed"] = str(exc)[:4000]
    if not args.skip_throughput:
        t = args.throughput_seconds
        report["throughput"] = {"clients": args.clients, "seconds": t, "max_tokens": args.max_tokens,
                                "thawed serve (no Ray)": plain_serve(args.ckpt, args)}
        for n in (1, 2):
            cfg = ClusterSettings(num_replicas=n, replica_cpus=cpus / n, app_name=f"bench{n}")
            with Cluster(settings.model_copy(update={"port": free_port()}), cfg) as url:
                run_load(url, args.clients, 3, args.max_tokens)  # warm every replica
                report["throughput"][f"{n} replica(s) x {cpus / n:g} CPU"] = summary(
                    run_load(url, args.clients, t, args.max_tokens), t)
    print(json.dumps(report, indent=1, default=sorted))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

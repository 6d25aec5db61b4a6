"""A local Ray cluster with 2 replicas of the tiny model, started once for this module.

Through Serve's HTTP proxy: the OpenAI SDK (completion, streamed chat) answers exactly what
``thawed serve`` answers, ``/metrics`` works, requests spread over both replicas, and when one
replica's process is killed under load its stream ends with an error event, no request that
starts after its death gets a 5xx, and Serve brings the replica back. Skipped without Ray
(``pip install 'thawed[cluster]'``). The same on SmolLM2 with a 60 s load: benchmarks/cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from server_fixtures import make_app, tiny_chat_ckpt, tiny_loaded, wait_ready  # noqa: F401

pytest.importorskip("ray.serve", reason="the cluster extra is not installed: pip install 'thawed[cluster]'")
import httpx  # noqa: E402

from thawed.server.cluster.deployment import replica_ids, replica_pid, wait_replaced  # noqa: E402
from thawed.server.cluster.replica import REPLICA_HEADER  # noqa: E402

pytestmark = pytest.mark.cluster

APP = "thawed-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_url(tiny_chat_ckpt):
    from thawed.server.cluster.cli import serve_cluster
    from thawed.server.cluster.settings import ClusterSettings
    from thawed.server import Settings

    port = _free_port()
    settings = Settings(checkpoint=str(tiny_chat_ckpt), device="cpu", port=port, served_model_name="tiny")
    cluster = ClusterSettings(num_replicas=2, health_check_period=1, app_name=APP)
    stop, ready, failure = threading.Event(), threading.Event(), []

    def run():
        try:
            serve_cluster(settings, cluster, stop=stop, ready=ready)
        except BaseException as exc:  # noqa: BLE001 - reported by the fixture
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name="serve-cluster", daemon=True)
    thread.start()
    assert ready.wait(300), "the Ray cluster did not come up in 300 s"
    if failure:
        raise failure[0]
    yield f"http://127.0.0.1:{port}"
    stop.set()
    thread.join(120)


def test_same_answers_as_thawed_serve(cluster_url, tiny_loaded):
    from fastapi.testclient import TestClient
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster_url}/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model="tiny", prompt="the capital of", max_tokens=6, temperature=0)
    messages = [{"role": "user", "content": "where is the king"}]
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices]
    with TestClient(make_app(tiny_loaded, served_model_name="tiny")) as local:  # `thawed serve`'s app
        wait_ready(local)
        want = local.post("/v1/completions", json={"prompt": "the capital of", "max_tokens": 6,
                                                   "temperature": 0}).json()["choices"][0]["text"]
        want_chat = local.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8,
                                                             "temperature": 0}).json()
    assert done.choices[0].text == want and want
    assert "".join(chunks) == want_chat["choices"][0]["message"]["content"] and len(chunks) > 1
    metrics = httpx.get(f"{cluster_url}/metrics", timeout=30)
    assert metrics.status_code == 200 and metrics.headers[REPLICA_HEADER]
    assert "thawed_" in metrics.text and "text/plain" in metrics.headers["content-type"]
    health = httpx.get(f"{cluster_url}/health", timeout=30)
    assert health.json() == {"status": "ok"}
    tgi = httpx.post(f"{cluster_url}/generate", json={"inputs": "the capital of",
                                                      "parameters": {"max_new_tokens": 6}}, timeout=30)
    assert tgi.status_code == 200 and tgi.json()["generated_text"] == want


def test_requests_spread_over_both_replicas(cluster_url):
    def one(i: int) -> str:
        r = httpx.post(f"{cluster_url}/v1/completions", json={"prompt": "the", "max_tokens": 16,
                                                              "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        return r.headers[REPLICA_HEADER]

    with ThreadPoolExecutor(8) as pool:
        counts = Counter(pool.map(one, range(40)))
    print(f"requests per replica: {dict(counts)}")
    assert len(counts) == 2 and min(counts.values()) >= 4, counts


def test_killing_a_replica_under_load(cluster_url):
    stop = threading.Event()
    log: list[tuple[float, float, int, str]] = []  # (start, end, status, replica)

    def load():
        with httpx.Client(base_url=cluster_url, timeout=60) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 8, "temperature": 0})
                    log.append((t0, time.monotonic(), r.status_code, r.headers.get(REPLICA_HEADER, "")))
                except httpx.HTTPError as exc:  # a connection cut counts as a failure
                    log.append((t0, time.monotonic(), 599, type(exc).__name__))

    workers = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    time.sleep(2)
    before = replica_ids(APP)
    assert len(before) == 2
    body = {"prompt": "the", "max_tokens": 250, "n": 8, "stream": True, "ignore_eos": True}
    events: list[str] = []
    with httpx.Client(base_url=cluster_url, timeout=httpx.Timeout(30)) as c:
        with c.stream("POST", "/v1/completions", json=body) as stream:
            assert stream.status_code == 200
            victim = stream.headers[REPLICA_HEADER]
            pid = replica_pid(victim)
            for line in stream.iter_lines():  # a read timeout (30 s) would fail the test: no hang
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 3:
                    os.kill(pid, signal.SIGKILL)
    dead = _wait_dead(pid)
    last = json.loads(events[-1])
    assert "error" in last and last["error"]["code"] == 503, events[-3:]
    assert "[DONE]" not in events
    time.sleep(4)  # load on the survivor while Serve replaces the dead replica
    new, _ = wait_replaced(APP, before, timeout=180)
    back_at = time.monotonic()
    time.sleep(4)  # traffic reaches the new replica too
    stop.set()
    for w in workers:
        w.join(60)
    after = [entry for entry in log if entry[0] > dead]
    statuses = Counter(status for _, _, status, _ in after)
    print(f"victim {victim} (pid {pid}); requests after its death: {dict(statuses)}; "
          f"per replica: {dict(Counter(r for *_, r in after))}")
    assert after and all(status < 500 for status in statuses), statuses
    replicas_back = {r for t0, _, s, r in log if t0 > back_at and s == 200}
    assert replicas_back == (before - {victim}) | {new}, (replicas_back, before, victim, new)


def _wait_dead(pid: int, timeout: float = 30) -> float:
    """When the process is gone (or a zombie): the moment of death."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return time.monotonic()
        except psutil.NoSuchProcess:
            return time.monotonic()
        time.sleep(0.01)
    raise AssertionError(f"replica process {pid} still alive {timeout} s after SIGKILL")

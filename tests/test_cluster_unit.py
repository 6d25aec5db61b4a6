"""thawed.server.cluster without Ray: settings, Serve options, the replica's ASGI wrapper, the proxy
middleware and the command line. The live Ray cluster is tests/test_cluster_live.py."""

from __future__ import annotations

import asyncio
import json
import sys
import threading

import httpx
import pytest
from server_fixtures import make_app, tiny_chat_ckpt, tiny_loaded  # noqa: F401

from thawed.server.cluster.proxy import LOST_MESSAGE, ReplicaLossGuard, middlewares
from thawed.server.cluster.replica import REPLICA_HEADER, ReplicaApp, replica_problem
from thawed.server.cluster.settings import ClusterSettings, deployment_options
from thawed.codecs.errors import ThawedError
from thawed.server import Settings


# ---- settings and Serve options ------------------------------------------------------------------
def test_fixed_replicas_and_resources():
    opts = deployment_options(ClusterSettings(num_replicas=3, replica_cpus=2, replica_gpus=0.5),
                              Settings(checkpoint="x", max_running=4, max_queue=6))
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert opts["max_ongoing_requests"] == 10  # max_running + max_queue: the engine's own 429 is kept
    assert opts["health_check_period_s"] == 5 and opts["health_check_timeout_s"] == 30
    assert deployment_options(ClusterSettings(), Settings(checkpoint="x"))["num_replicas"] == 1


def test_autoscaling_config():
    opts = deployment_options(ClusterSettings(min_replicas=0, max_replicas=4, target_ongoing_requests=2,
                                              max_ongoing_requests=8), Settings(checkpoint="x"))
    assert "num_replicas" not in opts and opts["max_ongoing_requests"] == 8
    assert opts["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 4,
                                          "target_ongoing_requests": 2}
    assert deployment_options(ClusterSettings(max_replicas=2), Settings(checkpoint="x"))[
        "autoscaling_config"]["min_replicas"] == 1


@pytest.mark.parametrize("kwargs, words", [
    ({"num_replicas": 2, "max_replicas": 3}, "not both"),
    ({"min_replicas": 3, "max_replicas": 2}, "more than max_replicas"),
    ({"min_replicas": 1}, "needs max_replicas"),
    ({"num_replicas": 0}, "greater than or equal to 1"),
])
def test_bad_cluster_settings(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ClusterSettings(**kwargs)


def test_cuda_without_a_gpu_per_replica_is_refused():
    with pytest.raises(ThawedError, match="--replica-gpus 1"):
        deployment_options(ClusterSettings(), Settings(checkpoint="x", device="cuda"))
    assert deployment_options(ClusterSettings(replica_gpus=1), Settings(checkpoint="x", device="cuda"))


def test_cluster_settings_from_environment_and_flags_win(monkeypatch):
    from thawed.server.cluster.cli import build_parser, cluster_settings_from_args
    from thawed.server.cli import settings_from_args

    monkeypatch.setenv("THAWED_NUM_REPLICAS", "2")
    monkeypatch.setenv("THAWED_REPLICA_CPUS", "0.5")
    monkeypatch.setenv("THAWED_MAX_QUEUE", "3")
    args = build_parser().parse_args(["serve-cluster", "/m", "--num-replicas", "4", "--port", "9100",
                                      "--cache-budget", "25%"])
    cluster, settings = cluster_settings_from_args(args), settings_from_args(args)
    assert cluster.num_replicas == 4 and cluster.replica_cpus == 0.5
    assert settings.checkpoint == "/m" and settings.port == 9100 and settings.max_queue == 3
    assert settings.cache_budget == "25%"


def test_every_serve_flag_is_a_serve_cluster_flag():
    from thawed.server.cluster.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    serve = {a.dest for a in sub.choices["serve"]._actions}
    cluster = {a.dest for a in sub.choices["serve-cluster"]._actions}
    assert serve <= cluster
    assert cluster - serve == set(ClusterSettings.model_fields)
    assert {"compress", "inspect", "generate", "eval", "serve", "serve-cluster"} <= set(sub.choices)


def test_cli_errors_name_the_fix(monkeypatch, capsys, tmp_path):
    from thawed.server.cluster.cli import main

    assert main(["serve-cluster", str(tmp_path), "--num-replicas", "2", "--max-replicas", "3"]) == 2
    assert "not both" in capsys.readouterr().err
    monkeypatch.setenv("THAWED_REPLICA_GPUS", "-1")
    assert main(["serve-cluster", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "replica_gpus" in err and "THAWED_REPLICA_GPUS" in err
    monkeypatch.delenv("THAWED_REPLICA_GPUS")
    assert main(["serve-cluster", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "every node" in err
    assert main(["serve-cluster", str(tmp_path), "--port", "0"]) == 2
    assert "fixed --port" in capsys.readouterr().err
    assert main(["serve-cluster", str(tmp_path), "--device", "cuda"]) == 2
    assert "--replica-gpus 1" in capsys.readouterr().err


def test_without_ray_the_error_says_what_to_install(monkeypatch, capsys, tmp_path):
    from thawed.server.cluster.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["serve-cluster", str(tmp_path)]) == 2
    assert "pip install 'thawed[cluster]'" in capsys.readouterr().err


# ---- the replica's ASGI wrapper ------------------------------------------------------------------
def _lifespan(app):
    """Serve starts a replica's app with uvicorn's LifespanOn, exactly as here."""
    from uvicorn import Config
    from uvicorn.lifespan.on import LifespanOn

    return LifespanOn(Config(app, lifespan="on", log_config=None))


def test_replica_takes_traffic_only_once_the_model_is_loaded(tiny_loaded):
    gate = threading.Event()
    app = ReplicaApp(make_app(tiny_loaded, gate=gate), "r1")

    async def run():
        life = _lifespan(app)
        startup = asyncio.ensure_future(life.startup())
        await asyncio.sleep(0.5)
        assert not startup.done() and app.state.status == "loading"  # Serve would not route here yet
        assert replica_problem(app.state) == "the model is still loading"
        gate.set()
        await asyncio.wait_for(startup, 30)
        assert not life.should_exit and replica_problem(app.state) is None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
            health = await client.get("/health")
            done = await client.post("/v1/completions", json={"prompt": "the", "max_tokens": 2, "temperature": 0})
        assert health.status_code == 200 and health.headers[REPLICA_HEADER] == "r1"
        assert done.status_code == 200 and done.headers[REPLICA_HEADER] == "r1"
        await life.shutdown()
        assert replica_problem(app.state) == "the replica is shutting down"

    asyncio.run(run())


def test_a_replica_whose_model_fails_to_load_fails_its_startup(tiny_loaded, caplog):
    app = ReplicaApp(make_app(tiny_loaded, fail=ThawedError("checkpoint /model is truncated")), "r2")

    async def run():
        life = _lifespan(app)
        await asyncio.wait_for(life.startup(), 30)
        return life

    life = asyncio.run(run())
    assert life.startup_failed and life.should_exit  # Serve reports the replica as failed to start
    assert "thawed replica r2: the model failed to load: checkpoint /model is truncated" in caplog.text


def test_replica_problem_reads_the_engine():
    class Engine:
        alive = False

    class State:
        status, error, engine = "ready", None, Engine()

    assert replica_problem(State()) == "the generation worker has stopped"
    State.engine.alive = True
    assert replica_problem(State()) is None


# ---- the proxy middleware ------------------------------------------------------------------------
def _stream_app(complete: bool, content_type: bytes = b"text/event-stream"):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": b"data: {\"x\": 1}\n\n", "more_body": True})
        if complete:
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        # else: the replica died, Serve's proxy returns without finishing the response

    return app


async def _silent_app(scope, receive, send):  # the replica died before it answered
    return None


def _call(app, path="/v1/completions"):
    async def run():
        sent = []

        async def receive():
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        await ReplicaLossGuard(app)(scope, receive, send)
        return sent

    return asyncio.run(run())


def test_a_cut_openai_stream_ends_with_an_error_event():
    sent = _call(_stream_app(False))
    last = sent[-1]
    assert last["type"] == "http.response.body" and not last.get("more_body", False)
    event = json.loads(last["body"].decode().removeprefix("data: "))
    assert event["error"]["code"] == 503 and event["error"]["message"] == LOST_MESSAGE


def test_a_cut_tgi_stream_ends_with_tgi_s_error_event():
    event = json.loads(_call(_stream_app(False), "/generate_stream")[-1]["body"].decode().removeprefix("data: "))
    assert event == {"error": LOST_MESSAGE, "error_type": "unavailable"}


def test_finished_and_plain_responses_pass_untouched():
    assert _call(_stream_app(True))[-1]["body"] == b"data: [DONE]\n\n"
    cut_json = _call(_stream_app(False, b"application/json"))
    assert cut_json[-1].get("more_body") is True  # a truncated plain body is not passed off as whole


def test_no_answer_becomes_503_with_retry_after():
    start, body = _call(_silent_app)
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert json.loads(body["body"])["error"]["message"] == LOST_MESSAGE


def test_the_callback_serve_imports():
    (mw,) = middlewares()
    assert mw.cls is ReplicaLossGuard


def test_the_openai_sdk_raises_on_the_error_event():
    from openai import APIError, AsyncOpenAI

    async def run():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=ReplicaLossGuard(_stream_app(False))),
                                 base_url="http://proxy")
        client = AsyncOpenAI(base_url="http://proxy/v1", api_key="unused", http_client=http, max_retries=0)
        stream = await client.completions.create(model="m", prompt="p", max_tokens=4, stream=True)
        with pytest.raises(APIError, match="stopped before it finished"):
            async for _ in stream:
                pass
        await http.aclose()

    asyncio.run(run())

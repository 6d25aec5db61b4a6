"""docker/: no Docker engine runs here, so the files are parsed and checked (non-root user,
read-only checkpoint mount, THAWED_* configuration, exec-form ``thawed serve`` entrypoint, a
Python HEALTHCHECK), and the images' command line — entrypoint + the image's environment — is
run outside Docker against a checkpoint, with the HEALTHCHECK command itself as the probe."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from server_fixtures import real_ckpt_dir, real_model_dir, tiny_chat_ckpt  # noqa: F401

DOCKER = Path(__file__).resolve().parent.parent / "docker"
IMAGES = ["Dockerfile", "Dockerfile.cpu"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage(instrs):
    last_from = max(i for i, (w, _) in enumerate(instrs) if w == "FROM")
    return instrs[last_from:]


def env_of(stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_form(stage, word: str) -> list[str]:
    (rest,) = [r for w, r in stage if w == word][-1:]
    if word == "HEALTHCHECK":
        rest = rest[rest.index("CMD ") + 4:]
    value = json.loads(rest)  # exec form is a JSON array; shell form would fail here
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile(name):
    instrs = instructions(DOCKER / name)
    stage = final_stage(instrs)
    assert exec_form(stage, "ENTRYPOINT") == ["thawed", "serve"]
    users = [r for w, r in stage if w == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    last_user = max(i for i, (w, _) in enumerate(stage) if w == "USER")
    assert all(w != "RUN" for w, _ in stage[last_user:]), "everything after USER runs as that user"
    env = env_of(stage)
    assert env["THAWED_CHECKPOINT"] == "/model" and env["THAWED_HOST"] == "0.0.0.0" and env["THAWED_PORT"] == "8000"
    assert all(k.startswith("THAWED_") or k in ("PATH", "PYTHONUNBUFFERED", "HOME", "HF_HOME", "HF_HUB_OFFLINE")
               for k in env)
    from thawed.server import Settings

    assert {k[len("THAWED_"):].lower() for k in env if k.startswith("THAWED_")} <= set(Settings.model_fields)
    health = exec_form(stage, "HEALTHCHECK")
    assert health[0] == "python" and "/health" in health[-1]
    compile(health[-1], "<healthcheck>", "exec")
    assert any(w == "EXPOSE" and r == "8000" for w, r in stage)
    assert any("torch==2.13.0" in r for w, r in instrs if w == "RUN")
    assert any(w == "VOLUME" and "/model" in r for w, r in stage)


def test_compose():
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) >= {"thawed", "thawed-cuda"}
    for name, svc in services.items():
        if name in ("prometheus", "grafana"):  # the monitoring profile: tests/test_grafana_dashboard.py
            continue
        assert (DOCKER.parent / svc["build"]["dockerfile"]).is_file()
        (vol,) = svc["volumes"]
        assert vol["target"] == svc["environment"]["THAWED_CHECKPOINT"] == "/model" and vol["read_only"] is True
        assert all(k.startswith("THAWED_") for k in svc["environment"])
        assert svc["user"].split(":")[0] not in ("0", "root")
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
    gpu = services["thawed-cuda"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["thawed"]["build"]["dockerfile"].endswith("Dockerfile.cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_image_command_line(ckpt: Path, image: str = "Dockerfile.cpu", timeout: float = 120.0) -> dict:
    """Start the image's ENTRYPOINT with the image's THAWED_* environment (checkpoint path and
    port replaced, host kept on loopback), probe it with the image's HEALTHCHECK command, send one
    request, stop it with SIGTERM (what `docker stop` sends)."""
    stage = final_stage(instructions(DOCKER / image))
    env = {k: v for k, v in os.environ.items() if not k.startswith("THAWED_")}
    env.update({k: v for k, v in env_of(stage).items() if k.startswith("THAWED_")})
    port = _free_port()
    env.update(THAWED_CHECKPOINT=str(ckpt), THAWED_PORT=str(port), THAWED_HOST="127.0.0.1", THAWED_DEVICE="cpu")
    entry = exec_form(stage, "ENTRYPOINT")
    exe = shutil.which(entry[0])
    cmd = [exe, *entry[1:]] if exe else [sys.executable, "-m", "thawed.server.cli", *entry[1:]]
    health = exec_form(stage, "HEALTHCHECK")
    health = [sys.executable if health[0] == "python" else health[0], *health[1:]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        probes = []
        while True:
            rc = subprocess.run(health, env=env, capture_output=True).returncode
            probes.append(rc)
            if rc == 0:
                break
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - t0 < timeout, "not healthy in time"
            time.sleep(0.3)
        ready = time.monotonic() - t0
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "the", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200, r.text
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    return {"probes": probes, "ready_seconds": ready, "returncode": proc.returncode, "log": out, "models": models}


def test_image_command_line_serves_tiny_checkpoint(tiny_chat_ckpt):
    res = run_image_command_line(tiny_chat_ckpt)
    assert res["probes"][-1] == 0
    # SIGTERM: graceful shutdown; uvicorn re-raises the signal after it, so -SIGTERM (143 in Docker)
    assert res["returncode"] in (0, -signal.SIGTERM) and "Application shutdown complete" in res["log"], res["log"]
    assert res["models"]["data"][0]["id"] == tiny_chat_ckpt.name


@pytest.mark.real
def test_image_command_line_serves_real_checkpoint(real_ckpt_dir):
    res = run_image_command_line(real_ckpt_dir, "Dockerfile")  # the CUDA image's command line: CPU fallback
    assert res["probes"][-1] == 0 and res["returncode"] in (0, -signal.SIGTERM), res["log"]
    assert "Application shutdown complete" in res["log"]

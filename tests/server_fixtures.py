"""Fixtures for the server tests: checkpoints, a shared loaded model, apps, a real uvicorn.

``from server_fixtures import tiny_chat_ckpt, tiny_loaded, real_ckpt_dir, make_app, LiveServer``.
The tiny model (2-layer random Llama, word-level tokenizer with a chat template) is compressed
once per session; the real SmolLM2 checkpoint is compressed once into the cache folder and
reused by later runs (and by ``benchmarks/load.py``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
import torch
from models_fixtures import make_tiny_llama, real_model_dir  # noqa: F401
from torch import nn

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}model {% endif %}"
)
# 8-bit: at 4 bits this 135M model (already Q4_1 at the source) answers some questions wrongly,
# which would make the client tests about codec quality rather than serving.
REAL_CODEC = "rtn:bits=8,group_size=64"


def compress_dir(src: Path, out: Path, codec: str = REAL_CODEC) -> Path:
    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice

    compress(src, out, Plan(parse_codec_choice(codec)), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_chat_ckpt(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    src = make_tiny_llama(tmp_path_factory.mktemp("tiny-chat-src"))
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(src)
    return compress_dir(src, tmp_path_factory.mktemp("tiny-chat") / "ckpt", "rtn:bits=4,group_size=32")


def real_checkpoint(model_dir: Path) -> Path:
    """SmolLM2 compressed with ``REAL_CODEC``, cached next to the converted model."""
    from thawed.runtime.checkpoint import Checkpoint

    out = model_dir.parent / f"{model_dir.name}-{REAL_CODEC.replace(':', '-').replace(',', '-').replace('=', '')}"
    if out.is_dir():
        try:
            Checkpoint.open(out).close()
            return out
        except Exception:  # written by an older format version: write it again
            import shutil

            shutil.rmtree(out)
    return compress_dir(model_dir, out)


@pytest.fixture(scope="session")
def real_ckpt_dir(real_model_dir) -> Path:  # noqa: F811
    return real_checkpoint(real_model_dir)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_chat_ckpt):
    from thawed.runtime.loading import load_for_inference
    from thawed.runtime.model import RuntimeConfig

    loaded = load_for_inference(tiny_chat_ckpt, RuntimeConfig(device="cpu"))
    yield loaded
    loaded.close()


class SlowModel(nn.Module):
    """Wraps a model: sleeps ``delay`` seconds per forward; raises after ``fail_after`` forwards."""

    def __init__(self, inner: nn.Module, delay: float = 0.0, fail_after: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.delay = delay
        self.fail_after = fail_after
        self.forwards = 0
        self.config = inner.config

    def forward(self, *args, **kwargs):
        self.forwards += 1
        if self.fail_after is not None and self.forwards > self.fail_after:
            raise RuntimeError("injected failure")
        if self.delay:
            time.sleep(self.delay)
        return self.inner(*args, **kwargs)


def with_model(loaded, model: nn.Module):
    return dataclasses.replace(loaded, model=model)


def make_app(loaded, *, gate: threading.Event | None = None, fail: Exception | None = None, **settings):
    """An app over an already loaded model (shared between tests; the app does not close it).
    ``gate``: loading waits until it is set; ``fail``: loading raises it."""
    from thawed.server import Settings, create_app

    settings.setdefault("checkpoint", "tiny")
    settings.setdefault("device", "cpu")

    def loader(_settings):
        if gate is not None:
            gate.wait(30)
        if fail is not None:
            raise fail
        return loaded

    return create_app(Settings(**settings), loader=loader)


def wait_ready(client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("the server did not become ready")


class LiveServer:
    """A real uvicorn on 127.0.0.1 (port 0) in a thread: ``with LiveServer(app) as url: ...``."""

    def __init__(self, app, ready: bool = True) -> None:
        import uvicorn

        self.config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                     timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.wait = ready
        self.url = ""

    def __enter__(self) -> str:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 30
        while not (self.server.started and self.server.servers):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError("uvicorn did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        if self.wait:
            with httpx.Client(base_url=self.url, timeout=10) as c:
                wait_ready(c, 120)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens straight from the model (no server), for comparisons."""
    from thawed.runtime.generate import SamplingParams, generate_tokens

    return [s.token for s in generate_tokens(model, ids, SamplingParams(max_new_tokens=n), ())]


def direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    """sum log p(continuation | context) from the model's own logits (fp32 log-softmax)."""
    ids = torch.tensor([context + continuation])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    pos = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
    return float(logp[pos, torch.tensor(continuation)].sum())

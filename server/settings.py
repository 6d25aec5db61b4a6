"""Server settings: every option of ``thawed serve`` is also a ``THAWED_*`` environment variable.

Precedence (pydantic-settings): explicit arguments (the CLI passes only the flags given on the
command line) > environment variables > defaults. The settings object is frozen; the app and the
engine read it once at start.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THAWED_", frozen=True, extra="ignore")

    checkpoint: str | None = Field(None, description="thawed checkpoint directory (or a Hugging Face model directory)")
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 inside a container)")
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field("auto", description="auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16")
    cache_budget: str = Field("auto", description="decoded-weight cache budget: auto, bytes, 512MiB, 2G or 25%")
    prefetch: int = Field(1, ge=0, description="layers decoded ahead in the background")
    max_queue: int = Field(32, ge=0, description="requests allowed to wait for a slot; more are answered 429")
    max_running: int = Field(8, ge=1, description="sequences decoded at once (interleaved token by token)")
    batching: bool = Field(True, description="decode running sequences together in one forward (continuous batching)")
    max_model_len: int | None = Field(None, ge=1, description="context length; default: the model's")
    direct: Literal["auto", "on", "off"] = Field("auto", description="run linears from their packed codes where a fused kernel runs (CPU: rtn <=4 bits; CUDA: rtn, cvxq, hyperc)")
    kernels: Literal["auto", "off"] = Field("auto", description="the Triton kernels on CUDA (off: the PyTorch decoders)")
    ring: Literal["auto", "on", "off"] = Field("auto", description="under a budget, stream decoder layers through a ring of slots (auto: on CUDA)")
    compile: bool = Field(False, description="torch.compile the batched decode step (a compile on first use)")
    prefill_chunk: int = Field(512, ge=16, description="prompt tokens prefilled per forward (long prompts go in chunks)")
    default_max_tokens: int = Field(512, ge=1, description="chat / TGI max new tokens when the request gives none")
    max_n: int = Field(16, ge=1, description="largest `n` (choices per prompt) a request may ask for")
    max_request_bytes: int = Field(32 * 2**20, ge=1024, description="largest request body accepted (413 above)")
    api_key: str | None = Field(None, description="when set, every route but /health needs `Authorization: Bearer KEY`")
    served_model_name: str | None = Field(None, description="model id reported by /v1/models; default: the checkpoint folder name")
    strict_model_name: bool = Field(False, description="reject requests whose `model` is not the served name")
    sse_keepalive: float = Field(15.0, ge=0, description="seconds of silence after which a stream sends an SSE "
                                 "comment (`: keep-alive`); 0 = never")
    timeout_header: float = Field(10.0, gt=0, description="seconds a client may take to send a request's headers")
    timeout_body: float = Field(30.0, gt=0, description="seconds a client may pause while sending a request body")
    timeout_keep_alive: float = Field(5.0, gt=0, description="seconds an idle keep-alive connection stays open")
    limit_concurrency: int | None = Field(256, ge=1, description="open connections + tasks before uvicorn "
                                          "answers 503 (None: no limit)")
    preload: bool = Field(False, description="decode every layer before answering /health 200")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="uvicorn / thawed log level")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v

    @field_validator("api_key", "served_model_name", "checkpoint", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.checkpoint:
            from pathlib import Path

            return Path(self.checkpoint).resolve().name or "thawed"
        return "thawed"

"""Request bodies (pydantic). Shapes copied from OpenAI / vLLM / TGI; unknown fields are ignored.

Explicit ``null`` is accepted wherever the field is optional and means "the default". Checks that
need the model (context length, vocabulary) happen in the routes, not here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "StreamOptions", "CompletionRequest", "ContentPart", "ChatMessage", "ChatCompletionRequest",
    "TokenizeRequest", "DetokenizeRequest", "TGIParameters", "TGIRequest",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = False


class _Sampling(_Body):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, description="0 = greedy; default 1.0")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1 = off")
    n: int | None = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    ignore_eos: bool | None = False


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20, description="number of top alternatives per token, at most 20")
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool | None = True


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class TGIParameters(_Body):
    max_new_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    do_sample: bool | None = False
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: list[str] | None = None
    details: bool | None = False
    decoder_input_details: bool | None = False
    return_full_text: bool | None = False
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    top_n_tokens: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    truncate: int | None = Field(None, ge=1)
    typical_p: float | None = None
    watermark: bool | None = False
    grammar: Any = None


class TGIRequest(_Body):
    inputs: str
    parameters: TGIParameters | None = None
    stream: bool | None = False


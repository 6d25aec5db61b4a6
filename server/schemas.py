"""Request bodies (pydantic). Shapes copied from OpenAI / vLLM / TGI; unknown fields are ignored.

Explicit ``null`` is accepted wherever the field is optional and means "the default". Checks that
need the model (context length, vocabulary) happen in the routes, not here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "StreamOptions", "CompletionRequest", "ContentPart", "ChatMessage", "ChatCompletionRequest",
    "TokenizeRequest", "DetokenizeRequest", "TGIParameters", "TGIRequest",
]


SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (a torch.Generator seed; n > 1 adds j modulo this)
TOP_K_LIMIT = 2**31 - 1


def _unicode_problem(value: Any) -> str | None:
    """Where a string inside ``value`` is not valid Unicode (a lone surrogate such as "\\ud800",
    which JSON can carry but UTF-8 cannot), or None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"character {exc.start} ({value[exc.start]!a}) is a lone surrogate"
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if (where := _unicode_problem(v)) is not None:
                return f"item {i}: {where}"
    if isinstance(value, dict):
        for k, v in value.items():
            if (where := _unicode_problem(k) or _unicode_problem(v)) is not None:
                return f"key {k!a}: {where}"
    return None


class _Body(BaseModel):
    # NaN and +-Infinity (JSON's NaN / Infinity literals, or the strings "Infinity", "nan") are
    # not numbers any field accepts
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value):
        where = _unicode_problem(value)
        if where is not None:
            raise ValueError(f"the text is not valid Unicode: {where}; send UTF-8 text (escape sequences "
                             "\\ud800-\\udfff must come in high/low surrogate pairs)")
        return value


# Parameters of the OpenAI / vLLM APIs that thawed does not implement: a request that sets one
# (to anything but its neutral value) gets a 400 that names it, never a silent 200. Known-harmless
# fields (user, metadata, store, parallel_tool_calls, ...) and unknown fields are ignored.
UNSUPPORTED: dict[str, str] = {
    "functions": "function calling is not supported; send the request without `functions`",
    "function_call": "function calling is not supported; send the request without `function_call`",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "this model has no reasoning-effort control",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "length_penalty only applies to beam search, which is not supported",
    "min_tokens": "min_tokens is not supported; stop strings and max_tokens are",
    "stop_token_ids": "stop_token_ids is not supported; use `stop` strings",
    "bad_words": "bad_words is not supported; use logit_bias with -100",
    "allowed_token_ids": "allowed_token_ids is not supported; use logit_bias",
    "guided_json": "guided decoding is not supported",
    "guided_regex": "guided decoding is not supported",
    "guided_choice": "guided decoding is not supported",
    "guided_grammar": "guided decoding is not supported",
    "guided_decoding_backend": "guided decoding is not supported",
    "structured_outputs": "structured outputs are not supported",
    "prompt_logprobs": "prompt_logprobs is not supported; use echo + logprobs on /v1/completions",
    "truncate_prompt_tokens": "truncate_prompt_tokens is not supported; shorten the prompt",
    "repetition_detection": "repetition_detection is not supported",
}
NEUTRAL = (None, False, 0, [], {}, "", "none", "auto", ["text"])


class StreamOptions(_Body):
    include_usage: bool | None = False


class _Sampling(_Body):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # extras: checked against UNSUPPORTED

    model: str | None = None
    temperature: float | None = Field(None, ge=0,
                                      description="0 = greedy; default: the model's generation_config, else 1.0")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=TOP_K_LIMIT, description="0 or -1 = off; at most the vocabulary size")
    min_p: float | None = Field(None, ge=0, le=1, description="drop tokens below min_p x the top token's probability")
    n: int | None = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="minus count x this per generated token")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="minus this once a token was generated")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    ignore_eos: bool | None = False
    include_stop_str_in_output: bool | None = False

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _bias(cls, value):
        if value is None:
            return value
        if len(value) > 1024:
            raise ValueError(f"at most 1024 entries, got {len(value)}")
        for key, bias in value.items():
            if not key.strip().isdigit():
                raise ValueError(f"key {key[:20]!r} is not a token id; keys are token ids as strings, e.g. \"50256\"")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} is {bias}; biases are in [-100, 100]")
        return value

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) of the first unsupported parameter this request sets, or None."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and not any(value == v and type(value) is type(v) for v in NEUTRAL):
                return name, f"{name}: {UNSUPPORTED[name]}"
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20, description="number of top alternatives per token, at most 20")
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, description="only 1 (or n) is supported")


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
    modalities: list[str] | None = None


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
    top_k: int | None = Field(None, ge=0, le=TOP_K_LIMIT)
    typical_p: float | None = Field(None, gt=0, le=1, description="locally typical sampling mass")
    do_sample: bool | None = False
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: list[str] | None = None
    details: bool | None = False
    decoder_input_details: bool | None = False
    return_full_text: bool | None = False
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    top_n_tokens: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    truncate: int | None = Field(None, ge=1)
    watermark: bool | None = Field(False, description="not supported: true is refused with 400")
    grammar: Any = Field(None, description="not supported: any grammar is refused with 400")
    adapter_id: str | None = Field(None, description="not supported: LoRA adapters are refused with 400")


class TGIRequest(_Body):
    inputs: str
    parameters: TGIParameters | None = None
    stream: bool | None = False

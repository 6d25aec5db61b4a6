"""Token generation over any transformers causal LM (a ``LazyModel``'s or a dense one).

A plain loop over a step function (``Stepper`` or transformers' forward) that yields one token at a time, so
callers can stream, stop on strings, or cancel between tokens. Sampling is reproducible per call
through its own ``torch.Generator`` (no global RNG state).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from thawed.codecs.errors import ThawedError

from .sampling import GREEDY_BELOW, check_params, process_logits, sample
from .native import is_native
from .stepper import Stepper, stepper_unsupported_reason

__all__ = ["SamplingParams", "StepOutput", "generate_tokens", "next_token", "GREEDY_BELOW", "new_cache",
           "cache_kwargs", "output_cache"]

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _cache_name() -> str:
    """The name transformers gives the KV cache, in forward's arguments and in its outputs:
    ``cache`` from the release that deprecated ``past_key_values`` (removed in 5.40)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``model(..., **cache_kwargs(cache))``: the cache under the name this transformers uses."""
    return {_cache_name(): cache}


def output_cache(out):
    """The KV cache a forward returned (``out.cache``, or ``out.past_key_values`` before)."""
    return getattr(out, _cache_name())


def new_cache(model: nn.Module):
    """An empty ``DynamicCache`` for ``model`` (the current cache API; no legacy tuples)."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers: DynamicCache() takes no config
        return DynamicCache()


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    logprobs: int = 0  # number of top alternatives to return per token (0 = only the chosen one)
    # OpenAI's penalties over the generated tokens, logit bias ((token, bias) pairs), min-p and
    # locally typical sampling: see runtime/sampling.py
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0
    typical_p: float = 1.0

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ThawedError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ThawedError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ThawedError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ThawedError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ThawedError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check_params(self)


@dataclass(frozen=True)
class StepOutput:
    token: int
    logprob: float  # log-probability of the chosen token under the unmodified distribution
    top: tuple[tuple[int, float], ...]  # (token, logprob) of the most likely tokens


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
               previous: Sequence[int], generated: Sequence[int] | None = None) -> int:
    """Choose the next token from a [vocab] logits vector (one row of ``runtime.sampling``).
    ``previous``: prompt + generated tokens (repetition penalty); ``generated``: the generated
    ones only (frequency / presence penalties; default: none)."""
    x = process_logits(logits.float()[None], [params], [generated or ()], [previous])
    return sample(x, [params], [generator])[0]


def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    eos_token_ids: Sequence[int] = (),
    device: torch.device | str | None = None,
    *,
    fast: bool = True,
    prefill_chunk: int = 512,
    compile: bool = False,
) -> Iterator[StepOutput]:
    """Yield generated tokens one by one; stops at ``max_new_tokens`` or an EOS token (which is
    yielded). The caller may stop iterating at any time to cancel.

    ``fast``: run the model through ``Stepper`` (a static KV cache and a short functional forward;
    runtime/stepper.py) when its architecture allows, else through transformers' own forward with
    a ``DynamicCache``; the two give the same tokens (tests/test_stepper.py)."""
    params.validate()
    if not prompt_ids:
        raise ThawedError("the prompt is empty: give at least one token")
    if device is None:
        device = next(iter(model.buffers()), torch.empty(0)).device
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    elif params.temperature > 0:
        generator = torch.Generator()
        generator.seed()
    tokens = list(prompt_ids)
    n_prompt = len(tokens)
    eos = set(eos_token_ids)
    step = _stepper_fn(model, len(tokens) + params.max_new_tokens, prefill_chunk, compile) if fast else None
    if step is None:
        step = _transformers_fn(model)
    inputs = torch.tensor([tokens], dtype=torch.long, device=device)
    with torch.inference_mode():
        for _ in range(params.max_new_tokens):
            logits = step(inputs, len(tokens) - inputs.shape[1])
            token = next_token(logits, params, generator, tokens, tokens[n_prompt:])
            logp = torch.log_softmax(logits, dim=-1)
            top: tuple[tuple[int, float], ...] = ()
            if params.logprobs > 0:
                vals, idx = torch.topk(logp, params.logprobs)
                top = tuple((int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist()))
            yield StepOutput(token, float(logp[token]), top)
            tokens.append(token)
            if token in eos and not params.ignore_eos:
                return
            inputs = torch.tensor([[token]], dtype=torch.long, device=device)


# A step: (new ids [1, T], position of the first of them) -> fp32 logits [vocab] of the last one.
StepFn = Callable[[torch.Tensor, int], torch.Tensor]


def _stepper_fn(model: nn.Module, length: int, chunk: int, compile: bool) -> StepFn | None:
    reason = stepper_unsupported_reason(model)
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None) or length
    if reason is None and length > max_len:
        reason = f"{length} positions exceed the model's context of {max_len}"
    if reason is not None:
        if is_native(model):  # built without transformers: there is no other forward to fall back to
            raise ThawedError(f"the fast decode path cannot run this request ({reason}); generate with "
                              "--skeleton transformers (or --no-fast)")
        log.info("generating through transformers' forward: %s", reason)
        return None
    stepper = Stepper(model, slots=1, max_len=max(length, 16), capacity=length, compile=compile)

    def step(ids: torch.Tensor, pos: int) -> torch.Tensor:
        logits = None
        for b in range(0, ids.shape[1], chunk):  # a long prompt is prefilled a chunk at a time
            logits = stepper.forward(ids[:, b:b + chunk], 0, [pos + b])
        return logits[0]

    return step


def _transformers_fn(model: nn.Module) -> StepFn:
    state = {"cache": new_cache(model)}

    def step(ids: torch.Tensor, pos: int) -> torch.Tensor:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(state["cache"]))
        state["cache"] = output_cache(out)
        return out.logits[0, -1].float()

    return step

"""Token generation over any transformers causal LM (a ``LazyModel``'s or a dense one).

A plain loop over a step function (``Stepper`` or transformers' forward) that yields one token at a time, so
callers can stream, stop on strings, or cancel between tokens. Sampling is reproducible per call
through its own ``torch.Generator`` (no global RNG state).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from thawed.codecs.errors import ThawedError

from .stepper import Stepper, stepper_unsupported_reason

__all__ = ["SamplingParams", "StepOutput", "generate_tokens", "next_token"]

log = logging.getLogger(__name__)


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (as vLLM does)


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


@dataclass(frozen=True)
class StepOutput:
    token: int
    logprob: float  # log-probability of the chosen token under the unmodified distribution
    top: tuple[tuple[int, float], ...]  # (token, logprob) of the most likely tokens


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
               previous: Sequence[int]) -> int:
    """Choose the next token from a [vocab] logits vector."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and len(previous):
        idx = torch.tensor(sorted(set(previous)), device=logits.device)
        vals = logits[idx]
        logits = logits.clone()
        logits[idx] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if params.temperature < GREEDY_BELOW:  # dividing by a tinier temperature overflows to NaN
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p >= params.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # the most likely token always stays, whatever float rounding says
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


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
    eos = set(eos_token_ids)
    step = _stepper_fn(model, len(tokens) + params.max_new_tokens, prefill_chunk, compile) if fast else None
    if step is None:
        step = _transformers_fn(model)
    inputs = torch.tensor([tokens], dtype=torch.long, device=device)
    with torch.inference_mode():
        for _ in range(params.max_new_tokens):
            logits = step(inputs, len(tokens) - inputs.shape[1])
            token = next_token(logits, params, generator, tokens)
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
    from transformers import DynamicCache

    cache = DynamicCache()

    def step(ids: torch.Tensor, pos: int) -> torch.Tensor:
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    return step

"""Logits processing and sampling over a decode batch, vectorised across rows.

``process_logits(logits [B, V] fp32, params, generated, previous) -> [B, V]`` applies, in order
(vLLM's and transformers' order):

1. ``repetition_penalty`` (CTRL / transformers): every token in ``previous`` (prompt + generated):
   positive logits divided by the penalty, negative ones multiplied;
2. ``frequency_penalty`` and ``presence_penalty`` (OpenAI): over the *generated* tokens only,
   ``logit -= count * frequency_penalty + (count > 0) * presence_penalty``;
3. ``logit_bias`` (OpenAI): a bias added to the named tokens' logits (-100 bans, +100 forces);
4. ``temperature`` (rows below ``GREEDY_BELOW`` are greedy and skip the rest);
5. ``top_k``, ``top_p``, ``min_p`` (a token is dropped when its probability is below ``min_p``
   times the most likely token's), ``typical_p`` (locally typical sampling, Meister et al. 2022,
   as transformers' ``TypicalLogitsWarper``). Dropped tokens get ``-inf``; the most likely token
   always stays.

``sample(logits, params, generators) -> LongTensor[B]``: argmax for greedy rows, otherwise one
draw per row from ``softmax(logits)`` with that row's own ``torch.Generator`` (so a seeded
request is reproducible whatever else shares its batch).

Every step is skipped when no row of the batch uses it, so a batch of plain greedy rows costs an
argmax.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from thawed.codecs.errors import ThawedError

__all__ = ["GREEDY_BELOW", "process_logits", "sample", "check_params"]

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (as vLLM does)


def check_params(p) -> None:
    """Range checks for the fields this module reads (``SamplingParams.validate`` calls it)."""
    import math

    for name in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
                 "min_p", "typical_p"):
        v = getattr(p, name)
        if not math.isfinite(v):
            raise ThawedError(f"{name} must be a finite number, got {v}")
    if not -2.0 <= p.frequency_penalty <= 2.0:
        raise ThawedError(f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}")
    if not -2.0 <= p.presence_penalty <= 2.0:
        raise ThawedError(f"presence_penalty must be in [-2, 2], got {p.presence_penalty}")
    if not 0.0 <= p.min_p <= 1.0:
        raise ThawedError(f"min_p must be in [0, 1], got {p.min_p}")
    if not 0.0 < p.typical_p <= 1.0:
        raise ThawedError(f"typical_p must be in (0, 1], got {p.typical_p}")
    for token, bias in p.logit_bias:
        if not (isinstance(token, int) and token >= 0):
            raise ThawedError(f"logit_bias: token id {token!r} must be an integer >= 0")
        if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
            raise ThawedError(f"logit_bias: the bias of token {token} must be in [-100, 100], got {bias}")


def _padded(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Ragged token lists -> ``ids [B, L]`` (padding 0) and ``valid [B, L]`` (float 1/0)."""
    longest = max((len(r) for r in rows), default=0)
    ids = torch.zeros(len(rows), max(longest, 1), dtype=torch.long)
    valid = torch.zeros(len(rows), max(longest, 1))
    for i, r in enumerate(rows):
        if len(r):
            ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            valid[i, :len(r)] = 1.0
    return ids.to(device), valid.to(device)


def _counts(rows: Sequence[Sequence[int]], vocab: int, device: torch.device) -> Tensor:
    """``[B, V]`` float counts of each token in each row."""
    ids, valid = _padded(rows, device)
    ids = ids.clamp_(0, vocab - 1)
    return torch.zeros(len(rows), vocab, device=device).scatter_add_(1, ids, valid)


def process_logits(logits: Tensor, params: Sequence, generated: Sequence[Sequence[int]] | None = None,
                   previous: Sequence[Sequence[int]] | None = None) -> Tensor:
    """Apply every logits processor of ``params[i]`` to row ``i`` of ``logits`` ([B, V]; returned
    as a new fp32 tensor). ``generated[i]``: the tokens row ``i`` has generated so far (frequency
    and presence penalties); ``previous[i]``: prompt + generated (repetition penalty); either may
    be omitted when no row needs it."""
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"logits must be [batch, vocab] with one row per params, got {tuple(logits.shape)} "
                         f"for {len(params)} params")
    x = logits.float().clone()
    B, V = x.shape
    dev = x.device

    def col(values, dtype=torch.float32) -> Tensor:  # one value per row -> [B, 1]
        return torch.tensor(values, dtype=dtype, device=dev)[:, None]

    # 1. repetition penalty over prompt + generated
    rep = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in rep) and previous is not None:
        seen = _counts(previous, V, dev) > 0
        penalty = col(rep)
        penalised = torch.where(x > 0, x / penalty, x * penalty)
        x = torch.where(seen, penalised, x)
    # 2. frequency / presence penalties over the generated tokens (OpenAI)
    freq = [p.frequency_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    if (any(freq) or any(pres)) and generated is not None:
        counts = _counts(generated, V, dev)
        x = x - counts * col(freq) - (counts > 0).float() * col(pres)
    # 3. logit bias
    if any(p.logit_bias for p in params):
        rows, cols, vals = [], [], []
        for i, p in enumerate(params):
            for token, bias in p.logit_bias:
                if 0 <= token < V:
                    rows.append(i)
                    cols.append(token)
                    vals.append(float(bias))
        if rows:
            x.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                         torch.tensor(vals, device=dev), accumulate=True)
    sampled = [p.temperature >= GREEDY_BELOW for p in params]
    if not any(sampled):
        return x
    # 4. temperature (greedy rows keep their logits: only their argmax is used)
    x = x / col([p.temperature if s else 1.0 for p, s in zip(params, sampled)])
    # 5. truncation: top_k, top_p, min_p, typical_p (only on sampled rows)
    on = col(sampled, torch.bool)
    neg = float("-inf")
    ks = [p.top_k if (s and 0 < p.top_k < V) else V for p, s in zip(params, sampled)]
    if any(k < V for k in ks):
        kth = torch.sort(x, dim=-1, descending=True).values.gather(1, col([k - 1 for k in ks], torch.long))
        x = x.masked_fill(x < kth, neg)
    tps = [p.top_p if s else 1.0 for p, s in zip(params, sampled)]
    if any(t < 1.0 for t in tps):
        probs = torch.softmax(x, dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= col(tps)  # keep the smallest prefix reaching top_p
        drop[:, 0] = False  # the most likely token always stays, whatever float rounding says
        x = x.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), neg)
    mps = [p.min_p if s else 0.0 for p, s in zip(params, sampled)]
    if any(m > 0 for m in mps):
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * col(mps), neg)
    typ = [p.typical_p if s else 1.0 for p, s in zip(params, sampled)]
    if any(t < 1.0 for t in typ):
        logp = torch.log_softmax(x, dim=-1)
        p_ = logp.exp()
        entropy = -(torch.nan_to_num(logp * p_)).sum(-1, keepdim=True)
        shifted = (-logp - entropy).abs()  # -inf tokens: +inf, sorted last
        sorted_s, order = torch.sort(shifted, dim=-1)
        cum = p_.gather(1, order).cumsum(dim=-1)
        last = (cum < col(typ)).sum(dim=1, keepdim=True).clamp_(max=V - 1)
        drop_sorted = sorted_s > sorted_s.gather(1, last)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        drop &= on
        x = x.masked_fill(drop, neg)
    return x


def sample(logits: Tensor, params: Sequence, generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row from processed logits (``process_logits``'s output)."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    out = []
    probs = None
    for i, p in enumerate(params):
        if p.temperature < GREEDY_BELOW:
            out.append(int(greedy[i]))
            continue
        if probs is None:
            probs = torch.softmax(logits, dim=-1).cpu()
        out.append(int(torch.multinomial(probs[i], 1, generator=generators[i])))
    return out

"""Calibration for planned codecs: per-weight sensitivities from gradients on calibration text.

``weight_sensitivities(src, tokens=N)`` runs the dense source model (fp32, CPU by default) over
``N`` calibration tokens (``runtime/compress/calib_data.py``: by default text the model generated itself,
else a user's file or Penn Treebank ``train``) in windows of at most ``seq_len`` and
accumulates, for every 2-D parameter, the squared gradient of

    sum_t log p(y_t | x_<=t),   y_t ~ p(. | x_<=t)   (labels sampled from the model itself)

per window. Its expectation is the diagonal of the Fisher information of the model's output
distribution, i.e. the second-order weight of each weight's perturbation in the KL divergence
between the dense and the compressed model's next-token distributions -- the "gradient of the
model output w.r.t. the weights" that CVXQ uses (the paper backpropagates projected logits;
sampling the label from the model's own softmax projects onto the directions the output
distribution is sensitive to). Tied parameters get the sum of both uses' gradients.

This module is imported only by the compression pipeline's planning step (lazily); the runtime
never imports it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from thawed.codecs.errors import ThawedError

from .calib_data import DEFAULT_CALIB_TOKENS, CalibData, CalibSpec, resolve_calibration

__all__ = ["Calibration", "weight_sensitivities", "calibration_ids", "linear_input_means", "tensor_kl_sensitivities"]

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    sens: dict[str, Tensor]  # parameter name -> accumulated squared gradient (float32, its shape)
    tokens: int
    windows: int
    seconds: float
    data: dict | None = None  # the calibration data's record (source, tokens, generation seconds...)


def calibration_ids(tokenizer, tokens: int, text: str | None = None) -> list[int]:
    """The first ``tokens`` token ids of ``text`` (default: Penn Treebank ``train``), no BOS.
    (Token frequencies for ``see`` still count PTB train; the calibrated stages use ``calib_data``.)"""
    if text is None:
        from ..eval import load_corpus

        _, text = load_corpus("ptb-train")
        text = text[: max(20_000, tokens * 8)]  # enough characters for `tokens` tokens (~5 per token)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    if len(ids) < 2:
        raise ThawedError("the calibration text has fewer than 2 tokens")
    return ids


def weight_sensitivities(src: str | Path, tokens: int = DEFAULT_CALIB_TOKENS, *, seq_len: int = 512, seed: int = 0,
                         calib: CalibSpec | CalibData | str | None = None, device: str = "cpu") -> Calibration:
    """Accumulated squared Fisher-sampled gradients for every 2-D parameter of the model at ``src``;
    ``calib``: the calibration data or where it comes from (default: self-generated, seeded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokens < 2:
        raise ThawedError(f"--calib-tokens must be at least 2, got {tokens}")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(device)
    model.eval()  # no dropout; gradients still flow
    tok = AutoTokenizer.from_pretrained(str(src))
    data = resolve_calibration(src, tokens, calib, seq_len=seq_len, tokenizer=tok)
    params = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    windows = 0
    for chunk in (w[i:i + seq_len] for w in data.windows for i in range(0, len(w), seq_len)):
        if len(chunk) < 2:
            continue
        x = torch.tensor([chunk], device=device)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=x, use_cache=False).logits[0].float()  # [T, V]
        logp = torch.log_softmax(logits, dim=-1)
        with torch.no_grad():
            y = torch.multinomial(logp.exp(), 1, generator=gen)  # labels from the model itself
        logp.gather(1, y).sum().backward()
        with torch.no_grad():
            for n, p in params.items():
                if p.grad is not None:
                    acc[n].addcmul_(p.grad, p.grad)
        windows += 1
        log.info("calibration window %d (%d tokens) done at %.1fs", windows, len(chunk), time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    del model
    secs = time.perf_counter() - t0
    log.info("calibration: %d tokens in %d windows, %.1fs", data.tokens, windows, secs)
    return Calibration(acc, data.tokens, windows, secs, data.record)


def linear_input_means(src: str | Path, tokens: int = DEFAULT_CALIB_TOKENS, *, seq_len: int = 512,
                       calib: CalibSpec | CalibData | str | None = None, device: str = "cpu") -> dict[str, Tensor]:
    """Mean input ``E[x]`` of every ``nn.Linear`` over the calibration tokens, keyed by the linear's
    weight name (``model.layers.0.mlp.down_proj.weight`` -> float32 ``[in_features]``).

    Forward only (no gradients); used for CVXQ's bias correction ``b = -(W_hat - W) E[x]``, which
    removes the mean of each output's quantisation error on the calibration distribution.
    """
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    data = resolve_calibration(src, tokens, calib, seq_len=seq_len, tokenizer=tok)
    sums: dict[str, Tensor] = {}
    count = 0
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            key = f"{name}.weight"
            sums[key] = torch.zeros(mod.in_features, dtype=torch.float64, device=device)

            def hook(m: nn.Module, args: tuple, key: str = key) -> None:
                x = args[0].detach()
                sums[key] += x.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float64)

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for chunk in (w[i:i + seq_len] for w in data.windows for i in range(0, len(w), seq_len)):
                model(input_ids=torch.tensor([chunk], device=device), use_cache=False)
                count += len(chunk)
    finally:
        for h in hooks:
            h.remove()
    del model
    log.info("linear input means: %d tokens, %d linears, %.1fs", count, len(sums), time.perf_counter() - t0)
    return {k: (v / max(1, count)).float().cpu() for k, v in sums.items()}


def tensor_kl_sensitivities(src: str | Path, noise: dict[str, float], tokens: int = 512, *, seed: int = 0,
                            calib: CalibSpec | CalibData | str | None = None, seq_len: int = 512,
                            device: str = "cpu") -> dict[str, float]:
    """Measured, end to end: for every weight in ``noise`` (name -> relative noise ``rho``), the mean
    per-token KL divergence from the dense model's next-token distribution to the model's with
    *only that weight* perturbed by Gaussian noise of standard deviation ``rho`` times each row's
    RMS, on the first ``tokens`` calibration tokens. Unlike the Fisher diagonal (the local
    curvature), this sees how an error of the size a codec really makes propagates through the
    network (attention softmax, outlier channels). One forward pass per weight; tied weights are
    perturbed once, in every use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(device)
    model.eval()
    data = resolve_calibration(src, tokens, calib, seq_len=seq_len, tokenizer=AutoTokenizer.from_pretrained(str(src)))
    windows, left = [], tokens
    for w in data.windows:
        if left <= 1:
            break
        windows.append(w[:left])
        left -= len(windows[-1])
    params = dict(model.named_parameters())
    missing = sorted(set(noise) - set(params))
    if missing:
        raise ThawedError(f"KL sensitivity: the model has no parameter {missing[0]!r} ({len(missing)} missing)")

    def logprobs() -> list[Tensor]:
        return [torch.log_softmax(model(input_ids=torch.tensor([w], device=device), use_cache=False).logits[0].float(), -1)
                for w in windows]

    out: dict[str, float] = {}
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        ref = logprobs()
        for name, rho in noise.items():
            p = params[name]
            orig = p.detach().clone()
            rms = orig.float().square().mean(1, keepdim=True).sqrt()
            p.add_(torch.randn(p.shape, generator=gen, device=device) * rho * rms)
            kl = sum(float((r.exp() * (r - q)).sum()) for r, q in zip(ref, logprobs()))
            p.copy_(orig)
            out[name] = kl / sum(len(w) for w in windows)
    del model
    log.info("KL sensitivities: %d weights, %d tokens, %.1fs", len(out), sum(len(w) for w in windows),
             time.perf_counter() - t0)
    return out

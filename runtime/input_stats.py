"""Calibration for codecs that use layer inputs: the Gram matrix ``X^T X / T`` of every linear layer's
input on calibration text (Penn Treebank ``train``), for importance (its diagonal, E[x^2] per input
column) and error feedback (GPTQ/LDLQ need the whole matrix).

Forward hooks on every ``nn.Linear`` of the dense source model (fp32, CPU); layers that share an
input (q/k/v, gate/up) share one matrix. Imported only by the compression pipeline; the runtime
never imports it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from thawed.codecs.errors import ThawedError

__all__ = ["input_grams"]

log = logging.getLogger(__name__)


@torch.no_grad()
def input_grams(src: str | Path, tokens: int = 2048, *, seq_len: int = 512, text: str | None = None) -> dict[str, Tensor]:
    """Weight name (``<module>.weight``) -> input Gram matrix [in, in] float32, averaged over tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calibrate import calibration_ids

    if tokens < 2:
        raise ThawedError(f"--calib-tokens must be at least 2, got {tokens}")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.eval()
    ids = calibration_ids(AutoTokenizer.from_pretrained(str(src)), tokens, text)
    grams: dict[str, Tensor] = {}
    # q/k/v (gate/up) see the same input tensor: one product for all (the tensor is kept alive so its id is not reused)
    by_input: dict[int, tuple[Tensor, Tensor]] = {}

    def make_hook(name: str):
        def hook(mod: nn.Module, args: tuple, _out: Tensor) -> None:
            x = args[0]
            hit = by_input.get(id(x))
            if hit is None:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                hit = by_input[id(x)] = (x, x2.t() @ x2)
            g = hit[1]
            grams[name] = grams[name] + g if name in grams else g.clone()
        return hook

    hooks = [mod.register_forward_hook(make_hook(f"{name}.weight"))
             for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    n_tok = 0
    try:
        for start in range(0, len(ids), seq_len):
            chunk = ids[start:start + seq_len]
            by_input.clear()
            model(input_ids=torch.tensor([chunk]), use_cache=False)
            n_tok += len(chunk)
    finally:
        for h in hooks:
            h.remove()
        by_input.clear()
    log.info("input statistics: %d linear layers, %d tokens, %.1fs", len(grams), n_tok, time.perf_counter() - t0)
    return {k: v / n_tok for k, v in grams.items()}

"""HQQ, the benchmarks' outside baseline: the ``hqq`` PyPI package (``pip install -e '.[bench]'``) at
its own defaults, dequantised into the dense model. The one HQQ harness of benchmarks/cvxq.py,
benchmarks/hyperc.py and benchmarks/nwc.py.

- Parameters: ``BaseQuantizeConfig(nbits, group_size)``'s weight parameters, as ``HQQLinear`` uses
  them: groups of ``group_size`` consecutive weights of the row-major tensor (axis 1), the default
  proximal optimiser (at most 20 iterations, early stop), and ``round_zero`` on at 4 bits (off at
  other widths).
- Storage: scale and zero rounded to F16, as the bpw (``bits + 32/group_size``) counts them.
- Tensors: every ``nn.Linear`` and ``nn.Embedding`` weight, each once (a tied lm_head is the
  embedding) -- the tensors the codecs compress under the default plan.

Two harnesses used to disagree at b4 g128 on SmolLM2-135M (PTB test, 4,096 tokens: 97.34 vs 75.98;
20,000 tokens: 81.82 vs 64.32). Group size, axis, iterations, the tensors quantised and the eval
protocol were the same; one flag was not: benchmarks/hyperc.py called ``Quantizer.quantize``, whose
``round_zero`` defaults to False, benchmarks/cvxq.py went through ``BaseQuantizeConfig``, which sets it
at 4 bits. Rounding the initial zero point costs a little weight SQNR (20.22 vs 20.26 dB over 14
projections of layers 3 and 17) yet lowers perplexity by a fifth: the first harness with the flag
measures 75.99 at 4,096 tokens (75.98 with unrounded scale/zero). 3-bit figures never differed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def quant_params(bits: int, group_size: int) -> dict:
    """The package's own weight-quantisation parameters for ``bits`` / ``group_size``."""
    from hqq.core.quantize import BaseQuantizeConfig

    return dict(BaseQuantizeConfig(nbits=bits, group_size=group_size)["weight_quant_params"])


def hqq_bpw(bits: int, group_size: int) -> float:
    """Bits per weight: the codes plus an F16 scale and an F16 zero per group."""
    return bits + 32 / group_size


def hqq_dequantize(w: Tensor, bits: int, group_size: int) -> Tensor:
    """``w`` HQQ-quantised (F16 scale and zero) and dequantised to float32, same shape."""
    from hqq.core.quantize import Quantizer

    wq, meta = Quantizer.quantize(w.detach().float(), device="cpu", compute_dtype=torch.float32,
                                  **quant_params(bits, group_size))
    meta["scale"] = meta["scale"].half().float()  # stored as F16, as hqq_bpw counts them
    meta["zero"] = meta["zero"].half().float()
    meta["compute_dtype"] = torch.float32
    return Quantizer.dequantize(wq, meta).float().reshape(w.shape)


def hqq_model(model: nn.Module, bits: int, group_size: int) -> int:
    """Replace, in place, every ``nn.Linear`` and ``nn.Embedding`` weight of ``model`` (each tensor
    once) by its HQQ dequantisation; returns the number of weights quantised."""
    seen: set[int] = set()
    numel = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in seen:
                seen.add(id(module.weight))
                module.weight.copy_(hqq_dequantize(module.weight, bits, group_size))
                numel += module.weight.numel()
    return numel

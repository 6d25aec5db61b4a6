"""One decode token of one sequence, eager, with as few torch calls as the arithmetic allows.

Batch-1 generation on the CPU spends about as long dispatching small ops as in the matmuls
(docs/SPEED.md: the 121 int4 kernel calls, the head and the attention of a SmolLM2 token take
~6.6 ms of a 16-19 ms step). ``Stepper.forward`` is general (rows, chunks, ragged positions,
hooks); for its commonest call -- one row, one token, every weight bound (no hooks) -- this
step runs the same arithmetic through fewer calls:

* each projection is called as its kernel: ``_weight_int4pack_mm_for_cpu`` on the packed codes of
  a direct layer (bf16 in and out, no module call, no reshapes) or ``F.linear`` on a bound weight;
* a direct layer's bf16 output is added to the fp32 residual as it is (type promotion computes
  ``h + float(y)``, the cast the module would have made);
* the query, key and value are rows of one [heads, head_dim] view; RoPE reads one row of the table.

The results are the general path's, bit for bit (``tests/test_stepper.py`` compares the logits
with ``rtol=0, atol=0`` over resident, direct and mixed layers). ``Stepper`` uses it on the CPU when
no layer streams, nothing is compiled or graphed, and every norm is Llama's RMSNorm.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .direct import DirectLinear

__all__ = ["LeanStep", "lean_projection", "rms_norm"]

_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default


def lean_projection(module: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor] | None:
    """``x [1, in] fp32 -> y [1, out]`` for a hook-free projection (``nn.Linear``, a CPU
    ``DirectLinear``, or a fused ``DirectLinear`` from ``fuse_direct``), else None.

    A direct layer returns bf16 (the kernel's own output; the caller promotes it where it meets
    fp32), a resident one fp32."""
    if isinstance(module, DirectLinear):
        if module.inner_k_tiles or module.packed.device.type != "cpu":
            return None
        packed, group, sz, bias = module.packed, module.group, module.scale_zero, module.bias
        if bias is not None:
            return lambda x: _INT4_MM(x.to(torch.bfloat16), packed, group, sz).float().add_(bias)
        return lambda x: _INT4_MM(x.to(torch.bfloat16), packed, group, sz)
    if type(module) is nn.Linear and not (module._forward_pre_hooks or module._forward_hooks):
        weight, bias = module.weight, module.bias
        if weight.device.type == "meta":
            return None
        return lambda x: F.linear(x, weight, bias)
    return None


class LeanStep:
    """``(token id, position) -> fp32 logits [1, vocab]`` for row 0 of a ``Stepper``'s cache."""

    def __init__(self, stepper, layers: list[tuple]) -> None:
        self._st = stepper
        self._layers = layers

    @classmethod
    def build(cls, stepper) -> "LeanStep | None":
        """The lean step of ``stepper``'s model, or None when a projection is not a bound
        ``nn.Linear`` or a CPU direct layer (streamed, hooked, or something else)."""
        layers = []
        for i, layer in enumerate(stepper.layers):
            fused_qkv, fused_gu = stepper._qkv[i], stepper._gate_up[i]
            qkv = lean_projection(fused_qkv) if isinstance(fused_qkv, DirectLinear) else None
            if qkv is None:
                parts = [lean_projection(getattr(layer.self_attn, n)) for n in ("q_proj", "k_proj", "v_proj")]
                if any(p is None for p in parts):
                    return None
                qkv = _concat(parts)
            gu = lean_projection(fused_gu) if isinstance(fused_gu, DirectLinear) else None
            if gu is None:
                parts = [lean_projection(getattr(layer.mlp, n)) for n in ("gate_proj", "up_proj")]
                if any(p is None for p in parts):
                    return None
                gu = _concat(parts)
            o, down = lean_projection(layer.self_attn.o_proj), lean_projection(layer.mlp.down_proj)
            # nn.SiLU, or transformers' SiLUActivation (whose forward is F.silu)
            if o is None or down is None or type(layer.mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
                return None
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            layers.append((n1.weight, n1.variance_epsilon, qkv, o, n2.weight, n2.variance_epsilon, gu, down,
                           layer.self_attn.scaling))
        return cls(stepper, layers)

    def __call__(self, ids: Tensor, p: int) -> Tensor:
        st = self._st
        H, KV, hd, inter = st.heads, st.kv_heads, st.head_dim, st.inter
        h = st.embed(ids)  # [1, 1, hidden]: a module call (a row-wise embedding decodes here)
        dim = h.shape[-1]
        h = h.view(1, dim)
        cos, sin = st._cos[p], st._sin[p]  # [head_dim]
        half, gqa, one_slot = hd // 2, KV != H, st.slots == 1
        for i, (w1, eps1, qkv, o_proj, w2, eps2, gate_up, down, scale) in enumerate(self._layers):
            x = rms_norm(h, w1, eps1)
            y = qkv(x).float().view(H + 2 * KV, hd)
            qk = y[: H + KV]
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin)
            kc, vc = st.k[i], st.v[i]
            kc[0, :, p] = qk[H:]
            vc[0, :, p] = y[H + KV:]
            if one_slot:
                kc, vc = kc.narrow(2, 0, p + 1), vc.narrow(2, 0, p + 1)
            else:
                kc, vc = kc[:1, :, : p + 1], vc[:1, :, : p + 1]
            att = F.scaled_dot_product_attention(qk[:H].view(1, H, 1, hd), kc, vc, scale=scale, enable_gqa=gqa)
            h = h + o_proj(att.view(1, H * hd))
            x = rms_norm(h, w2, eps2)
            gu = gate_up(x).float()
            h = h + down(F.silu(gu[:, :inter]) * gu[:, inter:])
        return st.head(rms_norm(h, st.norm.weight, st.norm.variance_epsilon)).float()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm of fp32 ``x`` in the fewest calls measured here (12.9 us against
    ``F.rms_norm``'s 17.8 at [1, 576]); ``Stepper._norm`` computes it the same way."""
    return (x * torch.rsqrt(torch.mean(x * x, -1, keepdim=True).add_(eps))).mul_(weight)


def _concat(parts: list[Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    return lambda x: torch.cat([p(x).float() for p in parts], dim=-1)

"""The *direct* execution mode: a linear layer that runs from its packed 4-bit codes.

An rtn payload with ``bits <= 4`` is ``w = q * scale + offset`` per group of ``g`` weights along the
input dimension. torch's weight-only int4 kernels (``_weight_int4pack_mm_for_cpu`` on the CPU,
tinygemm's ``_weight_int4pack_mm`` on CUDA) compute ``x @ ((q - 8) * s + z)^T`` over groups of
``gk`` in {32, 64, 128, 256} with bf16 ``s, z``. So the codes are repacked once at load into the
kernel's layout, with ``s = scale`` and ``z = offset + 8 * scale`` per kernel group (a stored group
of ``g`` weights becomes ``g / gk`` kernel groups with the same values; a partial last group of
``n % g`` weights needs ``gk`` to divide it too). The weight then stays at about 4.5 bits per
weight in memory, decoding happens inside the matmul, and nothing is materialised per token.

Precision: the kernels take bf16 activations, scales and zero points and return bf16, so a direct
layer equals ``F.linear(x.bfloat16(), W_decoded)`` to within bf16 rounding (tests check
``dequantise-then-matmul`` against it on odd shapes, the reference weight being the codec's own
PyTorch decode).

Prefill: the CPU kernel is a GEMV at heart, ~20 us per row of ``x`` on a 1536x576 weight (one
thread), linear in the rows; decoding the weight to bf16 and calling ``F.linear`` only wins past
~300 rows (measured on this machine: 22 ms vs 11 ms at 512 rows), so every batch stays on the kernel.

Why int4pack on the CPU: measured on this project's 2-core machine (AVX-512 bf16), one thread,
SmolLM2's shapes, a batch-1 GEMV with bf16 activations took 0.35-0.5x the time of fp32
``F.linear`` over the decoded weight, and the 49152x576 head 0.26x; with fp32 activations the same
kernel is 3-8x *slower* than fp32, so a direct layer always feeds it bf16 (benchmarks/speed.py).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from thawed.codecs.rtn import unpack_codes

__all__ = ["DirectLinear", "direct_unsupported_reason", "kernel_group_size", "pack_rtn"]

KERNEL_GROUPS = (256, 128, 64, 32)
PACK_ROWS = 64  # _convert_weight_to_int4pack_for_cpu lays rows out in blocks of 64 (tested)


def kernel_group_size(n: int, group_size: int) -> int | None:
    """The largest kernel group ``gk`` that tiles both the stored groups and the row, or None."""
    for gk in KERNEL_GROUPS:
        if group_size % gk == 0 and n % gk == 0:
            return gk
    return None


def direct_unsupported_reason(codec: str, params: Mapping[str, Any], shape: tuple[int, ...],
                              device: torch.device) -> str | None:
    """None when a weight can run in direct mode, else why not."""
    if codec != "rtn":
        return f"codec {codec!r} has no fused decode-matmul (rtn with bits <= 4 has)"
    if len(shape) != 2:
        return "not a matrix"
    bits, g = int(params.get("bits", 0)), int(params.get("group_size", 0))
    if bits > 4:
        return f"rtn with {bits} bits (the int4 kernels take at most 4)"
    m, n = shape
    if m % 16:
        return f"{m} output features is not a multiple of 16 (the int4 kernel's tile)"
    if kernel_group_size(n, g) is None:
        return f"group size {g} on rows of {n} has no kernel group in {KERNEL_GROUPS} tiling both"
    if device.type == "cuda" and n % 1024 and n % 64:  # tinygemm needs K % (inner_k_tiles*16)
        return f"{n} input features do not tile tinygemm's layout"
    if device.type not in ("cpu", "cuda"):
        return f"no int4 kernel on {device.type}"
    return None


class DirectLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` kept as packed 4-bit codes (see the module docstring)."""

    def __init__(self, packed: Tensor, scale_zero: Tensor, group: int, in_features: int,
                 out_features: int, bias: Tensor | None, inner_k_tiles: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.inner_k_tiles = inner_k_tiles  # 0 on the CPU
        self.register_buffer("packed", packed)  # CPU: [out, in/2] uint8; CUDA: tinygemm's int32 tiles
        self.register_buffer("scale_zero", scale_zero)  # [in/group, out, 2] bf16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * 2

    @classmethod
    def from_rtn(cls, codes: Tensor, scale: Tensor, offset: Tensor, params: Mapping[str, Any],
                 shape: tuple[int, int], bias: Tensor | None, device: torch.device,
                 packed: tuple[Tensor, Tensor, int, int] | None = None) -> "DirectLinear":
        """Repack an rtn payload (codes [packed bytes] u8, scale/offset [m, G] f16) for the kernel;
        ``packed``: ``pack_rtn``'s result for it, when already computed (runtime/early.py)."""
        m, n = shape
        packed_codes, scale_zero, gk, tiles = packed or pack_rtn(codes, scale, offset, params, shape, device)
        return cls(packed_codes, scale_zero, gk, n, m, bias, tiles)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.inner_k_tiles:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group, self.scale_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_zero)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group={self.group}, bias={self.bias is not None}, mode=direct")


def pack_rtn(codes: Tensor, scale: Tensor, offset: Tensor, params: Mapping[str, Any], shape: tuple[int, int],
             device: torch.device) -> tuple[Tensor, Tensor, int, int]:
    """An rtn payload in the int4 kernel's layout: ``(packed codes, scale_zero [n/gk, m, 2] bf16,
    kernel group gk, inner_k_tiles)`` (tiles 0 on the CPU). Pure: no module state, so the early
    decoder can run it before the model exists."""
    m, n = shape
    bits, g = int(params["bits"]), int(params["group_size"])
    gk = kernel_group_size(n, g)
    if gk is None or bits > 4:
        raise ValueError(direct_unsupported_reason("rtn", params, shape, device))
    q = unpack_codes(codes.to("cpu"), bits, m * n).view(m, n)
    rep = g // gk  # kernel groups per stored group (the partial last group: what is left)
    sc = scale.float().repeat_interleave(rep, dim=1)[:, : n // gk]
    of = offset.float().repeat_interleave(rep, dim=1)[:, : n // gk]
    zero = of + 8.0 * sc  # (q - 8) * s + z == q * s + offset
    scale_zero = torch.stack([sc.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [n/gk, m, 2]
    if device.type == "cuda":
        tiles = 8 if n % 1024 == 0 else 2
        packed = torch.ops.aten._convert_weight_to_int4pack(
            ((q[:, ::2] << 4) | q[:, 1::2]).to(device), tiles)  # high nibble = even column (torchao)
    else:
        tiles = 0
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return packed, scale_zero.to(device), gk, tiles


def fuse_direct(mods: list[nn.Module]) -> DirectLinear | None:
    """One ``DirectLinear`` computing ``cat([m(x) for m in mods], -1)`` in one kernel call, or None
    when the layers cannot share one (not all direct, or different input size, group or layout).

    The fused layer owns the packed codes; each input layer is re-pointed at its rows of them (a
    view: packing is independent across blocks of 64 rows, tested), so memory is not doubled and both the fused
    and the separate layers keep working."""
    if not mods or not all(isinstance(m, DirectLinear) for m in mods):
        return None
    first = mods[0]
    if any(m.in_features != first.in_features or m.group != first.group or m.inner_k_tiles
           or (m.bias is None) != (first.bias is None) or m.packed.device != first.packed.device for m in mods):
        return None
    if any(m.out_features % PACK_ROWS for m in mods[:-1]):  # the CPU layout packs blocks of 64 rows
        return None
    packed = torch.cat([m.packed for m in mods], dim=0)
    scale_zero = torch.cat([m.scale_zero for m in mods], dim=1).contiguous()
    bias = None if first.bias is None else torch.cat([m.bias.detach() for m in mods])
    out = sum(m.out_features for m in mods)
    fused = DirectLinear(packed, scale_zero, first.group, first.in_features, out, bias)
    row = 0
    for m in mods:
        m.packed = packed[row:row + m.out_features]
        row += m.out_features
    return fused

"""``thawed inspect``: per-tensor codec, shape, bytes and bits per weight; totals; ratio to bf16."""

from __future__ import annotations

import re
from typing import Any

import torch

from thawed.codecs import get_codec

from .checkpoint import Checkpoint
from .direct import direct_unsupported_reason
from .direct_gpu import KERNEL_CODECS

__all__ = ["inspect_checkpoint", "format_inspect", "healed_summary"]


def _bpw(nbytes: int, numel: int) -> float:
    return nbytes * 8 / numel if numel else 0.0


def execution_mode(entry, device: str = "cpu") -> str:
    """How the runtime runs this tensor on ``device`` ("cpu" or "cuda") with default settings
    (runtime/model.py ``plan_modes``): ``direct`` (matmul from packed codes: torch's int4 kernel on
    the CPU, the codec's Triton kernel on CUDA), ``rowwise`` (embedding rows decoded per token; a
    tied head that cannot run direct makes it ``decoded`` at load), ``decoded`` (resident, or
    streamed -- through the ring on CUDA -- under a small ``--cache-budget``) or ``raw``."""
    if entry.codec == "raw":
        return "raw"
    if entry.role in ("linear", "lm_head"):
        if device == "cuda":
            if entry.codec in KERNEL_CODECS and len(entry.shape) == 2:
                return "direct"
        elif direct_unsupported_reason(entry.codec, entry.params, tuple(entry.shape), torch.device("cpu")) is None:
            return "direct"
    if entry.role == "embedding" and hasattr(get_codec(entry.codec), "decode_rows"):
        return "rowwise"
    return "decoded"


def natural_key(name: str) -> list:
    """``layers.2`` before ``layers.10``: digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def inspect_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    """Every byte counts: a tensor's bpw includes codes and side info; the file total also counts
    shared codec state and the header."""
    rows = []
    lin_bytes = lin_numel = all_bytes = all_numel = 0
    for name, e in sorted(ckpt.index.items(), key=lambda kv: natural_key(kv[0])):
        numel = e.spec.numel
        rows.append({"name": name, "codec": e.codec, "role": e.role, "shape": list(e.shape),
                     "dtype": str(e.dtype).replace("torch.", ""), "bytes": e.nbytes,
                     "bpw": round(_bpw(e.nbytes, numel), 4), "params": e.params, "mode": execution_mode(e),
                     "mode_cuda": execution_mode(e, "cuda")})
        all_bytes += e.nbytes
        all_numel += numel
        if e.role in ("linear",):
            lin_bytes += e.nbytes
            lin_numel += numel
    file_bytes = ckpt.file_nbytes
    return {
        "path": str(ckpt.path),
        "tensors": rows,
        "linear": {"weights": lin_numel, "bytes": lin_bytes, "bpw": round(_bpw(lin_bytes, lin_numel), 4)},
        "total": {
            "weights": all_numel,
            "tensor_bytes": all_bytes,
            "file_bytes": file_bytes,
            "bpw": round(_bpw(file_bytes, all_numel), 4),
            "ratio_to_bf16": round(all_numel * 2 / file_bytes, 3) if file_bytes else 0.0,
        },
        "codecs": sorted({r["codec"] for r in rows}),
        "source": ckpt.metadata.get("source"),
        "settings": ckpt.metadata.get("settings"),
    }


def format_inspect(report: dict[str, Any], show_tensors: bool = True) -> str:
    lines = []
    if show_tensors:
        w = max([len(r["name"]) for r in report["tensors"]] + [6])
        lines.append(f"{'tensor':<{w}}  {'codec':<9} {'role':<9} {'shape':<14} {'bytes':>11} {'bpw':>7}  {'mode (cpu)':<10}  mode (cuda)")
        for r in report["tensors"]:
            shape = "x".join(map(str, r["shape"]))
            lines.append(f"{r['name']:<{w}}  {r['codec']:<9} {r['role']:<9} {shape:<14} {r['bytes']:>11,} {r['bpw']:>7.3f}"
                         f"  {r['mode']:<10}  {r['mode_cuda']}")
        lines.append("")
    healed = healed_summary(report.get("settings"))
    if healed:
        lines.append(healed)
    lin, tot = report["linear"], report["total"]
    lines.append(f"linear layers: {lin['weights']:,} weights, {lin['bytes']:,} bytes, {lin['bpw']:.3f} bits/weight")
    lines.append(
        f"whole file:    {tot['weights']:,} weights, {tot['file_bytes']:,} bytes (header and shared state "
        f"included), {tot['bpw']:.3f} bits/weight, " + _vs_bf16(tot['ratio_to_bf16'])
    )
    return "\n".join(lines)


def _vs_bf16(ratio: float) -> str:
    if ratio >= 1 or ratio <= 0:
        return f"{ratio:.2f}x smaller than bf16"
    return f"{1 / ratio:.2f}x larger than bf16 (the source is wider than bf16)"


def healed_summary(settings: dict | None) -> str | None:
    """One line for ``thawed inspect``: how the checkpoint was healed (``thawed heal``), or None."""
    h = (settings or {}).get("healing")
    if not isinstance(h, dict):
        return None

    def per_step(key: str) -> str:
        v = h.get(key)
        return f", {v:g} s/step" if isinstance(v, (int, float)) else ""

    parts = [f"stages {'+'.join(h.get('stages', []))}",
             f"{h.get('block_steps', 0)} block steps ({h.get('block_steps_per_layer', 0):g}/layer"
             f"{per_step('seconds_per_block_step')})",
             f"{h.get('e2e_steps', 0)} end-to-end steps{per_step('seconds_per_e2e_step').replace(', ', ' (', 1)}"
             + (")" if per_step("seconds_per_e2e_step") else "")]
    if isinstance(h.get("block_tokens"), int) and isinstance(h.get("e2e_tokens"), int):
        parts.append(f"tokens {h['block_tokens']:,} per-layer + {h['e2e_tokens']:,} end-to-end"
                     + (f" from {h['calib_tokens']:,} calibration tokens" if isinstance(h.get("calib_tokens"), int) else ""))
    if isinstance(h.get("seconds"), (int, float)):
        parts.append(f"{h['seconds']:.0f} s")
    if "lr" in h:
        parts.append(f"lr {h['lr']:g}/{h.get('lr_e2e', h['lr']):g}"
                     + (f" {h['schedule']}" if h.get("schedule", "constant") != "constant" else "")
                     + (" +STE codes" if h.get("ste") else ""))
    if h.get("kl_before") is not None and h.get("kl_after") is not None:
        parts.append(f"calibration KL {h['kl_before']:.4g} -> {h['kl_after']:.4g}")
    return "healed: " + ", ".join(parts)

"""CUDA graphs of the one-token decode step, one graph per padded batch size (as vLLM captures).

At batch 1 a decode step of a small model is a few hundred small kernels; launched one by one from
Python the GPU idles between them (docs/SERVING.md measured 28 ms per token on an H200 against
3 ms of GPU time). A captured graph replays them all with one launch.

``GraphedDecode`` wraps a step function ``fn(h [Bp, 1, D], pos [Bp]) -> logits [Bp, V]`` whose
other inputs (weights, KV cache, RoPE tables) live at fixed addresses. A batch of ``B`` rows runs
on the graph of the smallest captured size ``Bp >= B``; the padding rows get position ``scratch``,
a cache position past the capacity that no real row ever has (the stepper allocates one more
position than its capacity), so what they write is never read. Warm-up before capture (which
compiles Triton kernels and runs their autotuning) writes there too.

A graph is only valid while the tensors it read stay where they were: ``key`` (the caller's cache
version: it changes when the KV cache grows or gains slots) is part of each graph's identity, and
graphs of an older version are dropped. Weights that are decoded on demand by forward hooks would
be frozen into the graph at capture, so ``hooks_left`` must be empty before capturing; the caller
runs eager while it is not (resident weights bind on their first use, so the first decode step
after prefill can be captured).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

__all__ = ["GraphedDecode", "BATCH_SIZES", "hooks_left"]

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class GraphedDecode:
    """Replays captured decode steps; ``None`` from ``__call__`` means: run this step eager."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], hidden: int, dtype: torch.dtype,
                 device: torch.device, sizes: tuple[int, ...] = BATCH_SIZES) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.fn, self.hidden, self.dtype, self.device = fn, hidden, dtype, device
        self.sizes = tuple(sorted(sizes))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]] = {}
        self._key: object = None
        self._pool = None
        self.captures = 0
        self.capture_seconds = 0.0
        self.disabled: str | None = None

    def padded(self, rows: int) -> int | None:
        for s in self.sizes:
            if s >= rows:
                return s
        return None

    def __call__(self, h: Tensor, pos: list[int], scratch: int, key: object) -> Tensor | None:
        """Logits [B, V] of one decode step for the B rows of ``h`` [B, 1, D] at positions ``pos``,
        or None when no graph applies (too many rows, or capture failed: eager from then on)."""
        if self.disabled is not None:
            return None
        rows = h.shape[0]
        size = self.padded(rows)
        if size is None:
            return None
        if key != self._key:
            self._graphs.clear()  # the cache moved: every graph read the old tensors
            self._key = key
        entry = self._graphs.get(size)
        if entry is None:
            entry = self._capture(size, scratch)
            if entry is None:
                return None
        graph, h_in, pos_in, out = entry
        h_in[:rows].copy_(h)
        pad = [scratch] * (size - rows)
        pos_in.copy_(torch.tensor(list(pos) + pad, dtype=torch.long), non_blocking=False)
        graph.replay()
        return out[:rows].clone()

    def _capture(self, size: int, scratch: int):
        import time

        t0 = time.perf_counter()
        h_in = torch.zeros((size, 1, self.hidden), dtype=self.dtype, device=self.device)
        pos_in = torch.full((size,), scratch, dtype=torch.long, device=self.device)
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # warm-up: cuBLAS handles, Triton compiles and autotuning
                    self.fn(h_in, pos_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
                out = self.fn(h_in, pos_in)
        except Exception as exc:  # noqa: BLE001 - any capture failure: eager from now on, said once
            self.disabled = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log.warning("CUDA graph capture of the decode step failed (%s); running eager from now on",
                        self.disabled)
            return None
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0
        log.info("captured the decode step as a CUDA graph for %d rows (%.2f s)", size, time.perf_counter() - t0)
        self._graphs[size] = (graph, h_in, pos_in, out)
        return self._graphs[size]


def hooks_left(modules) -> bool:
    """Whether any of ``modules`` (or their children) still runs forward hooks."""
    for root in modules:
        for m in root.modules():
            if getattr(m, "_thawed_ring_hook", False):  # the ring's layer hook: the stepper loads itself
                continue
            if m._forward_pre_hooks or m._forward_hooks:
                return True
    return False

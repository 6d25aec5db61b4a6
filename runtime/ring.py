"""Streaming decoder layers through a ring of preallocated slots (the GPU's streamed mode).

Under a cache budget too small for every decoded weight, the hook-based streamed mode
(runtime/lazy.py) asks the cache for each weight in every forward: Python, a lock and an
allocation per linear, and nothing a CUDA graph can capture. The ring instead gives each decoder
layer's streamed weights fixed places in one of ``R`` slots (layer ``i`` in slot ``i % R``); every
weight is an ordinary parameter that *views* its place, so the layers run hook-free, and
``load(i)`` decodes layer ``i``'s weights into its slot right before the layer runs. Decoding goes
through the codecs' Triton kernels with ``out=`` (no allocation, no host sync), so a whole decode
step, decodes included, is captured in one CUDA graph (runtime/cuda_graphs.py).

With ``R >= 2`` and ``overlap``, ``load(i)`` also starts decoding layer ``i + 1`` on a side CUDA
stream while layer ``i`` computes: the side stream first waits for an event recorded on the main
stream at that moment (layer ``i - 1``, the slot's previous user, has been issued), and the main
stream waits for the decode's event before layer ``i + 1``. Both orderings are stream events, so
they hold inside a captured graph too.

Bytes held: ``R`` slots of the largest layer's decoded size; the weights outside decoder layers
(embedding, head) stay resident, which is what makes this mode fit the budget (``plan_modes``).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["LayerRing", "ALIGN"]

log = logging.getLogger(__name__)

ALIGN = 64  # elements: every weight starts 128-byte aligned in bf16 (vector loads in the kernels)


class LayerRing:
    """``R`` slots holding the streamed weights of the layers being run (see the module docstring)."""

    def __init__(self, layers: dict[int, list[tuple[nn.Module, str, str, tuple[int, ...]]]],
                 decode_into: Callable[[str, Tensor], None], slots: int, device: torch.device,
                 dtype: torch.dtype, overlap: bool = True) -> None:
        if not layers:
            raise ValueError("a ring needs at least one layer")
        self.order = sorted(layers)
        self.slots = max(1, min(int(slots), len(self.order)))
        self.device, self.dtype = device, dtype
        self.decode_into = decode_into
        sizes = {i: sum(_aligned(_numel(s)) for _, _, _, s in ws) for i, ws in layers.items()}
        self.slot_numel = max(sizes.values())
        self.buffers = [torch.empty(self.slot_numel, dtype=dtype, device=device) for _ in range(self.slots)]
        self.items: dict[int, list[tuple[str, Tensor]]] = {}
        self.position = {layer: p for p, layer in enumerate(self.order)}
        for p, layer in enumerate(self.order):
            buf, off = self.buffers[p % self.slots], 0
            items = []
            for mod, pname, key, shape in layers[layer]:
                view = buf[off:off + _numel(shape)].view(shape)
                setattr(mod, pname, nn.Parameter(view, requires_grad=False))
                items.append((key, view))
                off += _aligned(_numel(shape))
            self.items[layer] = items
        self.overlap = bool(overlap) and self.slots >= 2 and device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self.overlap else None
        self._ready: dict[int, torch.cuda.Event] = {}
        self.loads = 0

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_numel * torch.empty((), dtype=self.dtype).element_size()

    def __contains__(self, layer: int) -> bool:
        return layer in self.items

    def load(self, layer: int) -> None:
        """Make layer ``layer``'s weights valid in its slot (call right before running it)."""
        if layer not in self.items:
            return
        self.loads += 1
        ready = self._ready.pop(layer, None)
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        else:
            self._decode(layer)
        if self._side is not None:
            p = self.position[layer] + 1
            if p < len(self.order):
                nxt = self.order[p]
                issued = torch.cuda.Event()
                issued.record(torch.cuda.current_stream(self.device))
                self._side.wait_event(issued)  # the slot's previous user (layer p - R) has been issued
                with torch.cuda.stream(self._side):
                    self._decode(nxt)
                    done = torch.cuda.Event()
                    done.record(self._side)
                self._ready[nxt] = done

    def _decode(self, layer: int) -> None:
        for key, view in self.items[layer]:
            self.decode_into(key, view)

    def reset(self) -> None:
        """Forget prefetches in flight (a forward that stopped halfway)."""
        for ev in self._ready.values():
            torch.cuda.current_stream(self.device).wait_event(ev)
        self._ready.clear()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN

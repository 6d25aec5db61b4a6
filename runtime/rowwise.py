"""Per-token embedding decode: an ``nn.Embedding`` whose table is never materialised.

``attach_rowwise_embedding(module, rows)`` removes the module's weight and registers two hooks.
Before ``forward`` the ids are made unique, ``rows(unique_ids) -> [U, d]`` decodes just those
rows (a codec's ``decode_rows``), the module's weight is set to that small table and the ids are
remapped to positions in it; the module's own ``forward`` then runs unchanged (so subclasses such
as Gemma's scaled embedding keep their scaling). After ``forward`` (also when it raises) the
weight goes back to a meta placeholder with the full shape. Nothing is cached: a forward of ``T``
tokens decodes at most ``T`` rows, so the memory is ``O(T * d)`` instead of ``O(V * d)``.

A tied lm_head is not affected: it still reads the whole table through the decoded-weight cache.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["attach_rowwise_embedding", "RowwiseHandle"]

RowsFn = Callable[[Tensor], Tensor]  # unique row ids [U] (int64, on the module's device) -> rows [U, d]


class RowwiseHandle:
    """What ``attach_rowwise_embedding`` installed; ``rows_decoded`` counts rows rebuilt so far."""

    def __init__(self, module: nn.Module, placeholder: Tensor) -> None:
        self.module, self.placeholder = module, placeholder
        self.rows_decoded = 0
        self.calls = 0
        self._hooks: list = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def attach_rowwise_embedding(module: nn.Embedding, rows: RowsFn, shape: tuple[int, int],
                             dtype: torch.dtype) -> RowwiseHandle:
    if "weight" in module._parameters:
        del module._parameters["weight"]
    placeholder = torch.empty(shape, dtype=dtype, device="meta")
    module.__dict__["weight"] = placeholder
    handle = RowwiseHandle(module, placeholder)
    saved: dict[str, object] = {}

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict):
        ids = args[0] if args else kwargs["input"]
        uniq, inverse = torch.unique(ids, return_inverse=True)
        mod.__dict__["weight"] = rows(uniq)
        # padding_idx refers to the full table; the small table's indices differ (and padding_idx
        # only matters for gradients), so it is switched off while the small table is in place.
        saved["padding_idx"] = mod.padding_idx
        mod.padding_idx = None
        handle.rows_decoded += int(uniq.numel())
        handle.calls += 1
        inverse = inverse.view(ids.shape)
        if args:
            return (inverse,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "input": inverse}

    def post_hook(mod: nn.Module, args: tuple, output: object) -> None:
        mod.__dict__["weight"] = placeholder
        if "padding_idx" in saved:
            mod.padding_idx = saved.pop("padding_idx")

    handle._hooks = [
        module.register_forward_pre_hook(pre_hook, with_kwargs=True),
        module.register_forward_hook(post_hook, always_call=True),
    ]
    return handle

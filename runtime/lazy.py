"""Lazy weights: a module's weight comes from the decoded-weight cache only while it runs.

``attach_lazy_weight(module, "weight", key, ...)`` removes the parameter and registers two hooks:
before ``forward`` the weight is acquired (decoded on first use) and set on the module as a plain
tensor; after ``forward`` (also when it raises) it is released and replaced by a meta placeholder
that keeps ``shape``/``dtype`` queries working. Hooks rather than replacement classes, so the
module's own forward runs unchanged: ``nn.Linear``, ``nn.Embedding`` and subclasses such as
Gemma's scaled embedding all work, and tied weights are simply two modules sharing one key.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .cache import WeightCache

__all__ = ["attach_lazy_weight", "LazyWeightHandle"]


class LazyWeightHandle:
    """What ``attach_lazy_weight`` installed, so a test or caller can inspect or detach it."""

    def __init__(self, module: nn.Module, attr: str, key: str, placeholder: torch.Tensor,
                 hooks: list) -> None:
        self.module, self.attr, self.key, self.placeholder, self._hooks = module, attr, key, placeholder, hooks

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def attach_lazy_weight(
    module: nn.Module,
    attr: str,
    key: str,
    cache: WeightCache,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    on_access: Callable[[str], None] | None = None,
) -> LazyWeightHandle:
    if attr in module._parameters:
        del module._parameters[attr]
    placeholder = torch.empty(shape, dtype=dtype, device="meta")
    module.__dict__[attr] = placeholder

    def pre_hook(mod: nn.Module, args: tuple) -> None:
        weight = cache.acquire(key)
        mod.__dict__[attr] = weight
        if on_access is not None:
            on_access(key)

    def post_hook(mod: nn.Module, args: tuple, output: object) -> None:
        if mod.__dict__.get(attr) is not placeholder:
            mod.__dict__[attr] = placeholder
            cache.release(key)

    hooks = [
        module.register_forward_pre_hook(pre_hook),
        module.register_forward_hook(post_hook, always_call=True),
    ]
    return LazyWeightHandle(module, attr, key, placeholder, hooks)

"""Lazy weights: a module's weight comes from the decoded-weight cache, on first use.

Two ways, by execution mode (``runtime/model.py`` chooses per weight):

* **streamed** (``attach_lazy_weight``): the weight is acquired from the cache before every forward
  and released after it, so a cache smaller than the model can evict it between uses;
* **resident** (``attach_resident_weight``): the cache holds the weight for the rest of the run.
  The first forward (or ``bind()``, which ``LazyModel.warm`` calls) decodes it, binds it as a
  plain parameter and removes the hooks: afterwards the module is an ordinary ``nn.Linear`` with
  no lock, no lookup and no Python call per forward.

Streamed details:

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

__all__ = ["attach_lazy_weight", "attach_resident_weight", "LazyWeightHandle", "ResidentWeightHandle"]


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


class ResidentWeightHandle:
    """A weight decoded once on first use and then bound to its module for good."""

    def __init__(self, module: nn.Module, attr: str, key: str, cache: WeightCache) -> None:
        self.module, self.attr, self.key, self._cache = module, attr, key, cache
        self._hooks: list = []
        self.bound = False

    def bind(self) -> None:
        """Decode (or take from the cache), pin for good, bind as a parameter, drop the hooks."""
        if self.bound:
            return
        weight = self._cache.acquire(self.key)  # never released: the entry stays pinned
        self.module.__dict__.pop(self.attr, None)
        self.module._parameters[self.attr] = nn.Parameter(weight, requires_grad=False)
        self.bound = True
        self.remove()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def attach_resident_weight(module: nn.Module, attr: str, key: str, cache: WeightCache,
                           shape: tuple[int, ...], dtype: torch.dtype,
                           on_access: Callable[[str], None] | None = None) -> ResidentWeightHandle:
    """Decode ``key`` on the module's first forward, then bind it and remove every hook."""
    if attr in module._parameters:
        del module._parameters[attr]
    module.__dict__[attr] = torch.empty(shape, dtype=dtype, device="meta")
    handle = ResidentWeightHandle(module, attr, key, cache)

    def pre_hook(mod: nn.Module, args: tuple) -> None:
        handle.bind()  # removes this hook: later forwards run no Python of ours
        if on_access is not None:
            on_access(key)

    handle._hooks = [module.register_forward_pre_hook(pre_hook)]
    return handle

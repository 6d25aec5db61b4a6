"""Decode the next layers ahead while the current one computes.

Keys are grouped by layer (the first integer in the name: ``model.layers.7.mlp.up_proj.weight``
is layer 7; keys without one, such as the embedding, form their own groups) in execution order.
When a key of group ``g`` is accessed, the keys of groups ``g+1 .. g+depth`` (wrapping around to
the start, which the next token needs) are queued to a single worker thread that decodes them
into the cache. On CUDA the worker decodes on a side stream and the cache makes the consumer
wait on an event, so decode overlaps compute.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import weakref
from typing import Iterable

import torch

from .cache import WeightCache

__all__ = ["Prefetcher", "layer_groups", "layer_index"]

log = logging.getLogger(__name__)
_LAYER = re.compile(r"\.(\d+)\.")


_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer a module or tensor belongs to (``model.layers.3.mlp.up_proj`` -> 3), or None."""
    m = _DECODER_LAYER.search(name + ".")
    return int(m.group(1)) if m else None


def layer_groups(keys_in_order: Iterable[str]) -> list[list[str]]:
    """Group keys by their layer number, keeping first-seen order of groups and keys."""
    groups: dict[str, list[str]] = {}
    for key in keys_in_order:
        m = _LAYER.search(key)
        gid = m.group(0) if m else key
        groups.setdefault(gid, [])
        if key not in groups[gid]:
            groups[gid].append(key)
    return list(groups.values())


class Prefetcher:
    """Background decoder of upcoming layers. ``depth=0`` disables it."""

    def __init__(self, cache: WeightCache, keys_in_order: list[str], depth: int,
                 device: torch.device) -> None:
        self.cache = cache
        self.depth = depth
        self.groups = layer_groups(keys_in_order)
        self._group_of = {k: i for i, g in enumerate(self.groups) for k in g}
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        self._queued: set[str] = set()
        # Groups known to be fully decoded. Only with an unbounded cache, which never evicts: then
        # a resident group needs no per-key check on every access (211 accesses per token on
        # SmolLM2, ~7 keys each: that bookkeeping doubled the per-token time on an H200).
        self._resident: set[int] = set()
        self._lock = threading.Lock()
        self._errors = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread: threading.Thread | None = None
        if depth > 0 and self.groups:
            self._thread = threading.Thread(target=self._run, name="thawed-prefetch", daemon=True)
            self._thread.start()
            # Stop the worker at interpreter exit even if nobody called close(): a daemon thread
            # killed inside a torch kernel aborts the process ("terminate called ...").
            self._finalizer = weakref.finalize(self, _stop_worker, self._queue, self._thread)

    def on_access(self, key: str) -> None:
        if self._thread is None:
            return
        g = self._group_of.get(key)
        if g is None:
            return
        n = len(self.groups)
        unbounded = self.cache.budget_bytes is None
        for step in range(1, min(self.depth, n - 1) + 1):
            gi = (g + step) % n
            if gi in self._resident:
                continue
            missing = False
            for nxt in self.groups[gi]:
                if self.cache.contains(nxt):
                    continue
                missing = True
                with self._lock:
                    if nxt in self._queued:
                        continue
                    self._queued.add(nxt)
                self._queue.put(nxt)
            if unbounded and not missing:
                self._resident.add(gi)
        if unbounded and len(self._resident) == n:
            # Everything is decoded and an unbounded cache never evicts: nothing is left to
            # prefetch, so stop the worker. Measured on an H200 (layers decoded by warm(), so no
            # side-stream entries): with the idle worker alive a decode step took 71 ms, with
            # sys.setswitchinterval(1) 29 ms (= prefetch off), with the worker stopped 38 ms. When
            # the layers were decoded by the worker on its side stream, steps stayed at ~60 ms even
            # after it stopped -- not understood yet (docs/SERVING.md, "GPU").
            self.close(wait=False)

    def _run(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            try:
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        self.cache.prefetch(key)
                else:
                    self.cache.prefetch(key)
            except Exception:  # the forward will decode it again and raise the error itself
                self._errors += 1
                log.debug("prefetch of %s failed", key, exc_info=True)
            finally:
                with self._lock:
                    self._queued.discard(key)

    def close(self, wait: bool = True) -> None:
        """Stop the worker; ``wait=False`` returns without joining it (it exits once idle)."""
        if self._thread is not None:
            if wait:
                self._finalizer()
            else:
                self._finalizer.detach()
                self._queue.put(None)
            self._thread = None


def _stop_worker(work: "queue.Queue[str | None]", thread: threading.Thread) -> None:
    work.put(None)
    thread.join(timeout=30)

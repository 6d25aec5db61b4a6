"""Start decoding a checkpoint while the rest of the process is still starting up.

Opening a checkpoint needs only its header; building the model needs transformers, whose import
(plus the skeleton and the tokenizer) takes 2-3 s of mostly single-threaded Python on the CPU. The
decoders spend their time in torch ops and numba kernels that release the GIL, so they can run on
the other core during that time. ``EarlyDecode`` does that: right after ``Checkpoint.open`` it
queues every compressed tensor that the model will need decoded anyway (an unbounded cache holds
every layer) on one worker thread, in execution order (embedding, layer 0, 1, ..., head), and the
load takes the results:

* a result that is ready (or being computed) is taken as is, waiting for it if need be;
* a tensor the worker has not started is cancelled and decoded by the caller instead, so the
  caller and the worker leapfrog through the layers rather than the caller waiting in line;
* a job that failed is decoded again by the caller, which then raises the codec's own error with
  the runtime's wording.

A job produces what the load would otherwise compute itself: the decoded tensor (checked finite)
for a weight that will be resident, or the int4 repack for a weight that runs direct on the CPU
(``direct.pack_rtn``). Which of the two is guessed from the index alone (a ``linear``/``lm_head``
weight whose payload the int4 kernel takes runs direct when ``--direct`` allows it); a guess that
turns out wrong only wastes the job, and ``close`` drops every result nobody took.

CPU only, and only with an unbounded cache: under a budget decoding everything up front would break
the budget, and on CUDA decoding is fast enough not to matter against the imports.
"""

from __future__ import annotations

import logging
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from thawed.codecs import get_codec
from thawed.codecs.threads import one_thread, set_thread_count

from .checkpoint import Checkpoint
from .direct import direct_unsupported_reason, pack_rtn
from .prefetch import layer_index
from .validate import check_finite

__all__ = ["EarlyDecode"]

log = logging.getLogger(__name__)

def _order(name: str, role: str) -> tuple[int, int]:
    """Execution order of a tensor: the embedding first, then by decoder layer, the head last."""
    if role == "embedding":
        return (0, 0)
    if role == "lm_head":
        return (2, 0)
    layer = layer_index(name)
    return (1, layer if layer is not None else 1 << 30)


class EarlyDecode:
    """One worker thread decoding a checkpoint's compressed tensors ahead of the load (see the
    module docstring). ``take_decoded(key)`` / ``take_packed(key)`` return a finished result or
    None (then decode it yourself); ``close()`` stops the worker and drops what is left."""

    def __init__(self, jobs: list[tuple[str, str, Callable[[], Any]]]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thawed-early",
                                        initializer=set_thread_count, initargs=(1,))
        self._futures: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()
        self._fns: dict[tuple[str, str], Callable[[], Any]] = {}
        for kind, key, fn in jobs:
            self._futures[(kind, key)] = self._pool.submit(fn)
            self._fns[(kind, key)] = fn
        # At interpreter exit, concurrent.futures joins its workers after they run every queued job:
        # a process that exits without close() would first decode the rest of the model. Cancel
        # what has not started instead (callbacks registered later run first).
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            ref = weakref.ref(self)
            register(lambda: (lambda me: me is not None and me._cancel_pending())(ref()))
        self.taken = 0
        self.submitted = len(jobs)

    @classmethod
    def start(cls, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
              direct: bool) -> "EarlyDecode | None":
        """Queue every non-raw tensor of ``ckpt`` (None when there is none). ``direct``: whether
        direct mode may be used (``--direct auto|on``)."""
        if device.type != "cpu":
            return None
        entries = [e for e in ckpt.index.values() if e.codec != "raw"]
        if not entries:
            return None
        entries.sort(key=lambda e: _order(e.name, e.spec.role))
        shared: dict[str, dict[str, torch.Tensor]] = {}

        def shared_for(codec: str) -> dict[str, torch.Tensor]:  # read (and checksummed) once per codec
            if codec not in shared:
                shared[codec] = ckpt.shared(codec)
            return shared[codec]

        jobs: list[tuple[str, str, Callable[[], Any]]] = []
        for e in entries:
            if (direct and e.spec.role in ("linear", "lm_head")
                    and direct_unsupported_reason(e.codec, e.params, tuple(e.shape), device) is None):
                jobs.append(("packed", e.name, lambda e=e: _pack(ckpt, e.name)))
            elif e.spec.role == "embedding" and hasattr(get_codec(e.codec), "decode_rows"):
                continue  # may decode per row (rowwise): leave it to the load's plan
            else:
                jobs.append(("decoded", e.name, lambda e=e: _decode(ckpt, e, device, dtype, shared_for)))
        return cls(jobs) if jobs else None

    def _take(self, kind: str, key: str) -> Any | None:
        with self._lock:
            fut = self._futures.pop((kind, key), None)
        if fut is None or fut.cancel():  # never queued, or not started: the caller decodes it
            return None
        while not fut.done() and self._steal():  # in flight on the worker: decode the next ones meanwhile
            pass
        try:
            result = fut.result()
        except Exception:  # noqa: BLE001 - the caller decodes again and raises the error itself
            log.debug("early decode of %s failed; decoding it again", key, exc_info=True)
            return None
        self.taken += 1
        with self._lock:
            done = not self._futures
        if done:  # every result handed out: let the worker thread end
            self._pool.shutdown(wait=False)
        return result

    def _steal(self) -> bool:
        """Run the first job the worker has not started on this thread, keeping its result for its
        own ``take``; False when none is left. A caller waiting for a running job does this rather
        than idle, so both threads decode until the end (one OpenMP thread each: codecs/threads.py)."""
        with self._lock:
            for k, f in self._futures.items():
                if f.cancel():
                    fn, done = self._fns[k], Future()
                    self._futures[k] = done
                    break
            else:
                return False
        done.set_running_or_notify_cancel()
        try:
            with one_thread():
                done.set_result(fn())
        except Exception as exc:  # noqa: BLE001 - handed to its own take, which decodes again
            done.set_exception(exc)
        return True

    def take_decoded(self, key: str) -> torch.Tensor | None:
        """The decoded weight ``key`` (finite-checked), or None."""
        return self._take("decoded", key)

    def take_packed(self, key: str) -> tuple | None:
        """``direct.pack_rtn``'s result for ``key``, or None."""
        return self._take("packed", key)

    def retain(self, decoded: set[str], packed: set[str]) -> None:
        """Drop the jobs of every tensor the load's plan does not decode (or repack) after all."""
        with self._lock:
            drop = [k for k in self._futures
                    if k[1] not in (decoded if k[0] == "decoded" else packed)]
            futures = [self._futures.pop(k) for k in drop]
        for fut in futures:
            fut.cancel()  # a running one finishes and its result is dropped with the future

    def pending(self) -> int:
        with self._lock:
            return len(self._futures)

    def _cancel_pending(self) -> None:
        with self._lock:
            futures, self._futures = list(self._futures.values()), {}
        for fut in futures:
            fut.cancel()

    def close(self) -> None:
        """Cancel what has not started, wait for the running job, and drop every result."""
        self._cancel_pending()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.submitted:
            log.debug("early decode: %d of %d results used", self.taken, self.submitted)


def _pack(ckpt: Checkpoint, key: str) -> tuple:
    entry = ckpt.index[key]
    enc = ckpt.encoded(key)
    with torch.no_grad():
        return pack_rtn(enc.fields["codes"], enc.fields["scale"], enc.fields["offset"], enc.params,
                        tuple(entry.shape), torch.device("cpu"))


def _decode(ckpt: Checkpoint, entry, device: torch.device, dtype: torch.dtype,
            shared_for: Callable[[str], dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():  # plain tensors: usable inside and outside inference mode
        weight = get_codec(entry.codec).decode(ckpt.encoded(entry.name), entry.spec, shared_for(entry.codec),
                                               device, dtype)
    check_finite(ckpt.payload_path, entry, weight)
    return weight

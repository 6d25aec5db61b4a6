"""Decoded-weight cache: budget boundary, LRU eviction order, pins, one decode per key, threads."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from thawed.runtime.cache import WeightCache

NB = 400  # bytes of each test tensor: 100 float32


class Decoder:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[str] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, key: str):
        with self.lock:
            self.calls.append(key)
        if self.delay:
            time.sleep(self.delay)
        if key == "bad":
            raise ValueError("cannot decode bad")
        return torch.full((100,), float(len(key))), "test", None


def use(cache: WeightCache, key: str) -> torch.Tensor:
    t = cache.acquire(key)
    cache.release(key)
    return t


def test_budget_exactly_fits_keeps_everything():
    dec = Decoder()
    cache = WeightCache(dec, budget_bytes=3 * NB)
    for k in "abc":
        use(cache, k)
    for k in "abc":
        use(cache, k)
    s = cache.stats()
    assert dec.calls == ["a", "b", "c"]
    assert (s.hits, s.misses, s.evictions, s.bytes_used) == (3, 3, 0, 3 * NB)


def test_one_byte_under_budget_evicts_least_recently_used():
    dec = Decoder()
    cache = WeightCache(dec, budget_bytes=3 * NB - 1)
    for k in "abc":
        use(cache, k)
    s = cache.stats()
    assert s.keys == ["b", "c"] and s.evictions == 1 and s.bytes_used == 2 * NB


def test_eviction_order_follows_recency_not_insertion():
    dec = Decoder()
    cache = WeightCache(dec, budget_bytes=3 * NB)
    for k in "abc":
        use(cache, k)
    use(cache, "a")  # a becomes most recent: b is now the LRU entry
    use(cache, "d")
    assert cache.stats().keys == ["c", "a", "d"]
    use(cache, "e")
    assert cache.stats().keys == ["a", "d", "e"]
    assert cache.stats().evictions == 2


def test_pinned_entries_are_never_evicted_and_budget_recovers_on_release():
    dec = Decoder()
    cache = WeightCache(dec, budget_bytes=NB)
    a = cache.acquire("a")
    b = cache.acquire("b")  # over budget, but both are pinned by the "current forward"
    s = cache.stats()
    assert s.keys == ["a", "b"] and s.evictions == 0 and s.bytes_used == 2 * NB
    assert torch.equal(a, torch.full((100,), 1.0)) and b.shape == (100,)
    cache.release("a")
    s = cache.stats()
    assert s.keys == ["b"] and s.evictions == 1
    cache.release("b")
    assert cache.stats().keys == ["b"]


def test_zero_budget_streams_every_access():
    dec = Decoder()
    cache = WeightCache(dec, budget_bytes=0)
    for _ in range(3):
        use(cache, "a")
    assert dec.calls == ["a", "a", "a"]
    assert cache.stats().bytes_used == 0 and cache.stats().peak_bytes == NB


def test_release_without_acquire_is_an_error():
    cache = WeightCache(Decoder(), budget_bytes=None)
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        cache.release("a")


def test_decode_error_propagates_and_does_not_poison_the_key():
    dec = Decoder()
    cache = WeightCache(dec, budget_bytes=None)
    with pytest.raises(ValueError):
        cache.acquire("bad")
    assert not cache.contains("bad")
    with pytest.raises(ValueError):  # retried, not stuck waiting on a dead in-flight marker
        cache.acquire("bad")
    assert dec.calls == ["bad", "bad"]


def test_concurrent_acquires_decode_once():
    dec = Decoder(delay=0.05)
    cache = WeightCache(dec, budget_bytes=None)
    results: list[torch.Tensor] = []

    def worker() -> None:
        results.append(use(cache, "shared"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert dec.calls == ["shared"]
    assert len(results) == 8 and all(r is results[0] for r in results)
    s = cache.stats()
    assert s.misses == 1 and s.hits == 7


def test_prefetch_then_acquire_is_a_hit_and_counts_decode_time():
    dec = Decoder(delay=0.01)
    cache = WeightCache(dec, budget_bytes=None)
    cache.prefetch("a")
    cache.prefetch("a")  # already there: no second decode
    use(cache, "a")
    s = cache.stats()
    assert dec.calls == ["a"] and s.prefetched == 1 and s.hits == 1 and s.misses == 0
    assert s.decode_seconds["test"] >= 0.01


def test_many_threads_under_small_budget_stay_consistent():
    dec = Decoder()
    cache = WeightCache(dec, budget_bytes=2 * NB)
    keys = [f"k{i}" for i in range(6)]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(200):
                use(cache, keys[(seed * 7 + i) % len(keys)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    s = cache.stats()
    assert s.bytes_used <= 2 * NB and s.bytes_used == s.entries * NB
    assert s.hits + s.misses == 800


def test_prefetch_that_cannot_fit_beside_pinned_entries_is_skipped():
    dec = Decoder()
    cache = WeightCache(dec, budget_bytes=NB, size_of=lambda key: NB)
    cache.acquire("a")  # pinned by the running forward: fills the budget
    assert cache.prefetch("b") is False
    assert dec.calls == ["a"] and cache.stats().prefetch_skipped == 1
    cache.release("a")
    assert cache.prefetch("b") is True  # room again once the pin is gone
    s = cache.stats()
    assert s.keys == ["b"] and s.peak_bytes <= 2 * NB


def test_known_sizes_make_room_before_decoding_so_peak_stays_within_budget():
    dec = Decoder()
    cache = WeightCache(dec, budget_bytes=2 * NB, size_of=lambda key: NB)
    for k in "abcdef":
        use(cache, k)
    s = cache.stats()
    assert s.peak_bytes == 2 * NB and s.keys == ["e", "f"] and s.evictions == 4


@pytest.mark.parametrize("budget", [None, 2 * NB])
def test_prefetcher_skips_checks_only_for_groups_an_unbounded_cache_holds(budget):
    """With an unbounded cache (which never evicts) a group found fully decoded is not checked
    again on every access; under a budget every access still checks, so evicted keys are queued."""
    from thawed.runtime.prefetch import Prefetcher

    dec = Decoder()
    cache = WeightCache(dec, budget_bytes=budget)
    keys = [f"layers.{i}.w" for i in range(4)]
    pf = Prefetcher(cache, keys, depth=1, device=torch.device("cpu"))
    try:
        for _ in range(3):  # three "tokens"
            for k in keys:
                use(cache, k)
                pf.on_access(k)
            deadline = time.time() + 5
            while pf._queued and time.time() < deadline:
                time.sleep(0.01)
        checks = []
        real = cache.contains
        cache.contains = lambda key: checks.append(key) or real(key)  # type: ignore[method-assign]
        for k in keys:
            use(cache, k)
            pf.on_access(k)
        if budget is None:
            assert checks == [] and len(pf._resident) == 4
            # nothing left to prefetch: the worker was stopped (an idle live thread slowed CUDA decode steps 2.4x)
            assert pf._thread is None
            worker = [t for t in threading.enumerate() if t.name == "thawed-prefetch"]
            for t in worker:
                t.join(timeout=5)
            assert not any(t.is_alive() for t in worker)
        else:
            assert pf._thread is not None
            assert len(checks) == 4 and pf._resident == set()
    finally:
        pf.close()

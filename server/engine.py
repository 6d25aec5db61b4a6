"""The generation engine: one worker thread owns the model; requests wait in a bounded queue.

* ``Engine.submit(job)`` puts a request (a ``Job``: one or more sequences — prompts x ``n``) in
  the waiting queue, or raises ``QueueFull`` when ``max_queue`` requests already wait and no slot
  is free. The HTTP layer answers that with 429 + ``Retry-After``.
* The worker admits waiting jobs while fewer than ``max_running`` sequences are active (a job is
  admitted whole; a job larger than ``max_running`` runs alone). Each loop iteration prefills the
  new sequences one by one (each alone, batch 1), then runs one decode step for the running ones.
* Continuous batching: after its prefill a sequence joins a ``_Batch`` — one KV cache per layer
  ``[rows, heads, length, dim]``, rows left-padded to a common length, the padding masked out of
  attention and each row given its own position ids (what ``generate`` does for left-padded
  batches). One forward then decodes a token for every row. Rows leave when they finish
  (``index_select``; padding common to all rows is trimmed). A sequence joins only while padding
  stays under half of the batch's cache, and only plain full-attention ``DynamicCache``s are
  merged; anything else (sliding-window, linear-attention layers) decodes as a batch of one.
  ``batching=False`` decodes every sequence alone (round robin), for comparison.
* Events go back to the request's asyncio queue with ``loop.call_soon_threadsafe``.
* Cancellation: ``job.cancel()`` sets a flag the worker checks before every token, so a client
  that disconnects stops its generation within one token and frees its slot. Stop strings end a
  sequence the same way, from inside the worker.
* Prompt scoring (``echo`` + ``logprobs``): one forward over the whole prompt, fp32
  log-softmax; the same forward's last row chooses the first new token.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import torch
from torch import nn

from thawed.runtime.generate import SamplingParams, cache_kwargs, output_cache
from thawed.runtime.sampling import process_logits, sample
from thawed.runtime.stepper import Stepper, stepper_unsupported_reason

from .detok import TextAssembler
from .metrics import Metrics

__all__ = [
    "SeqSpec", "Job", "Engine", "QueueFull", "EngineClosed", "PromptScores", "TokenEvent",
    "Finished", "Failed", "job_events",
]

log = logging.getLogger(__name__)

_ids = itertools.count()


class QueueFull(Exception):
    """The waiting queue is full (answer 429)."""


class EngineClosed(Exception):
    """The engine is not running (loading, failed or shutting down)."""


@dataclass(frozen=True)
class SeqSpec:
    """One sequence to generate. ``prompt_logprobs``: score the prompt and return this many top
    alternatives per position (None: do not score). ``logprobs``: top alternatives per new token."""

    index: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    prompt_logprobs: int | None = None
    logprobs: int | None = None
    max_model_len: int | None = None


# ---- events (worker -> request) ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PromptScores:
    index: int
    logprobs: list  # [None, lp1, lp2, ...] one per prompt token
    top: list  # [None, [(id, lp), ...], ...]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    index: int
    token: int
    logprob: float
    top: tuple  # ((id, lp), ...)
    piece: str  # this token's own text (empty while a UTF-8 sequence is incomplete)
    delta: str  # text safe to send now (stop strings held back)
    special: bool


@dataclass(frozen=True, slots=True)
class Finished:
    index: int
    reason: str  # "length" | "eos" | "stop"
    delta: str  # remaining text (held back until now)
    text: str  # the whole generated text
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Failed:
    message: str


class Job:
    """One request: its sequences, its event queue (on the event loop), its cancel flag."""

    def __init__(self, seqs: Sequence[SeqSpec], loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not seqs:
            raise ValueError("a job needs at least one sequence")
        self.id = next(_ids)
        self.seqs = list(seqs)
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True  # read by the worker before every token

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class _Seq:
    __slots__ = ("job", "spec", "past", "batch", "history", "generator", "text", "n", "first_at", "last_at",
                 "last_token", "admitted", "slot", "pos")

    def __init__(self, job: Job, spec: SeqSpec, tokenizer) -> None:
        self.job = job
        self.spec = spec
        self.past = None
        self.batch: _Batch | None = None
        self.history = list(spec.prompt_ids)
        p = spec.params
        self.generator = None
        if p.temperature > 0:
            self.generator = torch.Generator()
            if p.seed is not None:
                self.generator.manual_seed(p.seed)
            else:
                self.generator.seed()
        self.text = TextAssembler(tokenizer, spec.stop, include_stop=spec.include_stop, context=spec.prompt_ids)
        self.n = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.last_token: int | None = None
        self.slot: int | None = None  # row of the Stepper's KV cache (fast path)
        self.pos = 0  # tokens of this sequence in that cache
        self.admitted = time.monotonic()


class _Batch:
    """Running sequences decoded together: one KV cache ``[rows, heads, length, dim]`` per layer,
    rows left-padded to a common length (``pads``), padding masked out of attention. Rows join
    after their own prefill and leave when they finish; padding shared by every row is trimmed."""

    __slots__ = ("rows", "cache", "pads", "length", "batched")

    def __init__(self, seq: _Seq, *, batched: bool) -> None:
        self.rows = [seq]
        self.cache = seq.past
        self.pads = [0]
        self.length = len(seq.history) - 1  # tokens in the cache (the last token is not in it yet)
        self.batched = batched
        seq.past = None
        seq.batch = self

    @staticmethod
    def can_batch(cache) -> bool:
        """Only plain dynamic caches (full attention, tensors [1, heads, length, dim]) are merged;
        anything else (sliding windows, linear attention, quantized caches) decodes alone."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = getattr(cache, "layers", None)
        return (type(cache) is DynamicCache and bool(layers)
                and all(type(layer) is DynamicLayer and getattr(layer, "keys", None) is not None
                        and layer.keys.dim() == 4 for layer in layers))

    def fits(self, seq: _Seq) -> bool:
        """Join only while padding stays at most half of the cache (a long prompt among short
        ones would otherwise multiply the KV memory and attention work)."""
        n = len(seq.history) - 1
        longest = max(self.length, n)
        real = sum(self.length - pad for pad in self.pads) + n
        return longest * (len(self.rows) + 1) <= 2 * real

    def add(self, seq: _Seq) -> None:
        import torch.nn.functional as F

        n = len(seq.history) - 1
        longest = max(self.length, n)
        for mine, theirs in zip(self.cache.layers, seq.past.layers):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                if longest > self.length:
                    a = F.pad(a, (0, 0, longest - self.length, 0))
                if longest > n:
                    b = F.pad(b, (0, 0, longest - n, 0))
                setattr(mine, name, torch.cat([a, b], dim=0))
        self.pads = [pad + longest - self.length for pad in self.pads] + [longest - n]
        self.length = longest
        self.rows.append(seq)
        seq.past = None
        seq.batch = self

    def remove(self, seq: _Seq) -> None:
        i = self.rows.index(seq)
        del self.rows[i], self.pads[i]
        if not self.rows:
            self.cache = None
            return
        keep = torch.tensor([j for j in range(len(self.rows) + 1) if j != i], device=self.cache.layers[0].keys.device)
        trim = min(self.pads)  # padding every remaining row has: drop those columns
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, keep)[:, :, trim:]
            layer.values = layer.values.index_select(0, keep)[:, :, trim:]
        self.pads = [pad - trim for pad in self.pads]
        self.length -= trim


class Engine:
    def __init__(self, model: nn.Module, tokenizer, eos_token_ids: Sequence[int], device: torch.device, *,
                 max_queue: int, max_running: int, metrics: Metrics | None = None, batching: bool = True,
                 max_model_len: int | None = None, fast: bool = True, prefill_chunk: int = 512,
                 compile: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos = frozenset(int(e) for e in eos_token_ids)
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self.device = torch.device(device)
        self.max_queue = max_queue
        self.max_running = max_running
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[_Seq] = []  # admitted sequences (prefilled or not)
        self._batches: list[_Batch] = []
        self._n_active = 0
        self.batching = batching
        # The fast path (runtime/stepper.py): one KV cache with a slot per running sequence; rows
        # 0..len(_rows)-1 are the prefilled sequences, decoded together in one forward per token.
        self.stepper: Stepper | None = None
        reason = stepper_unsupported_reason(model) if fast else "turned off"
        if reason is None:
            self.stepper = Stepper(model, slots=max_running, max_len=max_model_len, capacity=256, compile=compile,
                                   dynamic=True)  # batches change size: one graph for all
        else:
            log.info("the engine decodes through transformers' forward: %s", reason)
        self.prefill_chunk = prefill_chunk
        self._rows: list[_Seq] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="thawed-engine", daemon=True)

    # ---- asyncio side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self.alive:
                raise EngineClosed("the generation worker is not running")
            waiting_seqs = sum(len(j.seqs) for j in self._waiting)
            slot_free = self._n_active + waiting_seqs + len(job.seqs) <= self.max_running
            if len(self._waiting) >= self.max_queue and not slot_free:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue={self.max_queue})")
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
            self.metrics.waiting.set(len(self._waiting))
            self.metrics.cancelled.inc(len(job.seqs))

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the generation worker did not stop within %.0f s", timeout)

    # ---- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._admit()
                    while not self._active and not self._closing:
                        self._cond.wait()
                        self._admit()
                    if self._closing:
                        break
                if self.stepper is not None:
                    self._step_fast()
                    continue
                for seq in [s for s in self._active if s.batch is None]:  # new: prefill alone
                    if seq.job.cancelled:
                        self._drop(seq, cancelled=True)
                        continue
                    try:
                        self._prefill(seq)
                    except Exception as exc:  # a failing forward fails its request, not the server
                        log.exception("prefill failed for request %d", seq.job.id)
                        self._fail(seq.job, f"generation failed: {type(exc).__name__}: {exc}")
                for batch in list(self._batches):  # then one token for every running sequence
                    for seq in [r for r in batch.rows if r.job.cancelled]:
                        self._drop(seq, cancelled=True)
                    if not batch.rows:
                        continue
                    try:
                        self._decode(batch)
                    except Exception as exc:
                        log.exception("decode step failed for %d sequence(s)", len(batch.rows))
                        for job in {id(r.job): r.job for r in batch.rows}.values():
                            self._fail(job, f"generation failed: {type(exc).__name__}: {exc}")
        except BaseException:  # pragma: no cover - a bug in the loop itself
            log.exception("the generation worker stopped")
            raise
        finally:
            with self._cond:
                self._closing = True
                jobs = list(self._waiting) + list({id(s.job): s.job for s in self._active}.values())
                self._waiting.clear()
            for job in jobs:
                job.emit(Failed("the server is shutting down"))
            for seq in list(self._active):
                self._drop(seq, cancelled=True)

    def _admit(self) -> None:  # holds the lock
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            if self._n_active and self._n_active + len(job.seqs) > self.max_running:
                break
            self._waiting.popleft()
            self.metrics.queue_time.observe(time.monotonic() - job.submitted)
            try:
                seqs = [_Seq(job, spec, self.tokenizer) for spec in job.seqs]
            except Exception as exc:  # bad sampling state (the routes validate; this is the backstop)
                log.exception("cannot start request %d", job.id)
                job.cancel()
                job.emit(Failed(f"cannot start generation: {type(exc).__name__}: {exc}"))
                continue
            self._active.extend(seqs)
            self._n_active = len(self._active)
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.running.set(self._n_active)

    def _drop(self, seq: _Seq, *, cancelled: bool = False) -> None:
        if seq.slot is not None:
            self._free_slot(seq)
        batch, seq.batch, seq.past = seq.batch, None, None
        if batch is not None:
            batch.remove(seq)
            if not batch.rows:
                self._batches.remove(batch)
        with self._cond:
            try:
                self._active.remove(seq)
            except ValueError:
                return
            self._n_active = len(self._active)
            self.metrics.running.set(self._n_active)
        if cancelled:
            self.metrics.cancelled.inc()

    def _fail(self, job: Job, message: str) -> None:
        job.cancel()
        self.metrics.errors.inc()
        for s in [s for s in self._active if s.job is job]:
            self._drop(s)
        job.emit(Failed(message))

    def _finish(self, seq: _Seq, reason: str) -> None:
        delta = seq.text.flush()
        self._drop(seq)  # free the slot before the client can see the end and send its next request
        self.metrics.request_success.labels(reason).inc()
        self.metrics.e2e.observe(time.monotonic() - seq.job.submitted)
        self.metrics.request_prompt_tokens.observe(len(seq.spec.prompt_ids))
        self.metrics.request_generation_tokens.observe(seq.n)
        if seq.first_at is not None:
            self.metrics.prefill_time.observe(seq.first_at - seq.admitted)
            self.metrics.decode_time.observe(seq.last_at - seq.first_at)
        seq.job.emit(Finished(seq.spec.index, reason, delta, seq.text.output, seq.n))

    def _prefill(self, seq: _Seq) -> None:
        spec, p = seq.spec, seq.spec.params
        with torch.inference_mode():
            ids = torch.tensor([spec.prompt_ids], dtype=torch.long, device=self.device)
            self.metrics.prompt_tokens.inc(len(spec.prompt_ids))
            if spec.prompt_logprobs is not None:
                out = self.model(input_ids=ids, use_cache=p.max_new_tokens > 0)
                logp_all = torch.log_softmax(out.logits[0].float(), dim=-1)  # [prompt, vocab] fp32
                seq.job.emit(self._prompt_scores(spec, logp_all))
                del logp_all
                if p.max_new_tokens == 0:
                    self._finish(seq, "length")
                    return
            elif p.max_new_tokens == 0:
                self._finish(seq, "length")
                return
            else:
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            seq.past = output_cache(out)
            reason = self._next(seq, out.logits[0, -1])
        if reason is not None:
            self._finish(seq, reason)
            return
        if self.batching and _Batch.can_batch(seq.past):
            for batch in self._batches:
                if batch.batched and batch.fits(seq):
                    batch.add(seq)
                    return
            self._batches.append(_Batch(seq, batched=True))
        else:
            self._batches.append(_Batch(seq, batched=False))

    def _decode(self, batch: "_Batch") -> None:
        rows = list(batch.rows)
        kwargs = {}
        if len(rows) > 1:  # ragged batch: left padding masked out, each row at its own position
            if any(batch.pads):
                mask = torch.ones(len(rows), batch.length + 1, dtype=torch.long, device=self.device)
                for i, pad in enumerate(batch.pads):
                    mask[i, :pad] = 0
                kwargs["attention_mask"] = mask
            kwargs["position_ids"] = torch.tensor([[batch.length - pad] for pad in batch.pads],
                                                  dtype=torch.long, device=self.device)
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self.device)
        self.metrics.batch_rows.observe(len(rows))
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, **cache_kwargs(batch.cache), **kwargs)
            batch.cache = output_cache(out)
            batch.length += 1
            logits = out.logits[:, -1].float()
            del out
            tokens = self._choose(rows, logits)  # the whole batch's logits processing at once
            done = [(r, reason) for i, r in enumerate(rows)
                    if (reason := self._next(r, logits[i], tokens[i])) is not None]
        for r, reason in done:
            self._finish(r, reason)

    # ---- fast path: Stepper slots -----------------------------------------------------------------
    def _step_fast(self) -> None:
        """Prefill every newly admitted sequence together, then one token for every running one."""
        new = [s for s in self._active if s.slot is None]
        for seq in [s for s in new if s.job.cancelled]:
            self._drop(seq, cancelled=True)
        new = [s for s in new if not s.job.cancelled]
        if new:
            try:
                self._prefill_fast(new)
            except Exception as exc:  # a failing forward fails its requests, not the server
                log.exception("prefill failed for %d sequence(s)", len(new))
                for job in {id(s.job): s.job for s in new}.values():
                    self._fail(job, f"generation failed: {type(exc).__name__}: {exc}")
        for seq in [r for r in self._rows if r.job.cancelled]:
            self._drop(seq, cancelled=True)
        if self._rows:
            try:
                self._decode_fast()
            except Exception as exc:
                log.exception("decode step failed for %d sequence(s)", len(self._rows))
                for job in {id(r.job): r.job for r in self._rows}.values():
                    self._fail(job, f"generation failed: {type(exc).__name__}: {exc}")

    def _prefill_fast(self, seqs: list[_Seq]) -> None:
        """Batched, chunked prefill: the new prompts right-padded to one [n, T] block per chunk of
        ``prefill_chunk`` positions, in slots after the running rows. Prompt scoring (echo +
        logprobs) takes every position's logits, so such sequences go one at a time."""
        scored = [s for s in seqs if s.spec.prompt_logprobs is not None]
        plain = [s for s in seqs if s.spec.prompt_logprobs is None]
        for seq in [s for s in plain if s.spec.params.max_new_tokens == 0]:
            self._finish(seq, "length")
        plain = [s for s in plain if s.spec.params.max_new_tokens > 0]
        for group in [[s] for s in scored] + ([plain] if plain else []):
            self._prefill_group(group)

    def _prefill_group(self, seqs: list[_Seq]) -> None:
        stepper = self.stepper
        start = len(self._rows)
        stepper.ensure_slots(start + len(seqs))
        for i, seq in enumerate(seqs):
            seq.slot = start + i
            self._rows.append(seq)
            self.metrics.prompt_tokens.inc(len(seq.spec.prompt_ids))
        lengths = [len(s.spec.prompt_ids) for s in seqs]
        longest = max(lengths)
        score = seqs[0].spec.prompt_logprobs is not None
        first: list[torch.Tensor | None] = [None] * len(seqs)
        scores = []
        with torch.inference_mode():
            for b in range(0, longest, self.prefill_chunk):
                t = min(self.prefill_chunk, longest - b)
                block = [list(s.spec.prompt_ids[b:b + t]) for s in seqs]
                ids = torch.tensor([row + [0] * (t - len(row)) for row in block], dtype=torch.long,
                                   device=self.device)  # rows whose prompt ended: padding, masked later
                last = [min(max(n - 1 - b, 0), t - 1) for n in lengths]
                logits = stepper.forward(ids, start, [b] * len(seqs), last, all_positions=score)
                if score:
                    scores.append(logits[0])
                    if b + t >= longest:
                        first[0] = logits[0, lengths[0] - 1 - b]
                    continue
                for i, n in enumerate(lengths):
                    if b <= n - 1 < b + t:
                        first[i] = logits[i]
        for seq, n in zip(seqs, lengths):
            seq.pos = n
        if score:
            seq = seqs[0]
            logp_all = torch.log_softmax(torch.cat(scores), dim=-1)  # [prompt, vocab] fp32
            seq.job.emit(self._prompt_scores(seq.spec, logp_all))
            del logp_all
            if seq.spec.params.max_new_tokens == 0:
                self._finish(seq, "length")
                return
        batch = torch.stack(first)
        tokens = self._choose(seqs, batch)
        for i, seq in enumerate(seqs):
            reason = self._next(seq, batch[i], tokens[i])
            if reason is not None:
                self._finish(seq, reason)

    def _decode_fast(self) -> None:
        rows = list(self._rows)
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self.device)
        self.metrics.batch_rows.observe(len(rows))
        with torch.inference_mode():
            logits = self.stepper.forward(ids, 0, [r.pos for r in rows])
        for r in rows:
            r.pos += 1
        tokens = self._choose(rows, logits)  # the whole batch's logits processing at once
        done = [(r, reason) for i, r in enumerate(rows)
                if (reason := self._next(r, logits[i], tokens[i])) is not None]
        for r, reason in done:
            self._finish(r, reason)

    def _free_slot(self, seq: _Seq) -> None:
        """Give up a row: the last row moves into its slot, so rows stay 0..n-1."""
        i = seq.slot
        seq.slot = None
        if i is None or i >= len(self._rows) or self._rows[i] is not seq:
            return
        tail = self._rows.pop()
        if tail is not seq:
            self.stepper.move_slot(tail.slot, i, tail.pos)
            tail.slot = i
            self._rows[i] = tail

    @staticmethod
    def _choose(rows: Sequence[_Seq], logits: torch.Tensor) -> list[int]:
        """The next token of every row from fp32 logits [rows, vocab] (runtime.sampling)."""
        params = [r.spec.params for r in rows]
        # token lists only when a row has a penalty: slicing every history each step is per-token work
        generated = previous = None
        if any(p.frequency_penalty or p.presence_penalty for p in params):
            generated = [r.history[len(r.spec.prompt_ids):] for r in rows]
        if any(p.repetition_penalty != 1.0 for p in params):
            previous = [r.history for r in rows]
        x = process_logits(logits, params, generated, previous)
        return sample(x, params, [r.generator for r in rows])

    def _next(self, seq: _Seq, logits: torch.Tensor, token: int | None = None) -> str | None:
        """Record and emit the next token (chosen from the [vocab] logits row unless given); the
        finish reason or None."""
        spec, p = seq.spec, seq.spec.params
        logits = logits.float()
        if token is None:
            token = self._choose([seq], logits[None])[0]
        logp = torch.log_softmax(logits, dim=-1)
        lp = float(logp[token])
        top: tuple = ()
        if spec.logprobs:
            vals, idx = torch.topk(logp, min(spec.logprobs, logp.numel()))
            top = tuple(zip(idx.tolist(), vals.tolist()))
        now = time.monotonic()
        if seq.first_at is None:
            seq.first_at = now
            self.metrics.ttft.observe(now - seq.job.submitted)
        else:
            self.metrics.itl.observe(now - seq.last_at)
        seq.last_at = now
        seq.n += 1
        seq.last_token = token
        seq.history.append(token)
        self.metrics.generation_tokens.inc()
        piece, delta = seq.text.push(token)
        seq.job.emit(TokenEvent(spec.index, token, lp, top, piece, delta, token in self.special_ids))
        if token in self.eos and not p.ignore_eos:
            return "eos"
        if seq.text.stopped:
            return "stop"
        if seq.n >= p.max_new_tokens:
            return "length"
        if spec.max_model_len is not None and len(seq.history) >= spec.max_model_len:
            return "length"
        return None

    @staticmethod
    def _prompt_scores(spec: SeqSpec, logp_all: torch.Tensor) -> PromptScores:
        ids = torch.tensor(spec.prompt_ids[1:], dtype=torch.long, device=logp_all.device)
        rows = logp_all[:-1]
        chosen = rows.gather(1, ids[:, None])[:, 0].tolist() if len(ids) else []
        logprobs: list = [None, *chosen]
        top: list = [None]
        k = spec.prompt_logprobs or 0
        if k and len(ids):
            vals, idx = torch.topk(rows, k, dim=-1)
            top += [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        else:
            top += [[] for _ in chosen]
        return PromptScores(spec.index, logprobs, top)


# ---- consuming a job's events on the event loop -------------------------------------------------
class ClientGone(Exception):
    """The client disconnected while its request was running."""


async def _wait_disconnect(receive) -> None:
    quiet = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        quiet += 1
        if quiet > 100:  # a server that keeps answering with body messages: poll gently instead
            await asyncio.sleep(0.05)


async def job_events(engine: Engine, job: Job, receive=None) -> AsyncIterator:
    """Yield the job's events until every sequence has finished (or ``Failed``). If the client
    disconnects (``receive`` says ``http.disconnect``) or the consumer stops early, the job is
    cancelled; the worker sees that before its next token."""
    watcher = asyncio.ensure_future(_wait_disconnect(receive)) if receive is not None else None
    remaining = len(job.seqs)
    try:
        while remaining:
            getter = asyncio.ensure_future(job.events.get())
            waits = {getter} if watcher is None else {getter, watcher}
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                getter.cancel()
                raise
            if getter not in done:
                getter.cancel()
                raise ClientGone()
            event = getter.result()
            if isinstance(event, Finished):
                remaining -= 1
            yield event
            if isinstance(event, Failed):
                remaining = 0
                return
    finally:
        if watcher is not None:
            watcher.cancel()
        if remaining:
            engine.cancel(job)

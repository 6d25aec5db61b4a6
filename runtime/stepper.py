"""The fast decode path: a functional Llama-family forward over a static, slot-based KV cache.

transformers' eager forward spends most of a batch-1 decode step in Python (mask building, cache
objects, per-module dispatch), not in the matmuls. ``Stepper`` runs the same modules -- so every
execution mode of a linear works unchanged: a resident ``nn.Linear``, a direct (run-compressed)
``DirectLinear``, or a streamed linear whose hooks decode on demand -- in a short loop with:

* a KV cache preallocated per layer as ``[slots, kv_heads, capacity, head_dim]`` (grown by
  doubling up to ``max_len``), where each row (sequence) owns one slot and its own position, so
  rows of a decode batch need no padding and a row joins or leaves without touching the others;
* RoPE from a cos/sin table computed once by the model's own rotary module (so scaled RoPE types
  behave as in transformers);
* attention by ``scaled_dot_product_attention`` over exactly the positions in use, with a per-row
  mask only when rows differ in length.

The forward is ``forward(ids [B, T], start, pos0 [B], last [B])``: rows ``start .. start+B-1`` of
the cache take ``T`` new tokens at positions ``pos0[b] ..``; the result is the fp32 logits of the
token at offset ``last[b]`` of each row. Prefill is that with ``T > 1`` (prompts right-padded, a
chunk at a time), a decode step is ``T == 1``. Right padding writes keys past a row's length; they
are masked out (keys beyond a row's own position never count) and overwritten as the row grows.

Supported: decoder-only models whose layers are Llama's (``model_type`` llama, mistral without a
sliding window inside the context, qwen2); anything else generates through transformers
(``generate.generate_tokens`` falls back and says so once). ``tests/test_stepper.py`` compares
every path (prefill, chunked prefill, ragged batches, moved slots, the compiled step) with
transformers' own forward.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cuda_graphs import GraphedDecode, hooks_left
from .direct import fuse_direct
from .lean_step import LeanStep, rms_norm

__all__ = ["Stepper", "stepper_unsupported_reason"]

log = logging.getLogger(__name__)

_TYPES = ("llama", "mistral", "qwen2")
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "NativeRMSNorm")


def stepper_unsupported_reason(model: nn.Module) -> str | None:
    """None when ``Stepper`` can run ``model``, else why not (one line)."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in _TYPES:
        return f"model_type {mtype!r} has no fast path (supported: {', '.join(_TYPES)})"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", mtype == "mistral"):
        return "sliding-window attention has no fast path"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} does not have Llama's module layout"
    return None


class Stepper:
    """Prefill and decode steps for a Llama-family transformers model over a slot-based KV cache."""

    def __init__(self, model: nn.Module, *, slots: int = 1, max_len: int | None = None,
                 capacity: int = 256, compile: bool = False, dynamic: bool = False,
                 graphs: bool | None = None) -> None:
        reason = stepper_unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self.model = model
        cfg = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.head = model.lm_head
        self.rotary = inner.rotary_emb
        self.ring = getattr(model, "_thawed_ring", None)  # streamed layers (runtime/ring.py)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.max_len = int(max_len or getattr(cfg, "max_position_embeddings", 2048))
        self.slots = int(slots)
        buf = next(iter(self.rotary.buffers()), None)
        self.device = buf.device if buf is not None else torch.device("cpu")
        self.dtype = self._compute_dtype()
        self.capacity = 0
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self._cos = self._sin = torch.empty(0)
        self._version = 0  # bumped whenever the KV cache tensors or RoPE tables are replaced
        self._grow(min(max(int(capacity), 16), self.max_len))
        self.inter = int(self.layers[0].mlp.gate_proj.out_features)
        self._qkv = [fuse_linears(l.self_attn, ("q_proj", "k_proj", "v_proj")) for l in self.layers]
        self._gate_up = [fuse_linears(l.mlp, ("gate_proj", "up_proj")) for l in self.layers]
        self._fast_norm = all(type(n).__name__ in _RMS_NORMS and hasattr(n, "variance_epsilon")
                              for l in self.layers for n in (l.input_layernorm, l.post_attention_layernorm))
        self._compiled = None
        self._graph_fn = None
        self._hook_free = False
        # the lean batch-1 step (runtime/lean_step.py): eager fp32 on the CPU, no streamed layers.
        # False = not built yet; None = not used
        self._lean: LeanStep | bool | None = False
        if self.device.type != "cpu" or compile or self.ring is not None or self.dtype != torch.float32 \
                or not self._fast_norm:
            self._lean = None
        # CUDA graphs of the decode step (runtime/cuda_graphs.py): on by default on a GPU. On CUDA
        # they take the place of torch.compile: capture costs well under a second, no compiler.
        self.graphs: GraphedDecode | None = None
        if graphs is None:
            graphs = self.device.type == "cuda"
        if graphs and self.device.type == "cuda":
            # with compile: inductor fuses the step's small ops first, and the graph replays that
            self._graph_fn = compile_step(self._decode_static, False) if compile else None
            self.graphs = GraphedDecode(self._graph_step, int(cfg.hidden_size), self.dtype, self.device)
        elif compile:
            self._compiled = compile_step(self._decode_static, dynamic)

    def _compute_dtype(self) -> torch.dtype:
        for p in self.norm.parameters():
            return p.dtype
        return torch.float32

    # ---- cache ----------------------------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        """Make room for ``capacity`` positions per slot (copying what is cached)."""
        capacity = min(capacity, self.max_len)
        if capacity <= self.capacity:
            return
        # one more position than the capacity: a scratch place that no real position uses, where the
        # padding rows of a CUDA-graphed batch write (runtime/cuda_graphs.py)
        shape = (self.slots, self.kv_heads, capacity + 1, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        if self.capacity:
            for a, b in zip(new_k + new_v, self.k + self.v):
                a[:, :, : self.capacity].copy_(b[:, :, : self.capacity])
        self.k, self.v = new_k, new_v
        self.capacity = capacity
        self._version += 1
        pos = torch.arange(capacity + 1, device=self.device)[None]
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            cos, sin = self.rotary(probe, pos)
        half = self.head_dim // 2
        sign = torch.ones(self.head_dim, device=self.device)
        sign[:half] = -1  # rotate_half(x) == x.roll(half) * sign, so the sign goes into the sin table
        self._cos, self._sin = cos[0].to(self.dtype), (sin[0] * sign).to(self.dtype)  # [capacity + 1, head_dim]

    def reserve(self, length: int) -> None:
        """Make sure ``length`` positions fit (doubling, at most ``max_len``)."""
        if length > self.max_len:
            raise ValueError(f"{length} positions do not fit the context of {self.max_len}")
        cap = max(self.capacity, 16)
        while cap < length:
            cap *= 2
        self._grow(cap)

    def ensure_slots(self, slots: int) -> None:
        """Make room for ``slots`` rows (copying the cached ones)."""
        if slots <= self.slots:
            return
        grow = slots - self.slots
        pad = lambda t: torch.cat([t, t.new_zeros((grow, *t.shape[1:]))])  # noqa: E731
        self.k, self.v = [pad(t) for t in self.k], [pad(t) for t in self.v]
        self.slots = slots
        self._version += 1

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of slot ``src`` into slot ``dst``."""
        if src == dst or length <= 0:
            return
        for t in self.k + self.v:
            t[dst, :, :length].copy_(t[src, :, :length])

    # ---- forward --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: Tensor, start: int, pos0: Sequence[int], last: Sequence[int] | None = None,
                all_positions: bool = False) -> Tensor:
        """ids [B, T] -> fp32 logits [B, vocab] of each row's token at offset ``last[b]`` (default
        T-1), or [B, T, vocab] with ``all_positions``. Rows ``start .. start+B-1`` of the cache;
        ``pos0[b]``: row b's first new position."""
        B, T = ids.shape
        if start < 0 or start + B > self.slots:
            raise ValueError(f"rows {start}..{start + B - 1} are outside the cache's {self.slots} slots")
        if len(pos0) != B:
            raise ValueError(f"{len(pos0)} start positions for {B} rows")
        end = max(pos0) + T  # positions in use after this step (exclusive)
        self.reserve(end)
        if self.graphs is not None and T == 1 and start == 0 and not all_positions and last is None:
            out = self._graphed(ids, pos0)
            if out is not None:
                return out
        if B == 1 and T == 1 and start == 0 and not all_positions and last is None and self._lean is not None:
            lean = self._lean_step()
            if lean is not None:
                return lean(ids, pos0[0])
        if self._compiled is not None and T == 1 and start == 0 and not all_positions and last is None:
            try:
                # the embedding runs eager: a row-wise (per-token decoded) table is data-dependent
                return self._compiled(self.embed(ids), torch.tensor(pos0, device=self.device), self.k, self.v,
                                      self._cos, self._sin)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eager from now on
                log.warning("compiled decode step failed (%s: %s); running eager from now on",
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                self._compiled = None
        dev = self.device
        same = all(p == pos0[0] for p in pos0)
        if same:
            p0 = pos0[0]
            cos, sin = self._cos[p0:p0 + T], self._sin[p0:p0 + T]  # [T, hd], shared by the rows
            cos, sin = cos[None, :, None], sin[None, :, None]  # [1, T, 1, hd]
        else:
            pos = torch.tensor(pos0, device=dev)[:, None] + torch.arange(T, device=dev)  # [B, T]
            cos, sin = self._cos[pos][:, :, None], self._sin[pos][:, :, None]  # [B, T, 1, hd]
            rows = torch.arange(B, device=dev)[:, None]
        mask = None
        if T > 1 or not same:  # causal within the step, and each row only up to its own position
            qpos = torch.tensor(pos0, device=dev)[:, None] + torch.arange(T, device=dev)
            mask = (torch.arange(end, device=dev)[None, None, :] <= qpos[:, :, None])[:, None]  # [B,1,T,end]
        H, KV, hd = self.heads, self.kv_heads, self.head_dim
        h = self.embed(ids)
        for i, layer in enumerate(self.layers):
            if self.ring is not None:
                self.ring.load(i)
            attn = layer.self_attn
            x = self._norm(layer.input_layernorm, h)
            qkv = self._qkv[i](x).view(B, T, H + 2 * KV, hd)
            qk = qkv[:, :, : H + KV]
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin)  # RoPE: sin carries the sign
            q = qk[:, :, :H].transpose(1, 2)
            k = qk[:, :, H:]
            v = qkv[:, :, H + KV:]
            kc, vc = self.k[i][start:start + B], self.v[i][start:start + B]  # [B, KV, cap, hd]
            if same:
                kc[:, :, p0:p0 + T] = k.transpose(1, 2)
                vc[:, :, p0:p0 + T] = v.transpose(1, 2)
            else:
                kc[rows, :, pos] = k.to(kc.dtype)  # [B, T, KV, hd] at (row, position)
                vc[rows, :, pos] = v.to(vc.dtype)
            o = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=mask,
                                               scale=attn.scaling, enable_gqa=KV != H)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(B, T, H * hd))
            x = self._norm(layer.post_attention_layernorm, h)
            gu = self._gate_up[i](x)
            mlp = layer.mlp
            h = h + mlp.down_proj(mlp.act_fn(gu[..., : self.inter]) * gu[..., self.inter:])
        if all_positions:
            pass
        elif last is None:
            h = h[:, -1]
        else:
            h = h[torch.arange(B, device=dev), torch.tensor(last, device=dev)]
        return self.head(self._norm(self.norm, h)).float()

    def _lean_step(self) -> LeanStep | None:
        """The one-row one-token step (runtime/lean_step.py), built once every layer is bound; None
        while hooks remain (streamed weights, or resident ones not yet bound)."""
        if isinstance(self._lean, LeanStep):
            return self._lean
        if hooks_left([*self.layers, self.norm]):
            return None
        self._lean = LeanStep.build(self)  # None for good when a projection cannot run lean
        return self._lean

    def _graphed(self, ids: Tensor, pos0: Sequence[int]) -> Tensor | None:
        """The decode step on a CUDA graph, or None (eager) while weights still run hooks."""
        if not self._hook_free:
            if hooks_left([*self.layers, self.norm, self.head]):
                return None  # streamed weights decode in hooks; resident ones bind on first use
            self._hook_free = True  # hooks are only ever taken off after load: no need to look again
        size = self.graphs.padded(ids.shape[0])
        if size is None:
            return None
        self.ensure_slots(size)  # padding rows need slots (bumps the version: graphs recaptured)
        return self.graphs(self.embed(ids), list(pos0), self.capacity, (self._version, self.capacity))  # scratch

    def _graph_step(self, h: Tensor, pos: Tensor) -> Tensor:
        fn = self._graph_fn or self._decode_static
        return fn(h, pos, self.k, self.v, self._cos, self._sin)

    def _decode_static(self, h: Tensor, pos: Tensor, ks: list[Tensor], vs: list[Tensor], cos_t: Tensor,
                       sin_t: Tensor) -> Tensor:
        """One decode token for rows 0..B-1 at positions ``pos`` [B], attending over the whole cache
        capacity with a mask: shapes depend only on (B, capacity), so it compiles once per pair
        (``torch.compile(dynamic=True)`` keeps that to one graph)."""
        B = h.shape[0]  # h: the embedded tokens [B, 1, hidden]
        H, KV, hd = self.heads, self.kv_heads, self.head_dim
        cap = ks[0].shape[2]
        cos, sin = cos_t[pos][:, None, None], sin_t[pos][:, None, None]  # [B, 1, 1, hd]
        mask = (torch.arange(cap, device=h.device)[None, :] <= pos[:, None])[:, None, None]  # [B,1,1,cap]
        rows = torch.arange(B, device=h.device)
        for i, layer in enumerate(self.layers):
            if self.ring is not None:
                self.ring.load(i)
            attn = layer.self_attn
            x = self._norm(layer.input_layernorm, h)
            qkv = self._qkv[i](x).view(B, 1, H + 2 * KV, hd)
            qk = qkv[:, :, : H + KV]
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin)
            kc, vc = ks[i], vs[i]
            kc[rows, :, pos] = qk[:, 0, H:].to(kc.dtype)
            vc[rows, :, pos] = qkv[:, 0, H + KV:].to(vc.dtype)
            o = F.scaled_dot_product_attention(qk[:, :, :H].transpose(1, 2), kc[:B], vc[:B], attn_mask=mask,
                                               scale=attn.scaling, enable_gqa=KV != H)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(B, 1, H * hd))
            x = self._norm(layer.post_attention_layernorm, h)
            gu = self._gate_up[i](x)
            mlp = layer.mlp
            h = h + mlp.down_proj(mlp.act_fn(gu[..., : self.inter]) * gu[..., self.inter:])
        return self.head(self._norm(self.norm, h[:, -1])).float()

    def _norm(self, norm: nn.Module, x: Tensor) -> Tensor:
        if self._fast_norm:  # Llama's RMSNorm in few ops (equal to the module: tests/test_stepper.py)
            if x.dtype == torch.float32:
                return rms_norm(x, norm.weight, norm.variance_epsilon)  # the lean step's, so the two agree
            return F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype) * norm.weight
        return norm(x)


def compile_step(fn, dynamic: bool = False):
    """``torch.compile`` (inductor; CUDA graphs come with mode "reduce-overhead" on a GPU) of a
    decode step, or None with one log line when this torch cannot compile here. Compilation
    itself happens on the first call (its cost is what benchmarks/speed.py reports as cold and,
    with inductor's on-disk cache, warm); a failure then falls back to eager (``forward``).
    ``dynamic=False`` specialises on (rows, cache capacity): fastest, one compile per pair (batch-1
    generation has one); ``dynamic=True`` makes one graph for every shape (the server's batches)."""
    try:
        import torch._dynamo  # noqa: F401
        import torch._inductor.config as inductor_config

        if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
            # inductor's pool of compile workers stays busy after the first compile and took the
            # cores from decoding (measured on 2 cores, cold cache: 5.2 tok/s after the compile
            # with the pool, 85.6 with one compile thread). Only a process that asked to compile
            # gets this setting; TORCHINDUCTOR_COMPILE_THREADS overrides it.
            inductor_config.compile_threads = 1
        return torch.compile(fn, dynamic=dynamic, fullgraph=False)
    except Exception as exc:  # noqa: BLE001
        log.warning("torch.compile is unavailable (%s); the decode step runs eager", exc)
        return None


def fuse_linears(parent: nn.Module, names: tuple[str, ...]):
    """A callable computing ``cat([parent.<name>(x) ...], -1)``: one kernel when the layers run
    direct (``fuse_direct``; built once and kept on ``parent``), else one call per layer (resident
    and streamed layers keep their own weights, so nothing is copied)."""
    attr = "_thawed_fused_" + "_".join(names)
    fused = parent.__dict__.get(attr)
    if fused is None:
        mods = [getattr(parent, n) for n in names]
        fused = fuse_direct(mods)
        if fused is None:
            return lambda x: torch.cat([m(x) for m in mods], dim=-1)
        parent.__dict__[attr] = fused  # not a registered submodule: state_dict and .to() skip it
    return fused

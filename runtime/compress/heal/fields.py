"""The trainable view of a checkpoint: every tensor's continuous fields as float32 parameters, the
rest (codes, indices) fixed, and the weights decoded from them differentiably (``decode_train``).

Healed fields go back in their stored dtype (``encoded``): an F16 scale stays F16, so every
tensor keeps its byte count and the file its bpw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from thawed.codecs import Encoded, TensorSpec, get_codec
from thawed.codecs.base import Codec

from ...checkpoint import Checkpoint

__all__ = ["HealTensor", "TrainableCheckpoint"]

log = logging.getLogger(__name__)


@dataclass
class HealTensor:
    name: str
    spec: TensorSpec
    codec: type[Codec]
    codec_version: int
    params: dict
    fixed: dict[str, Tensor]
    train: dict[str, nn.Parameter]
    stored: dict[str, torch.dtype]  # trainable field -> its stored dtype
    ste: dict[str, nn.Parameter] = field(default_factory=dict)  # discrete fields as float codes (straight-through)
    memo: dict[str, Tensor] = field(default_factory=dict)

    def weight(self, shared: dict[str, Tensor]) -> Tensor:
        return self.codec.decode_train(self.fixed | self.train | self.ste, self.spec, self.params, shared, self.memo)

    def parameters(self) -> dict[str, nn.Parameter]:
        return self.train | self.ste


class TrainableCheckpoint:
    """Every tensor of ``ckpt`` with its trainable fields as ``nn.Parameter`` (float32); with ``ste``
    also the fields its codec trains straight-through (``Codec.ste_fields``: SEE's core codes)."""

    def __init__(self, ckpt: Checkpoint, ste: bool = False, dense: Mapping[str, Tensor] | None = None) -> None:
        """``dense``: the source's weights by name, where straight-through codes start (``Codec.ste_start``)."""
        self.ckpt = ckpt
        self.tensors: dict[str, HealTensor] = {}
        self.shared = {c: ckpt.shared(c) for c in ckpt.shared_codecs()}
        for name, entry in ckpt.index.items():
            enc = ckpt.encoded(name)
            cls = get_codec(entry.codec)
            names = cls.trainable_fields(entry.spec, enc.params)
            train = {k: nn.Parameter(enc.fields[k].to(torch.float32).clone()) for k in names}
            fixed = {k: v for k, v in enc.fields.items() if k not in names}
            ste_names = cls.ste_fields(entry.spec, enc.params) if ste else ()
            ref = None if dense is None else dense.get(name)
            ste_params = {k: nn.Parameter(cls.ste_start(k, enc.fields, entry.spec, enc.params, ref).clone())
                          for k in ste_names}
            self.tensors[name] = HealTensor(name, entry.spec, cls, entry.codec_version, enc.params, fixed, train,
                                            {k: enc.fields[k].dtype for k in names}, ste_params)

    # ---- parameters ---------------------------------------------------------------------------
    def named_parameters(self, prefix: str | None = None) -> list[tuple[str, nn.Parameter]]:
        """``"<tensor>::<field>"`` -> parameter, in index order; only tensors under ``prefix`` when given."""
        return [(f"{t.name}::{k}", p) for t in self.tensors.values()
                if prefix is None or t.name.startswith(prefix) for k, p in t.parameters().items()]

    def is_ste(self, key: str) -> bool:
        """Whether ``"<tensor>::<field>"`` is a straight-through code field (it takes its own learning rate)."""
        name, _, fld = key.rpartition("::")
        return fld in self.tensors[name].ste

    def count(self, prefix: str | None = None) -> int:
        return sum(p.numel() for _, p in self.named_parameters(prefix))

    def weights(self, prefix: str | None = None, strip: bool = False, exclude: str | None = None) -> dict[str, Tensor]:
        """Decoded tensors (differentiable in the trainable fields), keyed by name, or by the name after
        ``prefix`` when ``strip`` (for ``functional_call`` on a submodule); none under ``exclude``."""
        out = {}
        for t in self.tensors.values():
            if exclude is not None and t.name.startswith(exclude):
                continue
            if prefix is None or t.name.startswith(prefix):
                key = t.name[len(prefix):] if strip and prefix else t.name
                out[key] = t.weight(self.shared.get(t.codec.name, {}))
        return out

    def round_to_stored(self) -> None:
        """Every trainable field rounded to its stored dtype (the values ``encoded`` writes)."""
        with torch.no_grad():
            for t in self.tensors.values():
                for k, p in t.train.items():
                    p.copy_(_to_stored(p, t.stored[k]).to(torch.float32))
                for k, p in t.ste.items():
                    packed = t.codec.ste_pack(k, p, t.spec, t.params)
                    p.copy_(t.codec.ste_values(k, {k: packed}, t.spec, t.params))

    def encoded(self, name: str) -> Encoded:
        t = self.tensors[name]
        fields = dict(t.fixed)
        for k, p in t.train.items():
            fields[k] = _to_stored(p.detach(), t.stored[k]).contiguous()
        for k, p in t.ste.items():
            fields[k] = t.codec.ste_pack(k, p, t.spec, t.params).contiguous()
        order = list(self.ckpt.index[name].fields)
        return Encoded({k: fields[k] for k in order}, dict(t.params))

    # ---- state for resume ---------------------------------------------------------------------
    def state(self) -> dict[str, Tensor]:
        return {k: p.detach().clone() for k, p in self.named_parameters()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        params = dict(self.named_parameters())
        if set(params) != set(state):
            missing = sorted(set(params) ^ set(state))[:3]
            raise ValueError(f"saved healing state does not match the checkpoint's trainable fields ({missing} ...)")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k])


def _to_stored(x: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float16:
        x = x.clamp(-65504.0, 65504.0)
    elif dtype == torch.bfloat16:
        x = x.clamp(-3.38e38, 3.38e38)
    return x.to(dtype)

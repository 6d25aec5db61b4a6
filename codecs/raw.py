"""``raw``: the tensor stored as it is (norms, biases, anything the plan leaves uncompressed)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .base import (Codec, EncodeContext, Encoded, FieldSpec, SharedState, TensorSpec, check_known_params,
                   check_nonfinite_flag, train_dtype)

__all__ = ["Raw"]


class Raw(Codec, name="raw", version=1):
    """One field ``data`` with the original shape and dtype. Bit-exact."""

    roles = ("linear", "embedding", "lm_head", "other")

    def __init__(self) -> None:
        pass

    def encode(self, weight: Tensor, spec: TensorSpec, ctx: EncodeContext) -> Encoded:
        return Encoded({"data": weight.detach().to("cpu").contiguous()}, {})

    @classmethod
    def decode(cls, enc: Encoded, spec: TensorSpec, shared: SharedState,
               device: torch.device, dtype: torch.dtype) -> Tensor:
        return enc.fields["data"].to(device=device, dtype=dtype)

    @classmethod
    def expected_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> dict[str, FieldSpec]:
        check_known_params(cls.name, spec.name, params, ("nonfinite",))
        check_nonfinite_flag(cls.name, spec.name, params)
        return {"data": FieldSpec(spec.dtype, tuple(spec.shape))}

    @classmethod
    def trainable_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> tuple[str, ...]:
        """Raw norms and biases (role ``other``, floating point, finite) are trained as they are; a
        weight matrix a plan left raw is not (that would be full fine-tuning, not healing)."""
        if spec.role == "other" and spec.dtype.is_floating_point and not params.get("nonfinite"):
            return ("data",)
        return ()

    @classmethod
    def decode_train(cls, fields: Mapping[str, Tensor], spec: TensorSpec, params: Mapping[str, Any],
                     shared: SharedState, memo: dict[str, Tensor] | None = None) -> Tensor:
        if not cls.trainable_fields(spec, params):
            return super().decode_train(fields, spec, params, shared, memo)
        train_dtype(fields, ("data",))
        return fields["data"]

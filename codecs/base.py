"""The codec interface: a narrow ``encode`` / ``decode`` pair over a flat ``Encoded`` payload.

A codec is a small class registered by name when it is defined::

    class Rtn(Codec, name="rtn", version=1):
        def __init__(self, bits: int = 4, group_size: int = 128): ...
        def encode(self, weight, spec, ctx) -> Encoded: ...
        @classmethod
        def decode(cls, enc, spec, shared, device, dtype) -> Tensor: ...
        @classmethod
        def expected_fields(cls, spec, params) -> dict[str, FieldSpec]: ...

An instance is an *encoder configuration* (bits, group size, ...). Everything decoding needs is in
the payload's ``params``, so ``decode`` and ``expected_fields`` are class methods: the runtime
never constructs an encoder. Generic code (the file format, byte counting, moving payloads to a
device) only ever sees named tensors plus JSON-able params.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from .errors import CodecError, CorruptPayloadError, UnknownCodecError

__all__ = [
    "Codec",
    "EncodeContext",
    "Encoded",
    "FieldSpec",
    "TensorSpec",
    "SharedState",
    "registered_codecs",
    "get_codec",
]

# Tensor roles the compression plan assigns; codecs may use them (e.g. embeddings decode per row).
ROLES = ("linear", "embedding", "lm_head", "other")

# A codec's per-file shared state: "<id>.<param>" -> tensor, already on the decode device.
SharedState = Mapping[str, Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """What is known about an original tensor before and after encoding."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the original tensor in the source model
    role: str = "other"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class FieldSpec:
    """Expected dtype and shape of one payload field, derived from the tensor spec and params."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Encoded:
    """A codec's payload for one tensor: named tensors plus JSON-able params.

    Field tensors are contiguous and live on the CPU when written; the runtime may move them to
    the decode device once. ``params`` must round-trip through ``json.dumps``/``json.loads``.
    """

    fields: dict[str, Tensor]
    params: dict[str, Any]

    @property
    def nbytes(self) -> int:
        """Every stored byte of this tensor (codes and side information)."""
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    def to(self, device: torch.device | str) -> "Encoded":
        """The same payload on ``device`` (asynchronous only for host-to-GPU copies, which the
        stream orders; a copy back to the host is synchronous so its data is there on return)."""
        dev = torch.device(device)
        return Encoded({k: v.to(dev, non_blocking=dev.type == "cuda" and v.device.type == "cpu")
                        for k, v in self.fields.items()}, self.params)


@dataclass
class EncodeContext:
    """Per-tensor information the compression pipeline hands to ``encode``.

    ``importance``: optional per-input-column importance from calibration (e.g. E[x^2]);
    codecs that do not use calibration ignore it. ``seed`` makes randomised encoders repeatable.
    """

    name: str
    role: str = "other"
    importance: Tensor | None = None
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, type["Codec"]] = {}

# Built-in codecs are imported on first lookup, so importing thawed.codecs stays cheap and a
# broken optional codec cannot stop the others from loading.
_BUILTIN_MODULES: dict[str, str] = {
    "raw": "thawed.codecs.raw",
    "rtn": "thawed.codecs.rtn",
    "lossless": "thawed.codecs.lossless",
    "cvxq": "thawed.codecs.cvxq",
    "hyperc": "thawed.codecs.hyperc",
    "nwc": "thawed.codecs.nwc",
    "see": "thawed.codecs.see",
}


class Codec:
    """Base class of every weight codec. Subclass with ``name=`` and ``version=`` keywords."""

    name: ClassVar[str]
    version: ClassVar[int]
    # Roles this codec may be planned for by default. "other" tensors (norms, biases) stay raw.
    roles: ClassVar[tuple[str, ...]] = ("linear", "embedding", "lm_head")

    def __init_subclass__(cls, name: str | None = None, version: int = 1, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:  # an abstract intermediate class
            return
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise CodecError(
                f"codec name {name!r} is already registered by {_REGISTRY[name].__qualname__}; "
                f"pick another name for {cls.__qualname__}"
            )
        cls.name = name
        cls.version = int(version)
        _REGISTRY[name] = cls

    # ---- encoding (offline) -------------------------------------------------------------------
    def encode(self, weight: Tensor, spec: TensorSpec, ctx: EncodeContext) -> Encoded:
        raise NotImplementedError

    def shared_tensors(self) -> dict[str, Tensor]:
        """Per-file shared state to store once under ``__codec__.<name>.<id>.<param>``.

        Keys are ``"<id>.<param>"``. Codecs without shared state return ``{}``.
        """
        return {}

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> "Codec":
        """Build an encoder from string options (``bits=4,group_size=128``), typed by ``__init__``."""
        sig = inspect.signature(cls.__init__)
        hints = typing.get_type_hints(cls.__init__)
        allowed = [p for p in sig.parameters if p != "self"]
        kwargs: dict[str, Any] = {}
        for key, raw in options.items():
            if key not in allowed:
                raise CodecError(
                    f"codec {cls.name!r} has no option {key!r}; its options are: "
                    + (", ".join(allowed) or "(none)")
                )
            kwargs[key] = _convert_option(cls.name, key, raw, hints.get(key, str))
        return cls(**kwargs)

    def options(self) -> dict[str, Any]:
        """The encoder configuration, for the checkpoint's record of compression settings."""
        return {k: getattr(self, k) for k in inspect.signature(type(self).__init__).parameters
                if k != "self" and hasattr(self, k)}

    # ---- decoding (runtime) -------------------------------------------------------------------
    @classmethod
    def decode(
        cls,
        enc: Encoded,
        spec: TensorSpec,
        shared: SharedState,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Tensor:
        raise NotImplementedError

    # ---- healing: the decode as a differentiable function of the continuous fields -----------
    @classmethod
    def trainable_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The payload's continuous fields that healing (``runtime/compress/heal``) may fine-tune: scales,
        offsets, factors, raw norms. The other fields (bit-packed codes, indices, entropy-coded
        streams) stay fixed: no codec updates them (no straight-through estimator). ``()`` = none."""
        return ()

    @classmethod
    def ste_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> tuple[str, ...]:
        """Discrete fields a codec lets healing update with a straight-through estimator: ``decode_train``
        also accepts them as float code values (``ste_values``), rounds them in the forward pass and
        passes the gradient through unchanged; ``ste_pack`` stores them back. ``()`` = none."""
        return ()

    @classmethod
    def ste_values(cls, name: str, fields: Mapping[str, Tensor], spec: TensorSpec,
                   params: Mapping[str, Any]) -> Tensor:
        """The STE field ``name`` as float32 code values (what ``decode_train`` accepts in its place)."""
        raise NotImplementedError(f"codec {cls.name!r} has no straight-through field {name!r}")

    @classmethod
    def ste_start(cls, name: str, fields: Mapping[str, Tensor], spec: TensorSpec, params: Mapping[str, Any],
                  dense: Tensor | None = None) -> Tensor:
        """Where straight-through training of field ``name`` starts: float code values that round to the
        stored codes. A codec that can place them by the dense weight ``dense`` (the unrounded code,
        clipped into the stored code's rounding interval) lets a code that was nearly a tie flip after
        a few steps instead of having to drift half a step; by default the stored codes themselves."""
        return cls.ste_values(name, fields, spec, params)

    @classmethod
    def ste_pack(cls, name: str, values: Tensor, spec: TensorSpec, params: Mapping[str, Any]) -> Tensor:
        """Float code values -> the stored field (rounded and clamped to the codes' range)."""
        raise NotImplementedError(f"codec {cls.name!r} has no straight-through field {name!r}")

    @classmethod
    def decode_train(cls, fields: Mapping[str, Tensor], spec: TensorSpec, params: Mapping[str, Any],
                     shared: SharedState, memo: dict[str, Tensor] | None = None) -> Tensor:
        """The decoded tensor as a differentiable function of ``trainable_fields``.

        ``fields``: every field of the payload on one device, the trainable ones as float32 or
        float64 tensors (they may require grad; they need not be representable in the stored
        dtype), the others as stored. Returns the tensor in the trainable fields' dtype (float32
        when there are none). At the stored values it equals ``decode`` (tested per codec).
        ``memo``: a dict the caller keeps per tensor across calls, where the codec may keep what
        depends only on the fixed fields (unpacked codes), so a training step does not unpack
        them again. Codecs without trainable fields decode once and return a constant."""
        if cls.trainable_fields(spec, params):
            raise NotImplementedError(f"codec {cls.name!r} declares trainable fields but no decode_train")
        key = "__decoded__"
        if memo is not None and key in memo:
            return memo[key]
        dev = next(iter(fields.values())).device if fields else torch.device("cpu")
        out = cls.decode(Encoded(dict(fields), dict(params)), spec, shared, dev, torch.float32)
        if memo is not None:
            memo[key] = out
        return out

    @classmethod
    def has_output_bias(cls, params: Mapping[str, Any]) -> bool:
        """Whether a payload with these params carries an output correction (``decode_output_bias``);
        read from the index alone, so the runtime touches no payload byte of the others."""
        return False

    @classmethod
    def decode_output_bias(cls, enc: Encoded, spec: TensorSpec, device: torch.device,
                           dtype: torch.dtype) -> Tensor | None:
        """A correction added to the output of the linear layer that uses this weight (``[out]``),
        or ``None``. The runtime adds it to the layer's bias, creating one where there is none;
        cvxq stores its bias correction this way. Small: the runtime reads it once on load."""
        return None

    @classmethod
    def checked_fields(cls, enc: Encoded, spec: TensorSpec, device: torch.device | str) -> dict[str, Tensor]:
        """The payload's fields, checked against ``expected_fields`` and moved to ``device``.

        Raises ``CorruptPayloadError`` naming the tensor and field; every decoder starts here.
        """
        out: dict[str, Tensor] = {}
        dev = torch.device(device)
        for key, fs in cls.expected_fields(spec, enc.params).items():
            t = enc.fields.get(key)
            if t is None:
                raise CorruptPayloadError(
                    f"tensor {spec.name!r}: codec {cls.name!r} payload has no field {key!r}; the file is incomplete"
                )
            if t.dtype != fs.dtype or tuple(t.shape) != fs.shape:
                raise CorruptPayloadError(
                    f"tensor {spec.name!r}: codec {cls.name!r} field {key!r} is {t.dtype} {list(t.shape)}, "
                    f"expected {fs.dtype} {list(fs.shape)}; the file is damaged or was not written by thawed"
                )
            out[key] = t if t.device == dev else t.to(dev)
        return out

    @classmethod
    def expected_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> dict[str, FieldSpec]:
        """Dtype and shape every field must have for this tensor and these params.

        Raises ``CodecError`` naming the parameter when params are missing or out of range; the
        checkpoint reader calls this on open, before any payload byte is read. Field sizes that
        depend on the data (an entropy-coded stream's length) must therefore be params too.
        ``decode`` raises ``CorruptPayloadError`` for a payload whose bytes contradict its params.
        """
        raise NotImplementedError


def _convert_option(codec: str, key: str, raw: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw.lower() in ("none", "null") and len(args) < len(typing.get_args(typ)):
            return None
        typ = args[0] if args else str
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ in (int, float, str):
            return typ(raw)
    except ValueError:
        raise CodecError(
            f"codec {codec!r} option {key!r}: cannot read {raw!r} as {getattr(typ, '__name__', typ)}"
        ) from None
    return raw


def registered_codecs() -> dict[str, type[Codec]]:
    """All codecs, the built-ins imported first. Name -> class."""
    for name in list(_BUILTIN_MODULES):
        get_codec(name)
    return dict(sorted(_REGISTRY.items()))


def get_codec(name: str) -> type[Codec]:
    """Look a codec class up by name, importing a built-in one on first use."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        import importlib

        importlib.import_module(_BUILTIN_MODULES[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        known = sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))
        raise UnknownCodecError(
            f"unknown codec {name!r}; available codecs: {', '.join(known)}. "
            "If the checkpoint was written by a newer thawed, upgrade thawed."
        ) from None


def row_ids(codec: str, spec: TensorSpec, ids: Tensor, device: torch.device) -> Tensor:
    """``decode_rows``' ids checked against a 2-D tensor's rows, flattened to int64 on ``device``."""
    if len(spec.shape) != 2:
        raise CodecError(f"tensor {spec.name!r}: {codec} decode_rows needs a 2-D tensor, got {list(spec.shape)}")
    flat = ids.reshape(-1).to(device=device, dtype=torch.int64)
    rows = spec.shape[0]
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
        raise CodecError(f"tensor {spec.name!r}: row ids must be in 0..{rows - 1}, got {int(flat.min())}..{int(flat.max())}")
    return flat


def check_param(codec: str, tensor: str, params: Mapping[str, Any], key: str, typ: type,
                lo: float | None = None, hi: float | None = None) -> Any:
    """Read a required param and check its type and range; errors name tensor and param."""
    if key not in params:
        raise CodecError(f"tensor {tensor!r}: codec {codec!r} param {key!r} is missing from the index")
    val = params[key]
    ok = isinstance(val, typ) and not (typ is int and isinstance(val, bool))
    if typ is float and isinstance(val, int) and not isinstance(val, bool):
        ok = True
    if not ok:
        raise CodecError(
            f"tensor {tensor!r}: codec {codec!r} param {key!r} is {val!r}, expected {typ.__name__}"
        )
    if (lo is not None and val < lo) or (hi is not None and val > hi):
        raise CodecError(
            f"tensor {tensor!r}: codec {codec!r} param {key!r}={val!r} is outside [{lo}, {hi}]"
        )
    return val


def check_known_params(codec: str, tensor: str, params: Mapping[str, Any], known: tuple[str, ...]) -> None:
    """Refuse a param the codec never writes (a typo, an edit, another codec's payload): every
    ``expected_fields`` calls it, so no key of ``params`` escapes validation."""
    extra = sorted(k for k in params if k not in known)
    if extra:
        raise CodecError(
            f"tensor {tensor!r}: codec {codec!r} has no param {extra[0]!r} (its params are "
            f"{', '.join(known) or 'none'}); the index is damaged or was edited"
        )


def check_nonfinite_flag(codec: str, tensor: str, params: Mapping[str, Any]) -> None:
    """``"nonfinite": true`` (the source tensor held NaN/Inf, kept bit for bit) is the only value allowed."""
    if "nonfinite" in params and params["nonfinite"] is not True:
        raise CodecError(f"tensor {tensor!r}: codec {codec!r} param 'nonfinite' must be true when present, "
                         f"got {params['nonfinite']!r}")


def train_dtype(fields: Mapping[str, Tensor], names: tuple[str, ...]) -> torch.dtype:
    """The float dtype ``decode_train`` computes in: that of the trainable fields (float32 or float64)."""
    dtypes = {fields[k].dtype for k in names}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
        raise CodecError(f"decode_train needs the trainable fields {', '.join(names)} as one float32 or float64 "
                         f"dtype, got {sorted(map(str, dtypes))}; convert them with .float()")
    return next(iter(dtypes))


def stored_at_unit(fields: Mapping[str, Tensor], ones: tuple[str, ...], zeros: tuple[str, ...]) -> dict[str, Tensor]:
    """A copy of ``fields`` (the fixed ones as they are) with the fields ``ones`` set to 1 and ``zeros`` to 0
    as float16 (the stored dtype of every scale and offset field that uses this): decoding it gives an
    affine codec's unit values (its codes through their tables)."""
    out = dict(fields)
    for k in ones:
        out[k] = torch.ones(fields[k].shape, dtype=torch.float16, device=fields[k].device)
    for k in zeros:
        out[k] = torch.zeros(fields[k].shape, dtype=torch.float16, device=fields[k].device)
    return out

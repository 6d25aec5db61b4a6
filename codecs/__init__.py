"""thawed.codecs: weight codecs (encode offline, decode at run time on any device)."""

from .base import (
    ROLES,
    Codec,
    EncodeContext,
    Encoded,
    FieldSpec,
    SharedState,
    TensorSpec,
    check_param,
    get_codec,
    registered_codecs,
)
from .errors import CodecError, CorruptPayloadError, ThawedError, UnknownCodecError

__all__ = [
    "ROLES",
    "Codec",
    "CodecError",
    "CorruptPayloadError",
    "EncodeContext",
    "Encoded",
    "FieldSpec",
    "SharedState",
    "TensorSpec",
    "ThawedError",
    "UnknownCodecError",
    "check_param",
    "get_codec",
    "registered_codecs",
]

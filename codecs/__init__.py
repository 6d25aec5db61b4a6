"""thawed.codecs: weight codecs (encode offline, decode at run time on any device)."""

from .base import (
    Codec,
    EncodeContext,
    Encoded,
    FieldSpec,
    SharedState,
    TensorSpec,
    get_codec,
    registered_codecs,
)
from .errors import CodecError, CorruptPayloadError, ThawedError, UnknownCodecError

__all__ = [
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
    "get_codec",
    "registered_codecs",
]

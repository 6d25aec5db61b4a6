"""Error types shared by every layer of thawed.

The hierarchy is small on purpose: catch ``ThawedError`` for anything thawed raises on bad input.
Every message names the object (tensor, field, parameter) and says what to do about it.
"""

from __future__ import annotations


class ThawedError(Exception):
    """Base class of every error thawed raises for bad input or a bad file."""


class CodecError(ThawedError):
    """A codec was misconfigured, asked for by an unknown name, or given a payload it cannot decode."""


class UnknownCodecError(CodecError):
    """No codec is registered under the requested name."""


class CorruptPayloadError(CodecError):
    """A payload's bytes are inconsistent with its parameters (for example a broken entropy stream)."""

"""Errors of the thawed checkpoint format (reader and writer).

Every class derives from ``FormatError`` and so from ``thawed.codecs.errors.ThawedError``; catch
``ThawedError`` for anything thawed raises on bad input. Messages name the file, the tensor and the
field, and say what to do next.
"""

from __future__ import annotations

from thawed.codecs.errors import ThawedError, UnknownCodecError

__all__ = [
    "FormatError",
    "CheckpointNotFoundError",
    "TruncatedFileError",
    "HeaderTooLargeError",
    "HeaderError",
    "UnsupportedFormatError",
    "UnsupportedCodecError",
    "IndexMismatchError",
    "FieldMismatchError",
    "LayoutError",
    "ChecksumError",
    "TensorNotFoundError",
    "WriterError",
    "ConfigError",
    "NonFiniteError",
]


class FormatError(ThawedError):
    """A checkpoint file is malformed, unsupported or corrupted (or cannot be written)."""


class CheckpointNotFoundError(FormatError, FileNotFoundError):
    """The path is not a thawed checkpoint directory or payload file."""


class TruncatedFileError(FormatError):
    """The file ends before its header or its data does."""


class HeaderTooLargeError(FormatError):
    """The declared header length exceeds the cap; refused before reading it."""


class HeaderError(FormatError):
    """The header is not valid JSON or does not have the structure of the format."""


class UnsupportedFormatError(FormatError):
    """Not a thawed file (``format`` is missing or different), or a format version this thawed cannot read."""


class UnsupportedCodecError(UnsupportedFormatError, UnknownCodecError):
    """A tensor uses a codec this thawed does not know, or a newer version of one it knows."""


class IndexMismatchError(FormatError):
    """The index and the stored tensors disagree: a field without its tensor, a tensor nobody
    declared, undeclared shared codec state."""


class FieldMismatchError(FormatError):
    """A field's dtype, shape or byte size disagrees with its codec's params or its data_offsets."""


class LayoutError(FormatError):
    """The data_offsets overlap, leave holes, or do not cover the data buffer exactly."""


class ChecksumError(FormatError):
    """A tensor's bytes do not match the checksum recorded in the index."""


class TensorNotFoundError(FormatError, KeyError):
    """A tensor name that is not in the checkpoint's index was asked for."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class WriterError(FormatError):
    """The writer was given something it cannot store (duplicate name, bad dtype, bad params...)."""


class ConfigError(FormatError):
    """The checkpoint's config.json is unreadable, out of bounds, or disagrees with its payload index."""


class NonFiniteError(FormatError):
    """A decoded tensor holds NaN or Inf that its source did not have."""

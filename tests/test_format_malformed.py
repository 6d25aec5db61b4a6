"""Malformed checkpoints: each must fail on open (or, for corrupted data, on first read) with a
typed error whose message names the file, the tensor/field and what to do.

Each file is a valid checkpoint (``tiny_ckpt``: two raw tensors, one toy-codec tensor, toy shared
state) edited in one place.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from safetensors.torch import save_file
import torch

from thawed.codecs import ThawedError, UnknownCodecError
from thawed.runtime.checkpoint import Checkpoint
from thawed.runtime.errors import (
    CheckpointNotFoundError,
    ChecksumError,
    FieldMismatchError,
    FormatError,
    HeaderError,
    HeaderTooLargeError,
    IndexMismatchError,
    LayoutError,
    TruncatedFileError,
    UnsupportedCodecError,
    UnsupportedFormatError,
)
from thawed.runtime.format import MAX_HEADER_BYTES, PAYLOAD_FILE

TOY = "toy-format-test"


def _fails(ckpt: Path, error: type[Exception], *words: str) -> str:
    with pytest.raises(error) as info:
        Checkpoint.open(ckpt)
    msg = str(info.value)
    assert isinstance(info.value, FormatError) and isinstance(info.value, ThawedError)
    assert PAYLOAD_FILE in msg, msg  # names the file
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def _payload(ckpt: Path) -> Path:
    return ckpt / PAYLOAD_FILE


def _header_len(ckpt: Path) -> int:
    return struct.unpack("<Q", _payload(ckpt).read_bytes()[:8])[0]


# ---- sizes ---------------------------------------------------------------------------------------


def test_shorter_than_length_prefix(tiny_ckpt):
    _payload(tiny_ckpt).write_bytes(b"\x10\x00\x00")
    _fails(tiny_ckpt, TruncatedFileError, "3 bytes long", "truncated", "thawed compress")


def test_truncated_in_header(tiny_ckpt):
    blob = _payload(tiny_ckpt).read_bytes()
    _payload(tiny_ckpt).write_bytes(blob[: 8 + _header_len(tiny_ckpt) // 2])
    _fails(tiny_ckpt, TruncatedFileError, "truncated in the header", "thawed compress")


def test_truncated_in_data(tiny_ckpt):
    blob = _payload(tiny_ckpt).read_bytes()
    _payload(tiny_ckpt).write_bytes(blob[:-3])
    _fails(tiny_ckpt, TruncatedFileError, "truncated in the data", "tensor 'model.layer.weight' field 'codes'",
           "ends at byte 107", "104 data bytes", "thawed compress")


def test_header_length_larger_than_file(tiny_ckpt):
    blob = _payload(tiny_ckpt).read_bytes()
    _payload(tiny_ckpt).write_bytes(struct.pack("<Q", len(blob)) + blob[8:])
    _fails(tiny_ckpt, TruncatedFileError, f"header length says {len(blob)} bytes", f"only {len(blob) - 8} bytes")


def test_oversized_header_refused_before_reading(tiny_ckpt):
    blob = _payload(tiny_ckpt).read_bytes()
    _payload(tiny_ckpt).write_bytes(struct.pack("<Q", 1 << 40) + blob[8:])
    _fails(tiny_ckpt, HeaderTooLargeError, str(1 << 40), f"limit of {MAX_HEADER_BYTES}", "refusing")


# ---- header structure ----------------------------------------------------------------------------


def test_header_not_json(tiny_ckpt, payload_io):
    _, data = payload_io.read(_payload(tiny_ckpt))
    payload_io.write(_payload(tiny_ckpt), '{"__metadata__": {"format": "thawed"', data)
    _fails(tiny_ckpt, HeaderError, "not valid JSON", "thawed compress")


def test_header_not_utf8(tiny_ckpt, payload_io):
    _, data = payload_io.read(_payload(tiny_ckpt))
    payload_io.write(_payload(tiny_ckpt), "{}", data)
    blob = bytearray(_payload(tiny_ckpt).read_bytes())
    blob[8] = 0xFF
    _payload(tiny_ckpt).write_bytes(bytes(blob))
    _fails(tiny_ckpt, HeaderError, "not valid UTF-8")


def test_duplicate_tensor_name_in_header(tiny_ckpt, payload_io):
    header, data = payload_io.read(_payload(tiny_ckpt))
    text = json.dumps(header, separators=(",", ":"))
    entry = '"model.norm.weight::data":' + json.dumps(header["model.norm.weight::data"], separators=(",", ":"))
    payload_io.write(_payload(tiny_ckpt), text[:-1] + "," + entry + "}", data)
    _fails(tiny_ckpt, HeaderError, "names 'model.norm.weight::data' twice")


def test_plain_safetensors_file(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / PAYLOAD_FILE))
    _fails(tmp_path, UnsupportedFormatError, "no __metadata__", "plain safetensors", "thawed compress")


def test_wrong_format(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: m.update(format="gguf-ish"))
    _fails(tiny_ckpt, UnsupportedFormatError, "'gguf-ish'", "not a thawed checkpoint")


def test_unsupported_format_version(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: m.update(format_version="3"))
    _fails(tiny_ckpt, UnsupportedFormatError, "format version 3", "newer thawed", "upgrade thawed")


def test_format_version_not_a_number(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: m.update(format_version="1.0"))
    _fails(tiny_ckpt, UnsupportedFormatError, "'1.0' is not a version number")


def test_metadata_key_missing(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: m.pop("shared"))
    _fails(tiny_ckpt, HeaderError, "__metadata__ has no 'shared'")


def test_unknown_field_dtype(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: h["model.norm.weight::data"].update(dtype="F128"))
    _fails(tiny_ckpt, HeaderError, "tensor 'model.norm.weight' field 'data'", "'F128'")


# ---- index <-> tensors ---------------------------------------------------------------------------


def test_index_field_without_tensor(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: i["model.layer.weight"]["fields"].append("zeros"))
    _fails(tiny_ckpt, IndexMismatchError, "field 'zeros' of tensor 'model.layer.weight'",
           "no tensor 'model.layer.weight::zeros'", "thawed compress")


def test_tensor_without_index_entry(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: i.pop("model.norm.weight"))
    _fails(tiny_ckpt, IndexMismatchError, "tensor 'model.norm.weight' field 'data' is stored",
           "has no index entry")


def test_field_not_listed_by_its_entry(tiny_ckpt, payload_io):
    def edit(h, i, m):  # keep the layout: the embedding's field now poses as a second norm field
        h["model.norm.weight::extra"] = h.pop("model.embed.weight::data")
        i.pop("model.embed.weight")

    payload_io.edit(_payload(tiny_ckpt), edit)
    _fails(tiny_ckpt, IndexMismatchError, "tensor 'model.norm.weight' field 'extra' is stored",
           "the index entry of 'model.norm.weight' does not list that field")


def test_undeclared_shared_state(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: m.update(shared="{}", shared_checksums="{}"))
    _fails(tiny_ckpt, IndexMismatchError, f"'__codec__.{TOY}.0.table'", "not declared")


def test_declared_shared_state_missing(tiny_ckpt, payload_io):
    shared = json.dumps({TOY: {"0": ["table", "extra"]}})
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: m.update(shared=shared))
    _fails(tiny_ckpt, IndexMismatchError, f"declares '__codec__.{TOY}.0.extra'", "no such tensor")


# ---- codecs --------------------------------------------------------------------------------------


def test_unknown_codec(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: i["model.layer.weight"].update(codec="cvxq9"))
    msg = _fails(tiny_ckpt, UnsupportedCodecError, "tensor 'model.layer.weight'", "'cvxq9'", "upgrade thawed",
                 "re-compress")
    assert "available codecs" in msg
    assert issubclass(UnsupportedCodecError, UnknownCodecError)


def test_codec_version_newer_than_supported(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: i["model.norm.weight"].update(codec_version=2))
    _fails(tiny_ckpt, UnsupportedCodecError, "tensor 'model.norm.weight'", "'raw' version 2",
           "this thawed has version 1", "upgrade thawed")


def test_field_shape_inconsistent_with_params(tiny_ckpt, payload_io):
    # raw: the field must have the tensor's shape; the index now claims [2, 2], the field is [4]
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: i["model.norm.weight"].update(shape=[2, 2]))
    _fails(tiny_ckpt, FieldMismatchError, "tensor 'model.norm.weight' field 'data'", "stored as F32 [4]",
           "needs F32 [2, 2]", "thawed compress")


def test_field_dtype_inconsistent_with_params(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: i["model.norm.weight"].update(dtype="bfloat16"))
    _fails(tiny_ckpt, FieldMismatchError, "tensor 'model.norm.weight' field 'data'", "needs BF16 [4]")


def test_codec_rejects_params(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: i["model.layer.weight"]["params"].update(bits=9))
    _fails(tiny_ckpt, FieldMismatchError, "tensor 'model.layer.weight'", f"codec '{TOY}' rejects its params", "'bits'")


def test_codec_fields_differ_from_index(tiny_ckpt, payload_io):
    def edit(h, i, m):
        h["model.layer.weight::other"] = h.pop("model.layer.weight::codes")
        i["model.layer.weight"]["fields"] = ["scale", "other"]

    payload_io.edit(_payload(tiny_ckpt), edit)
    _fails(tiny_ckpt, FieldMismatchError, "expects fields ['codes', 'scale']", "index lists ['scale', 'other']")


# ---- offsets and layout --------------------------------------------------------------------------


def test_data_offsets_inconsistent_with_shape(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: h["model.norm.weight::data"].update(shape=[3]))
    _fails(tiny_ckpt, FieldMismatchError, "tensor 'model.norm.weight' field 'data'", "has 16 bytes", "need 12")


def test_overlapping_offsets(tiny_ckpt, payload_io):
    def edit(h, i, m):  # the table starts 4 bytes early: it overlaps model.norm.weight::data
        h[f"__codec__.{TOY}.0.table"]["data_offsets"] = [12, 76]

    payload_io.edit(_payload(tiny_ckpt), edit)
    _fails(tiny_ckpt, LayoutError, f"'__codec__.{TOY}.0.table'", "overlaps tensor 'model.norm.weight' field 'data'")


def test_hole_in_data(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: h["model.layer.weight::codes"].update(data_offsets=[99, 108]))
    _fails(tiny_ckpt, LayoutError, "hole at bytes 98..99", "field 'codes'")


def test_trailing_bytes(tiny_ckpt):
    with open(_payload(tiny_ckpt), "ab") as f:
        f.write(b"\0" * 5)
    _fails(tiny_ckpt, LayoutError, "5 bytes follow the last tensor")


def test_negative_offsets(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: h["model.norm.weight::data"].update(data_offsets=[-16, 0]))
    _fails(tiny_ckpt, HeaderError, "tensor 'model.norm.weight' field 'data'", "data_offsets [-16, 0]")


# ---- dims ----------------------------------------------------------------------------------------


def test_negative_dim_in_field(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: h["model.norm.weight::data"].update(shape=[-4]))
    _fails(tiny_ckpt, HeaderError, "tensor 'model.norm.weight' field 'data'", "negative dimension -4")


def test_negative_dim_in_index(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: i["model.layer.weight"].update(shape=[-3, 5]))
    _fails(tiny_ckpt, HeaderError, "index entry 'model.layer.weight'", "negative dimension -3")


def test_huge_dims(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: i["model.layer.weight"].update(shape=[1 << 30, 1 << 30]))
    _fails(tiny_ckpt, HeaderError, "index entry 'model.layer.weight'", "above the limit")


def test_huge_dim_in_field(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: h["model.norm.weight::data"].update(shape=[1 << 62]))
    _fails(tiny_ckpt, HeaderError, "tensor 'model.norm.weight' field 'data'", "above the limit")


def test_too_many_dims(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: h["model.norm.weight::data"].update(shape=[1] * 9 + [4]))
    _fails(tiny_ckpt, HeaderError, "10 dimensions")


def test_non_integer_dim(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: h["model.norm.weight::data"].update(shape=[4.0]))
    _fails(tiny_ckpt, HeaderError, "dimension 4.0", "expected an integer")


# ---- data corruption: found on first read, not on open -------------------------------------------


def test_checksum_mismatch_on_read_not_open(tiny_ckpt):
    blob = bytearray(_payload(tiny_ckpt).read_bytes())
    blob[-1] ^= 0x01  # last byte of model.layer.weight::codes
    _payload(tiny_ckpt).write_bytes(bytes(blob))
    with Checkpoint.open(tiny_ckpt) as ckpt:  # opens fine
        ckpt.encoded("model.norm.weight")
        with pytest.raises(ChecksumError) as info:
            ckpt.encoded("model.layer.weight")
        msg = str(info.value)
        for w in (PAYLOAD_FILE, "tensor 'model.layer.weight'", "scale, codes", "corrupted", "thawed compress"):
            assert w in msg, msg
        with pytest.raises(ChecksumError):  # still failing on a second read
            ckpt.decode("model.layer.weight")


def test_bad_checksum_string(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: i["model.norm.weight"].update(checksum="md5:00"))
    _fails(tiny_ckpt, HeaderError, "index entry 'model.norm.weight'", "checksum 'md5:00'")


# ---- names ---------------------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not a thawed checkpoint.*thawed compress"):
        Checkpoint.open(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")


def test_reserved_index_name(tiny_ckpt, payload_io):
    payload_io.edit(_payload(tiny_ckpt), lambda h, i, m: i.update({"__metadata__": i["model.norm.weight"]}))
    _fails(tiny_ckpt, HeaderError, "index entry '__metadata__'", "reserved")

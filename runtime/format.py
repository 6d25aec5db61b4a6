"""The thawed checkpoint format, version 2 (reads 1 too): constants, dtype tables, header encoding and validation.

The byte-level specification is ``docs/FORMAT.md``; this module is its executable form. A payload
file is a plain safetensors file::

    [8 bytes]  N, little-endian u64: length of the JSON header
    [N bytes]  JSON header, UTF-8, padded with spaces so that 8 + N is a multiple of 8
    [rest]     data buffer; each tensor's ``data_offsets`` are [begin, end) into it

whose ``__metadata__`` carries ``format="thawed"``, ``format_version``, the ``index`` (one entry
per original tensor: codec, params, fields, checksum), the declared ``shared`` codec state, the
``source`` and the compression ``settings``.

``read_header`` parses and validates *everything* (sizes, JSON, names, dtypes, shapes, offsets,
index <-> tensors, every field against its codec's ``expected_fields``) without touching a payload
byte; it only reads the 8-byte length and the header.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from thawed.codecs.base import ROLES, FieldSpec, TensorSpec, get_codec
from thawed.codecs.errors import CodecError, UnknownCodecError

from .errors import (
    CheckpointNotFoundError,
    ChecksumError,
    FieldMismatchError,
    HeaderError,
    HeaderTooLargeError,
    IndexMismatchError,
    LayoutError,
    TruncatedFileError,
    UnsupportedCodecError,
    UnsupportedFormatError,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "PAYLOAD_FILE",
    "MARKER_FILE",
    "HEADER_CHECKSUM_KEY",
    "MAX_JSON_DEPTH",
    "seal_header",
    "entry_digest_seed",
    "shared_digest_seed",
    "MAX_HEADER_BYTES",
    "MAX_RANK",
    "MAX_DIM",
    "MAX_NUMEL",
    "FIELD_SEP",
    "SHARED_PREFIX",
    "DTYPE_TO_CODE",
    "CODE_TO_DTYPE",
    "NAME_TO_DTYPE",
    "dtype_name",
    "field_key",
    "shared_key",
    "check_tensor_name",
    "check_field_name",
    "check_token",
    "crc32_of",
    "bits_per_weight",
    "encode_index",
    "encode_header",
    "TensorInfo",
    "IndexEntry",
    "Header",
    "read_header",
    "parse_header",
]

# ---- constants --------------------------------------------------------------------------------

FORMAT_NAME = "thawed"
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
PAYLOAD_FILE = "model.thawed.safetensors"
MARKER_FILE = "thawed.json"     # present in every checkpoint directory written by format v2
HEADER_CHECKSUM_KEY = "header_checksum"  # v2: CRC-32 of the whole header (section 4 of docs/FORMAT.md)
MAX_JSON_DEPTH = 32             # nesting of any JSON document in the header (params, settings...)

MAX_HEADER_BYTES = 100_000_000  # the same cap as the safetensors library; checked before reading
MAX_RANK = 8                    # dimensions of any tensor or field
MAX_DIM = 1 << 40               # any single dimension
MAX_NUMEL = 1 << 40             # elements of any tensor or field (2 TiB of bf16)
MAX_OFFSET = 1 << 62            # data_offsets bound (a file is checked against its real size anyway)
DATA_ALIGNMENT = 8              # the data buffer starts at a multiple of this

FIELD_SEP = "::"
SHARED_PREFIX = "__codec__."
CHECKSUM_RE = re.compile(r"crc32:[0-9a-f]{8}")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_\-]+")          # codec names, shared ids and params
_FIELD_RE = re.compile(r"[A-Za-z0-9_\-.]+")         # field names (no ':' so no '::')
_META_KEYS = ("format", "format_version", "index", "shared", "shared_checksums", "source", "settings")
_SEAL_RE = re.compile(rb'"header_checksum":"(crc32:[0-9a-f]{8})"')
_SEAL_ZERO = b"crc32:00000000"
_INDEX_KEYS = ("codec", "codec_version", "shape", "dtype", "role", "fields", "params", "checksum")

_RECOMPRESS = "Re-run `thawed compress` to rebuild the checkpoint"
_NOT_OURS = "the file is truncated or corrupted, or was not written by thawed"

# ---- dtypes -------------------------------------------------------------------------------------

_DTYPES: list[tuple[torch.dtype, str]] = [
    (torch.float64, "F64"),
    (torch.float32, "F32"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int64, "I64"),
    (torch.int32, "I32"),
    (torch.int16, "I16"),
    (torch.int8, "I8"),
    (torch.uint8, "U8"),
    (torch.bool, "BOOL"),
]
for _attr, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _attr):  # torch >= 2.3 has the unsigned ones (limited op support)
        _DTYPES.append((getattr(torch, _attr), _code))

DTYPE_TO_CODE: dict[torch.dtype, str] = dict(_DTYPES)
CODE_TO_DTYPE: dict[str, torch.dtype] = {c: d for d, c in _DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling the index uses)."""
    return str(dtype).removeprefix("torch.")


NAME_TO_DTYPE: dict[str, torch.dtype] = {dtype_name(d): d for d, _ in _DTYPES}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_ITEMSIZE: dict[torch.dtype, int] = {d: _itemsize(d) for d, _ in _DTYPES}

# ---- names --------------------------------------------------------------------------------------


def field_key(name: str, field_name: str) -> str:
    """Stored name of field ``field_name`` of tensor ``name``: ``NAME::F``."""
    return f"{name}{FIELD_SEP}{field_name}"


def shared_key(codec: str, key: str) -> str:
    """Stored name of shared state ``"<id>.<param>"`` of ``codec``: ``__codec__.<codec>.<id>.<param>``."""
    return f"{SHARED_PREFIX}{codec}.{key}"


def check_tensor_name(name: Any) -> str | None:
    """Why ``name`` cannot be an original tensor name, or ``None`` when it can."""
    if not isinstance(name, str) or not name:
        return "a tensor name must be a non-empty string"
    if FIELD_SEP in name:
        return f"a tensor name may not contain {FIELD_SEP!r}"
    if name.startswith("__"):
        return "names starting with '__' are reserved (__metadata__, __codec__)"
    if len(name) > 1024:
        return "a tensor name may have at most 1024 characters"
    if not name.isprintable():  # control characters, lone surrogates (not UTF-8), ...
        return "a tensor name must be printable UTF-8 text (no control characters or lone surrogates)"
    return None


def check_field_name(name: Any) -> str | None:
    if not isinstance(name, str) or not _FIELD_RE.fullmatch(name) or len(name) > 128:
        return "a field name must be 1-128 characters of A-Z a-z 0-9 _ - ."
    return None


def check_token(name: Any, what: str) -> str | None:
    """Codec names, shared-state ids and params: 1-128 characters of A-Z a-z 0-9 _ -."""
    if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name) or len(name) > 128:
        return f"{what} must be 1-128 characters of A-Z a-z 0-9 _ -"
    return None


# ---- checksums and sizes ------------------------------------------------------------------------


def _as_bytes(t: Tensor) -> Any:
    """A zero-copy byte view (a numpy uint8 array) of a contiguous CPU tensor."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def crc32_of(tensors: Iterable[Tensor], crc: int = 0) -> str:
    """``"crc32:xxxxxxxx"``: zlib CRC-32 over the raw bytes of ``tensors``, one after the other."""
    for t in tensors:
        crc = zlib.crc32(_as_bytes(t.contiguous()), crc)
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def entry_digest_seed(name: str, entry: Mapping[str, Any]) -> int:
    """Format v2: the CRC-32 state a tensor's checksum starts from before its field bytes.

    It covers the tensor's name and its whole index entry (codec, codec_version, shape, dtype, role,
    fields, params; not the checksum itself) as compact sorted JSON, so a checksum moved to another
    name, or params edited without recomputing it, no longer match."""
    meta = {k: v for k, v in entry.items() if k != "checksum"} | {"name": name}
    return zlib.crc32(_dumps(meta).encode("ascii"))


def shared_digest_seed(codec: str, tensors: Iterable[tuple[str, str, tuple[int, ...]]]) -> int:
    """Format v2: the CRC-32 state a codec's shared-state checksum starts from: the codec name and
    each shared tensor's ``("<id>.<param>", dtype code, shape)`` in stored order."""
    return zlib.crc32(_dumps({"codec": codec, "tensors": [[k, c, list(s)] for k, c, s in tensors]}).encode("ascii"))


def seal_header(text: bytes) -> bytes:
    """Format v2: header JSON ``text`` with its ``header_checksum`` value filled in.

    The value is the CRC-32 of the header JSON (trailing padding spaces excluded) with the value
    itself written as ``crc32:00000000``. ``text`` must hold ``"header_checksum":"crc32:<8 hex>"``
    exactly once (compact JSON, as the writer emits it)."""
    found = list(_SEAL_RE.finditer(text))
    if len(found) != 1:
        raise ValueError(f"the header holds {len(found)} header_checksum entries, expected 1")
    m = found[0]
    zeroed = text[:m.start(1)] + _SEAL_ZERO + text[m.end(1):]
    crc = f"crc32:{zlib.crc32(zeroed.rstrip(b' ')) & 0xFFFFFFFF:08x}".encode("ascii")
    return text[:m.start(1)] + crc + text[m.end(1):]


def bits_per_weight(nbytes: int, numel: int) -> float:
    """Every stored byte (codes and side information) x 8 / the original element count."""
    return nbytes * 8 / numel if numel else 0.0


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- dataclasses --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the safetensors header. ``begin``/``end`` are relative to the data buffer."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class IndexEntry:
    """The index's record of one original tensor."""

    name: str
    codec: str
    codec_version: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: str
    fields: tuple[str, ...]
    params: dict[str, Any] = field(hash=False)
    checksum: str
    nbytes: int  # every stored byte of this tensor: the sum of its fields

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(name=self.name, shape=self.shape, dtype=self.dtype, role=self.role)

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def bpw(self) -> float:
        return bits_per_weight(self.nbytes, self.numel)

    def field_keys(self) -> tuple[str, ...]:
        return tuple(field_key(self.name, f) for f in self.fields)

    def digest_seed(self) -> int:
        """Format v2: where this tensor's checksum starts (``entry_digest_seed``)."""
        return entry_digest_seed(self.name, index_entry_dict(self.spec, self.codec, self.codec_version,
                                                             self.fields, self.params, self.checksum))


@dataclass(frozen=True)
class Header:
    """A fully validated payload-file header."""

    path: Path
    file_nbytes: int
    header_nbytes: int  # N, padding included
    data_start: int  # 8 + N
    tensors: dict[str, TensorInfo]  # every stored tensor, in file (offset) order
    index: dict[str, IndexEntry]  # in the order of the index JSON (the writer's order)
    shared: dict[str, tuple[str, ...]]  # codec -> "<id>.<param>" keys, in declared order
    shared_checksums: dict[str, str]
    format_version: int
    source: str
    settings: dict[str, Any]

    @property
    def data_nbytes(self) -> int:
        return self.file_nbytes - self.data_start


# ---- encoding (the writer's half) ---------------------------------------------------------------


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def index_entry_dict(spec: TensorSpec, codec: str, codec_version: int, fields: Iterable[str],
                     params: Mapping[str, Any], checksum: str) -> dict[str, Any]:
    return {
        "codec": codec,
        "codec_version": int(codec_version),
        "shape": [int(d) for d in spec.shape],
        "dtype": dtype_name(spec.dtype),
        "role": spec.role,
        "fields": list(fields),
        "params": dict(params),
        "checksum": checksum,
    }


def encode_index(entries: Iterable[tuple[str, Mapping[str, Any]]]) -> str:
    """The ``index`` metadata string: names in the given (file) order, each entry's keys sorted."""
    return "{" + ",".join(_dumps(name) + ":" + _dumps(entry) for name, entry in entries) + "}"


def encode_header(metadata: Mapping[str, str],
                  tensors: Iterable[tuple[str, str, tuple[int, ...], int, int]]) -> bytes:
    """Length prefix + JSON header, padded with spaces so that the data starts 8-aligned.

    ``tensors``: ``(key, dtype code, shape, begin, end)`` in file order. ``__metadata__`` comes
    first, then the tensors in file order, each as ``{"dtype","shape","data_offsets"}``.
    """
    parts = ['"__metadata__":' + _dumps(dict(metadata))]
    for key, code, shape, begin, end in tensors:
        parts.append(_dumps(key) + ':{"dtype":' + _dumps(code) + ',"shape":' + _dumps(list(shape))
                     + ',"data_offsets":' + _dumps([begin, end]) + "}")
    text = ("{" + ",".join(parts) + "}").encode("utf-8")
    text += b" " * (-(8 + len(text)) % DATA_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


# ---- parsing and validation (the reader's half) -------------------------------------------------


class _DuplicateKey(Exception):
    pass


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_problem(obj: Any) -> str | None:
    """Why a parsed JSON document is refused (too deep, a string that is not UTF-8), or ``None``."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return f"the string {v[:40]!r} is not UTF-8 (a lone surrogate)"
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"it nests deeper than {MAX_JSON_DEPTH} levels"
            items = list(v.items()) if isinstance(v, dict) else [(None, x) for x in v]
            for k, x in items:
                if k is not None:
                    stack.append((k, depth + 1))
                stack.append((x, depth + 1))
    return None


def _loads(text: str, what: str, path: Path) -> Any:
    try:
        value = json.loads(text, object_pairs_hook=_pairs_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise HeaderError(
            f"{path}: {what} names {str(exc)!r} twice; {_NOT_OURS}. {_RECOMPRESS}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise HeaderError(
            f"{path}: {what} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); "
            f"{_NOT_OURS}. {_RECOMPRESS}"
        ) from None
    problem = _json_problem(value)
    if problem:
        raise HeaderError(f"{path}: {what} is refused: {problem}; {_NOT_OURS}. {_RECOMPRESS}")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _describe(key: str) -> str:
    """``"tensor 'a.weight' field 'codes'"`` for ``a.weight::codes``; shared state as it is."""
    if key.startswith(SHARED_PREFIX):
        return f"shared codec state {key!r}"
    if FIELD_SEP in key:
        name, _, fld = key.rpartition(FIELD_SEP)
        return f"tensor {name!r} field {fld!r}"
    return f"tensor {key!r}"


def _shape(value: Any, path: Path, what: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise HeaderError(f"{path}: {what} has shape {value!r}, expected a list of integers; {_NOT_OURS}. {_RECOMPRESS}")
    if len(value) > MAX_RANK:
        raise HeaderError(
            f"{path}: {what} has {len(value)} dimensions, more than the limit of {MAX_RANK}; {_NOT_OURS}. {_RECOMPRESS}"
        )
    for d in value:
        if not _is_int(d):
            raise HeaderError(f"{path}: {what} has dimension {d!r} in shape {value!r}, expected an integer; {_NOT_OURS}. {_RECOMPRESS}")
        if d < 0:
            raise HeaderError(f"{path}: {what} has negative dimension {d} in shape {value}; {_NOT_OURS}. {_RECOMPRESS}")
        if d > MAX_DIM:
            raise HeaderError(
                f"{path}: {what} has dimension {d} in shape {value}, above the limit of {MAX_DIM}; {_NOT_OURS}. {_RECOMPRESS}"
            )
    if _numel(value) > MAX_NUMEL:
        raise HeaderError(
            f"{path}: {what} has shape {value} with {_numel(value)} elements, above the limit of "
            f"{MAX_NUMEL}; {_NOT_OURS}. {_RECOMPRESS}"
        )
    return tuple(value)


def read_header(path: str | Path) -> Header:
    """Read and validate the header of payload file ``path``. Reads 8 + N bytes, nothing else."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CheckpointNotFoundError(
            f"{path} cannot be read ({exc.strerror or exc}); check that it exists and that this user may read "
            "it (thawed writes checkpoints 0644 less the umask)"
        ) from None
    with f:
        size = f.seek(0, 2)
        f.seek(0)
        if size < 8:
            raise TruncatedFileError(
                f"{path} is {size} bytes long, shorter than its 8-byte header length; {_NOT_OURS}. {_RECOMPRESS}"
            )
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise HeaderTooLargeError(
                f"{path}: the header length says {n} bytes, above the limit of {MAX_HEADER_BYTES}; "
                f"refusing to read it. This is not a thawed checkpoint (or it is corrupted or hostile). {_RECOMPRESS}"
            )
        if 8 + n > size:
            raise TruncatedFileError(
                f"{path}: the header length says {n} bytes but only {size - 8} bytes follow it; the file "
                f"is truncated in the header or is not a thawed checkpoint. {_RECOMPRESS}"
            )
        raw = f.read(n)
    if len(raw) != n:  # the file shrank while we read it
        raise TruncatedFileError(f"{path}: could read only {len(raw)} of the {n} header bytes; {_RECOMPRESS}")
    return parse_header(raw, size, path)


def parse_header(raw: bytes, file_nbytes: int, path: Path) -> Header:
    """Validate header bytes ``raw`` (without the length prefix) of a file of ``file_nbytes`` bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{path}: the header is not valid UTF-8 ({exc}); {_NOT_OURS}. {_RECOMPRESS}") from None
    header = _loads(text, "the header", path)
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: the header is JSON but not an object; {_NOT_OURS}. {_RECOMPRESS}")

    # -- __metadata__: format, version, and the JSON strings inside it
    meta = header.pop("__metadata__", None)
    if meta is None:
        raise UnsupportedFormatError(
            f"{path} has no __metadata__: it is a plain safetensors file, not a thawed checkpoint; "
            "create one with `thawed compress`"
        )
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings; {_NOT_OURS}. {_RECOMPRESS}")
    if meta.get("format") != FORMAT_NAME:
        raise UnsupportedFormatError(
            f"{path}: __metadata__ format is {meta.get('format')!r}, not {FORMAT_NAME!r}: this safetensors "
            "file is not a thawed checkpoint; create one with `thawed compress`"
        )
    version_text = meta.get("format_version")
    if not isinstance(version_text, str) or not version_text.isdigit() or len(version_text) > 9:
        raise UnsupportedFormatError(
            f"{path}: format_version {version_text!r} is not a version number; {_NOT_OURS}. {_RECOMPRESS}"
        )
    version = int(version_text)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        newer = version > max(SUPPORTED_FORMAT_VERSIONS)
        raise UnsupportedFormatError(
            f"{path}: format version {version} is not supported by this thawed (it reads version "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); "
            + ("the checkpoint was written by a newer thawed: upgrade thawed, or re-compress the model "
               "with this one" if newer else "re-run `thawed compress` with this thawed")
        )
    for key in _META_KEYS:
        if key not in meta:
            raise HeaderError(f"{path}: __metadata__ has no {key!r}; {_NOT_OURS}. {_RECOMPRESS}")
    if version >= 2:
        _check_seal(raw, meta.get(HEADER_CHECKSUM_KEY), path)
    if not meta["source"].isprintable():
        raise HeaderError(f"{path}: __metadata__['source'] holds control characters; {_NOT_OURS}. {_RECOMPRESS}")
    settings = _loads(meta["settings"], "__metadata__['settings']", path)
    if not isinstance(settings, dict):
        raise HeaderError(f"{path}: __metadata__['settings'] is not a JSON object; {_NOT_OURS}. {_RECOMPRESS}")

    # -- the stored tensors: dtype, shape, offsets, sizes; then the layout of the data buffer
    data_start = 8 + len(raw)
    data_nbytes = file_nbytes - data_start
    tensors: list[TensorInfo] = []
    for key, info in header.items():
        what = _describe(key)
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(
                f"{path}: {what} must be an object with exactly dtype, shape and data_offsets; {_NOT_OURS}. {_RECOMPRESS}"
            )
        dtype = CODE_TO_DTYPE.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise HeaderError(
                f"{path}: {what} has dtype {info['dtype']!r}, which thawed does not read (known: "
                f"{', '.join(CODE_TO_DTYPE)}); {_NOT_OURS}. {_RECOMPRESS}"
            )
        shape = _shape(info["shape"], path, what)
        offs = info["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
                and 0 <= offs[0] <= offs[1] <= MAX_OFFSET):
            raise HeaderError(
                f"{path}: {what} has data_offsets {offs!r}, expected [begin, end] with 0 <= begin <= end; "
                f"{_NOT_OURS}. {_RECOMPRESS}"
            )
        want = _numel(shape) * _ITEMSIZE[dtype]
        if offs[1] - offs[0] != want:
            raise FieldMismatchError(
                f"{path}: {what} has {offs[1] - offs[0]} bytes (data_offsets {offs}) but its shape "
                f"{list(shape)} and dtype {info['dtype']} need {want}; {_NOT_OURS}. {_RECOMPRESS}"
            )
        tensors.append(TensorInfo(key, dtype, shape, offs[0], offs[1]))
    tensors.sort(key=lambda t: (t.begin, t.end))
    pos, prev = 0, None
    for t in tensors:
        if t.begin < pos:
            raise LayoutError(
                f"{path}: {_describe(t.key)} (bytes {t.begin}..{t.end}) overlaps {_describe(prev.key)} "
                f"(bytes {prev.begin}..{prev.end}) in the data buffer; {_NOT_OURS}. {_RECOMPRESS}"
            )
        if t.begin > pos:
            raise LayoutError(
                f"{path}: the data buffer has a hole at bytes {pos}..{t.begin} before {_describe(t.key)}; "
                f"{_NOT_OURS}. {_RECOMPRESS}"
            )
        pos, prev = t.end, t
    if pos > data_nbytes:
        cut = next(t for t in tensors if t.end > data_nbytes)
        raise TruncatedFileError(
            f"{path}: {_describe(cut.key)} ends at byte {cut.end} of the data buffer but the file holds "
            f"only {max(data_nbytes, 0)} data bytes; the file is truncated in the data. {_RECOMPRESS}"
        )
    if pos < data_nbytes:
        raise LayoutError(
            f"{path}: {data_nbytes - pos} bytes follow the last tensor; the data_offsets do not cover "
            f"the data buffer; {_NOT_OURS}. {_RECOMPRESS}"
        )
    by_key = {t.key: t for t in tensors}
    claimed: set[str] = set()

    # -- the index: one entry per original tensor, each field present with the codec's dtype/shape
    index_raw = _loads(meta["index"], "__metadata__['index']", path)
    if not isinstance(index_raw, dict):
        raise HeaderError(f"{path}: __metadata__['index'] is not a JSON object; {_NOT_OURS}. {_RECOMPRESS}")
    index: dict[str, IndexEntry] = {}
    for name, e in index_raw.items():
        entry = _index_entry(path, name, e)
        nbytes = 0
        for fld in entry.fields:
            key = field_key(name, fld)
            if key not in by_key:
                raise IndexMismatchError(
                    f"{path}: the index lists field {fld!r} of tensor {name!r} but the file has no tensor "
                    f"{key!r}; {_NOT_OURS}. {_RECOMPRESS}"
                )
            claimed.add(key)
            nbytes += by_key[key].nbytes
        index[name] = dataclasses.replace(entry, nbytes=nbytes)

    # -- shared codec state: declared ids and params, each stored once
    shared_raw = _loads(meta["shared"], "__metadata__['shared']", path)
    sums_raw = _loads(meta["shared_checksums"], "__metadata__['shared_checksums']", path)
    if not isinstance(shared_raw, dict) or not isinstance(sums_raw, dict):
        raise HeaderError(
            f"{path}: __metadata__['shared'] and ['shared_checksums'] must be JSON objects; {_NOT_OURS}. {_RECOMPRESS}"
        )
    shared: dict[str, tuple[str, ...]] = {}
    for codec, ids in shared_raw.items():
        problem = check_token(codec, "a codec name")
        if problem is None and not isinstance(ids, dict):
            problem = "the declaration must map ids to lists of params"
        if problem is None and not (isinstance(sums_raw.get(codec), str) and CHECKSUM_RE.fullmatch(sums_raw[codec])):
            problem = f"its checksum is {sums_raw.get(codec)!r}, expected 'crc32:' and 8 hex digits"
        if problem:
            raise HeaderError(f"{path}: shared state of codec {codec!r}: {problem}; {_NOT_OURS}. {_RECOMPRESS}")
        keys: list[str] = []
        for sid, params in ids.items():
            problem = check_token(sid, "a shared-state id")
            if problem is None and not (isinstance(params, list) and params):
                problem = "its params must be a non-empty list"
            for p in params if problem is None else ():
                problem = problem or check_token(p, "a shared-state param")
            if problem is None and len(set(params)) != len(params):
                problem = "its params repeat a name"
            if problem:
                raise HeaderError(
                    f"{path}: shared state {sid!r} of codec {codec!r}: {problem}; {_NOT_OURS}. {_RECOMPRESS}"
                )
            for p in params:
                key = shared_key(codec, f"{sid}.{p}")
                if key not in by_key:
                    raise IndexMismatchError(
                        f"{path}: __metadata__['shared'] declares {key!r} but the file has no such tensor; "
                        f"{_NOT_OURS}. {_RECOMPRESS}"
                    )
                claimed.add(key)
                keys.append(f"{sid}.{p}")
        shared[codec] = tuple(keys)
    extra_sums = set(sums_raw) - set(shared)
    if extra_sums:
        raise HeaderError(
            f"{path}: shared_checksums names codec {sorted(extra_sums)[0]!r} that declares no shared state; {_NOT_OURS}. {_RECOMPRESS}"
        )

    # -- every stored tensor belongs to someone
    for t in tensors:
        if t.key in claimed:
            continue
        if t.key.startswith(SHARED_PREFIX):
            raise IndexMismatchError(
                f"{path}: shared codec state tensor {t.key!r} is not declared in __metadata__['shared']; "
                f"{_NOT_OURS}. {_RECOMPRESS}"
            )
        name = t.key.rpartition(FIELD_SEP)[0] if FIELD_SEP in t.key else t.key
        raise IndexMismatchError(
            f"{path}: {_describe(t.key)} is stored but "
            + (f"tensor {name!r} has no index entry" if name not in index
               else f"the index entry of {name!r} does not list that field")
            + f"; {_NOT_OURS}. {_RECOMPRESS}"
        )

    # -- codecs: known, not too new, and every field exactly as the codec expects
    for entry in index.values():
        _check_codec(path, entry, by_key)

    return Header(
        path=path, file_nbytes=file_nbytes, header_nbytes=len(raw), data_start=data_start,
        tensors=by_key, index=index, shared=shared, shared_checksums=dict(sums_raw),
        format_version=version, source=meta["source"], settings=settings,
    )


def _check_seal(raw: bytes, value: Any, path: Path) -> None:
    """Format v2: the header's own CRC-32 (``seal_header``) matches; any edit of names, offsets,
    params or checksums that did not recompute it is refused here, before anything else is read."""
    if not (isinstance(value, str) and CHECKSUM_RE.fullmatch(value)):
        raise HeaderError(
            f"{path}: __metadata__[{HEADER_CHECKSUM_KEY!r}] is {value!r}, expected 'crc32:' and 8 hex digits; "
            f"{_NOT_OURS}. {_RECOMPRESS}"
        )
    text = raw.rstrip(b" ")
    try:
        got = _SEAL_RE.search(seal_header(text)).group(1).decode("ascii")  # type: ignore[union-attr]
    except ValueError as exc:
        raise HeaderError(f"{path}: the header checksum cannot be located ({exc}); {_NOT_OURS}. {_RECOMPRESS}") from None
    if got != value:
        raise ChecksumError(
            f"{path}: the header hashes to {got} but its {HEADER_CHECKSUM_KEY} says {value}: the header (names, "
            f"offsets, params or checksums) was edited or damaged after it was written. {_RECOMPRESS}"
        )


def _index_entry(path: Path, name: str, e: Any) -> IndexEntry:
    problem = check_tensor_name(name)
    if problem:
        raise HeaderError(f"{path}: index entry {name!r}: {problem}; {_NOT_OURS}. {_RECOMPRESS}")
    where = f"{path}: index entry {name!r}"
    if not isinstance(e, dict):
        raise HeaderError(f"{where} is not a JSON object; {_NOT_OURS}. {_RECOMPRESS}")
    missing = [k for k in _INDEX_KEYS if k not in e]
    if missing:
        raise HeaderError(f"{where} has no {', '.join(missing)}; {_NOT_OURS}. {_RECOMPRESS}")
    problem = check_token(e["codec"], "the codec name")
    if problem is None and not (_is_int(e["codec_version"]) and 1 <= e["codec_version"] < 1 << 31):
        problem = f"codec_version {e['codec_version']!r} is not a positive integer"
    if problem is None and not (isinstance(e["dtype"], str) and e["dtype"] in NAME_TO_DTYPE):
        problem = f"dtype {e['dtype']!r} is not one of {', '.join(NAME_TO_DTYPE)}"
    if problem is None and e["role"] not in ROLES:
        problem = f"role {e['role']!r} is not one of {', '.join(ROLES)}"
    if problem is None and not (isinstance(e["fields"], list) and e["fields"]):
        problem = f"fields {e['fields']!r} is not a non-empty list"
    for fld in e["fields"] if problem is None else ():
        problem = problem or (check_field_name(fld) and f"field {fld!r}: {check_field_name(fld)}")
    if problem is None and len(set(e["fields"])) != len(e["fields"]):
        problem = f"fields {e['fields']} repeat a name"
    if problem is None and not isinstance(e["params"], dict):
        problem = f"params {e['params']!r} is not a JSON object"
    if problem is None and not (isinstance(e["checksum"], str) and CHECKSUM_RE.fullmatch(e["checksum"])):
        problem = f"checksum {e['checksum']!r} is not 'crc32:' and 8 lowercase hex digits"
    if problem:
        raise HeaderError(f"{where}: {problem}; {_NOT_OURS}. {_RECOMPRESS}")
    shape = _shape(e["shape"], path, f"index entry {name!r}")
    return IndexEntry(
        name=name, codec=e["codec"], codec_version=e["codec_version"], shape=shape,
        dtype=NAME_TO_DTYPE[e["dtype"]], role=e["role"], fields=tuple(e["fields"]),
        params=e["params"], checksum=e["checksum"], nbytes=0,
    )


def expected_fields(path: Path | str, entry: IndexEntry) -> dict[str, FieldSpec]:
    """The entry's codec class checked (known, version supported) and its expected fields."""
    try:
        cls = get_codec(entry.codec)
    except UnknownCodecError as exc:
        raise UnsupportedCodecError(
            f"{path}: tensor {entry.name!r} uses codec {entry.codec!r}, which this thawed does not know "
            f"({exc}). Upgrade thawed, or re-compress the model with codecs this version has"
        ) from None
    if entry.codec_version > cls.version:
        raise UnsupportedCodecError(
            f"{path}: tensor {entry.name!r} uses codec {entry.codec!r} version {entry.codec_version}, "
            f"but this thawed has version {cls.version}; upgrade thawed, or re-compress the model with this one"
        )
    try:
        return cls.expected_fields(entry.spec, entry.params)
    except CodecError as exc:
        raise FieldMismatchError(
            f"{path}: tensor {entry.name!r}: codec {entry.codec!r} rejects its params: {exc}; "
            f"{_NOT_OURS}. {_RECOMPRESS}"
        ) from None
    except (TypeError, ValueError, KeyError, IndexError, ArithmeticError) as exc:
        raise FieldMismatchError(
            f"{path}: tensor {entry.name!r}: codec {entry.codec!r} cannot use params {entry.params!r} "
            f"({type(exc).__name__}: {exc}); {_NOT_OURS}. {_RECOMPRESS}"
        ) from None


def _check_codec(path: Path, entry: IndexEntry, by_key: Mapping[str, TensorInfo]) -> None:
    expected = expected_fields(path, entry)
    if set(expected) != set(entry.fields):
        raise FieldMismatchError(
            f"{path}: tensor {entry.name!r}: codec {entry.codec!r} expects fields {sorted(expected)} but the "
            f"index lists {list(entry.fields)}; {_NOT_OURS}. {_RECOMPRESS}"
        )
    for fld in entry.fields:
        info, want = by_key[field_key(entry.name, fld)], expected[fld]
        if info.dtype != want.dtype or info.shape != tuple(want.shape):
            raise FieldMismatchError(
                f"{path}: tensor {entry.name!r} field {fld!r} is stored as {DTYPE_TO_CODE[info.dtype]} "
                f"{list(info.shape)}, but codec {entry.codec!r} with params {entry.params} and shape "
                f"{list(entry.shape)} needs {DTYPE_TO_CODE.get(want.dtype, want.dtype)} {list(want.shape)}; "
                f"{_NOT_OURS}. {_RECOMPRESS}"
            )

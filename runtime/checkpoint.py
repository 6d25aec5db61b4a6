"""Reading thawed checkpoints: validate everything on open, then map the payload lazily.

``Checkpoint.open(path)`` reads only the 8-byte length and the JSON header, validates it completely
(see ``format.read_header``), and memory-maps the payload file without reading it. Fields come back
as zero-copy CPU tensors over that mapping (a field whose offset is not aligned for its dtype, which
thawed's writer never produces, is copied). Each tensor's checksum is verified the first time it is
read. Tensors handed out keep the mapping alive after ``close``.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from thawed.codecs.base import Encoded, get_codec

from .errors import ChecksumError, CheckpointNotFoundError, FormatError, TensorNotFoundError, TruncatedFileError
from .files import special_file_problem
from .format import (
    DTYPE_TO_CODE,
    PAYLOAD_FILE,
    Header,
    IndexEntry,
    TensorInfo,
    crc32_of,
    field_key,
    read_header,
    shared_digest_seed,
    shared_key,
)
from .marker import check_folder
from .validate import check_finite

__all__ = ["Checkpoint"]

log = logging.getLogger(__name__)

_REFETCH = ("the file is corrupted or was edited (a damaged copy or download, a disk error, or a changed name, codec "
            "or params: version 2 checksums cover those too); copy it again or re-run `thawed compress`")


class Checkpoint:
    """An open thawed checkpoint. Build it with ``Checkpoint.open(path)``."""

    def __init__(self, path: Path, payload_path: Path, header: Header, storage: torch.UntypedStorage) -> None:
        self.path = path
        self.payload_path = payload_path
        self._header = header
        self._storage: torch.UntypedStorage | None = storage
        self._bytes: Tensor | None = torch.empty(0, dtype=torch.uint8).set_(storage)
        self._lock = threading.Lock()
        self._verified: set[str] = set()
        self._verified_shared: set[str] = set()

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """Open a checkpoint directory (or its payload file). Validates the whole header first."""
        p = Path(path)
        if p.is_dir():
            directory, payload = p, p / PAYLOAD_FILE
            check_folder(directory)
        elif os.path.lexists(p) and not p.name.endswith(".safetensors"):
            raise CheckpointNotFoundError(
                f"{p} is neither a folder nor a .safetensors file; give a thawed checkpoint directory or its {PAYLOAD_FILE}"
            )
        elif os.path.lexists(p):
            payload, directory = p, p.parent
        else:
            raise CheckpointNotFoundError(f"{p} does not exist; give a thawed checkpoint directory or its {PAYLOAD_FILE}")
        problem = special_file_problem(payload)
        if problem:
            raise CheckpointNotFoundError(
                f"{payload} {problem}; a thawed checkpoint's payload must be a regular file. Copy the "
                "checkpoint again or re-run `thawed compress`"
            )
        header = read_header(payload)
        if header.format_version < 2:
            log.warning("%s is format version %d: its checksums cover field bytes only, so the names and params "
                        "in its index are not checked; re-run `thawed compress` to write version 2",
                        payload, header.format_version)
        try:  # a private (copy-on-write) mapping: nothing is read until a field is used
            storage = torch.UntypedStorage.from_file(str(payload), shared=False, nbytes=header.file_nbytes)
        except RuntimeError as exc:
            raise TruncatedFileError(
                f"{payload}: cannot map {header.file_nbytes} bytes ({exc}); the file changed or shrank while "
                "being opened. Open it again, or re-run `thawed compress`"
            ) from None
        return cls(directory, payload, header, storage)

    # ---- what the file holds ------------------------------------------------------------------
    @property
    def index(self) -> dict[str, IndexEntry]:
        """Every original tensor, in the order it was written."""
        return self._header.index

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every stored tensor (fields and shared state), in file order."""
        return self._header.tensors

    @property
    def metadata(self) -> dict[str, Any]:
        h = self._header
        return {"format": "thawed", "format_version": h.format_version, "source": h.source,
                "settings": copy.deepcopy(h.settings)}

    @property
    def config_dir(self) -> Path:
        """The directory holding config.json and the tokenizer files."""
        return self.path

    @property
    def file_nbytes(self) -> int:
        """Size of the payload file, header included."""
        return self._header.file_nbytes

    @property
    def payload_nbytes(self) -> int:
        """Every field byte of every tensor plus the shared codec state (no header)."""
        return sum(t.nbytes for t in self._header.tensors.values())

    def shared_codecs(self) -> tuple[str, ...]:
        return tuple(self._header.shared)

    # ---- reading --------------------------------------------------------------------------------
    def _entry(self, name: str) -> IndexEntry:
        try:
            return self._header.index[name]
        except KeyError:
            raise TensorNotFoundError(
                f"{self.payload_path}: no tensor {name!r} in the index ({len(self._header.index)} tensors); "
                "check the name with `thawed inspect`"
            ) from None

    def _tensor(self, info: TensorInfo) -> Tensor:
        if self._bytes is None or self._storage is None:
            raise FormatError(f"{self.payload_path}: the checkpoint is closed; open it again")
        start = self._header.data_start + info.begin
        size = info.dtype.itemsize
        if start % size == 0:  # zero-copy view into the mapping
            return torch.empty(0, dtype=info.dtype).set_(self._storage, start // size, info.shape)
        # Unaligned for its dtype (not written by thawed): copy this field into aligned memory.
        return self._bytes[start:start + info.nbytes].clone().view(info.dtype).reshape(info.shape)

    def encoded(self, name: str) -> Encoded:
        """The tensor's payload: fields as CPU tensors (zero-copy) and its params.

        The checksum is verified on the first read of each tensor; ``ChecksumError`` names it.
        """
        entry = self._entry(name)
        fields = {f: self._tensor(self._header.tensors[field_key(name, f)]) for f in entry.fields}
        with self._lock:
            verified = name in self._verified
        if not verified:
            seed = entry.digest_seed() if self._header.format_version >= 2 else 0
            got = crc32_of((fields[f] for f in entry.fields), seed)
            if got != entry.checksum:
                raise ChecksumError(
                    f"{self.payload_path}: tensor {name!r} (fields {', '.join(entry.fields)}) has checksum "
                    f"{got}, the index says {entry.checksum}: {_REFETCH}"
                )
            with self._lock:
                self._verified.add(name)
        return Encoded(fields, copy.deepcopy(entry.params))

    def shared(self, codec: str) -> dict[str, Tensor]:
        """A codec's shared state, ``"<id>.<param>"`` -> CPU tensor; ``{}`` if it has none."""
        keys = self._header.shared.get(codec, ())
        out = {k: self._tensor(self._header.tensors[shared_key(codec, k)]) for k in keys}
        with self._lock:
            verified = codec in self._verified_shared
        if keys and not verified:
            seed = 0
            if self._header.format_version >= 2:
                infos = [self._header.tensors[shared_key(codec, k)] for k in keys]
                seed = shared_digest_seed(codec, ((k, DTYPE_TO_CODE[i.dtype], i.shape) for k, i in zip(keys, infos)))
            got, want = crc32_of(out.values(), seed), self._header.shared_checksums[codec]
            if got != want:
                raise ChecksumError(
                    f"{self.payload_path}: the shared state of codec {codec!r} ({', '.join(keys)}) has checksum "
                    f"{got}, the header says {want}: {_REFETCH}"
                )
            with self._lock:
                self._verified_shared.add(codec)
        return out

    def decode(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Tensor:
        """Decode one tensor with its codec on ``device`` (payload moved there first)."""
        entry = self._entry(name)
        dev = torch.device(device)
        enc = self.encoded(name)
        shared = self.shared(entry.codec)
        if dev.type != "cpu":
            enc = enc.to(dev)
            shared = {k: v.to(dev) for k, v in shared.items()}
        value = get_codec(entry.codec).decode(enc, entry.spec, shared, dev, dtype or entry.dtype)
        check_finite(self.payload_path, entry, value)
        return value

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop this object's mapping; tensors already returned stay valid."""
        self._bytes = None
        self._storage = None

    @property
    def closed(self) -> bool:
        return self._storage is None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Checkpoint({str(self.path)!r}, tensors={len(self.index)}, "
                f"payload_nbytes={self.payload_nbytes}, format_version={self._header.format_version})")

"""Streaming writer of thawed checkpoints (format version 2, see ``docs/FORMAT.md``).

``add`` writes a tensor's field bytes to a temporary data file at once and keeps only its offsets
and checksum, so peak memory is about one tensor. Fields go to one temporary file per element size
(8, 4, 2, 1 bytes); ``finish`` writes the header and then those files in that order, so every field
of the final file is aligned for its dtype and the reader maps it without copying (safetensors
orders its own files the same way).

One commit point: everything (data files, payload, config and tokenizer files, the marker) is
written into a hidden sibling folder ``.<out>.thawed-partial-<pid>-<random>``, and ``finish``
renames that folder onto ``out`` last. A kill at any moment leaves either no checkpoint at ``out``
or a whole one; the next writer for the same ``out`` names the leftover folder and refuses to
start until it is deleted. Files are ``0o666 & ~umask`` and the folder ``0o777 & ~umask``.

    with CheckpointWriter(out, source="HuggingFaceTB/SmolLM2-135M", settings=plan,
                          source_dir=src) as w:
        for spec, enc in ...:
            w.add(spec, codec.name, codec.version, enc)
        w.add_shared(codec.name, codec.shared_tensors())
        path = w.finish()
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from torch import Tensor

from thawed.codecs.base import ROLES, Encoded, TensorSpec, get_codec
from thawed.codecs.errors import CodecError, UnknownCodecError

from ..errors import WriterError
from ..files import public_mode, special_file_problem
from ..format import (
    DTYPE_TO_CODE,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_CHECKSUM_KEY,
    MARKER_FILE,
    MAX_DIM,
    MAX_HEADER_BYTES,
    MAX_RANK,
    NAME_TO_DTYPE,
    PAYLOAD_FILE,
    _as_bytes,
    _dumps,
    check_field_name,
    check_tensor_name,
    check_token,
    crc32_of,
    encode_header,
    encode_index,
    entry_digest_seed,
    field_key,
    index_entry_dict,
    seal_header,
    shared_digest_seed,
    shared_key,
)
from ..marker import marker_text

__all__ = ["CheckpointWriter", "check_output_path", "is_weight_file", "partial_folders", "WEIGHT_SUFFIXES"]

log = logging.getLogger(__name__)

# Files of a source model directory that are weights (not copied); everything else is copied.
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5",
    ".safetensors.index.json", ".bin.index.json",
)
_GROUP_ORDER = (8, 4, 2, 1)  # element sizes, largest first: every field stays aligned


def is_weight_file(name: str) -> bool:
    """Whether a source-directory file name holds weights (and so is not copied)."""
    return name.endswith(WEIGHT_SUFFIXES)


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.thawed-partial-"


def partial_folders(out: str | Path) -> list[Path]:
    """Temporary sibling folders that writers for ``out`` left behind (interrupted or still running)."""
    out = Path(out)
    try:
        return sorted(p for p in out.parent.iterdir() if p.name.startswith(_partial_prefix(out)))
    except OSError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def check_output_path(out: Path) -> None:
    """``out`` must be new or an empty folder, with no partial folder of an earlier writer beside it."""
    if os.path.lexists(out) and not out.is_dir():
        raise WriterError(f"output {out} exists and is not a folder; choose a new path or delete it")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
            raise WriterError(f"output folder {out} is not empty (it holds {shown}); choose a new path or delete it")
    for leftover in partial_folders(out):
        pid_text = leftover.name[len(_partial_prefix(out)):].partition("-")[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            raise WriterError(f"another thawed process (pid {pid_text}) is writing {out} into {leftover}; "
                              "wait for it to finish or stop it")
        raise WriterError(f"{leftover} is left over from an interrupted `thawed compress` of {out} (killed before "
                          f"it finished; it is not a checkpoint); delete it (rm -r '{leftover}') and run again")


def _storable_problem(t: object) -> str | None:
    """Why the format cannot store ``t`` (a field or a shared-state tensor), or None."""
    if not isinstance(t, Tensor):
        return f"is a {type(t).__name__}, not a tensor"
    if t.dtype not in DTYPE_TO_CODE:
        return f"has dtype {t.dtype}, which the format cannot store (store it as {', '.join(DTYPE_TO_CODE.values())})"
    if t.dim() > MAX_RANK:
        return f"has {t.dim()} dimensions, more than {MAX_RANK}"
    return None


@dataclass
class _Record:
    key: str
    code: str
    shape: tuple[int, ...]
    group: int  # element size
    offset: int  # within the group's temporary file
    nbytes: int


class _Group:
    """A temporary data file holding every field of one element size, in the order added."""

    def __init__(self, out_dir: Path, itemsize: int) -> None:
        fd, name = tempfile.mkstemp(dir=out_dir, prefix=f".data.{itemsize}.", suffix=".part")
        self.path = Path(name)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, t: Tensor) -> int:
        offset = self.size
        n = t.numel() * t.element_size()
        if n:
            self.file.write(_as_bytes(t))
        self.size += n
        return offset


class CheckpointWriter:
    """Writes a thawed checkpoint directory: one payload file plus the source's config files."""

    def __init__(self, out_dir: str | Path, *, source: str, settings: Mapping[str, Any],
                 source_dir: str | Path | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.source = str(source)
        self.source_dir = Path(source_dir) if source_dir is not None else None
        try:
            self._settings = _dumps(dict(settings))
        except (TypeError, ValueError) as exc:
            raise WriterError(f"compression settings must be JSON (no NaN/inf): {exc}") from None
        check_output_path(self.out_dir)
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.temp_dir = Path(tempfile.mkdtemp(dir=self.out_dir.parent,
                                                  prefix=f"{_partial_prefix(self.out_dir)}{os.getpid()}-"))
        except OSError as exc:
            raise WriterError(f"cannot create a folder beside {self.out_dir}: {exc.strerror or exc}") from None
        self._groups: dict[int, _Group] = {}
        self._records: list[_Record] = []
        self._index: list[tuple[str, dict[str, Any]]] = []
        self._names: set[str] = set()
        self._shared: dict[str, dict[str, list[str]]] = {}
        self._shared_sums: dict[str, str] = {}
        self._state = "open"  # open | finished | aborted
        self._path: Path | None = None

    # ---- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._state == "open":
                self.finish()
        elif self._state != "finished":
            self.abort()

    # ---- adding tensors -------------------------------------------------------------------------
    @property
    def payload_path(self) -> Path:
        """Where the payload file is once ``finish`` has renamed the folder into place."""
        return self.out_dir / PAYLOAD_FILE

    def _check_open(self) -> None:
        if self._state != "open":
            raise WriterError(f"the checkpoint writer for {self.out_dir} is {self._state}; nothing more can be added")

    def add(self, spec: TensorSpec, codec_name: str, codec_version: int, enc: Encoded) -> None:
        """Validate one encoded tensor against its codec, then write its fields right away."""
        self._check_open()
        name = spec.name
        problem = check_tensor_name(name)
        if problem:
            raise WriterError(f"cannot write tensor {name!r}: {problem}")
        if name in self._names:
            raise WriterError(f"tensor {name!r} was already added to {self.out_dir}; each tensor is written once")
        where = f"tensor {name!r}"
        problem = check_token(codec_name, "a codec name")
        if problem:
            raise WriterError(f"{where}: codec {codec_name!r}: {problem}")
        if isinstance(codec_version, bool) or not isinstance(codec_version, int) or codec_version < 1:
            raise WriterError(f"{where}: codec_version {codec_version!r} must be a positive integer")
        if spec.role not in ROLES:
            raise WriterError(f"{where}: role {spec.role!r} is not one of {', '.join(ROLES)}")
        if spec.dtype not in DTYPE_TO_CODE:
            raise WriterError(f"{where}: original dtype {spec.dtype} cannot be recorded (known: {', '.join(NAME_TO_DTYPE)})")
        shape = tuple(int(d) for d in spec.shape)
        if len(shape) > MAX_RANK or any(d < 0 or d > MAX_DIM for d in shape):
            raise WriterError(f"{where}: shape {list(shape)} is outside the format's bounds (rank <= {MAX_RANK}, 0 <= dim <= {MAX_DIM})")
        spec = TensorSpec(name=name, shape=shape, dtype=spec.dtype, role=spec.role)
        if not isinstance(enc.fields, dict) or not enc.fields:
            raise WriterError(f"{where}: codec {codec_name!r} produced no fields")
        try:  # what the reader will see: params after a JSON round trip
            params = json.loads(_dumps(dict(enc.params)))
        except (TypeError, ValueError) as exc:
            raise WriterError(f"{where}: codec {codec_name!r} params are not JSON (no NaN/inf): {exc}") from None

        fields: dict[str, Tensor] = {}
        for fname, t in enc.fields.items():
            problem = check_field_name(fname) or _storable_problem(t)
            if problem:
                raise WriterError(f"{where} field {fname!r}: {problem}")
            fields[fname] = t.detach()
        self._check_against_codec(spec, codec_name, codec_version, params, fields)

        # Largest element size first; stable, so the codec's order holds within a size.
        order = sorted(fields, key=lambda f: -fields[f].element_size())
        records: list[_Record] = []
        try:
            tensors = []
            for fname in order:
                t = fields[fname].to("cpu").contiguous()
                tensors.append(t)
                group = self._group(t.element_size())
                offset = group.write(t)
                records.append(_Record(field_key(name, fname), DTYPE_TO_CODE[t.dtype], tuple(t.shape),
                                       t.element_size(), offset, t.numel() * t.element_size()))
            entry = index_entry_dict(spec, codec_name, codec_version, order, params, "")
            entry["checksum"] = crc32_of(tensors, entry_digest_seed(name, entry))
        except BaseException:
            self.abort()  # a partial write leaves the temporary files inconsistent
            raise
        self._records.extend(records)
        self._names.add(name)
        self._index.append((name, entry))

    def _check_against_codec(self, spec: TensorSpec, codec_name: str, codec_version: int,
                             params: dict[str, Any], fields: Mapping[str, Tensor]) -> None:
        """The writer never produces a file its reader would reject."""
        where = f"tensor {spec.name!r}"
        try:
            cls = get_codec(codec_name)
        except UnknownCodecError as exc:
            raise WriterError(f"{where}: {exc}; import the module that defines the codec before writing") from None
        if codec_version > cls.version:
            raise WriterError(f"{where}: codec {codec_name!r} version {codec_version} is newer than the "
                              f"registered class ({cls.version})")
        try:
            expected = cls.expected_fields(spec, params)
        except NotImplementedError:
            raise WriterError(f"{where}: codec {codec_name!r} does not implement expected_fields, which the "
                              "reader needs to validate files; implement it") from None
        except CodecError as exc:
            raise WriterError(f"{where}: codec {codec_name!r} rejects its own params: {exc}") from None
        if set(expected) != set(fields):
            raise WriterError(f"{where}: codec {codec_name!r} produced fields {sorted(fields)} but its "
                              f"expected_fields says {sorted(expected)}; fix the codec")
        for fname, t in fields.items():
            want = expected[fname]
            if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
                raise WriterError(
                    f"{where} field {fname!r}: codec {codec_name!r} produced {t.dtype} {list(t.shape)} but its "
                    f"expected_fields says {want.dtype} {list(want.shape)}; fix the codec"
                )

    def add_shared(self, codec: str, tensors: Mapping[str, Tensor]) -> None:
        """Store a codec's per-file state once: keys ``"<id>.<param>"``, written sorted by (id, param)."""
        self._check_open()
        problem = check_token(codec, "a codec name")
        if problem:
            raise WriterError(f"shared state of codec {codec!r}: {problem}")
        if codec in self._shared:
            raise WriterError(f"shared state of codec {codec!r} was already added; add it once, with every key")
        if not tensors:
            return
        items: list[tuple[str, str, Tensor]] = []
        for key, t in tensors.items():
            sid, dot, param = key.partition(".") if isinstance(key, str) else ("", "", "")
            problem = (None if dot else "keys must look like '<id>.<param>'") or check_token(sid, "the id") \
                or check_token(param, "the param") or _storable_problem(t)
            if problem:
                raise WriterError(f"shared state {key!r} of codec {codec!r}: {problem}")
            items.append((sid, param, t.detach()))
        items.sort(key=lambda x: (x[0], x[1]))
        records: list[_Record] = []
        declared: dict[str, list[str]] = {}
        try:
            written = []
            for sid, param, t in items:
                t = t.to("cpu").contiguous()
                written.append(t)
                group = self._group(t.element_size())
                offset = group.write(t)
                records.append(_Record(shared_key(codec, f"{sid}.{param}"), DTYPE_TO_CODE[t.dtype], tuple(t.shape),
                                       t.element_size(), offset, t.numel() * t.element_size()))
                declared.setdefault(sid, []).append(param)
            seed = shared_digest_seed(codec, ((f"{r.key[len(shared_key(codec, '')):]}", r.code, r.shape)
                                              for r in records))
            checksum = crc32_of(written, seed)
        except BaseException:
            self.abort()
            raise
        self._records.extend(records)
        self._shared[codec] = declared
        self._shared_sums[codec] = checksum

    def _group(self, itemsize: int) -> _Group:
        group = self._groups.get(itemsize)
        if group is None:
            if itemsize not in _GROUP_ORDER:
                raise WriterError(f"element size {itemsize} is not one of {_GROUP_ORDER}")
            group = self._groups[itemsize] = _Group(self.temp_dir, itemsize)
        return group

    # ---- finishing ------------------------------------------------------------------------------
    def finish(self) -> Path:
        """Write the payload file (header, then data), the config files and the marker into the
        temporary folder, then rename it onto ``out``: the one commit point.

        Returns the payload file's path. Calling it again returns the same path.
        """
        if self._state == "finished":
            assert self._path is not None
            return self._path
        self._check_open()
        try:
            for group in self._groups.values():
                group.file.close()
            base, pos = {}, 0
            for size in _GROUP_ORDER:
                base[size] = pos
                pos += self._groups[size].size if size in self._groups else 0
            records = sorted(self._records, key=lambda r: base[r.group] + r.offset)
            metadata = {
                "format": FORMAT_NAME,
                "format_version": str(FORMAT_VERSION),
                HEADER_CHECKSUM_KEY: "crc32:00000000",  # filled in by seal_header below
                "index": encode_index(self._index),
                "shared": _dumps(self._shared),
                "shared_checksums": _dumps(self._shared_sums),
                "source": self.source,
                "settings": self._settings,
            }
            header = encode_header(metadata, (
                (r.key, r.code, r.shape, base[r.group] + r.offset, base[r.group] + r.offset + r.nbytes)
                for r in records))
            header = header[:8] + seal_header(header[8:])
            if len(header) - 8 > MAX_HEADER_BYTES:
                raise WriterError(f"the header of {self.payload_path} would be {len(header) - 8} bytes, above the "
                                  f"format's limit of {MAX_HEADER_BYTES}; shard the model")
            fd = os.open(self.temp_dir / PAYLOAD_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _pwrite_all(fd, header, 0)
                at = len(header)
                for size in _GROUP_ORDER:
                    group = self._groups.get(size)
                    if group is None or group.size == 0:
                        continue
                    src = os.open(group.path, os.O_RDONLY)
                    try:
                        _copy_range(src, fd, group.size, at)
                    finally:
                        os.close(src)
                    at += group.size
                os.fsync(fd)
            finally:
                os.close(fd)
            self._remove_temporaries()  # the data files are in the payload now
            self._copy_config_files()
            self._write_marker()
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._state = "finished"
        self._path = self.payload_path
        log.info("wrote %s: %d tensors, %d bytes", self._path, len(self._index), self._path.stat().st_size)
        return self._path

    def _write_marker(self) -> None:
        with open(self.temp_dir / MARKER_FILE, "x", encoding="ascii") as f:
            f.write(marker_text())
            f.flush()
            os.fsync(f.fileno())

    def _publish(self) -> None:
        """Readable modes (the umask decides), then the rename that makes the checkpoint appear whole."""
        file_mode, dir_mode = public_mode(), public_mode(directory=True)
        for p in self.temp_dir.iterdir():
            os.chmod(p, file_mode)
        os.chmod(self.temp_dir, dir_mode)
        _fsync_dir(self.temp_dir)
        try:
            os.rename(self.temp_dir, self.out_dir)  # replaces a missing or empty folder, atomically
        except OSError as exc:
            raise WriterError(f"cannot move the finished checkpoint {self.temp_dir} onto {self.out_dir} "
                              f"({exc.strerror or exc}); is {self.out_dir} still empty?") from None
        _fsync_dir(self.out_dir.parent)

    def _copy_config_files(self) -> None:
        src = self.source_dir
        if src is None:
            return
        if not src.is_dir():
            raise WriterError(f"source directory {src} does not exist; cannot copy its config and tokenizer files")
        for p in sorted(src.iterdir()):
            if p.is_dir() or is_weight_file(p.name) or p.name.startswith(".") or p.name == MARKER_FILE:
                continue
            problem = special_file_problem(p)
            if problem:
                raise WriterError(f"source file {p} {problem}; only regular files are copied into a checkpoint")
            shutil.copyfile(p, self.temp_dir / p.name)

    def _remove_temporaries(self) -> None:
        for group in self._groups.values():
            try:
                group.file.close()
            except OSError:
                pass
            group.path.unlink(missing_ok=True)
        self._groups.clear()

    def abort(self) -> None:
        """Delete the temporary folder and everything in it; ``out`` is left as it was. Idempotent."""
        if self._state == "finished":
            return
        self._remove_temporaries()
        self._state = "aborted"
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_range(src: int, dst: int, nbytes: int, dst_offset: int) -> None:
    """Copy ``nbytes`` from the start of ``src`` to ``dst`` at ``dst_offset`` (kernel copy when possible)."""
    done = 0
    fast = hasattr(os, "copy_file_range")
    while done < nbytes:
        chunk = min(nbytes - done, 1 << 28)
        if fast:
            try:
                n = os.copy_file_range(src, dst, chunk, done, dst_offset + done)
            except OSError:
                fast = False
                continue
        else:
            buf = os.pread(src, chunk, done)
            _pwrite_all(dst, buf, dst_offset + done)
            n = len(buf)
        if n == 0:
            raise WriterError(f"temporary data file ended after {done} of {nbytes} bytes; was it modified?")
        done += n


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

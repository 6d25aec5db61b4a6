"""Shared fixtures of the format tests: a toy codec with shared state, a tiny deterministic
checkpoint built from it, and a helper that rewrites a payload file's header."""

from __future__ import annotations

import os

import torch as _torch

# Without CUDA, the Triton kernels (thawed.codecs.kernels) run in Triton's CPU interpreter. The
# variable must be set before any kernel module is imported: triton.jit reads it at decoration.
if not _torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import pytest
import torch
from torch import Tensor

from thawed.codecs.base import Codec, EncodeContext, Encoded, FieldSpec, SharedState, TensorSpec, check_param


class ToyFormatCodec(Codec, name="toy-format-test", version=2):
    """4-bit codes (two per byte, low nibble first) into a shared 16-entry table, times a per-row scale.

    Fields: ``codes`` [rows, ceil(cols/2)] uint8, ``scale`` [rows] float16. Shared: ``0.table`` [16] f32.
    """

    TABLE = torch.linspace(-1.0, 1.0, 16)

    def __init__(self) -> None:
        pass

    def encode(self, weight: Tensor, spec: TensorSpec, ctx: EncodeContext) -> Encoded:
        rows, cols = weight.shape
        scale = weight.abs().amax(dim=1).clamp_min(1e-8).to(torch.float16)
        x = weight / scale.float()[:, None]
        codes = (x[..., None] - self.TABLE).abs().argmin(-1).to(torch.uint8)
        if cols % 2:
            codes = torch.cat([codes, torch.zeros(rows, 1, dtype=torch.uint8)], 1)
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
        return Encoded({"scale": scale, "codes": packed.contiguous()}, {"bits": 4, "note": "toy"})

    def shared_tensors(self) -> dict[str, Tensor]:
        return {"0.table": self.TABLE.clone()}

    @classmethod
    def decode(cls, enc: Encoded, spec: TensorSpec, shared: SharedState, device: torch.device,
               dtype: torch.dtype) -> Tensor:
        rows, cols = spec.shape
        p = enc.fields["codes"].to(device)
        codes = torch.stack([p & 15, p >> 4], -1).reshape(rows, -1)[:, :cols].long()
        return (shared["0.table"][codes] * enc.fields["scale"].float()[:, None]).to(dtype)

    @classmethod
    def expected_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> dict[str, FieldSpec]:
        check_param(cls.name, spec.name, params, "bits", int, 4, 4)
        rows, cols = spec.shape
        return {"codes": FieldSpec(torch.uint8, (rows, (cols + 1) // 2)),
                "scale": FieldSpec(torch.float16, (rows,))}


def build_tiny_checkpoint(out: Path, src: Path | None = None) -> Path:
    """Two raw tensors, one toy-encoded tensor and the toy codec's shared table; fixed values."""
    from thawed.codecs import get_codec
    from thawed.runtime.compress.writer import CheckpointWriter

    raw, toy = get_codec("raw")(), ToyFormatCodec()
    tensors = [
        ("model.norm.weight", torch.tensor([1.0, 0.5, -2.0, 3.0]), "other", raw),
        ("model.embed.weight", (torch.arange(6, dtype=torch.float32) / 4).reshape(3, 2).bfloat16(), "embedding", raw),
        ("model.layer.weight", ((torch.arange(15, dtype=torch.float32) - 7) / 7).reshape(3, 5), "linear", toy),
    ]
    with CheckpointWriter(out, source="tests/tiny", settings={"plan": "toy", "seed": 0}, source_dir=src) as w:
        for name, t, role, codec in tensors:
            spec = TensorSpec(name=name, shape=tuple(t.shape), dtype=t.dtype, role=role)
            w.add(spec, codec.name, codec.version, codec.encode(t, spec, EncodeContext(name=name, role=role)))
        w.add_shared(toy.name, toy.shared_tensors())
        return w.finish()


@pytest.fixture
def toy_codec() -> type[ToyFormatCodec]:
    return ToyFormatCodec


@pytest.fixture
def build_checkpoint() -> Callable[..., Path]:
    """``build_tiny_checkpoint(out, src=None) -> payload path``."""
    return build_tiny_checkpoint


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "toy"}')
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "model.safetensors.index.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"weights")
    (src / "sub" / "x.txt").write_text("no")
    return src


@pytest.fixture
def tiny_ckpt(tmp_path: Path, tiny_source: Path) -> Path:
    """A valid checkpoint directory built by ``build_tiny_checkpoint``."""
    build_tiny_checkpoint(tmp_path / "ckpt", tiny_source)
    return tmp_path / "ckpt"


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _write(path: Path, header: dict[str, Any] | str, data: bytes, reseal: bool = True) -> None:
    """Write a payload file. ``reseal``: recompute the v2 header checksum when the header has one, so a
    test reaches the check it is about instead of the header checksum (pass False to test that)."""
    from thawed.runtime.format import seal_header

    text = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode()
    if reseal:
        try:
            text = seal_header(text)
        except ValueError:  # no (or several) header_checksum entries: leave the text as it is
            pass
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit(path: Path, fn: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], None]) -> None:
    """``fn(header, index, metadata)`` edits in place; the index is re-encoded afterwards."""
    header, data = _read(path)
    meta = header["__metadata__"]
    index = json.loads(meta["index"])
    fn(header, index, meta)
    meta["index"] = json.dumps(index)
    _write(path, header, data)


@pytest.fixture
def payload_io() -> SimpleNamespace:
    """``read(path) -> (header, data)``, ``write(path, header|text, data)``, ``edit(path, fn)``."""
    return SimpleNamespace(read=_read, write=_write, edit=_edit)

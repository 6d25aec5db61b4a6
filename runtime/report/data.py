"""What ``thawed report`` shows, as plain data: bits per tensor on a layer x tensor-type grid, bytes
by codec and role, and (against the source model) weight SQNR per tensor.

SQNR is measured streaming: one tensor is decoded on the CPU, compared with the same tensor read
from the source's memory-mapped safetensors, and dropped before the next, so memory stays at about
two copies of the largest tensor whatever the model size.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from thawed.codecs.errors import ThawedError

from ..checkpoint import Checkpoint
from ..compress.source import SourceModel
from ..format import PAYLOAD_FILE
from ..inspection import inspect_checkpoint

__all__ = ["TensorRow", "ReportData", "collect_report", "sqnr_db", "split_layer"]

log = logging.getLogger(__name__)

# the order a block computes them in (Llama family); other tensor types follow by name
_KIND_ORDER = {k: i for i, k in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj",
                                           "up_proj", "gate_up_proj", "down_proj", "fc1", "fc2"))}
_LAYER = re.compile(r"^(?P<prefix>.*?\.layers?)\.(?P<idx>\d+)\.(?P<kind>.+)$")


def split_layer(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``(3, "self_attn.q_proj")``; a tensor outside
    the numbered blocks -> ``(None, name)``."""
    m = _LAYER.match(name)
    if m is None:
        return None, name
    kind = m.group("kind")
    return int(m.group("idx")), kind[: -len(".weight")] if kind.endswith(".weight") else kind


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor, chunk: int = 1 << 20) -> float:
    """Signal-to-quantisation-noise ratio, 10·log10(Σ w² / Σ (w − ŵ)²), summed in fp64 over chunks
    of ``chunk`` elements (no fp64 copy of a whole tensor); ``inf`` when the two are identical
    (lossless), ``-inf`` for an all-zero reference that was not reproduced."""
    if reference.shape != approx.shape:
        raise ValueError(f"sqnr_db: shapes differ, {tuple(reference.shape)} vs {tuple(approx.shape)}")
    ref, app = reference.detach().reshape(-1), approx.detach().reshape(-1)
    noise = signal = 0.0
    for i in range(0, ref.numel(), chunk):
        r = ref[i:i + chunk].to(torch.float64)
        signal += float(r.square().sum())
        noise += float((app[i:i + chunk].to(torch.float64) - r).square().sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass(frozen=True)
class TensorRow:
    name: str
    layer: int | None       # decoder block index, None outside the blocks
    kind: str               # "self_attn.q_proj", "input_layernorm"; the whole name outside the blocks
    codec: str
    role: str
    shape: tuple[int, ...]
    bytes: int
    bpw: float
    params: dict[str, Any]
    sqnr_db: float | None = None  # with a source: weight SQNR of the decoded tensor


@dataclass
class ReportData:
    path: str
    tensors: list[TensorRow]
    linear: dict[str, Any]                       # inspect's linear totals
    total: dict[str, Any]                        # inspect's whole-file totals
    bytes_by_codec_role: dict[str, dict[str, int]]
    shared_bytes: dict[str, int]                 # codec -> bytes of its per-file shared state
    header_bytes: int
    source: str | None                           # the source recorded in the checkpoint
    settings: dict[str, Any] | None
    against: str | None = None                   # the source the SQNR was measured against
    sqnr_seconds: float | None = None

    @property
    def layers(self) -> list[int]:
        return sorted({t.layer for t in self.tensors if t.layer is not None})

    @property
    def kinds(self) -> list[str]:
        """Tensor types inside the blocks that hold at least one coded (non-raw) tensor, in first-seen order."""
        seen: dict[str, None] = {}
        for t in self.tensors:
            if t.layer is not None and t.codec != "raw":
                seen.setdefault(t.kind, None)
        return sorted(seen, key=lambda k: (_KIND_ORDER.get(k.rsplit(".", 1)[-1], len(_KIND_ORDER)), k))

    def grid(self, value: Callable[[TensorRow], float | None]) -> list[list[float | None]]:
        """``[layer][kind]`` -> value (None where the block has no such tensor)."""
        cells = {(t.layer, t.kind): value(t) for t in self.tensors if t.layer is not None}
        return [[cells.get((layer, kind)) for kind in self.kinds] for layer in self.layers]

    def outside(self) -> list[TensorRow]:
        """Coded tensors outside the numbered blocks (embeddings, an untied head)."""
        return [t for t in self.tensors if t.layer is None and t.codec != "raw"]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for t in d["tensors"]:
            t["shape"] = list(t["shape"])
            if t["sqnr_db"] is not None and not math.isfinite(t["sqnr_db"]):
                t["sqnr_db"] = str(t["sqnr_db"])  # JSON has no inf
        return d


def collect_report(ckpt: Checkpoint, against: str | Path | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> ReportData:
    """Gather everything the report shows. With ``against``, decode every coded tensor on the CPU,
    one at a time, and measure its SQNR against the source model's tensor of the same name."""
    info = inspect_checkpoint(ckpt)
    rows: list[TensorRow] = []
    by_codec_role: dict[str, dict[str, int]] = {}
    for r in info["tensors"]:
        layer, kind = split_layer(r["name"])
        rows.append(TensorRow(name=r["name"], layer=layer, kind=kind, codec=r["codec"], role=r["role"],
                              shape=tuple(r["shape"]), bytes=r["bytes"], bpw=r["bpw"], params=r["params"]))
        role = "norm/bias" if r["codec"] == "raw" and r["role"] == "other" else r["role"]
        slot = by_codec_role.setdefault(r["codec"], {})
        slot[role] = slot.get(role, 0) + r["bytes"]
    shared = {}
    for codec in ckpt.shared_codecs():
        shared[codec] = sum(ckpt.tensors[k].nbytes for k in ckpt.tensors if k.startswith(f"__codec__.{codec}."))
    header = ckpt.file_nbytes - ckpt.payload_nbytes
    data = ReportData(path=str(ckpt.path), tensors=rows, linear=info["linear"], total=info["total"],
                      bytes_by_codec_role=by_codec_role, shared_bytes=shared, header_bytes=header,
                      source=info["source"], settings=info["settings"])
    if against is not None:
        t0 = time.perf_counter()
        data.tensors = _with_sqnr(ckpt, rows, Path(against), progress)
        data.against = str(against)
        data.sqnr_seconds = round(time.perf_counter() - t0, 2)
    return data


def _with_sqnr(ckpt: Checkpoint, rows: list[TensorRow], src_dir: Path,
               progress: Callable[[int, int, str], None] | None) -> list[TensorRow]:
    if (src_dir / PAYLOAD_FILE).exists():
        raise ThawedError(f"--against {src_dir} is a thawed checkpoint; give the dense Hugging Face directory "
                          f"{ckpt.path} was compressed from (it records {ckpt.metadata.get('source')!r})")
    with SourceModel(src_dir) as src:
        have = set(src.names())
        missing = [r.name for r in rows if r.codec != "raw" and r.name not in have]
        if missing:
            raise ThawedError(
                f"--against {src_dir}: tensor {missing[0]!r} (and {len(missing) - 1} more) of {ckpt.path} is not in "
                "that model; give the Hugging Face directory the checkpoint was compressed from "
                f"(it records {ckpt.metadata.get('source')!r})")
        out = []
        todo = [r for r in rows if r.codec != "raw"]
        done = 0
        for r in rows:
            if r.codec == "raw":
                out.append(r)
                continue
            shape, _ = src.shape_dtype(r.name)
            if tuple(shape) != tuple(r.shape):
                raise ThawedError(
                    f"--against {src_dir}: tensor {r.name!r} has shape {list(shape)} there and {list(r.shape)} in "
                    f"{ckpt.path}; give the model the checkpoint was compressed from")
            decoded = ckpt.decode(r.name, "cpu", torch.float32)
            value = sqnr_db(src.get(r.name), decoded)
            del decoded
            out.append(TensorRow(**{**asdict(r), "shape": r.shape, "sqnr_db": value}))
            done += 1
            if progress is not None:
                progress(done, len(todo), r.name)
        log.info("SQNR of %d tensors against %s", done, src_dir)
    return out

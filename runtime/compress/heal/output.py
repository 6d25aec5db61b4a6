"""Write the healed checkpoint: every tensor with its codec, params and field layout unchanged, the
trainable fields replaced by their healed values in the stored dtype, shared codec state copied,
and the healing record added to the settings (``thawed inspect`` shows it: ``inspection.healed_summary``)."""

from __future__ import annotations

from pathlib import Path

from ..writer import CheckpointWriter
from .fields import TrainableCheckpoint

__all__ = ["write_healed"]


def write_healed(tc: TrainableCheckpoint, out: str | Path, record: dict) -> Path:
    ckpt = tc.ckpt
    meta = ckpt.metadata
    settings = dict(meta.get("settings") or {})
    settings["healing"] = record
    with CheckpointWriter(out, source=str(meta.get("source") or ""), settings=settings, source_dir=ckpt.config_dir) as w:
        for name, entry in ckpt.index.items():
            w.add(entry.spec, entry.codec, entry.codec_version, tc.encoded(name))
        for codec in ckpt.shared_codecs():
            w.add_shared(codec, ckpt.shared(codec))
        return w.finish()

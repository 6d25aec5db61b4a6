"""Read a Hugging Face model directory tensor by tensor (safetensors, single file or sharded)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from thawed.codecs.errors import ThawedError

__all__ = ["SourceModel"]


class SourceModel:
    """A source model directory: its config and a lazy, tensor-at-a-time view of its weights.

    Only one tensor is materialised at a time (safetensors memory-maps the files), so compressing
    never holds the model twice.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ThawedError(
                f"{self.path} is not a Hugging Face model directory (no config.json); "
                "pass the folder that holds config.json and *.safetensors (`thawed demo-model` prints one)"
            )
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.path / fname for name, fname in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                others = [p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
                hint = f" (found {', '.join(others)}: convert to safetensors first)" if others else ""
                raise ThawedError(f"{self.path} holds no *.safetensors weights{hint}")
            self._files = {}
            for f in files:
                with safe_open(f, framework="pt") as sf:
                    for name in sf.keys():
                        self._files[name] = f
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._files)

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = self._stack.enter_context(safe_open(f, framework="pt"))
        return self._handles[f]

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        sl = self._handle(self._files[name]).get_slice(name)
        dtype = _ST_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise ThawedError(f"tensor {name!r} in {self._files[name].name} has unsupported dtype {sl.get_dtype()}")
        return tuple(sl.get_shape()), dtype

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self._files[name]).get_tensor(name)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._files:
            yield name, self.get(name)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "SourceModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}

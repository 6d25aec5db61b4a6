"""Open a model for inference: a thawed checkpoint (lazy) or an ordinary HF directory (dense).

``eval`` and ``generate`` take either, so the dense baseline is measured by the same code.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from thawed.codecs.errors import ThawedError

from .errors_text import one_line
from .files import read_json_file
from .native import is_native
from .marker import is_thawed_folder
from .model import LazyModel, RuntimeConfig, resolve_device, resolve_dtype

__all__ = ["Loaded", "forward_logits", "is_checkpoint", "load_for_inference", "load_tokenizer"]


def is_checkpoint(path: str | Path) -> bool:
    """A thawed checkpoint folder (marker or payload entry, in any state) or a payload file.

    Such a path is only ever opened by the thawed reader, never by the dense loader."""
    p = Path(path)
    return is_thawed_folder(p) or (os.path.lexists(p) and not p.is_dir() and p.name.endswith(".safetensors"))


def load_tokenizer(path: str | Path, fast: bool = False):
    """transformers' ``AutoTokenizer`` for the folder; with ``fast``, the ``tokenizers``-only one
    (runtime/tokenizer.py) where it tokenizes the same, which spares the transformers import."""
    if fast:
        from .tokenizer import load_fast_tokenizer

        tok = load_fast_tokenizer(path)
        if tok is not None:
            return tok
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizer files are input: every failure is the folder's
        raise ThawedError(f"cannot load the tokenizer from {path}: {one_line(exc)}; copy the source model's "
                          "tokenizer files again") from None


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    device: torch.device
    eos_token_ids: tuple[int, ...]
    kind: str  # "thawed" | "dense"
    load_seconds: float
    lazy: LazyModel | None = None

    def close(self) -> None:
        if self.lazy is not None:
            self.lazy.close()


def _eos_ids(model: nn.Module, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def load_for_inference(path: str | Path, config: RuntimeConfig = RuntimeConfig(), chat: bool = False) -> Loaded:
    """The model and tokenizer of a checkpoint or a dense HF folder. A native model
    (``config.skeleton``, runtime/native.py) gets the ``tokenizers``-only tokenizer when it can, unless
    ``chat`` (chat templates are transformers')."""
    t0 = time.perf_counter()
    path = Path(path)
    if is_checkpoint(path):
        lazy = LazyModel.load(path, config)
        model = lazy.model
        native = is_native(model)
        tokenizer = load_tokenizer(lazy.checkpoint.config_dir, fast=native and not chat)
        _attach_generation_config(model, lazy.checkpoint.config_dir, native)
        return Loaded(model, tokenizer, lazy.device, _eos_ids(model, tokenizer), "thawed",
                      time.perf_counter() - t0, lazy)
    if not (path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))):
        raise ThawedError(f"{path} is neither a thawed checkpoint nor a Hugging Face model directory with "
                          "config.json and .safetensors weights (pickled .bin weights are never loaded)")
    from transformers import AutoModelForCausalLM

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    try:  # safetensors only: a pickle in the folder is never unpickled
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True).to(device).eval()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ThawedError(f"cannot load the dense model in {path}: {one_line(exc)}") from None
    tokenizer = load_tokenizer(path)
    return Loaded(model, tokenizer, device, _eos_ids(model, tokenizer), "dense", time.perf_counter() - t0)


def forward_logits(path: str | Path, input_ids: Tensor, config: RuntimeConfig = RuntimeConfig()) -> Tensor:
    """Load ``path`` (a thawed checkpoint or a dense folder), run one full forward of ``input_ids``
    ``[B, T]`` without a KV cache, close it, and return the logits ``[B, T, vocab]``: the check that a
    written checkpoint reloads to the model it was written from (healing, tests)."""
    loaded = load_for_inference(path, config)
    try:
        with torch.no_grad():
            return loaded.model(input_ids=input_ids, use_cache=False).logits
    finally:
        loaded.close()


def _attach_generation_config(model: nn.Module, folder: Path, native: bool = False) -> None:
    if native:  # its EOS ids only: reading the JSON spares the transformers import
        try:
            raw = read_json_file(Path(folder) / "generation_config.json", "generation_config.json")
        except ValueError:
            return
        if isinstance(raw, dict) and raw.get("eos_token_id") is not None:
            model.generation_config.eos_token_id = raw["eos_token_id"]
        return
    if (Path(folder) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        except (OSError, ValueError):
            pass

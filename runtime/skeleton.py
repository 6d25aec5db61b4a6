"""Build a transformers model with no weights, and tell which tensors are linears, embeddings, heads.

Parameters go on the meta device (no memory, no init); buffers stay real. Building the whole
model under ``torch.device("meta")`` would also put RoPE's ``inv_freq`` on meta, which silently
breaks positions, so only parameter registration is redirected (accelerate's
``init_empty_weights(include_buffers=False)``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .errors_text import one_line
from .files import read_json_file
from .validate import check_config_json

__all__ = ["SKELETONS", "load_config", "build_skeleton", "build_model", "tensor_roles", "tied_sources"]

log = logging.getLogger(__name__)

# How the model is built: "transformers" (its own classes: every architecture, every entry point),
# "native" (runtime/native.py: Llama-family only, no transformers import, runs only through the
# fast decode path), "auto" (native where it can be, else transformers).
SKELETONS = ("auto", "native", "transformers")


def _raw_config(path: str | Path) -> dict:
    cfg_file = Path(path) / "config.json"
    try:  # regular file, bounded size and nesting, valid JSON object: before anything reads it
        raw = read_json_file(cfg_file, "config.json")
        if not isinstance(raw, dict):
            raise ValueError("config.json is not a JSON object")
    except ValueError as exc:
        raise ConfigError(f"{cfg_file}: {exc}. The folder needs the config.json of a transformers model") from None
    check_config_json(raw, cfg_file)
    return raw


def load_config(path: str | Path, skeleton: str = "transformers"):
    """The folder's config.json as a transformers config, or as a ``NativeConfig`` when ``skeleton``
    is "native" or "auto" and the architecture has a native model; one-line ``ConfigError`` when
    it cannot be read (or "native" was asked for and is not possible)."""
    if skeleton not in SKELETONS:
        raise ConfigError(f"--skeleton {skeleton!r} is not one of {', '.join(SKELETONS)}")
    raw = _raw_config(path)
    if skeleton != "transformers":
        from .native import native_config

        cfg = native_config(raw)
        if not isinstance(cfg, str):
            return cfg
        if skeleton == "native":
            raise ConfigError(f"{Path(path) / 'config.json'}: {cfg}; use --skeleton transformers (or auto)")
        log.info("building the model with transformers: %s", cfg)
    from transformers import AutoConfig

    cfg_file = Path(path) / "config.json"
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - config.json is input: any failure is the file's, not a bug
        raise ConfigError(
            f"cannot read the model config {cfg_file}: {one_line(exc)}. The folder needs the config.json "
            "of a transformers model"
        ) from None


def build_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a ``load_config`` result: native for a ``NativeConfig``, else transformers'."""
    from .native import NativeConfig, build_native

    if isinstance(config, NativeConfig):
        return build_native(config, dtype)
    return build_skeleton(config, dtype)


def build_skeleton(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal-LM of ``config``'s architecture with parameters on meta and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, ArithmeticError, RuntimeError,
            MemoryError) as exc:  # a config transformers cannot build is input, not a bug
        raise ConfigError(
            f"transformers cannot build a causal LM for model_type {getattr(config, 'model_type', '?')!r}: "
            f"{one_line(exc)}"
        ) from None
    model.eval()
    model.requires_grad_(False)
    return model


def tensor_roles(model: nn.Module) -> dict[str, str]:
    """Parameter name -> role: ``linear`` | ``embedding`` | ``lm_head`` | ``other``.

    Roles come from module types, so the plan works for any decoder-only architecture whose
    projections are ``nn.Linear`` (Llama, Mistral, Qwen2/3, Gemma 2/3 ...), not from name tables.
    """
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    roles: dict[str, str] = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if pname == "weight" and out_emb is not None and mod is out_emb:
                role = "lm_head"
            elif pname == "weight" and isinstance(mod, nn.Embedding):
                role = "embedding"
            elif pname == "weight" and isinstance(mod, nn.Linear):
                role = "linear"
            else:
                role = "other"
            roles[full] = role
    return roles


def tied_sources(model: nn.Module) -> dict[str, str]:
    """Tied parameter name -> the name whose tensor it shares (e.g. lm_head -> embed_tokens)."""
    tied: dict[str, str] = {}
    keys = getattr(model, "_tied_weights_keys", None)
    cfg = getattr(model, "config", None)
    want_tie = bool(getattr(cfg, "tie_word_embeddings", False))
    if isinstance(keys, dict) and want_tie:
        tied.update(keys)
    elif want_tie and hasattr(model, "get_output_embeddings"):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        if out_emb is not None and in_emb is not None:
            tied[f"{names[id(out_emb)]}.weight"] = f"{names[id(in_emb)]}.weight"
    # Parameters that are literally the same object are tied too.
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        first.setdefault(id(p), name)
    return tied

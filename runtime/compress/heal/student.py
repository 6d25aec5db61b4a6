"""The dense teacher and the compressed student as one module structure.

The teacher is the source model (float32, frozen). The student is a copy whose weights are
substituted, on every call, by the tensors decoded from the trainable fields
(``torch.func.functional_call``; tied embeddings stay tied). A codec's output correction (cvxq's
stored bias) becomes a fixed bias of the student's linear layer, as the runtime adds it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from thawed.codecs import get_codec
from thawed.codecs.errors import ThawedError

from ...checkpoint import Checkpoint

__all__ = ["load_teacher", "make_student", "decoder_layers", "layer_inputs", "run_layer", "run_model"]


def load_teacher(src: str | Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ThawedError(f"cannot load the dense source model {src} ({type(exc).__name__}: {str(exc)[:200]}); "
                          "give its Hugging Face directory with --source DIR") from None
    model.eval().requires_grad_(False)
    model.config.use_cache = False
    return model


def make_student(teacher: nn.Module, ckpt: Checkpoint) -> nn.Module:
    student = copy.deepcopy(teacher)
    for name, entry in ckpt.index.items():
        cls = get_codec(entry.codec)
        if not cls.has_output_bias(entry.params):
            continue
        module = student.get_submodule(name.rsplit(".", 1)[0])
        bias = cls.decode_output_bias(ckpt.encoded(name), entry.spec, torch.device("cpu"), torch.float32)
        if bias is None:
            continue
        if getattr(module, "bias", None) is None:
            module.bias = nn.Parameter(bias.clone(), requires_grad=False)
        else:
            module.bias = nn.Parameter(module.bias.detach() + bias, requires_grad=False)
    return student


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers' ``ModuleList`` and its name (``model.layers`` for Llama-family models)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module):
            return name, module
    raise ThawedError(f"{type(model).__name__} has no decoder-layer list (a ModuleList named *layers); "
                      "block-wise healing needs one: run --stages e2e")


class _Stop(Exception):
    pass


def layer_inputs(model: nn.Module, weights: dict[str, Tensor] | None, ids: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """Hidden states entering the first decoder layer for ``ids`` and the keyword arguments the model
    passes to every layer (rotary embeddings, mask), stopping the forward there."""
    _, layers = decoder_layers(model)
    got: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        got["x"] = args[0] if args else kwargs.pop("hidden_states")
        got["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_model(model, weights, ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["x"], got["kw"]


def run_layer(layer: nn.Module, weights: dict[str, Tensor] | None, x: Tensor, kw: dict[str, Any]) -> Tensor:
    out = functional_call(layer, weights, (x,), kw) if weights else layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def run_model(model: nn.Module, weights: dict[str, Tensor] | None, ids: Tensor) -> Tensor:
    kw = {"input_ids": ids, "use_cache": False}
    out = functional_call(model, weights, (), kw) if weights else model(**kw)
    return out.logits

"""A Llama-family model built without transformers, for the fast decode path.

Importing transformers and building a model through it is most of a process's start-up here:
``import transformers`` plus its model and tokenizer modules takes 4-6 s on the project's 2-core
machine against 2-3 s for torch itself (``python -X importtime``; docs/SPEED.md). ``Stepper``
(runtime/stepper.py) only needs the modules that hold the weights and the rotary table, so for the
architectures it runs (llama, mistral without a sliding window, qwen2) this module builds them
directly from ``config.json``: the same module tree and parameter names as transformers'
``*ForCausalLM`` (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj`` ...), so the lazy
loader, the execution modes and the checkpoint index work unchanged.

The model has no ``forward``: it runs through ``Stepper`` only. Anything else (``thawed eval``, the
server's prompt logprobs, ``--no-fast``) builds the transformers model (``RuntimeConfig.skeleton``).
``tests/test_native.py`` checks that the two give the same logits and greedy tokens.

Supported: ``hidden_act`` silu, RoPE without scaling (``rope_type`` default), no sliding window in
use; ``native_config`` says why not otherwise, and the caller falls back to transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NativeConfig", "native_config", "build_native", "NativeCausalLM", "NativeRMSNorm", "is_native"]

_TYPES = ("llama", "mistral", "qwen2")
_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}  # transformers' config defaults


@dataclass(frozen=True)
class NativeConfig:
    """The fields of a Llama-family config.json that the native model and ``Stepper`` use; the
    names are transformers' (``Stepper`` reads them with ``getattr``)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: str = "silu"
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None  # never in use here: a config that uses one is not native
    use_sliding_window: bool = False


def _rope(raw: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """(rope_theta, why not) from the legacy ``rope_theta``/``rope_scaling`` keys or transformers 5's
    ``rope_parameters``."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    for p in (params, scaling):
        if isinstance(p, Mapping):
            kind = p.get("rope_type", p.get("type", "default"))
            if kind not in (None, "default"):
                return None, f"RoPE type {kind!r} has no native path"
            if theta is None and p.get("rope_theta") is not None:
                theta = p["rope_theta"]
        elif p is not None:
            return None, f"rope parameters {p!r} are not a mapping"
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        return None, "partial rotary embeddings have no native path"
    if theta is None:
        theta = 10000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        return None, f"rope_theta={theta!r} is not a positive number"
    return float(theta), None


def native_config(raw: Mapping[str, Any]) -> NativeConfig | str:
    """``config.json``'s content -> a ``NativeConfig``, or one line saying why it has no native model.

    Sizes are checked beforehand by ``validate.check_config_json``."""
    mtype = raw.get("model_type")
    if mtype not in _TYPES:
        return f"model_type {mtype!r} has no native model (supported: {', '.join(_TYPES)})"
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r} has no native path (silu only)"
    theta, why = _rope(raw)
    if why is not None:
        return why
    use_sw = bool(raw.get("use_sliding_window", mtype == "mistral"))
    window = raw.get("sliding_window", 4096 if mtype == "mistral" else None)  # MistralConfig's default
    if window and use_sw:
        return "sliding-window attention has no native path"
    if raw.get("layer_types") and any(t != "full_attention" for t in raw["layer_types"]):
        return "layers other than full attention have no native path"
    try:
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        qkv_bias = mtype == "qwen2" or bool(raw.get("attention_bias", False))
        return NativeConfig(
            model_type=mtype, vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]), num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=head_dim, rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            max_position_embeddings=int(raw.get("max_position_embeddings") or _MAX_POSITIONS[mtype]),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
            o_bias=mtype == "llama" and bool(raw.get("attention_bias", False)),
            mlp_bias=mtype == "llama" and bool(raw.get("mlp_bias", False)), hidden_act="silu",
            eos_token_id=raw.get("eos_token_id"), bos_token_id=raw.get("bos_token_id"),
            pad_token_id=raw.get("pad_token_id"), sliding_window=window,
            use_sliding_window=use_sw)
    except (KeyError, TypeError, ValueError) as exc:
        return f"config.json lacks a usable {exc} for a native model"


class NativeRMSNorm(nn.Module):
    """Llama's RMSNorm (``weight``, ``variance_epsilon``, as transformers names them)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.variance_epsilon).to(x.dtype) * self.weight


class NativeRotary(nn.Module):
    """RoPE's cos/sin for given positions, computed as transformers' default rotary embedding does
    (``inv_freq`` in fp32, ``cat(freqs, freqs)``), so the tables are the same numbers."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exps = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta ** exps), persistent=False)

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _meta(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta", dtype=dtype), requires_grad=False)


def _linear(i: int, o: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` with its parameters on meta, made without ``reset_parameters``: random init on
    meta runs torch's Python decompositions, whose first use imports torch._dynamo (3.5 s here)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = i, o
    lin.weight = _meta(o, i, dtype=dtype)
    lin.bias = _meta(o, dtype=dtype) if bias else None
    return lin


def _embedding(n: int, d: int, dtype: torch.dtype) -> nn.Embedding:
    """An ``nn.Embedding`` on meta; a given ``_weight`` skips the random init (as for ``_linear``)."""
    return nn.Embedding(n, d, _weight=_meta(n, d, dtype=dtype), _freeze=True)


class NativeAttention(nn.Module):
    def __init__(self, c: NativeConfig, dtype: torch.dtype) -> None:
        super().__init__()
        hd = c.head_dim
        self.q_proj = _linear(c.hidden_size, c.num_attention_heads * hd, c.qkv_bias, dtype)
        self.k_proj = _linear(c.hidden_size, c.num_key_value_heads * hd, c.qkv_bias, dtype)
        self.v_proj = _linear(c.hidden_size, c.num_key_value_heads * hd, c.qkv_bias, dtype)
        self.o_proj = _linear(c.num_attention_heads * hd, c.hidden_size, c.o_bias, dtype)
        self.scaling = hd ** -0.5


class NativeMlp(nn.Module):
    def __init__(self, c: NativeConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtype)
        self.act_fn = nn.SiLU()


class NativeDecoderLayer(nn.Module):
    def __init__(self, c: NativeConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = NativeAttention(c, dtype)
        self.mlp = NativeMlp(c, dtype)
        self.input_layernorm = NativeRMSNorm(c.hidden_size, c.rms_norm_eps, dtype, "meta")
        self.post_attention_layernorm = NativeRMSNorm(c.hidden_size, c.rms_norm_eps, dtype, "meta")


class NativeBackbone(nn.Module):
    def __init__(self, c: NativeConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = _embedding(c.vocab_size, c.hidden_size, dtype)
        self.layers = nn.ModuleList(NativeDecoderLayer(c, dtype) for _ in range(c.num_hidden_layers))
        self.norm = NativeRMSNorm(c.hidden_size, c.rms_norm_eps, dtype, "meta")
        self.rotary_emb = NativeRotary(c.head_dim, c.rope_theta)


class NativeCausalLM(nn.Module):
    """The module tree of transformers' ``LlamaForCausalLM`` with parameters on meta. It runs
    through ``Stepper``; calling it directly is an error that says so."""

    def __init__(self, c: NativeConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = c
        self.model = NativeBackbone(c, dtype)
        self.lm_head = _linear(c.hidden_size, c.vocab_size, False, dtype)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter: skeleton.tied_sources
        self.generation_config = SimpleNamespace(eos_token_id=c.eos_token_id)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this model was built without transformers and runs only through the fast decode "
                           "path (runtime/stepper.py); load it with RuntimeConfig(skeleton='transformers') "
                           "(`--skeleton transformers`) to call its forward")


def build_native(c: NativeConfig, dtype: torch.dtype = torch.float32) -> NativeCausalLM:
    """The native model of ``c`` with parameters on meta and the rotary buffer real, in eval mode."""
    model = NativeCausalLM(c, dtype)
    model.eval()
    return model


def is_native(model: nn.Module) -> bool:
    return isinstance(model, NativeCausalLM)

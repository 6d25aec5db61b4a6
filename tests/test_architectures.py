"""The plan and the lazy runtime are architecture-generic: tiny random Mistral, Qwen2 (q/k/v
biases), Qwen3 (q/k norms), Gemma 2 and Gemma 3 (scaled embeddings, tied head) compress and run
lazily with logits equal to the dense model holding the same decoded weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from models_fixtures import make_tokenizer
from transformers import AutoModelForCausalLM

from thawed.runtime.checkpoint import Checkpoint
from thawed.runtime.compress.pipeline import compress
from thawed.runtime.compress.plan import Plan, parse_codec_choice
from thawed.runtime.model import LazyModel, RuntimeConfig

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, head_dim=16)
ARCHS = {
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "gemma2": ("Gemma2Config", {"tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_round_trip(arch, tmp_path):
    cls_name, extra = ARCHS[arch]
    cfg_cls = getattr(transformers, cls_name, None)
    if cfg_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    src = tmp_path / "src"
    src.mkdir()
    tok = make_tokenizer(src)
    cfg = cfg_cls(vocab_size=len(tok), **COMMON, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    model.save_pretrained(src)

    out = tmp_path / "ck"
    compress(src, out, Plan(parse_codec_choice("rtn:bits=6,group_size=16")), progress=False)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with Checkpoint.open(out) as ckpt, torch.no_grad():
        linear = [n for n, e in ckpt.index.items() if e.role == "linear"]
        assert len(linear) == 2 * 7, linear  # q k v o gate up down per layer
        assert all(ckpt.index[n].codec == "rtn" for n in linear)
        assert all(e.codec == "raw" for e in ckpt.index.values() if len(e.shape) == 1)
        for name, p in dense.named_parameters():
            key = name if name in ckpt.index else "model.embed_tokens.weight"
            p.copy_(ckpt.decode(key, dtype=torch.float32))
    ids = torch.tensor([[1, 4, 7, 9, 12, 3]])
    with LazyModel.load(out, RuntimeConfig(device="cpu", direct="off")) as lm, torch.inference_mode():
        got = lm(input_ids=ids).logits
        want = dense(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)

"""End to end on the real SmolLM2-135M-Instruct (converted once into the cache folder).

* rtn 4-bit g128: greedy generation of "The capital of France is" names Paris.
* lossless: logits bit-identical to the dense fp32 model.
"""

from __future__ import annotations

import pytest
import torch
from models_fixtures import real_model_dir  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

from thawed.runtime.compress import compress
from thawed.runtime.generate import SamplingParams, generate_tokens
from thawed.runtime.loading import load_for_inference
from thawed.runtime.model import RuntimeConfig
from thawed.runtime.plan import Plan, parse_codec_choice

pytestmark = pytest.mark.real


def test_rtn4_generates_paris(real_model_dir, tmp_path):
    ckpt = tmp_path / "rtn4"
    compress(real_model_dir, ckpt, Plan(parse_codec_choice("rtn:bits=4,group_size=128")), progress=False)
    loaded = load_for_inference(ckpt, RuntimeConfig(device="cpu"))
    try:
        ids = loaded.tokenizer("The capital of France is")["input_ids"]
        out = [s.token for s in generate_tokens(loaded.model, ids, SamplingParams(max_new_tokens=8),
                                                loaded.eos_token_ids)]
        text = loaded.tokenizer.decode(out)
        assert "Paris" in text, text
        assert loaded.lazy is not None and loaded.lazy.cache.stats().decodes > 0
    finally:
        loaded.close()


def test_lossless_logits_bit_identical_to_dense(real_model_dir, tmp_path):
    ckpt = tmp_path / "lossless"
    compress(real_model_dir, ckpt, Plan(parse_codec_choice("lossless")), progress=False)
    size = (ckpt / "model.thawed.safetensors").stat().st_size
    source = (real_model_dir / "model.safetensors").stat().st_size
    assert size < source, "lossless should be smaller than the fp32 source"
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. Paris is")["input_ids"]])
    dense = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = dense(input_ids=ids).logits
    del dense
    loaded = load_for_inference(ckpt, RuntimeConfig(device="cpu"))
    try:
        with torch.inference_mode():
            got = loaded.model(input_ids=ids).logits
    finally:
        loaded.close()
    assert torch.equal(got, want)

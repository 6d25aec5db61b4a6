"""End to end on the real SmolLM2-135M-Instruct (converted once into the cache folder).

* rtn 4-bit g128: greedy generation of "The capital of France is" names Paris.
* lossless: logits bit-identical to the dense fp32 model.
"""

from __future__ import annotations

import pytest
import torch
from models_fixtures import real_model_dir  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

from thawed.runtime.compress.pipeline import compress
from thawed.runtime.compress.plan import Plan, parse_codec_choice
from thawed.runtime.generate import SamplingParams, generate_tokens
from thawed.runtime.loading import load_for_inference
from thawed.runtime.model import RuntimeConfig

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def rtn4(real_model_dir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("real") / "rtn4"
    compress(real_model_dir, ckpt, Plan(parse_codec_choice("rtn:bits=4,group_size=128")), progress=False)
    return ckpt


@pytest.mark.parametrize("direct", ["on", "off"])
def test_rtn4_generates_paris(rtn4, direct):
    loaded = load_for_inference(rtn4, RuntimeConfig(device="cpu", direct=direct))
    try:
        ids = loaded.tokenizer("The capital of France is")["input_ids"]
        out = [s.token for s in generate_tokens(loaded.model, ids, SamplingParams(max_new_tokens=8),
                                                loaded.eos_token_ids)]
        text = loaded.tokenizer.decode(out)
        assert "Paris" in text, text
        stats, modes = loaded.lazy.cache.stats(), loaded.lazy.mode_summary()["modes"]
        if direct == "on":  # every linear runs from its codes (the tied head too); nothing decoded
            assert modes == {"direct": 211, "rowwise": 1} and stats.decodes == 0
        else:
            assert modes == {"resident": 212} and stats.decodes == 211
    finally:
        loaded.close()


def test_fast_and_direct_paths_give_eager_tokens(rtn4):
    """64 greedy tokens on SmolLM2: the fast path equals transformers' eager forward over the same
    layers (resident fp32 and direct). (The compiled step is held to eager tokens on the tiny model
    here and on SmolLM2 by ``benchmarks/speed.py --compile``: its compile takes minutes on 2 cores.)"""
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    for direct in ("off", "on"):
        loaded = load_for_inference(rtn4, RuntimeConfig(device="cpu", direct=direct))
        try:
            ids = loaded.tokenizer("The capital of France is")["input_ids"]
            eager = [s.token for s in generate_tokens(loaded.model, ids, params, fast=False)]
            assert [s.token for s in generate_tokens(loaded.model, ids, params)] == eager
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

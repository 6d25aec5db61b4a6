"""The ring streaming mode (runtime/ring.py): decoder layers streamed through preallocated slots.

On the CPU the ring decodes with the PyTorch decoders (``ring="on"``); on CUDA with the Triton
kernels and inside CUDA graphs (the GPU test skips without CUDA)."""

from __future__ import annotations

import pytest
import torch
from models_fixtures import make_tiny_llama  # noqa: F401

from thawed.runtime.compress.pipeline import compress
from thawed.runtime.compress.plan import Plan, parse_codec_choice
from thawed.runtime.cuda_graphs import hooks_left
from thawed.runtime.generate import SamplingParams, generate_tokens
from thawed.runtime.model import LazyModel, RuntimeConfig, layer_index

PROMPT = [1, 5, 9, 13, 4, 7]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    src = make_tiny_llama(tmp_path_factory.mktemp("ring-src"), layers=4)
    out = tmp_path_factory.mktemp("ring") / "ckpt"
    compress(src, out, Plan(parse_codec_choice("rtn:bits=4,group_size=32")), progress=False)
    return out


def _tokens(path, device="cpu", fast=True, **conf) -> tuple[list[int], LazyModel]:
    lm = LazyModel.load(path, RuntimeConfig(device=device, direct="off", **conf))
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    toks = [s.token for s in generate_tokens(lm.model, PROMPT, params, fast=fast)]
    return toks, lm


def test_layer_index_reads_module_names():
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("layers.0.self_attn.q_proj") == 0
    assert layer_index("model.embed_tokens") is None
    assert layer_index("lm_head") is None


@pytest.mark.parametrize("budget", [-300, -600])
@pytest.mark.parametrize("fast", [True, False])
def test_ring_gives_the_resident_models_tokens(ckpt, budget, fast):
    ref, lm_ref = _tokens(ckpt, fast=fast)
    got, lm = _tokens(ckpt, fast=fast, cache_budget=budget, ring="on")
    try:
        ring = lm.ring
        assert ring is not None and set(lm.modes.values()) >= {"ring"}
        assert sorted(ring.order) == [0, 1, 2, 3]
        assert ring.loads > 0
        # weights outside the layers are resident; the ring's bytes and the residents fit the budget
        assert all(m in ("ring", "resident") for m in lm.modes.values())
        assert not hooks_left(list(lm.model.model.layers[0].children()))  # linears are hook-free views
        assert got == ref
    finally:
        lm.close()
        lm_ref.close()


def test_ring_slots_follow_the_budget(ckpt):
    small = LazyModel.load(ckpt, RuntimeConfig(device="cpu", direct="off", cache_budget=-300, ring="on"))
    large = LazyModel.load(ckpt, RuntimeConfig(device="cpu", direct="off", cache_budget=-600, ring="on"))
    try:
        assert small.ring.slots < large.ring.slots
        # every layer's weights share the slot of its position modulo the slot count
        w0 = small.model.model.layers[0].mlp.up_proj.weight
        w_same = small.model.model.layers[small.ring.slots % 4].mlp.up_proj.weight
        assert w0.untyped_storage().data_ptr() == w_same.untyped_storage().data_ptr() or small.ring.slots >= 4
    finally:
        small.close()
        large.close()


def test_budget_below_one_layer_falls_back_to_hooks(ckpt):
    lm = LazyModel.load(ckpt, RuntimeConfig(device="cpu", direct="off", cache_budget=-150, ring="on"))
    try:  # one decoder layer is ~25 % of this model: 15 % cannot hold a slot
        assert lm.ring is None and "streamed" in lm.modes.values()
    finally:
        lm.close()


def test_ring_off_keeps_hooks(ckpt):
    lm = LazyModel.load(ckpt, RuntimeConfig(device="cpu", direct="off", cache_budget=-150, ring="off"))
    try:
        assert lm.ring is None and "streamed" in lm.modes.values()
    finally:
        lm.close()


def test_bad_ring_setting_is_named(ckpt):
    with pytest.raises(Exception, match="--ring"):
        LazyModel.load(ckpt, RuntimeConfig(device="cpu", direct="off", cache_budget=-150, ring="sometimes"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ring_on_cuda_with_graphs_equals_resident(ckpt):
    ref, lm_ref = _tokens(ckpt, device="cuda")
    got, lm = _tokens(ckpt, device="cuda", cache_budget=-300)
    try:
        assert lm.ring is not None
        assert got == ref
    finally:
        lm.close()
        lm_ref.close()

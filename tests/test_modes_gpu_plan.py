"""Execution-mode planning for a CUDA device (pure logic: runs without a GPU).

On CUDA, ``direct`` means a Triton fused decode-matmul (rtn, cvxq, hyperc); under a budget, the
decoder layers stream through a ring (runtime/ring.py) while the rest stays resident."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from thawed.codecs.kernels import kernels_available
from thawed.runtime.model import RuntimeConfig, plan_modes

CUDA = torch.device("cuda")
CPU = torch.device("cpu")

needs_triton = pytest.mark.skipif(not kernels_available("cuda"), reason="Triton is not installed")


def _entry(codec: str, shape: tuple[int, int], **params):
    return SimpleNamespace(codec=codec, params=params, shape=shape,
                           spec=SimpleNamespace(numel=shape[0] * shape[1]))


def _model(codec: str, layers: int = 4, **params):
    weights, index = [], {}
    emb = nn.Embedding(100, 32)
    index["model.embed_tokens.weight"] = _entry(codec, (100, 32), **params)
    weights.append(("model.embed_tokens", emb, "weight", "model.embed_tokens.weight"))
    for i in range(layers):
        for name, shape in (("self_attn.q_proj", (32, 32)), ("mlp.up_proj", (64, 32)), ("mlp.down_proj", (32, 64))):
            key = f"model.layers.{i}.{name}.weight"
            index[key] = _entry(codec, shape, **params)
            weights.append((f"model.layers.{i}.{name}", nn.Linear(shape[1], shape[0], bias=False), "weight", key))
    head = nn.Linear(32, 100, bias=False)
    weights.append(("lm_head", head, "weight", "model.embed_tokens.weight"))  # tied
    return weights, index


@needs_triton
@pytest.mark.parametrize("codec", ["rtn", "cvxq", "hyperc"])
def test_cuda_runs_kernel_codecs_direct(codec):
    weights, index = _model(codec, bits=4, group_size=32)
    plan = plan_modes(weights, index, RuntimeConfig(), CUDA, 2, None)
    assert all(p == "direct" for (m, mod, _, _), p in zip(weights, plan) if isinstance(mod, nn.Linear))
    assert plan[0] == "rowwise" or plan[0] in ("resident",)  # the embedding: the head runs direct


def test_cuda_decodes_codecs_without_kernels():
    weights, index = _model("lossless")
    plan = plan_modes(weights, index, RuntimeConfig(), CUDA, 2, None)
    assert set(plan) == {"resident"}


@needs_triton
def test_cuda_budget_streams_layers_through_the_ring():
    weights, index = _model("lossless")
    total = sum(e.spec.numel for e in index.values()) * 2
    layer = (32 * 32 + 64 * 32 + 32 * 64) * 2
    budget = 100 * 32 * 2 + 2 * layer  # the tied table resident, two layer slots
    assert budget < total
    plan = plan_modes(weights, index, RuntimeConfig(), CUDA, 2, budget)
    for (mname, _, _, _), p in zip(weights, plan):
        assert p == ("ring" if ".layers." in mname else "resident"), mname
    # the same budget with ring=off: every weight streams through the hooks
    off = plan_modes(weights, index, RuntimeConfig(ring="off"), CUDA, 2, budget)
    assert set(off) == {"streamed"}
    # the CPU keeps the hooks unless ring=on
    assert set(plan_modes(weights, index, RuntimeConfig(), CPU, 2, budget)) == {"streamed"}
    # too small for the table plus one slot: hooks
    small = plan_modes(weights, index, RuntimeConfig(), CUDA, 2, 100 * 32 * 2 + layer // 2)
    assert set(small) == {"streamed"}


def test_kernels_off_on_cuda_turns_direct_and_ring_off():
    weights, index = _model("rtn", bits=4, group_size=32)
    plan = plan_modes(weights, index, RuntimeConfig(kernels="off"), CUDA, 2, None)
    assert "direct" not in plan
    layer = (32 * 32 + 64 * 32 + 32 * 64) * 2
    small = plan_modes(weights, index, RuntimeConfig(kernels="off"), CUDA, 2, 100 * 32 * 2 + 2 * layer)
    assert "ring" not in small
    with pytest.raises(Exception, match="--kernels"):
        plan_modes(weights, index, RuntimeConfig(kernels="maybe"), CUDA, 2, None)

"""Sampling edge cases of runtime.generate.next_token."""

from __future__ import annotations

import torch

from thawed.runtime.generate import SamplingParams, next_token


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([0.0, 5.0, 1.0])
    for t in (1e-30, 1e-9, 9e-6):
        assert next_token(logits, SamplingParams(temperature=t), torch.Generator().manual_seed(0), []) == 1


def test_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    g = torch.Generator().manual_seed(0)
    picks = {next_token(logits, SamplingParams(temperature=1.0, top_p=1e-12), g, []) for _ in range(20)}
    assert picks == {1}


def test_top_k_and_repetition_penalty():
    logits = torch.tensor([4.0, 3.9, 0.0, -2.0])
    g = torch.Generator().manual_seed(0)
    picks = {next_token(logits, SamplingParams(temperature=1.0, top_k=2), g, []) for _ in range(50)}
    assert picks <= {0, 1} and len(picks) == 2
    # a strong penalty on token 0 makes token 1 the greedy choice
    assert next_token(logits, SamplingParams(repetition_penalty=2.0), None, [0]) == 1


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, top_p=0.9)
    a = [next_token(logits, p, torch.Generator().manual_seed(5), []) for _ in range(5)]
    b = [next_token(logits, p, torch.Generator().manual_seed(5), []) for _ in range(5)]
    assert a == b

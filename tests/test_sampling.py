"""runtime.sampling: every logits processor against its definition (OpenAI's penalties and
logit_bias, min-p, transformers' typical-p), a batch equals its rows processed one by one, and
seeded sampling is reproducible whatever shares the batch."""

from __future__ import annotations

import math

import pytest
import torch

from thawed.codecs.errors import ThawedError
from thawed.runtime.generate import SamplingParams, next_token
from thawed.runtime.sampling import process_logits, sample

V = 12


def logits(seed: int = 0, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_frequency_and_presence_penalties_follow_openai():
    x = logits()
    generated = [3, 3, 3, 5]
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = process_logits(x, [p], [generated], [[1, 2] + generated])[0]
    # OpenAI: mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    expect = x[0].clone()
    expect[3] -= 3 * 0.5 + 0.25
    expect[5] -= 1 * 0.5 + 0.25
    torch.testing.assert_close(out, expect)
    # prompt tokens (1, 2) are not penalised: only the generated ones count
    assert out[1] == x[0, 1] and out[2] == x[0, 2]
    neg = process_logits(x, [SamplingParams(frequency_penalty=-2.0)], [generated], None)[0]
    assert neg[3] == pytest.approx(float(x[0, 3]) + 6.0)


def test_logit_bias_bans_and_forces():
    x = logits()
    top = int(x[0].argmax())
    banned = process_logits(x, [SamplingParams(logit_bias=((top, -100.0),))])[0]
    assert int(banned.argmax()) != top and banned[top] == pytest.approx(float(x[0, top]) - 100)
    forced = SamplingParams(temperature=1.0, logit_bias=((7, 100.0),))
    gen = torch.Generator().manual_seed(0)
    picks = [sample(process_logits(x, [forced]), [forced], [gen])[0] for _ in range(50)]
    assert picks == [7] * 50


def test_repetition_penalty_is_unchanged():
    x = logits()
    p = SamplingParams(repetition_penalty=2.0)
    out = process_logits(x, [p], None, [[0, 1]])[0]
    for t in (0, 1):
        v = float(x[0, t])
        assert float(out[t]) == pytest.approx(v / 2 if v > 0 else v * 2)
    assert torch.equal(out[2:], x[0, 2:])


def _kept(x: torch.Tensor, p: SamplingParams) -> set[int]:
    out = process_logits(x, [p])[0]
    return {i for i in range(V) if math.isfinite(float(out[i]))}


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    x = logits(1)
    probs = torch.softmax(x[0], -1)
    expect = {i for i in range(V) if probs[i] >= 0.2 * probs.max()}
    assert _kept(x, SamplingParams(temperature=1.0, min_p=0.2)) == expect
    assert _kept(x, SamplingParams(temperature=1.0, min_p=1.0)) == {int(probs.argmax())}


def test_typical_p_matches_transformers():
    from transformers.generation.logits_process import TypicalLogitsWarper

    for seed in range(5):
        x = logits(seed)
        for mass in (0.2, 0.5, 0.9):
            ref = TypicalLogitsWarper(mass, min_tokens_to_keep=1)(None, x.clone())
            expect = {i for i in range(V) if math.isfinite(float(ref[0, i]))}
            assert _kept(x, SamplingParams(temperature=1.0, typical_p=mass)) == expect, (seed, mass)


def test_top_k_and_top_p():
    x = logits(2)
    order = x[0].argsort(descending=True).tolist()
    assert _kept(x, SamplingParams(temperature=1.0, top_k=3)) == set(order[:3])
    probs = torch.softmax(x[0], -1)[order]
    n = int((torch.cumsum(probs, 0) - probs < 0.6).sum())
    assert _kept(x, SamplingParams(temperature=1.0, top_p=0.6)) == set(order[:n])
    assert _kept(x, SamplingParams(temperature=1.0, top_p=1e-30)) == {order[0]}  # the top token stays


def test_batch_equals_rows_one_by_one():
    x = logits(3, rows=4)
    params = [SamplingParams(temperature=0.7, top_k=5, frequency_penalty=0.3),
              SamplingParams(),  # greedy
              SamplingParams(temperature=1.3, top_p=0.8, min_p=0.05, logit_bias=((2, 5.0),)),
              SamplingParams(temperature=1.0, typical_p=0.7, presence_penalty=1.0, repetition_penalty=1.2)]
    generated = [[1, 1, 4], [], [2], [0, 9, 9]]
    previous = [[5] + g for g in generated]
    batch = process_logits(x, params, generated, previous)
    for i, p in enumerate(params):
        row = process_logits(x[i:i + 1], [p], [generated[i]], [previous[i]])
        torch.testing.assert_close(batch[i:i + 1], row)
    assert torch.isfinite(batch).any(dim=1).all()


def test_seeded_sampling_is_reproducible_and_next_token_agrees():
    x = logits(4)
    p = SamplingParams(temperature=1.0, seed=5)
    a = [next_token(x[0], p, torch.Generator().manual_seed(5), []) for _ in range(3)]
    assert len(set(a)) == 1
    other = SamplingParams(temperature=2.0)
    both = sample(process_logits(torch.cat([x, x]), [p, other]), [p, other],
                  [torch.Generator().manual_seed(5), torch.Generator().manual_seed(99)])
    assert both[0] == a[0]  # the other row does not change this row's draw


@pytest.mark.parametrize("field,value", [
    ("frequency_penalty", 2.5), ("presence_penalty", -3.0), ("min_p", 1.5), ("typical_p", 0.0),
    ("typical_p", 5.0), ("temperature", float("inf")), ("top_p", float("nan")), ("logit_bias", ((1, 101.0),)),
])
def test_validate_names_the_field(field, value):
    with pytest.raises(ThawedError, match=field.split("_")[0]):
        SamplingParams(**{field: value}).validate()

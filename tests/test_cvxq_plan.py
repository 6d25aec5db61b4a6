"""cvxq planning: allocation hits its budget, ``compress --target-bpw`` hits the target (linear layers
and whole file), the checkpoint round-trips through the lazy runtime, calibration is real gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models_fixtures import make_column_scaled_llama
from thawed.codecs import get_codec
from thawed.codecs.cvxq import cvxq_nbytes
from thawed.codecs.errors import ThawedError
from thawed.runtime.compress.allocate import GroupSet, allocate
from thawed.runtime.compress.calib_data import CalibSpec

PTB = CalibSpec("ptb-train")  # fast and cache-free; tests/test_calib_data.py covers the self-generated default


def _sets(seed: int = 0) -> list[GroupSet]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (r, n) in enumerate([(2, 300), (1, 128), (4, 77)]):
        score = torch.rand(r * n, generator=gen, dtype=torch.float64).pow(6) * 10.0 ** (i - 1)
        score[:5] = 0.0  # dead groups
        out.append(GroupSet(f"t{i}", 64, (r, n), score, r * 64 * n))
    return out


@pytest.mark.parametrize("target", [0.7, 1.5, 2.5, 3.0, 3.5, 4.0, 4.5, 6.0])
def test_allocate_hits_budget_from_below(target: float) -> None:
    sets = _sets()
    numel = sum(s.numel for s in sets)
    depths, lam, bits = allocate(sets, target * numel)
    exact = 8 * sum(cvxq_nbytes(s.groups, 64, torch.bincount(d, minlength=9).tolist()) for s, d in zip(sets, depths))
    assert bits == exact <= target * numel
    assert target * numel - bits <= 64 * 8 + 64  # within one group's step
    assert all(int(d.min()) >= 0 and int(d.max()) <= 8 for d in depths)
    # higher score never gets fewer bits (same lambda everywhere)
    s = torch.cat([x.score for x in sets])
    d = torch.cat(depths)
    o = torch.argsort(s)
    assert torch.all(d[o][1:] >= d[o][:-1])


def test_allocate_limits() -> None:
    sets = _sets()
    numel = sum(s.numel for s in sets)
    with pytest.raises(ThawedError, match="side information"):
        allocate(sets, 0.1 * numel)
    floor, lam, bits = allocate(sets, 0.1 * numel, strict=False)
    assert math.isinf(lam) and all(int(d.max()) == 0 for d in floor)
    top, _, _ = allocate(sets, 20 * numel)
    assert all(int(d[5:].min()) == 8 for d in top)  # every live group at 8 bits
    floor2, _, _ = allocate(sets, 3 * numel, min_depth=2)
    assert all(int(d.min()) >= 2 for d in floor2)


def _model_dir(folder: Path) -> Path:
    return make_column_scaled_llama(folder, vocab=1024, hidden=128, intermediate=256)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("cvxq-small"))


@pytest.fixture(scope="module")
def sens(small_dir: Path) -> dict:
    from thawed.runtime.compress.calibrate import weight_sensitivities

    cal = weight_sensitivities(small_dir, 256, seq_len=128, calib=PTB)
    assert cal.windows == 2 and cal.tokens == 256
    return cal.sens


def test_calibration_gradients_are_real(small_dir: Path, sens: dict) -> None:
    assert set(sens) >= {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}
    for name, s in sens.items():
        assert torch.isfinite(s).all() and (s >= 0).all() and float(s.sum()) > 0, name
    # v_proj gradients only exist through the attention output: a different model gives different values
    assert not torch.equal(sens["model.layers.0.self_attn.v_proj.weight"], sens["model.layers.1.self_attn.v_proj.weight"])


@pytest.mark.parametrize("target", [2.5, 3.5, 4.5])  # 3.0 and 4.0: the CLI test and the benchmark
def test_compress_hits_target(small_dir: Path, sens: dict, tmp_path: Path, target: float) -> None:
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice
    from thawed.runtime.inspection import inspect_checkpoint

    out = tmp_path / "ck"
    compress(small_dir, out, Plan(parse_codec_choice("cvxq:group_rows=64")), target_bpw=target, sensitivities=sens,
             calib=PTB,
             progress=False)
    with Checkpoint.open(out) as ck:
        rep = inspect_checkpoint(ck)
        plan = ck.metadata["settings"]["cvxq_plan"] if isinstance(ck.metadata["settings"], dict) else None
    assert abs(rep["linear"]["bpw"] - target) <= 0.02, rep["linear"]
    assert abs(rep["total"]["bpw"] - target) <= 0.02, rep["total"]
    assert {r["codec"] for r in rep["tensors"] if r["role"] in ("linear", "embedding")} == {"cvxq"}
    if plan is not None:
        assert plan["target_bpw"] == target


def test_checkpoint_round_trip_through_lazy_runtime(small_dir: Path, sens: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice
    from thawed.runtime.model import LazyModel, RuntimeConfig

    out = tmp_path / "ck"
    compress(small_dir, out, Plan(parse_codec_choice("cvxq:group_rows=64")), target_bpw=3.5, sensitivities=sens,
             calib=PTB,
             progress=False)
    dense = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[3, 7, 11, 5, 9, 4]])
    corrected = 0
    with Checkpoint.open(out) as ck, torch.no_grad():
        for name, p in dense.named_parameters():
            p.copy_(ck.decode(name, dtype=torch.float32))
        # the bias corrections stored with every linear layer become biases of the dense copy too
        for mname, mod in dense.named_modules():
            key = f"{mname}.weight"
            if isinstance(mod, torch.nn.Linear) and key in ck.index and ck.index[key].codec == "cvxq":
                e = ck.index[key]
                corr = get_codec("cvxq").decode_output_bias(ck.encoded(key), e.spec, torch.device("cpu"), torch.float32)
                if e.spec.role == "linear":
                    assert corr is not None and corr.shape == (mod.out_features,) and corr.abs().sum() > 0, key
                    mod.bias = torch.nn.Parameter(corr)
                    corrected += 1
        assert corrected == 14  # 7 linears x 2 layers; the tied lm_head is the embedding: none
        enc = ck.encoded("model.layers.1.mlp.down_proj.weight")
        e = ck.index["model.layers.1.mlp.down_proj.weight"]
        direct = get_codec("cvxq").decode(enc, e.spec, {}, torch.device("cpu"), torch.float32)
        assert sum(enc.params["counts"][1:]) > 0
    with torch.no_grad():
        want = dense(input_ids=ids).logits
    with LazyModel.load(out, RuntimeConfig(device="cpu")) as lm, torch.no_grad():
        got = lm(input_ids=ids).logits
        lazy_biases = sum(isinstance(m, torch.nn.Linear) and m.bias is not None for m in lm.model.modules())
    assert lazy_biases == corrected  # the corrections survive reload
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dict(dense.named_parameters())["model.layers.1.mlp.down_proj.weight"], direct)


def test_target_needs_cvxq(small_dir: Path, tmp_path: Path) -> None:
    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice

    with pytest.raises(ThawedError, match="--codec cvxq"):
        compress(small_dir, tmp_path / "x", Plan(parse_codec_choice("rtn")), target_bpw=3.0)


def test_cli_compress_with_target(small_dir: Path, tmp_path: Path, capsys) -> None:
    from thawed.runtime.cli import main

    out = tmp_path / "cli"
    assert main(["compress", str(small_dir), str(out), "--codec", "cvxq:group_rows=64", "--target-bpw", "3.0",
                 "--calib-tokens", "128", "--calib", "ptb-train", "--no-progress"]) == 0
    assert main(["inspect", str(out), "--totals"]) == 0
    text = capsys.readouterr().out
    lin = float(text.split("linear layers:")[1].split("bits/weight")[0].split(",")[-1])
    assert abs(lin - 3.0) <= 0.02, text


def test_bias_correction_is_switchable_and_counted(small_dir: Path, sens: dict, tmp_path: Path) -> None:
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.compress.calibrate import linear_input_means
    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice
    from thawed.runtime.inspection import inspect_checkpoint

    means = linear_input_means(small_dir, 256, seq_len=128, calib=PTB)
    assert means["model.layers.0.mlp.down_proj.weight"].shape == (256,)
    reps = {}
    for bias in (True, False):
        out = tmp_path / f"b{bias}"
        compress(small_dir, out, Plan(parse_codec_choice(f"cvxq:group_rows=64,bias={str(bias).lower()}")),
                 target_bpw=3.0, sensitivities=sens, input_means=means, progress=False)
        with Checkpoint.open(out) as ck:
            reps[bias] = inspect_checkpoint(ck)
            with_bias = [n for n, e in ck.index.items() if e.params.get("bias")]
        assert len(with_bias) == (14 if bias else 0)
        # the correction's bytes are inside the target either way
        assert abs(reps[bias]["linear"]["bpw"] - 3.0) <= 0.02, reps[bias]["linear"]
        assert abs(reps[bias]["total"]["bpw"] - 3.0) <= 0.02, reps[bias]["total"]

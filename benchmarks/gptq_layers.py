"""Layer-output error of GPTQ error feedback on real SmolLM2-135M layers, in-sample and held out.

    python benchmarks/gptq_layers.py [--layers 3,15,27] [--kinds q_proj,o_proj,down_proj]
                                     [--calib-tokens 2048] [--heldout-tokens 4096]

For each chosen linear weight ``W`` and codec variant, the relative output error
``tr(dW H dW^T) / tr(W H W^T)`` (dB, lower is better) under three input second moments ``H``:
``cal`` -- the calibration inputs the feedback saw (self-generated text, ``runtime/compress/calib_data``),
``ptb-train`` -- PTB train (the former calibration text), ``held`` -- PTB *valid* (held out: the
diagnosis may look at it, no codec is calibrated on it). Variants: rtn b4 g128 with and without
GPTQ; nwc at a fixed rate (lam 256) plain, with feedback in column order (the former ``ec=true``)
and with act-order; each also with feedback computed from PTB-train inputs. Correctness first:
every variant's stored bits are checked equal to its plain counterpart's (GPTQ moves codes, not
sizes) within 2 % for the entropy-coded nwc.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def rel_db(w, wh, h) -> float:
    from thawed.codecs.gptq import layer_output_error

    return 10 * math.log10(layer_output_error(w, wh, h) / layer_output_error(w, torch.zeros_like(w), h))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="3,15,27")
    ap.add_argument("--kinds", default="self_attn.q_proj,self_attn.o_proj,mlp.down_proj")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--heldout-tokens", type=int, default=4096)
    ap.add_argument("--lam", type=float, default=256.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from thawed.codecs import EncodeContext, TensorSpec
    from thawed.codecs.nwc import Nwc
    from thawed.codecs.rtn import Rtn
    from thawed.runtime.compress.calib_data import CalibSpec
    from thawed.runtime.compress.input_stats import input_grams
    from thawed.runtime.compress.source import SourceModel
    from thawed.runtime.demo_model import demo_model_dir
    from thawed.runtime.eval import load_corpus

    src = demo_model_dir()
    t0 = time.perf_counter()
    grams = {"cal": input_grams(src, args.calib_tokens, calib=CalibSpec()),
             "ptb-train": input_grams(src, args.calib_tokens, calib=CalibSpec("ptb-train")),
             "held": input_grams(src, args.heldout_tokens, calib=load_corpus("ptb-valid")[1][:200_000])}
    print(f"input statistics in {time.perf_counter() - t0:.0f}s", flush=True)
    variants = {  # name -> (codec, gram the feedback uses)
        "rtn4": (Rtn(bits=4, group_size=128), None),
        "rtn4+gptq": (Rtn(bits=4, group_size=128, gptq=True), "cal"),
        "rtn4+gptq(ptb)": (Rtn(bits=4, group_size=128, gptq=True), "ptb-train"),
        "nwc": (Nwc(lam=args.lam, levels=False), None),
        "nwc+ec in order": (Nwc(lam=args.lam, levels=False, ec=True, act_order=False), "cal"),
        "nwc+ec in order(ptb)": (Nwc(lam=args.lam, levels=False, ec=True, act_order=False), "ptb-train"),
        "nwc+gptq act-order": (Nwc(lam=args.lam, levels=False, ec=True), "cal"),
    }
    print(f"python benchmarks/gptq_layers.py {' '.join(sys.argv[1:])}")
    print("relative layer-output error, dB (lower is better), under cal / ptb-train / held-out (PTB valid) inputs")
    print("| weight | variant | bytes | cal | ptb-train | held |\n|---|---|---|---|---|---|")
    with SourceModel(src) as source:
        for layer in args.layers.split(","):
            for kind in args.kinds.split(","):
                name = f"model.layers.{layer}.{kind}.weight"
                w = source.get(name).float()
                spec = TensorSpec(name=name, shape=tuple(w.shape), dtype=torch.float32, role="linear")
                plain_bytes: dict[str, int] = {}
                for vname, (codec, which) in variants.items():
                    extras = {} if which is None else {"input_gram": grams[which][name]}
                    enc = codec.encode(w, spec, EncodeContext(name=name, role="linear", extras=extras))
                    shared = codec.shared_tensors()
                    wh = type(codec).decode(enc, spec, shared, torch.device("cpu"), torch.float32)
                    family = vname.split("+")[0]
                    plain_bytes.setdefault(family, enc.nbytes)
                    assert abs(enc.nbytes - plain_bytes[family]) <= 0.02 * plain_bytes[family], (vname, enc.nbytes)
                    errs = [rel_db(w, wh, grams[k][name]) for k in ("cal", "ptb-train", "held")]
                    print(f"| {name.removeprefix('model.')} | {vname} | {enc.nbytes} | "
                          + " | ".join(f"{e:.2f}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()

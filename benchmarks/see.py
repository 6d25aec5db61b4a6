"""SEE (``see``) benchmark on SmolLM2-135M: embedding perplexity vs compression, Kronecker-sum linears
next to ``rtn`` at equal bpw, peak RSS of generation with per-token embedding decode, decode cost.

    python benchmarks/see.py --part emb|linear|memory|speed|all [--tokens 8192] [--ctx 1024]
                             [--only LABEL,...] [--device cpu|cuda] [--work-dir DIR] [--json-out FILE]

Checks correctness first (for every ``see`` tensor of each checkpoint: ``decode_rows`` on a sample
of ids equals the rows of the full decode, and the full decode equals the explicit ``torch.kron``
reference on a sample of rows), then prints figures and one JSON line. Perplexity is
``thawed.runtime.eval.perplexity`` -- the protocol of ``thawed eval MODEL --corpus ptb-test --tokens
N --ctx 1024`` -- with the dense model measured in the same run. Compression ratios are against
the fp32 source (32 bits per weight) and read from the checkpoint files (every byte).

Parts:
* ``emb``: only ``model.embed_tokens.weight`` (tied: also the lm_head) is compressed (``see`` at
  several settings, ``rtn`` at nearby bpw); every linear stays fp32, so the perplexity change is
  the embedding's alone.
* ``linear``: every linear is ``see`` (Kronecker sum at the rank that fills ``target_bpw`` on top of
  a 3-bit g128 ``rtn`` residual) or ``rtn`` at the same bpw; the embedding stays fp32.
* ``memory``: ``see`` embedding + ``rtn`` b4 g128 linears; fresh processes generate tokens with the
  table materialised vs per-token embedding decode, with the cache holding everything vs a budget;
  peak RSS (VmHWM) per process.
* ``speed``: ``decode_rows`` for 1 and 64 ids and the full-table decode, ``--device`` cpu or cuda.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

EMB = "model.embed_tokens.weight"
EMB_CONFIGS = [  # label, --codec-for spec for the embedding
    ("see-r8", "see:rank=8,units=256,core_bits=8"),  # pure SEE, 32x
    ("see-r16c6", "see:rank=16,units=256,core_bits=6"),  # pure SEE, 11.3x
    ("see-r4-res2g64", "see:rank=4,units=256,core_bits=8,residual_bits=2,residual_group=64"),  # 11.4x
    ("see-r8-res2g128", "see:rank=8,units=256,core_bits=8,residual_bits=2,residual_group=128"),  # 10.0x
    ("rtn-emb-b3g128", "rtn:bits=3,group_size=128"),
    ("rtn-emb-b2g64", "rtn:bits=2,group_size=64"),
    ("rtn-emb-b2g32", "rtn:bits=2,group_size=32"),  # 3.0 bpw, 10.7x: the nearest rtn above see-r4-res2g64
]
LINEAR_CONFIGS = [  # label, default codec for linears (embedding stays raw)
    ("see-lin-3.5", "see:target_bpw=3.5,residual_bits=3,residual_group=128"),
    ("rtn-b3-g64", "rtn:bits=3,group_size=64"),
    ("see-lin-4.0", "see:target_bpw=4.0,residual_bits=3,residual_group=128"),
    ("rtn-b3-g32", "rtn:bits=3,group_size=32"),
    ("rtn-b3-g128", "rtn:bits=3,group_size=128"),  # the residual alone (no Kronecker part)
]
MEM_SPEC = ("see-r4-res2g64+rtn4", "rtn:bits=4,group_size=128",
            f"{EMB}=see:rank=4,units=256,core_bits=8,residual_bits=2,residual_group=64")
PROMPT = "The capital of France is"


def _work(args) -> Path:
    base = Path(args.work_dir or Path(os.environ.get("THAWED_CACHE", "/tmp/thawed-cache")) / "bench-see")
    base.mkdir(parents=True, exist_ok=True)
    return base


def _compress(src: Path, work: Path, label: str, default: str, *overrides: str) -> tuple[Path, float]:
    import shutil

    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice, parse_override

    path = work / label
    stamp = path / "compress_seconds.json"
    if (path / "model.thawed.safetensors").is_file() and stamp.is_file():
        return path, json.loads(stamp.read_text())["seconds"]
    shutil.rmtree(path, ignore_errors=True)
    plan = Plan(parse_codec_choice(default), tuple(parse_override(o) for o in overrides))
    rep = compress(src, path, plan, progress=False)
    stamp.write_text(json.dumps({"seconds": rep.seconds, "default": default, "overrides": list(overrides)}))
    return path, rep.seconds


def check_correctness(path: Path) -> str:
    from thawed.codecs.see import See, see_decode_reference
    from thawed.runtime.checkpoint import Checkpoint

    n = 0
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    with Checkpoint.open(path) as ckpt:
        for key, e in ckpt.index.items():
            if e.codec != "see":
                continue
            enc = ckpt.encoded(key)
            full = See.decode(enc, e.spec, {}, cpu, torch.float32)
            assert torch.isfinite(full).all(), key
            ids = torch.randint(0, e.shape[0], (257,), generator=gen)
            torch.testing.assert_close(See.decode_rows(enc, e.spec, {}, ids, cpu, torch.float32), full[ids],
                                       rtol=1e-6, atol=1e-6)
            if enc.params["mode"] == "rows":  # the reference loops over rows: check a slice
                from thawed.codecs import Encoded, TensorSpec

                sl = {k: (v[:64] if v.dim() and v.shape[0] == e.shape[0] else v) for k, v in enc.fields.items()}
                sub = TensorSpec(key, (64, e.shape[1]), e.spec.dtype, e.spec.role)
                torch.testing.assert_close(full[:64], see_decode_reference(Encoded(sl, enc.params), sub),
                                           rtol=1e-5, atol=1e-5)
            elif n < 3:
                torch.testing.assert_close(full, see_decode_reference(enc, e.spec).reshape(full.shape),
                                           rtol=1e-4, atol=1e-5)
            n += 1
    return f"{n} see tensors: decode_rows == rows of decode; decode == torch.kron reference"


def _ppl(model_path: Path, ids: list[int], ctx: int) -> tuple[float, str]:
    from thawed.runtime.eval import evaluate

    res, _ = evaluate(model_path, "ptb-test", ids=ids, ctx=ctx)
    return res.perplexity, res.protocol


def _sizes(path: Path) -> dict:
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.inspection import inspect_checkpoint

    with Checkpoint.open(path) as ckpt:
        rep = inspect_checkpoint(ckpt)
        emb = ckpt.index[EMB]
        emb_bytes = sum(v.numel() * v.element_size() for v in ckpt.encoded(EMB).fields.values())
        see_params = next((e.params for e in ckpt.index.values() if e.codec == "see"), None)
    return {"bpw_emb": emb_bytes * 8 / emb.spec.numel, "emb_ratio_vs_fp32": emb.spec.numel * 4 / emb_bytes,
            "bpw_linear": rep["linear"]["bpw"], "bpw_file": rep["total"]["bpw"], "see_params": see_params}


def part_ppl(kind: str, tokens: int, ctx: int, work: Path, only: list[str] | None) -> dict:
    from thawed.runtime.demo_model import demo_model_dir
    from thawed.runtime.eval import load_corpus
    from thawed.runtime.loading import load_tokenizer

    src = Path(demo_model_dir())
    _, text = load_corpus("ptb-test")
    ids = load_tokenizer(src)(text, add_special_tokens=False)["input_ids"][:tokens]
    rows, protocol, correctness = [], "", {}
    if not only or "dense" in only:
        t0 = time.perf_counter()
        dense, protocol = _ppl(src, ids, ctx)
        print(f"  dense fp32: perplexity {dense:.3f} [{protocol}] ({time.perf_counter() - t0:.0f}s)", flush=True)
        rows.append({"config": "dense fp32", "ppl": dense})
    configs = ([(lbl, "raw", (f"{EMB}={spec}",)) for lbl, spec in EMB_CONFIGS] if kind == "emb"
               else [(lbl, spec, (f"{EMB}=raw",)) for lbl, spec in LINEAR_CONFIGS])
    for label, default, overrides in configs:
        if only and label not in only:
            continue
        t0 = time.perf_counter()
        path, secs = _compress(src, work, label, default, *overrides)
        if "see" in default or any("=see" in o for o in overrides):
            correctness[label] = check_correctness(path)
        ppl, protocol = _ppl(path, ids, ctx)
        row = {"config": label, "codec": default, "overrides": list(overrides), "ppl": ppl, "compress_s": secs,
               **_sizes(path)}
        rows.append(row)
        if kind == "emb":
            print(f"  {label:<16} embedding {row['bpw_emb']:.3f} bpw = {row['emb_ratio_vs_fp32']:.1f}x vs fp32: "
                  f"perplexity {ppl:.3f} ({time.perf_counter() - t0:.0f}s, compress {secs:.0f}s)", flush=True)
        else:
            print(f"  {label:<16} linear {row['bpw_linear']:.3f} bpw, file {row['bpw_file']:.3f}: perplexity "
                  f"{ppl:.3f} ({time.perf_counter() - t0:.0f}s, compress {secs:.0f}s)", flush=True)
    return {"protocol": protocol, "tokens": tokens, "rows": rows, "correctness": correctness}


# ---- memory: fresh processes ------------------------------------------------------------------
def peak_rss_mib() -> float:
    """VmHWM of this process (not ru_maxrss, which Linux carries across fork+exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(path: str, tokens: int, budget: str, rowwise: str) -> None:
    torch.set_num_threads(2)
    from thawed.runtime.generate import SamplingParams, generate_tokens
    from thawed.runtime.loading import load_for_inference
    from thawed.runtime.model import RuntimeConfig, parse_budget

    loaded = load_for_inference(path, RuntimeConfig(device="cpu", cache_budget=parse_budget(budget),
                                                    rowwise_embedding=rowwise))
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    t0 = time.perf_counter()
    out = [s.token for s in generate_tokens(loaded.model, ids, SamplingParams(max_new_tokens=tokens, ignore_eos=True),
                                            device="cpu")]
    dt = time.perf_counter() - t0
    st = loaded.lazy.cache.stats()
    res = {"budget": budget, "rowwise": rowwise, "tokens": len(out), "tok_per_s": len(out) / dt,
           "peak_rss_mib": peak_rss_mib(), "cache_peak_mib": st.peak_bytes / 2**20,
           "decoded_model_mib": loaded.lazy.decoded_nbytes / 2**20, "decodes": st.decodes,
           "text": loaded.tokenizer.decode(out[:12])}
    print("RESULT " + json.dumps(res), flush=True)


def part_memory(work: Path, tokens: int, repeats: int) -> dict:
    from thawed.runtime.demo_model import demo_model_dir

    label, default, override = MEM_SPEC
    path, _ = _compress(Path(demo_model_dir()), work, label, default, override)
    print(f"  correctness: {check_correctness(path)}", flush=True)
    # (budget, rowwise): everything cached vs a budget under which the tied head's table is not
    # kept between forwards (the 30 layers + table decode to ~540 MiB fp32; 160 MiB holds the
    # table while the head runs, nothing more).
    confs = [("auto", "off"), ("auto", "on"), ("160MiB", "off"), ("160MiB", "on")]
    results: dict = {}
    for _ in range(repeats):
        for budget, rowwise in confs:
            cmd = [sys.executable, __file__, "--worker", str(path), "--gen-tokens", str(tokens), "--budget", budget]
            cmd += ["--rowwise", rowwise]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=os.environ | {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"worker failed:\n{proc.stderr[-3000:]}")
            results.setdefault((budget, rowwise), []).append(json.loads(line[7:]))
    rows = []
    texts = {r[0]["text"] for r in results.values()}
    assert len(texts) == 1, f"the configurations generated different text: {texts}"
    for (budget, rowwise), rs in results.items():
        row = {"budget": budget, "rowwise_embedding": rowwise,
               "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
               "tok_per_s": statistics.median(r["tok_per_s"] for r in rs),
               "cache_peak_mib": rs[0]["cache_peak_mib"], "decodes": rs[0]["decodes"], "runs": len(rs)}
        rows.append(row)
        print(f"  budget {budget:<7} rowwise {rowwise:<4}: peak RSS {row['peak_rss_mib']:7.1f} MiB, cache peak "
              f"{row['cache_peak_mib']:6.1f} MiB, {row['tok_per_s']:.2f} tok/s, decodes {row['decodes']}", flush=True)
    return {"checkpoint": label, "tokens": tokens, "rows": rows, "text": texts.pop()}


# ---- speed ------------------------------------------------------------------------------------
def _emb_payload(work: Path, label: str, spec_text: str):
    """(spec, Encoded) of the embedding: from the benchmark's checkpoint when it exists, else
    encoded here from the demo model's table (so ``--part speed`` runs on a fresh machine)."""
    from thawed.codecs import EncodeContext, TensorSpec
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.compress.plan import parse_codec_choice

    path = work / label
    if (path / "model.thawed.safetensors").is_file():
        with Checkpoint.open(path) as ckpt:
            return ckpt.index[EMB].spec, ckpt.encoded(EMB)
    from safetensors import safe_open

    from thawed.runtime.compress.token_freq import token_frequencies
    from thawed.runtime.demo_model import demo_model_dir

    src = Path(demo_model_dir())
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        table = f.get_tensor(EMB).float()
    spec = TensorSpec(EMB, tuple(table.shape), torch.float32, "embedding")
    print(f"  encoding {label} ({spec_text}) from {src}", flush=True)
    ctx = EncodeContext(EMB, "embedding", extras={"token_freq": token_frequencies(src, table.shape[0])})
    return spec, parse_codec_choice(spec_text).build().encode(table, spec, ctx)


def part_speed(work: Path, device: str, repeats: int, only: list[str] | None) -> list[dict]:
    from thawed.codecs.see import See

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    rows = []
    for label, spec_text in EMB_CONFIGS:
        if not label.startswith("see") or (only and label not in only):
            continue
        spec, enc = _emb_payload(work, label, spec_text)
        enc = enc.to(dev)
        full = See.decode(enc, spec, {}, dev, torch.float32)  # correctness on this device first
        ids = torch.randint(0, spec.shape[0], (300,), generator=torch.Generator().manual_seed(1)).to(dev)
        torch.testing.assert_close(See.decode_rows(enc, spec, {}, ids, dev, torch.float32), full[ids],
                                   rtol=1e-5, atol=1e-5)
        if dev.type != "cpu":
            cpu_full = See.decode(enc.to("cpu"), spec, {}, torch.device("cpu"), torch.float32)
            torch.testing.assert_close(full.cpu(), cpu_full, rtol=1e-4, atol=1e-5)
        del full
        gen = torch.Generator().manual_seed(0)
        row = {"checkpoint": label, "device": device, "params": enc.params}
        for n in (1, 64):
            ids = torch.randint(0, spec.shape[0], (n,), generator=gen).to(dev)
            times = []
            for _ in range(max(20, repeats) + 1):
                sync()
                t0 = time.perf_counter()
                See.decode_rows(enc, spec, {}, ids, dev, torch.float32)
                sync()
                times.append(time.perf_counter() - t0)
            row[f"rows_{n}_us"] = statistics.median(times[1:]) * 1e6
            row[f"rows_{n}_us_min"] = min(times[1:]) * 1e6  # the median is noisy on a shared CPU
        times = []
        for _ in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            See.decode(enc, spec, {}, dev, torch.float32)
            sync()
            times.append(time.perf_counter() - t0)
        row["table_s"] = statistics.median(times[1:])
        row["table_ns_per_weight"] = row["table_s"] / spec.numel * 1e9
        rows.append(row)
        print(f"  {label:<16} {device}: 1 row {row['rows_1_us']:8.1f} us (min {row['rows_1_us_min']:.1f}), 64 rows "
              f"{row['rows_64_us']:8.1f} us (min {row['rows_64_us_min']:.1f}), "
              f"full table {row['table_s'] * 1e3:8.1f} ms ({row['table_ns_per_weight']:.2f} ns/weight)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["all", "emb", "linear", "memory", "speed"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default=None, help="comma-separated rows (dense, see-r8, rtn-b3-g64, ...)")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--rowwise", default="off", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.gen_tokens, args.budget, args.rowwise)
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = _work(args)
    only = args.only.split(",") if args.only else None
    out: dict = {"torch_threads": torch.get_num_threads()}
    if args.part in ("all", "emb"):
        print("embedding: perplexity vs compression (linears fp32)", flush=True)
        out["emb"] = part_ppl("emb", args.tokens, args.ctx, work, only)
    if args.part in ("all", "linear"):
        print("linear layers: see Kronecker sum + 3-bit residual vs rtn at equal bpw (embedding fp32)", flush=True)
        out["linear"] = part_ppl("linear", args.tokens, args.ctx, work, only)
    if args.part in ("all", "memory"):
        print(f"memory: generation of {args.gen_tokens} tokens, fresh process per configuration", flush=True)
        out["memory"] = part_memory(work, args.gen_tokens, args.repeats)
    if args.part in ("all", "speed"):
        print(f"decode cost ({args.device})", flush=True)
        out["speed"] = part_speed(work, args.device, args.repeats, only)
    line = json.dumps(out)
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")


if __name__ == "__main__":
    main()

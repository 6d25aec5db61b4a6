"""Backbone benchmark on the real SmolLM2-135M: decode throughput, time to first token, tokens/s, RSS.

    python benchmarks/backbone.py [--tokens 64] [--repeats 3] [--json-out FILE]

Checks correctness first (decoded weights against the reference, lazy logits against the model
with the same decoded weights, lossless bit-exact), then prints a table and one JSON line.
Every figure that compares thawed with dense transformers is measured in this same run, each
configuration in its own fresh process (so start-up time and peak RSS are its own), alternating
configurations across repeats; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The capital of France is"


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across
    fork+exec, so a worker would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# worker: one configuration in a fresh process; prints one JSON line
# ---------------------------------------------------------------------------------------------
def worker(mode: str, path: str, tokens: int, budget: str, t_start: float) -> None:
    import torch

    from thawed.runtime.generate import SamplingParams, generate_tokens

    if mode in ("dense", "dense-ram"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if mode == "dense-ram":
            # from_pretrained leaves fp32 weights memory-mapped from the file; copying them into
            # process memory separates the cost of running from page-cache-backed weights.
            with torch.no_grad():
                for p in model.parameters():
                    p.data = p.data.clone()
            model.tie_weights()
        tok = AutoTokenizer.from_pretrained(path)
        lazy = None
    else:
        from thawed.runtime.loading import load_for_inference
        from thawed.runtime.model import RuntimeConfig, parse_budget

        loaded = load_for_inference(path, RuntimeConfig(device="cpu", cache_budget=parse_budget(budget)))
        model, tok, lazy = loaded.model, loaded.tokenizer, loaded.lazy
    ids = tok(PROMPT)["input_ids"]
    first_params = SamplingParams(max_new_tokens=1)
    first = next(generate_tokens(model, ids, first_params, device="cpu")).token
    ttft = time.time() - t_start
    # warm generation: the first call above decoded/loaded everything the budget allows; a few
    # more tokens fault in every page of a memory-mapped dense model before the clock starts.
    for _ in generate_tokens(model, ids, SamplingParams(max_new_tokens=4, ignore_eos=True), device="cpu"):
        pass
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    n = 0
    out = []
    for step in generate_tokens(model, ids, params, device="cpu"):
        n += 1
        out.append(step.token)
    dt = time.perf_counter() - t0
    res = {
        "mode": mode, "budget": budget, "ttft_s": ttft, "tokens": n, "tok_per_s": n / dt,
        "first_token": first, "text": tok.decode(out[:12]),
        "peak_rss_mib": peak_rss_mib(),
    }
    if lazy is not None:
        s = lazy.cache.stats()
        res.update(cache_budget=s.budget_bytes, cache_peak=s.peak_bytes, decoded_bytes=lazy.decoded_nbytes,
                   evictions=s.evictions, decodes=s.decodes)
    print("RESULT " + json.dumps(res), flush=True)


def run_worker(mode: str, path: Path, tokens: int, budget: str = "auto") -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, str(path), "--tokens", str(tokens), "--budget", budget,
           "--t-start", "0"]
    t_start = time.time()
    cmd[-1] = repr(t_start)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker {mode} failed:\n{proc.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------
# in-process parts: correctness and decode throughput
# ---------------------------------------------------------------------------------------------
def check_correctness(src: Path, ckpts: dict[str, Path]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.model import LazyModel, RuntimeConfig

    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 216]])
    with torch.inference_mode():
        ref = dense(input_ids=ids).logits
    out = {}
    for name, path in ckpts.items():
        with LazyModel.load(path, RuntimeConfig(device="cpu")) as lm, torch.inference_mode():
            got = lm(input_ids=ids).logits
        if name == "lossless":
            assert torch.equal(got, ref), "lossless logits differ from the dense model"
            out[name] = "bit-identical logits"
        else:
            # same decoded weights in the dense model must give the same logits
            state = {}
            with Checkpoint.open(path) as ckpt:
                for pname, p in dense.named_parameters():
                    state[pname] = p.detach().clone()
                    with torch.no_grad():
                        p.copy_(ckpt.decode(pname if pname in ckpt.index else "model.embed_tokens.weight",
                                            dtype=torch.float32))
            with torch.inference_mode():
                want = dense(input_ids=ids).logits
            with torch.no_grad():
                for pname, p in dense.named_parameters():
                    p.copy_(state[pname])
            err = float((got - want).abs().max())
            assert err < 1e-3, f"{name}: lazy logits differ from dense-with-decoded-weights by {err}"
            out[name] = f"max |lazy - dense(decoded)| = {err:.2e}"
    return out


def decode_throughput(ckpts: dict[str, Path], repeats: int) -> list[dict]:
    import torch

    from thawed.codecs import get_codec
    from thawed.runtime.checkpoint import Checkpoint

    rows = []
    for name, path in ckpts.items():
        with Checkpoint.open(path) as ckpt:
            by_shape: dict[tuple, str] = {}
            for key, e in ckpt.index.items():
                if e.codec != "raw":
                    by_shape.setdefault(tuple(e.shape), key)
            for shape, key in sorted(by_shape.items()):
                e = ckpt.index[key]
                enc = ckpt.encoded(key)
                codec = get_codec(e.codec)
                codec.decode(enc, e.spec, ckpt.shared(e.codec), torch.device("cpu"), torch.float32)  # warm
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    w = codec.decode(enc, e.spec, ckpt.shared(e.codec), torch.device("cpu"), torch.float32)
                    times.append(time.perf_counter() - t0)
                t = statistics.median(times)
                out_bytes = w.numel() * 4
                rows.append({"checkpoint": name, "codec": e.codec, "shape": list(shape), "tensor": key,
                             "decode_ms": t * 1e3, "decoded_MB_per_s": out_bytes / t / 1e6,
                             "weights_per_s": w.numel() / t})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "PATH"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--budget", default="auto")
    ap.add_argument("--t-start", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default=None, help="where to keep the compressed checkpoints (default: cache dir)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.tokens, args.budget, args.t_start)
        return

    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice
    from thawed.runtime.demo_model import default_cache_dir, demo_model_dir

    src = demo_model_dir()
    work = Path(args.work_dir) if args.work_dir else default_cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    specs = {"rtn-b4-g128": "rtn:bits=4,group_size=128", "rtn-b3-g128": "rtn:bits=3,group_size=128",
             "lossless": "lossless"}
    ckpts = {}
    for name, spec in specs.items():
        path = work / name
        if not (path / "model.thawed.safetensors").is_file():
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            compress(src, path, Plan(parse_codec_choice(spec)), progress=False)
        ckpts[name] = path

    print("correctness:", flush=True)
    correct = check_correctness(src, ckpts)
    for k, v in correct.items():
        print(f"  {k}: {v}")

    decode_rows = decode_throughput(ckpts, args.repeats)
    print("\ndecode throughput (CPU, fp32 output, median of", args.repeats, "runs):")
    print(f"  {'checkpoint':<12} {'shape':<12} {'ms':>8} {'MB/s':>9} {'Mweights/s':>11}")
    for r in decode_rows:
        print(f"  {r['checkpoint']:<12} {'x'.join(map(str, r['shape'])):<12} {r['decode_ms']:>8.2f} "
              f"{r['decoded_MB_per_s']:>9.0f} {r['weights_per_s'] / 1e6:>11.1f}")

    rtn = ckpts["rtn-b4-g128"]
    configs = [("dense", src, "auto"), ("dense-ram", src, "auto"), ("thawed", rtn, "auto"), ("thawed", rtn, "25%")]
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for mode, path, budget in configs:
            key = f"{mode}[{budget}]"
            r = run_worker(mode, path, args.tokens, budget)
            runs.setdefault(key, []).append(r)
            print(f"  run {rep + 1} {key}: ttft {r['ttft_s']:.2f}s, {r['tok_per_s']:.2f} tok/s, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[key])

    d, dr, t, s = "dense[auto]", "dense-ram[auto]", "thawed[auto]", "thawed[25%]"
    summary = {
        "dense": {f: med(d, f) for f in ("ttft_s", "tok_per_s", "peak_rss_mib")},
        "dense_ram": {f: med(dr, f) for f in ("ttft_s", "tok_per_s", "peak_rss_mib")},
        "thawed_rtn_b4_g128": {f: med(t, f) for f in ("ttft_s", "tok_per_s", "peak_rss_mib")},
        "thawed_rtn_b4_g128_budget25": {f: med(s, f) for f in ("ttft_s", "tok_per_s", "peak_rss_mib")},
    }
    summary["ratios"] = {
        "warm_tok_per_s_thawed_over_dense": summary["thawed_rtn_b4_g128"]["tok_per_s"] / summary["dense"]["tok_per_s"],
        "warm_tok_per_s_thawed_over_dense_ram": summary["thawed_rtn_b4_g128"]["tok_per_s"] / summary["dense_ram"]["tok_per_s"],
        "ttft_thawed_over_dense": summary["thawed_rtn_b4_g128"]["ttft_s"] / summary["dense"]["ttft_s"],
        "peak_rss_budget25_over_dense": summary["thawed_rtn_b4_g128_budget25"]["peak_rss_mib"] / summary["dense"]["peak_rss_mib"],
        "tok_per_s_budget25_over_dense": summary["thawed_rtn_b4_g128_budget25"]["tok_per_s"] / summary["dense"]["tok_per_s"],
    }
    print(f"\nend to end on SmolLM2-135M (CPU, fp32 compute, greedy, {args.tokens} new tokens, "
          f"median of {args.repeats} fresh processes):")
    print(f"  {'configuration':<28} {'first token s':>14} {'tok/s':>8} {'peak RSS MiB':>13}")
    for label, k in (("dense transformers", "dense"), ("dense, weights copied to RAM", "dense_ram"),
                     ("thawed rtn b4 g128", "thawed_rtn_b4_g128"),
                     ("thawed rtn b4, budget 25%", "thawed_rtn_b4_g128_budget25")):
        v = summary[k]
        print(f"  {label:<28} {v['ttft_s']:>14.2f} {v['tok_per_s']:>8.2f} {v['peak_rss_mib']:>13.0f}")
    for k, v in summary["ratios"].items():
        print(f"  {k}: {v:.3f}")
    result = {"correctness": correct, "decode": decode_rows, "end_to_end": summary, "runs": runs}
    print("JSON " + json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Quality of checkpoints against their dense source, on two evaluation domains, as one JSON file
for ``benchmarks/plot_rd.py``.

    python benchmarks/quality_ckpts.py --ckpt rtn4=out/rtn4 --ckpt nwc425=out/nwc425 [--ckpt LABEL=DIR ...]
                                 [--src DIR] [--domains ptb-test,code-stdlib] [--tokens 4096] [--no-dense]
                                 [--json-out out/quality.json]

Domains: ``ptb-test`` (Penn Treebank test, English news) and ``code-stdlib`` (Python source from
the standard library: argparse, difflib, textwrap). Protocol per domain: ``thawed eval``'s (first
--tokens tokens, no BOS, window 1024, stride 512), dense measured in the same run with the same
code. Bits per weight come from the files (``thawed inspect``: linear layers, and the whole file
with header and shared codec state).

Correctness first: every checkpoint must have been compressed from --src (each coded tensor's
shape matches, and the first coded tensor decodes within 5 dB SQNR of the source, which rules out a
checkpoint of another model), and every perplexity must be finite.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def check_checkpoint(path: Path, src: Path) -> dict:
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.compress.source import SourceModel
    from thawed.runtime.inspection import inspect_checkpoint
    from thawed.runtime.report import sqnr_db

    with Checkpoint.open(path) as ckpt, SourceModel(src) as source:
        rep = inspect_checkpoint(ckpt)
        coded = [n for n, e in ckpt.index.items() if e.codec != "raw"]
        assert coded, f"{path}: no coded tensor"
        for n in coded:
            shape, _ = source.shape_dtype(n)
            assert tuple(shape) == tuple(ckpt.index[n].shape), f"{path}: {n} shape differs from {src}"
        probe = next(n for n in coded if ckpt.index[n].role == "linear")
        sqnr = sqnr_db(source.get(probe), ckpt.decode(probe, "cpu", torch.float32))
        assert sqnr > 5.0, f"{path}: {probe} is {sqnr:.1f} dB from {src}: not compressed from this source"
        codecs = {}
        for r in rep["tensors"]:
            if r["codec"] != "raw":
                codecs[r["codec"]] = codecs.get(r["codec"], 0) + 1
    return {"codec": max(codecs, key=codecs.get), "codecs": codecs, "bpw_linear": rep["linear"]["bpw"],
            "bpw_file": rep["total"]["bpw"], "probe": probe, "probe_sqnr_db": round(sqnr, 2),
            "settings": ckpt.metadata.get("settings", {}).get("plan")}


def evaluate(model: Path, domains: dict[str, list[int]], ctx: int) -> dict[str, dict]:
    from thawed.runtime.eval import perplexity
    from thawed.runtime.loading import load_for_inference
    from thawed.runtime.model import RuntimeConfig

    loaded = load_for_inference(model, RuntimeConfig(device="cpu"))
    try:
        out = {}
        for name, ids in domains.items():
            res = perplexity(lambda x: loaded.model(input_ids=x, use_cache=False).logits, ids, ctx=ctx, corpus=name)
            assert math.isfinite(res.perplexity) and res.perplexity > 1, f"{model} on {name}: {res.perplexity}"
            out[name] = {"perplexity": round(res.perplexity, 4), "scored_tokens": res.scored_tokens,
                         "seconds": round(res.seconds, 1), "protocol": res.protocol}
        return out
    finally:
        loaded.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", action="append", default=[], metavar="LABEL=DIR", help="checkpoint to measure")
    ap.add_argument("--src", default=None, help="the dense source (default: thawed demo-model)")
    ap.add_argument("--domains", default="ptb-test,code-stdlib")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the dense rows (a second run to pool with a first one that has them)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from thawed.runtime.demo_model import demo_model_dir
    from thawed.runtime.eval import load_corpus
    from thawed.runtime.loading import load_tokenizer

    src = Path(args.src) if args.src else Path(demo_model_dir())
    ckpts = []
    for item in args.ckpt:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            ap.error(f"--ckpt {item!r}: give LABEL=DIR with an existing checkpoint directory")
        ckpts.append((label, Path(path)))
    command = "python benchmarks/quality_ckpts.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"# {command}", flush=True)

    checks = {label: check_checkpoint(path, src) for label, path in ckpts}  # correctness first
    for label, c in checks.items():
        print(f"  ok {label}: {c['codec']}, probe {c['probe']} {c['probe_sqnr_db']} dB", flush=True)

    tok = load_tokenizer(src)
    domains = {}
    for d in args.domains.split(","):
        _, text = load_corpus(d)
        domains[d] = tok(text, add_special_tokens=False)["input_ids"][: args.tokens]
    rows = []
    t0 = time.perf_counter()
    dense = [] if args.no_dense else [("dense", src, {"codec": "dense", "bpw_linear": 32.0, "bpw_file": 32.0})]
    for label, path, info in dense + [(lbl, p, checks[lbl]) for lbl, p in ckpts]:
        res = evaluate(path, domains, args.ctx)
        for d, r in res.items():
            rows.append({"label": label, "path": str(path), "domain": d, **{k: info[k] for k in
                         ("codec", "bpw_linear", "bpw_file")}, **r})
            print(f"  {label:<12} {info['codec']:<6} file {info['bpw_file']:6.3f} bpw  {d:<12} perplexity "
                  f"{r['perplexity']:9.3f}  ({r['seconds']:.0f}s)", flush=True)
    result = {"command": command, "source": str(src), "tokens": args.tokens, "ctx": args.ctx,
              "domains": {d: next(r["protocol"] for r in rows if r["domain"] == d) for d in domains},
              "python": platform.python_version(), "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "seconds": round(time.perf_counter() - t0, 1), "checks": checks, "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

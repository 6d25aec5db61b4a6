"""Decode throughput of every codec in one or more checkpoints, per device (CPU, and CUDA when present).

    python benchmarks/decode_speed.py CKPT [CKPT ...] [--devices cpu,cuda] [--dtype fp32|bf16]
                                      [--repeats 3] [--match REGEX] [--threads N] [--workers N] [--json-out FILE]
    python benchmarks/decode_speed.py --subset OUT --match 'layers\\.(0|1|2)\\.' CKPT

Correctness first: every tensor decoded on each device must equal the CPU fp32 decode (bit-exact
for ``raw``/``lossless``; ``assert_close`` at fp32 round-off for the others, NaN/Inf checked),
else the script exits non-zero before printing any figure. Then, per checkpoint x device x codec:
weights, decoded bytes (at the output dtype), payload bytes, median seconds over the repeats to
decode every matching tensor once (payloads already on the device, as the runtime holds them; CUDA
synchronised), decoded GB/s and weights/s. CUDA runs one untimed warm-up pass first.

``--subset`` copies the matching tensors of a checkpoint, payload bytes unchanged, into a smaller
checkpoint: a few real layers are enough to measure throughput on a machine that a whole model
cannot be sent to.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from thawed.codecs import get_codec
from thawed.runtime.checkpoint import Checkpoint
from thawed.codecs.threads import set_thread_count
from thawed.runtime.compress.writer import CheckpointWriter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXACT = ("raw", "lossless")


def subset(src: Path, out: Path, pattern: re.Pattern[str]) -> int:
    with Checkpoint.open(src) as ckpt:
        names = [n for n in ckpt.index if pattern.search(n)]
        if not names:
            raise SystemExit(f"no tensor of {src} matches {pattern.pattern!r}")
        codecs = {ckpt.index[n].codec for n in names}
        with CheckpointWriter(out, source=f"subset of {src}", settings={"subset": pattern.pattern},
                              source_dir=ckpt.config_dir) as w:
            for n in names:
                e = ckpt.index[n]
                w.add(e.spec, e.codec, e.codec_version, ckpt.encoded(n))
            for c in sorted(codecs & set(ckpt.shared_codecs())):
                w.add_shared(c, ckpt.shared(c))
            w.finish()
    return len(names)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed_pass(group, decode_one, dev: torch.device, workers: int) -> float:
    """Seconds to decode every tensor of ``group`` once: one after another (each op on torch's
    threads), or on the CPU with ``workers`` > 0 on that many threads at once, each running its ops
    on one thread (codecs/threads.py: OpenMP team and MKL count, set after torch's per-thread init) -- how the
    runtime decodes a whole model (runtime/early.py)."""
    _sync(dev)
    t0 = time.perf_counter()
    if workers > 0 and dev.type == "cpu":
        with ThreadPoolExecutor(workers, initializer=set_thread_count, initargs=(1,)) as pool:
            for _ in pool.map(decode_one, group):
                pass
    else:
        for n in group:
            decode_one(n)
    _sync(dev)
    return time.perf_counter() - t0


def measure(path: Path, devices: list[str], dtype: torch.dtype, repeats: int,
            pattern: re.Pattern[str] | None, workers: int = 0) -> list[dict]:
    rows: list[dict] = []
    with Checkpoint.open(path) as ckpt:
        names = [n for n, e in ckpt.index.items() if e.codec != "raw" and (pattern is None or pattern.search(n))]
        by_codec: dict[str, list[str]] = {}
        for n in names:
            by_codec.setdefault(ckpt.index[n].codec, []).append(n)
        reference = {n: ckpt.decode(n, "cpu", torch.float32) for n in names}
        for dev_name in devices:
            dev = torch.device(dev_name)
            for codec_name, group in sorted(by_codec.items()):
                cls = get_codec(codec_name)
                shared = {k: v.to(dev) for k, v in ckpt.shared(codec_name).items()}
                payloads = {n: ckpt.encoded(n).to(dev) for n in group}
                _sync(dev)
                # correctness: this device and dtype against the CPU fp32 decode
                for n in group:
                    e = ckpt.index[n]
                    got = cls.decode(payloads[n], e.spec, shared, dev, dtype).float().cpu()
                    want = reference[n]
                    if not torch.isfinite(got).all() and torch.isfinite(want).all():
                        raise SystemExit(f"FAIL {path.name} {n} on {dev_name}: NaN/Inf in the decode")
                    if dtype == torch.float32 and codec_name in EXACT and dev.type == "cpu":
                        ok = torch.equal(got, want)
                    else:
                        tol = 1e-5 if dtype == torch.float32 else 1e-2
                        ok = torch.allclose(got, want.to(dtype).float(), rtol=tol, atol=tol * float(want.abs().max()))
                    if not ok:
                        err = float((got - want).abs().max())
                        raise SystemExit(f"FAIL {path.name} {n} on {dev_name}: differs from the CPU decode (max |diff| {err:.3g})")
                def decode_one(n: str) -> None:
                    e = ckpt.index[n]
                    cls.decode(payloads[n], e.spec, shared, dev, dtype)

                w = workers if dev.type == "cpu" else 0
                secs = [_timed_pass(group, decode_one, dev, w) for _ in range(repeats + (1 if dev.type == "cuda" else 0))]
                if dev.type == "cuda":
                    secs = secs[1:]
                s = statistics.median(secs)
                numel = sum(ckpt.index[n].spec.numel for n in group)
                out_bytes = numel * torch.empty((), dtype=dtype).element_size()
                rows.append({
                    "checkpoint": path.name, "device": dev_name, "codec": codec_name, "tensors": len(group),
                    "weights": numel, "payload_MB": sum(ckpt.index[n].nbytes for n in group) / 1e6,
                    "decoded_MB": out_bytes / 1e6, "seconds": s, "GB_per_s": out_bytes / s / 1e9,
                    "Mweights_per_s": numel / s / 1e6, "dtype": str(dtype).removeprefix("torch."),
                    "mode": f"{w} tensors at once, 1 thread each" if w else f"ops on {torch.get_num_threads()} threads",
                })
                del payloads, shared
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--devices", default=None, help="comma list; default cpu plus cuda when available")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--match", default=None, help="regex on tensor names")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--workers", type=int, default=0,
                    help="CPU: decode this many tensors at once, each on one OpenMP thread (the runtime's way); "
                         "0 = one tensor at a time on --threads")
    ap.add_argument("--subset", type=Path, default=None, help="write the matching tensors of one checkpoint here and exit")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    pattern = re.compile(args.match) if args.match else None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.subset is not None:
        if pattern is None or len(args.checkpoints) != 1:
            ap.error("--subset needs --match and exactly one checkpoint")
        n = subset(args.checkpoints[0], args.subset, pattern)
        print(f"wrote {n} tensors to {args.subset}")
        return 0
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for path in args.checkpoints:
        rows += measure(path, devices, DTYPES[args.dtype], args.repeats, pattern, args.workers)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(f"{'checkpoint':<22} {'device':<6} {'codec':<9} {'tensors':>7} {'Mweights':>9} {'payload MB':>10} "
          f"{'seconds':>9} {'GB/s':>8} {'Mweights/s':>11}  mode")
    for r in rows:
        print(f"{r['checkpoint']:<22} {r['device']:<6} {r['codec']:<9} {r['tensors']:>7} {r['weights'] / 1e6:>9.2f} "
              f"{r['payload_MB']:>10.2f} {r['seconds']:>9.4f} {r['GB_per_s']:>8.2f} {r['Mweights_per_s']:>11.1f}  {r['mode']}")
    line = json.dumps({"decode_speed": rows})
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

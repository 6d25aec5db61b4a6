"""Does nwc's learned network earn its place? (issue 15, item 5)

Trains the nwc network and its scalar baseline -- the same network with the encoder/decoder MLPs
kept at their identity start, so only the per-rate step sizes and the prior learn (an
entropy-coded scalar quantiser) -- on the same data, steps and seed, and compares them on held-out
weights at equal bits per weight:

* ``minilm``: all-MiniLM-L6-v2's fp32 linears, layers 0-4 (the shipped network's data);
* ``minilm+source``: the same plus the dense model's own even decoder layers (``--source``,
  default the bundled SmolLM2-135M; as many chunks as MiniLM gives).

Held out: MiniLM layer 5 and the source's odd decoder layers (never trained on). Real rounding,
bits from the integer tables' code lengths. The gain at equal rate is the MLP network's SQNR
interpolated (linearly in bpw) at each of the scalar baseline's rate points, minus the baseline's.

    python benchmarks/nwc_mlp_gain.py [--steps 1500] [--threads 1] [--source DIR] [--json-out FILE]

Correctness first: every network's rates rise with lambda and every SQNR is finite, and the
scalar baseline's MLPs are still exactly the identity after training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def _interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            t = (x - xs[i]) / (xs[i + 1] - xs[i]) if xs[i + 1] > xs[i] else 0.0
            return ys[i] + t * (ys[i + 1] - ys[i])
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", default=None, help="dense HF folder (default: the bundled SmolLM2-135M)")
    ap.add_argument("--data", default="minilm,minilm+source")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    from thawed.runtime.compress.train_nwc import TrainConfig, train_nwc

    source = args.source
    if source is None:
        from thawed.runtime.demo_model import demo_model_dir

        source = str(demo_model_dir())
    command = "python benchmarks/nwc_mlp_gain.py " + " ".join(sys.argv[1:])
    print(command, flush=True)
    results: dict[str, dict] = {}
    for data in args.data.split(","):
        for kind in ("mlp", "scalar"):
            cfg = TrainConfig(steps=args.steps, threads=args.threads, seed=args.seed,
                              source=source if data == "minilm+source" else None, scalar_only=kind == "scalar")
            t0 = time.perf_counter()
            net, _, record = train_nwc(cfg)
            sets = {"minilm-layer5": record["val"], **record.get("held_out", {})}
            # correctness first
            for name, rows in sets.items():
                bits = [r["bits_per_weight"] for r in rows]
                assert all(b2 > b1 for b1, b2 in zip(bits, bits[1:])), f"{data}/{kind}/{name}: rates not rising"
                assert all(math.isfinite(r["sqnr_db"]) for r in rows), f"{data}/{kind}/{name}: non-finite SQNR"
            if kind == "scalar":
                assert float(net.enc.l3.weight.abs().sum() + net.dec.l3.weight.abs().sum()) == 0.0
            results[f"{data}/{kind}"] = {"sets": sets, "train_seconds": record["train_seconds"],
                                         "seconds": round(time.perf_counter() - t0, 1), "data": record["data"]}
            print(f"trained {data}/{kind}: {record['train_seconds']} s training, "
                  f"{time.perf_counter() - t0:.0f} s in all", flush=True)

    print(f"\n{args.steps} steps, seed {args.seed}; held-out SQNR (dB) at the scalar baseline's rates, "
          "MLP network interpolated at equal bpw:")
    print("| training data | held-out set | bpw | scalar baseline dB | MLP network dB | gain dB |")
    print("|---|---|---|---|---|---|")
    gains = []
    for data in args.data.split(","):
        mlp, sc = results[f"{data}/mlp"]["sets"], results[f"{data}/scalar"]["sets"]
        for name in sc:
            xs = [r["bits_per_weight"] for r in mlp[name]]
            ys = [r["sqnr_db"] for r in mlp[name]]
            for r in sc[name]:
                if not 2.0 <= r["bits_per_weight"] <= 6.0:
                    continue
                y = _interp(r["bits_per_weight"], xs, ys)
                if y is None:
                    continue
                gains.append({"data": data, "set": name, "bpw": r["bits_per_weight"], "scalar_db": r["sqnr_db"],
                              "mlp_db": round(y, 3), "gain_db": round(y - r["sqnr_db"], 3)})
                print(f"| {data} | {name} | {r['bits_per_weight']:.3f} | {r['sqnr_db']:.2f} | {y:.2f} | "
                      f"{y - r['sqnr_db']:+.2f} |")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"command": command, "results": results, "gains": gains}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

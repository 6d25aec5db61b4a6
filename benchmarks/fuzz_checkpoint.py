"""Fuzz checkpoints: damaged and lying mutants through inspect and load + forward (issue 14).

Every outcome must be a one-line thawed error or logits exactly equal to the good checkpoint's;
anything else is printed and the script exits 1. The mutant families and the oracle live in
``tests/checkpoint_mutants.py`` (the CI share runs them on tiny models: tests/test_fuzz_checkpoint.py).

    python benchmarks/fuzz_checkpoint.py --real --per-family 12 --seed 0    # SmolLM2-135M rtn4
    python benchmarks/fuzz_checkpoint.py --per-family 60 --seed 1           # tiny Llama, 3 codecs
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from checkpoint_mutants import FAMILIES, make_mutants, reference_logits, run_mutant, summarise  # noqa: E402

from thawed.runtime.compress.pipeline import compress  # noqa: E402
from thawed.runtime.compress.plan import Plan, parse_codec_choice  # noqa: E402


def _bases(work: Path, real: bool) -> tuple[list[Path], torch.Tensor]:
    if real:
        from thawed.runtime.demo_model import demo_model_dir

        src = demo_model_dir(None)
        out = work / "smollm2-rtn4"
        compress(src, out, Plan(parse_codec_choice("rtn:bits=4,group_size=128"), ()), progress=False)
        return [out], torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    from models_fixtures import make_tiny_llama

    src = make_tiny_llama(work / "tiny")
    outs = []
    for codec in ("rtn:bits=4,group_size=32", "lossless", "cvxq"):
        out = work / codec.partition(":")[0]
        compress(src, out, Plan(parse_codec_choice(codec), ()), progress=False)
        outs.append(out)
    return outs, torch.tensor([[1, 5, 9, 3, 17, 4, 22, 8, 11, 2, 6, 30]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M rtn4 instead of the tiny Llama")
    ap.add_argument("--per-family", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-s", type=int, default=60, help="time limit of inspect and of load+forward")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        bases, ids = _bases(work, args.real)
        want = {b: reference_logits(b, ids) for b in bases}
        mutants = make_mutants(bases, {f: args.per_family for f in FAMILIES}, args.seed)
        t1 = time.perf_counter()
        outcomes = [run_mutant(m, work, want, ids, args.limit_s) for m in mutants]
        t2 = time.perf_counter()
    bad = [o for o in outcomes if o.bad]
    for o in bad:
        print(f"BAD [{o.mutant.family}] {o.mutant.what} ({o.mutant.base.name}): inspect={o.inspect} "
              f"load={o.load}: {o.message}")
    table = summarise(outcomes)
    print(json.dumps({"model": "SmolLM2-135M rtn4" if args.real else "tiny Llama rtn/lossless/cvxq",
                      "seed": args.seed, "per_family": args.per_family, "prepare_s": round(t1 - t0, 1),
                      "fuzz_s": round(t2 - t1, 1), "families": table}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Fuzz: 312 seeded mutants of tiny-Llama checkpoints (rtn, lossless, cvxq), six families, through
inspect and load + forward. Every outcome is a one-line thawed error or logits exactly equal to
the good checkpoint's: zero tracebacks, hangs or silent wrong loads. The families and the oracle:
tests/checkpoint_mutants.py. On the real model: benchmarks/fuzz_checkpoint.py --real.

Run with ``-s`` to see the counts per family.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from checkpoint_mutants import FAMILIES, make_mutants, reference_logits, run_mutant, summarise
from models_fixtures import tiny_llama_dir  # noqa: F401

from thawed.runtime.compress.pipeline import compress
from thawed.runtime.compress.plan import Plan, parse_codec_choice

PER_FAMILY = 52  # 6 families x 52 = 312 mutants
SEED = 14


@pytest.fixture(scope="module")
def bases(tiny_llama_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("fuzz-bases")
    out = []
    for codec in ("rtn:bits=4,group_size=32", "lossless", "cvxq"):
        folder = root / codec.partition(":")[0]
        compress(tiny_llama_dir, folder, Plan(parse_codec_choice(codec), ()), progress=False)
        out.append(folder)
    return out


def test_fuzz_every_mutant_is_refused_or_identical(bases, tmp_path, caplog):
    caplog.set_level(logging.ERROR)  # v1/format warnings of mutants are expected noise
    want = {b: reference_logits(b) for b in bases}
    mutants = make_mutants(bases, {f: PER_FAMILY for f in FAMILIES}, SEED)
    assert len(mutants) >= 300
    t0 = time.perf_counter()
    outcomes = [run_mutant(m, tmp_path, want, limit_s=30) for m in mutants]
    seconds = time.perf_counter() - t0
    table = summarise(outcomes)
    print(json.dumps({"seed": SEED, "seconds": round(seconds, 1), "families": table}))
    bad = [f"[{o.mutant.family}] {o.mutant.what} ({o.mutant.base.name}): inspect={o.inspect} load={o.load}: "
           f"{o.message}" for o in outcomes if o.bad]
    assert not bad, "\n".join(bad)
    for fam in FAMILIES:  # each family really damaged something: most of its mutants are refused
        assert table[fam]["mutants"] == PER_FAMILY
        assert table[fam]["load_error"] >= PER_FAMILY // 2, (fam, table[fam])
    assert table["total"]["load_error"] + table["total"]["load_same"] == len(mutants)

"""Healing benchmark on SmolLM2-135M (issue 17): perplexity before and after ``thawed heal`` per
checkpoint, with the dense model measured in the same run, on PTB test and pydoc.

    python benchmarks/heal.py --rows rtn3,see-emb-r8 --tokens 4096 --minutes 15 [--work-dir DIR]
                              [--json-out FILE] [--threads N]

For every row: compress (cached in the work folder), perplexity before, heal with the given
budget (self-generated calibration text, never an evaluation corpus), then *correctness first*:
every tensor of the healed checkpoint has the same codec, params, field dtypes and byte count as
before (so the bpw is unchanged) and the reloaded healed checkpoint gives the logits of the
in-memory healed model; then perplexity after. Perplexity: ``thawed.runtime.eval.perplexity``, the
protocol of ``thawed eval MODEL --corpus ptb-test|pydoc --tokens N --ctx 1024 --stride 512``.
Rows (``--rows``, comma-separated): see ROWS below.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

EMB = "model.embed_tokens.weight"
# label -> (default codec, overrides, cvxq target bpw or None)
ROWS: dict[str, tuple[str, tuple[str, ...], float | None]] = {
    "rtn3": ("rtn:bits=3,group_size=128", (), None),  # every tensor at 3.25 bpw (embedding and tied head too)
    "rtn3-ste": ("rtn:bits=3,group_size=128", (), None),  # rtn3, healed with its codes straight-through too
    # rtn3's format with GPTQ-chosen codes (self-generated calibration): x14 at 2,048 tokens, x7 at 32,768, not x81
    "rtn3-gptq": ("rtn:bits=3,group_size=128,gptq=true", (), None),
    # and each group's range chosen by an importance-weighted clip search first (stop 27; since then GPTQ
    # also reaches the tied head): x2.46 on PTB valid before healing
    "rtn3-gptq-clip": ("rtn:bits=3,group_size=128,gptq=true,clip_search=true", (), None),
    "rtn3-lin": ("rtn:bits=3,group_size=128", (f"{EMB}=lossless",), None),  # linears 3.25 bpw, embedding exact
    "see-emb-r8": ("lossless", (f"{EMB}=see:rank=8,units=256,core_bits=8",), None),  # 1.0 bpw: 16x < bf16
    "see-emb-r10": ("lossless", (f"{EMB}=see:rank=10,units=256,core_bits=8",), None),  # ~1.45 bpw: 11x < bf16
    "rtn2-emb": ("lossless", (f"{EMB}=rtn:bits=2,group_size=64",), None),  # 2.5 bpw: 6.4x < bf16
    "rtn3-emb": ("lossless", (f"{EMB}=rtn:bits=3,group_size=128",), None),  # 3.25 bpw: 4.9x < bf16
    # the same two with GPTQ on the tied embedding (the head's input Hessian) after a clip search (stop 27)
    "rtn2-emb-gc": ("lossless", (f"{EMB}=rtn:bits=2,group_size=64,gptq=true,clip_search=true",), None),
    "rtn3-emb-gc": ("lossless", (f"{EMB}=rtn:bits=3,group_size=128,gptq=true,clip_search=true",), None),
    "hyperc-3.25": ("hyperc:target_bpw=3.25", (), None),
    "cvxq-3.25": ("cvxq", (), 3.25),
    "cvxq-2.5": ("cvxq", (), 2.5),
    "nwc-3.25": ("nwc:target_bpw=3.25", (), None),
    "nwc-2.5": ("nwc:target_bpw=2.5", (), None),
}
# per-row healing settings over the command line's: SEE rows also train their core codes straight-through,
# and give stage (a) (which can only train the norms there: every linear is lossless) a small share
ROW_HEAL: dict[str, dict] = {
    "rtn3-ste": dict(ste=True, ste_stages=("block",)),
    "see-emb-r8": dict(ste=True, block_share=0.25, lr_e2e=1e-3, lr_codes=0.1),
    "see-emb-r10": dict(ste=True, block_share=0.25, lr_e2e=1e-3, lr_codes=0.1),
}
CORPORA = ("ptb-test", "pydoc")


def _compress(src: Path, work: Path, label: str) -> Path:
    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice, parse_override

    default, overrides, target = ROWS[label]
    path = work / label
    if (path / "model.thawed.safetensors").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    plan = Plan(parse_codec_choice(default), tuple(parse_override(o) for o in overrides))
    t0 = time.perf_counter()
    compress(src, path, plan, progress=False, target_bpw=target)
    print(f"  compressed {label} in {time.perf_counter() - t0:.0f}s", flush=True)
    return path


def _ppl(model: Path, ids: list[int], corpus: str, tokens: int) -> tuple[float, str]:
    from thawed.runtime.eval import evaluate

    res, _ = evaluate(model, corpus, ids=ids[:tokens], ctx=1024, stride=512)
    return res.perplexity, res.protocol


def _sizes(path: Path) -> dict:
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.inspection import inspect_checkpoint

    with Checkpoint.open(path) as ckpt:
        rep = inspect_checkpoint(ckpt)
        e = ckpt.index[EMB]
    return {"bpw_emb": round(e.nbytes * 8 / e.numel, 4), "emb_x_smaller_than_bf16": round(e.numel * 2 / e.nbytes, 2),
            "bpw_linear": rep["linear"]["bpw"], "bpw_file": rep["total"]["bpw"],
            "tensor_bytes": {n: x.nbytes for n, x in ckpt.index.items()}}


def check_healed(before: Path, after: Path, result) -> str:
    """Same codecs, params, dtypes and bytes per tensor; the reloaded healed checkpoint (exact decode path,
    ``direct=off``: the CPU int4 kernel of the default path runs in bf16) gives the logits of the healed
    fields decoded by ``decode_train`` (the in-memory model of this run, or read back from the file when
    the row was healed by an earlier run)."""
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.compress.heal.fields import TrainableCheckpoint
    from thawed.runtime.compress.heal.student import load_teacher, make_student, run_model
    from thawed.runtime.loading import forward_logits
    from thawed.runtime.model import RuntimeConfig

    with Checkpoint.open(before) as a, Checkpoint.open(after) as b:
        assert list(a.index) == list(b.index)
        for name, ea in a.index.items():
            eb = b.index[name]
            assert (ea.codec, ea.params, ea.fields, ea.nbytes) == (eb.codec, eb.params, eb.fields, eb.nbytes), name
        src = Path(a.metadata["source"])
        ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
        student = make_student(load_teacher(src), b)  # with cvxq's output-bias corrections
        fields = result.fields if result is not None else TrainableCheckpoint(b)
        with torch.no_grad():
            mine = run_model(student, fields.weights(), ids)
    got = forward_logits(after, ids, RuntimeConfig(device="cpu", direct="off"))
    torch.testing.assert_close(got, mine, rtol=1e-4, atol=1e-4)
    where = "in-memory" if result is not None else "decode_train of the file's fields"
    return f"bytes per tensor unchanged; reloaded logits == {where} (max diff {float((got - mine).abs().max()):.2e})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="rtn3,see-emb-r8")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--minutes", type=float, default=15.0, help="healing budget per row")
    ap.add_argument("--block-share", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lr-e2e", type=float, default=1e-4)
    ap.add_argument("--calib-tokens", type=int, default=None,
                    help="calibration tokens for healing (default: HealConfig's, the compressor's 32,768)")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense rows (only to re-run one row)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("thawed.runtime.compress.heal").setLevel(logging.INFO)
    from thawed.runtime.demo_model import demo_model_dir
    from thawed.runtime.eval import load_corpus
    from thawed.runtime.compress.heal import HealConfig, heal
    from thawed.runtime.loading import load_tokenizer

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    src = Path(demo_model_dir())
    work = Path(args.work_dir or Path(os.environ.get("THAWED_CACHE", "/tmp/thawed-cache")) / "bench-heal")
    work.mkdir(parents=True, exist_ok=True)
    print("command: python benchmarks/heal.py " + " ".join(sys.argv[1:]), flush=True)
    print(f"torch threads {torch.get_num_threads()}; healing budget {args.minutes} min per row; "
          f"perplexity on the first {args.tokens} tokens, window 1024, stride 512", flush=True)
    tok = load_tokenizer(src)
    ids = {c: tok(load_corpus(c)[1], add_special_tokens=False)["input_ids"][: args.tokens] for c in CORPORA}
    out: dict = {"args": vars(args), "rows": {}}
    dense = {}
    if not args.no_dense:
        for c in CORPORA:
            t0 = time.perf_counter()
            dense[c], proto = _ppl(src, ids[c], c, args.tokens)
            out.setdefault("protocol", {})[c] = proto
            print(f"  dense {c}: {dense[c]:.3f} ({time.perf_counter() - t0:.0f}s) [{proto}]", flush=True)
    out["dense"] = dense
    for label in rows:
        ck = _compress(src, work, label)
        row: dict = {"sizes": _sizes(ck)}
        row["sizes"].pop("tensor_bytes")
        for c in CORPORA:
            row[f"{c}_before"] = _ppl(ck, ids[c], c, args.tokens)[0]
        opts = dict(minutes=args.minutes, block_share=args.block_share, lr=args.lr, lr_e2e=args.lr_e2e)
        if args.calib_tokens is not None:
            opts["calib_tokens"] = args.calib_tokens
        opts |= ROW_HEAL.get(label, {})
        healed_dir = work / (f"{label}-healed-" + "-".join(
            f"{k}{v:g}" if isinstance(v, float) else f"{k}{'+'.join(v)}" if isinstance(v, tuple) else f"{k}{v}"
            for k, v in sorted(opts.items())))
        result = None
        if not (healed_dir / "model.thawed.safetensors").is_file():
            shutil.rmtree(healed_dir, ignore_errors=True)
            cfg = HealConfig(**opts)
            print(f"  {label}: healing with {opts}", flush=True)
            result = heal(ck, healed_dir, cfg)
        print(f"  {label}: correctness: {check_healed(ck, healed_dir, result)}", flush=True)
        from thawed.runtime.checkpoint import Checkpoint

        with Checkpoint.open(healed_dir) as h:
            rec = h.metadata["settings"]["healing"]
        row["healing"] = {k: rec.get(k) for k in ("block_steps", "block_steps_per_layer", "e2e_steps", "tokens",
                                                   "block_tokens", "e2e_tokens", "seconds", "seconds_per_e2e_step",
                                                   "kl_before", "kl_after", "calib_tokens", "lr", "lr_e2e", "ste",
                                                   "lr_codes", "minutes")}
        for c in CORPORA:
            row[f"{c}_after"] = _ppl(healed_dir, ids[c], c, args.tokens)[0]
        out["rows"][label] = row
        r = row
        print(f"  {label}: emb {r['sizes']['bpw_emb']:.3f} bpw ({r['sizes']['emb_x_smaller_than_bf16']}x < bf16), "
              f"linear {r['sizes']['bpw_linear']:.3f} bpw; "
              + "; ".join(f"{c} {r[c + '_before']:.2f} -> {r[c + '_after']:.2f}" for c in CORPORA)
              + f"; healing {json.dumps(r['healing'])}", flush=True)
    print()
    print("| row | emb bpw (x < bf16) | linear bpw | " + " | ".join(
        f"{c} before (x dense) | {c} healed (x dense)" for c in CORPORA) + " | heal s | block steps | e2e steps "
          "| s/e2e step | tokens | calib KL |")
    print("|---" * (9 + 2 * len(CORPORA)) + "|")
    if dense:
        print("| dense fp32 | 32 | 32 | " + " | ".join(f"{dense[c]:.2f} | -" for c in CORPORA) + " | | | | | | |")
    for label, r in out["rows"].items():
        s, h = r["sizes"], r["healing"]

        def x(c: str, when: str) -> str:
            v = r[f"{c}_{when}"]
            return f"{v:.2f} (x{v / dense[c]:.2f})" if dense else f"{v:.2f}"

        print(f"| {label} | {s['bpw_emb']:.3f} ({s['emb_x_smaller_than_bf16']}) | {s['bpw_linear']:.3f} | "
              + " | ".join(f"{x(c, 'before')} | {x(c, 'after')}" for c in CORPORA)
              + f" | {h['seconds']} | {h['block_steps']} | {h['e2e_steps']} | {h['seconds_per_e2e_step']} | "
                f"{h['tokens']} | {h['kl_before']} -> {h['kl_after']} |")
    print(json.dumps(out))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

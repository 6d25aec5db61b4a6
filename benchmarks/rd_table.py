"""The rate-distortion table of issue 15: every codec at 2.5, 3.25 and 4.25 bits per weight on the
real SmolLM2-135M, perplexity on PTB test and pydoc with dense in the same run, plus weight SQNR on
MiniLM's genuine fp32 linears.

    python benchmarks/rd_table.py [--codecs rtn,rtn-gptq,hqq,cvxq,nwc,hyperc] [--rates 2.5,3.25,4.25]
                                  [--tokens 20000] [--corpora ptb-test,pydoc] [--jobs 1] [--threads 2]
                                  [--cells CODEC@RATE,...] [--no-minilm | --minilm-only] [--work out/rd] [--json-out out/rd/results.jsonl]
                                  [--calib-compare CODEC@RATE [--calib-text FILE]] [--calib-tokens 32768]
    python benchmarks/rd_table.py --table-only [--json-out out/rd/results.jsonl]   # the table so far

Rows and protocol are ``benchmarks/quality.py``'s (compress from the dense model with the row's
calibration -- ``self``: text the model generates itself, never an evaluated corpus -- then the
first ``--tokens`` tokens of each corpus, no BOS, window 1024, stride 512). Each (codec, rate):

| codec | 2.5 | 3.25 | 4.25 | calibration |
|---|---|---|---|---|
| rtn | b2 g64 | b3 g128 | b4 g128 | none |
| rtn-gptq | the same + ``gptq=true,clip_search=true`` (since stop 27) | | | self |
| hqq | the same + ``hqq=true`` (thawed's HQQ refinement of scale and zero) | | | none |
| cvxq | ``target_bpw`` | | | self (sensitivities, bias means) |
| nwc | ``target_bpw`` | | | self (importance levels) |
| hyperc | ``target_bpw`` | | | none |

rtn's bpw is ``bits + 32 / group`` (f16 scale and offset per group); SmolLM2's 576-wide rows end in
a partial group of 64 at g128, so rtn and hqq sit slightly above their nominal rate: the table
prints every row's measured file bpw next to its nominal one.

Calibration sources (``--calib-compare cvxq@4.25``): the same cell again with PTB train as calibration
(row ``cvxq@4.25+ptb-train``) and, with ``--calib-text FILE``, with that file (row ``cvxq@4.25+text``),
measured in the same run; the table then gains a section comparing the three sources on both domains.

MiniLM SQNR (``--no-minilm`` skips it): the calibration-free codecs (rtn, hqq, hyperc, nwc without
importance) encode each of all-MiniLM-L6-v2's 36 encoder linears alone; SQNR over all of them
together, and over layer 5 alone (the layer nwc's shipped network was not trained on: its layers 0-4
are nwc's training data). cvxq and GPTQ need calibration inputs of a causal LM and are not measured there.
Correctness first: every compressed row's checkpoint is read back (bpw from ``thawed inspect``'s
counting), and every perplexity must be finite over exactly the scored tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402  (benchmarks/quality.py: compress + evaluate one row)

RTN_AT = {2.5: (2, 64), 3.25: (3, 128), 4.25: (4, 128)}
CODECS = ("rtn", "rtn-gptq", "hqq", "cvxq", "nwc", "hyperc")


def row_spec(codec: str, rate: float) -> tuple[str, float | None, str | None]:
    """(codec choice, cvxq file target or None, calibration) of one table cell."""
    if codec in ("rtn", "rtn-gptq", "hqq"):
        if rate not in RTN_AT:
            raise SystemExit(f"rtn-family rows exist at {sorted(RTN_AT)} bpw, not {rate}")
        b, g = RTN_AT[rate]
        base = f"rtn:bits={b},group_size={g}"
        return {"rtn": (base, None, None), "rtn-gptq": (base + ",gptq=true,clip_search=true", None, "self"),
                "hqq": (base + ",hqq=true", None, None)}[codec]
    if codec == "cvxq":
        return ("cvxq", rate, "self")
    if codec == "nwc":
        return (f"nwc:target_bpw={rate}", None, "self")
    if codec == "hyperc":
        return (f"hyperc:target_bpw={rate}", None, None)
    raise SystemExit(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")


def minilm_sqnr(codecs: list[str], rates: list[float]) -> list[dict]:
    import torch

    from thawed.codecs import EncodeContext, TensorSpec, get_codec
    from thawed.runtime.compress.plan import parse_codec_choice

    sys.path.insert(0, str(HERE))
    from hyperc import _minilm  # the 36 encoder linears of the bundled all-MiniLM-L6-v2

    lin = _minilm()
    numel = sum(w.numel() for w in lin.values())
    rows = []
    for codec in codecs:
        if codec in ("cvxq", "rtn-gptq"):
            continue
        for rate in rates:
            text = row_spec(codec, rate)[0]
            choice = parse_codec_choice(text)
            enc_codec = choice.build()
            sig = noise = sig5 = noise5 = 0.0
            nbytes = 0
            t0 = time.perf_counter()
            for name, w in lin.items():
                spec = TensorSpec(name, tuple(w.shape), w.dtype, "linear")
                enc = enc_codec.encode(w, spec, EncodeContext(name))
                shared = enc_codec.shared_tensors() if hasattr(enc_codec, "shared_tensors") else {}
                out = get_codec(choice.name).decode(enc, spec, shared, torch.device("cpu"), torch.float32)
                assert torch.isfinite(out).all(), (codec, rate, name)
                s_, n_ = float(w.double().square().sum()), float((w.double() - out.double()).square().sum())
                sig, noise = sig + s_, noise + n_
                if ".layer.5." in name:  # the layer nwc's shipped network never trained on
                    sig5, noise5 = sig5 + s_, noise5 + n_
                nbytes += enc.nbytes
            row = {"part": "minilm_sqnr", "codec": codec, "rate": rate, "spec": text, "bpw": nbytes * 8 / numel,
                   "sqnr_db": 10 * math.log10(sig / noise),
                   "sqnr_db_layer5": 10 * math.log10(sig5 / noise5) if noise5 else None,
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def render_table(path: str) -> str:
    """The whole table from ``--json-out``'s lines, however many invocations wrote them (``--cells``
    re-runs an interrupted table). Every invocation measured dense; they must agree to the digit
    (evaluation is deterministic), or the rows would not be comparable and this refuses."""
    ppl: dict[str, dict] = {}
    dense: dict[str, set] = {}
    sqnr: dict[tuple, dict] = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("part") == "minilm_sqnr":
            sqnr[(r["codec"], r["rate"])] = r
        elif "perplexity" in r:
            if r["row"] == "dense":
                dense.setdefault(r["corpus"], set()).add(r["perplexity"])
            ppl.setdefault(r["row"], {"bpw": r["file_bpw"]})[r["corpus"]] = r["perplexity"]
    if any(len(v) != 1 for v in dense.values()):
        raise SystemExit(f"{path}: the invocations measured different dense perplexities {dense}; "
                         "re-run the table in one invocation")
    d = {c: next(iter(v)) for c, v in dense.items()}
    if set(d) != {"ptb-test", "pydoc"}:
        raise SystemExit(f"{path}: no dense row on ptb-test and pydoc; run rd_table.py first")

    def fmt(x: float) -> str:
        return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"

    out = ["| codec | nominal bpw | file bpw | PTB test ppl | × dense | pydoc ppl | × dense | "
           "pydoc increase / PTB increase |", "|---|---|---|---|---|---|---|---|",
           f"| dense fp32 | 32 | 32 | {d['ptb-test']:.3f} | — | {d['pydoc']:.3f} | — | |"]
    for codec in CODECS:
        for rate in (4.25, 3.25, 2.5):
            v = ppl.get(f"{codec}@{rate}")
            if not v or "ptb-test" not in v or "pydoc" not in v:
                out.append(f"| {codec} | {rate} | not measured | | | | | |")
                continue
            a, b = v["ptb-test"] / d["ptb-test"], v["pydoc"] / d["pydoc"]
            ratio = f"{(b - 1) / (a - 1):.2f}" if a > 1 else ""
            out.append(f"| {codec} | {rate} | {v['bpw']:.3f} | {fmt(v['ptb-test'])} | ×{a:.3f} | "
                       f"{fmt(v['pydoc'])} | ×{b:.3f} | {ratio} |")
    for base in sorted({row.split("+")[0] for row in ppl if "+" in row}):
        out += ["", f"Calibration sources, {base} (same run, same dense):", "",
                "| calibration | file bpw | PTB test ppl | × dense | pydoc ppl | × dense | pydoc increase / PTB increase |",
                "|---|---|---|---|---|---|---|"]
        for tag, label in (("", "self-generated (default)"), ("+ptb-train", "PTB train"), ("+text", "--calib-text")):
            v = ppl.get(base + tag)
            if not v or "ptb-test" not in v or "pydoc" not in v:
                continue
            a, b = v["ptb-test"] / d["ptb-test"], v["pydoc"] / d["pydoc"]
            ratio = f"{(b - 1) / (a - 1):.2f}" if a > 1 else ""
            out.append(f"| {label} | {v['bpw']:.3f} | {fmt(v['ptb-test'])} | ×{a:.3f} | {fmt(v['pydoc'])} | ×{b:.3f} | "
                       f"{ratio} |")
    if sqnr:
        out += ["", sqnr_table(r for _, r in sorted(sqnr.items(),
                                                    key=lambda kv: (CODECS.index(kv[0][0]), -kv[0][1])))]
    return "\n".join(out)


def sqnr_table(rows) -> str:
    """The MiniLM SQNR rows (``minilm_sqnr``'s records) as a Markdown table."""
    out = ["| codec | rate | bpw (MiniLM) | SQNR dB (36 linears) | SQNR dB (layer 5 only) |", "|---|---|---|---|---|"]
    for r in rows:
        l5 = "" if r["sqnr_db_layer5"] is None else f"{r['sqnr_db_layer5']:.2f}"
        out.append(f"| {r['codec']} | {r['rate']} | {r['bpw']:.3f} | {r['sqnr_db']:.2f} | {l5} |")
    return "\n".join(out)


def main() -> int:
    from thawed.runtime.compress.calib_data import DEFAULT_CALIB_TOKENS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--rates", default="2.5,3.25,4.25")
    ap.add_argument("--cells", default=None,
                    help="explicit cells codec@rate,... instead of every codec at every rate (e.g. the cells an "
                         "interrupted run had not reached; dense is measured again in this run)")
    ap.add_argument("--corpora", default="ptb-test,pydoc")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS)
    ap.add_argument("--calib-compare", default=None, metavar="CODEC@RATE",
                    help="also measure this cell calibrated on PTB train and (with --calib-text) on FILE")
    ap.add_argument("--calib-text", default=None, metavar="FILE", help="the user-text row of --calib-compare")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--minilm-only", action="store_true", help="only the MiniLM SQNR part (no perplexity rows)")
    ap.add_argument("--work", default="out/rd")
    ap.add_argument("--json-out", default="out/rd/results.jsonl")
    ap.add_argument("--src", default=None)
    ap.add_argument("--table-only", action="store_true",
                    help="measure nothing: print the whole table from --json-out (every invocation's cells)")
    args = ap.parse_args()
    if args.table_only:
        print(render_table(args.json_out))
        return 0
    codecs = [c for c in args.codecs.split(",") if c]
    rates = [float(r) for r in args.rates.split(",") if r]
    cells = {f"{c}@{r}": (c, r) for c in codecs for r in rates}
    if args.cells:
        cells = {}
        for cell in args.cells.split(","):
            c, sep, r = cell.partition("@")
            if not sep:
                raise SystemExit(f"--cells entry {cell!r} is not codec@rate (e.g. rtn@3.25)")
            cells[f"{c}@{float(r)}"] = (c, float(r))
        codecs = sorted({c for c, _ in cells.values()}, key=lambda c: CODECS.index(c) if c in CODECS else len(CODECS))
        rates = sorted({r for _, r in cells.values()})
    for name, (c, r) in cells.items():
        quality.ROWS[name] = row_spec(c, r)
    if args.calib_text and not args.calib_compare:
        raise SystemExit("--calib-text is the user-text row of --calib-compare CODEC@RATE; give both")
    if args.calib_compare:  # first in the run: their compressions are the slow part
        c, sep, r = args.calib_compare.partition("@")
        codec, target, calib = row_spec(c, float(r)) if sep else (None, None, None)
        if calib is None:
            raise SystemExit(f"--calib-compare {args.calib_compare!r}: name a calibrated cell, e.g. cvxq@4.25 "
                             "or rtn-gptq@4.25")
        base = f"{c}@{float(r)}"
        extra = {base + "+ptb-train": (codec, target, "ptb-train")}
        if args.calib_text:
            if not Path(args.calib_text).is_file():
                raise SystemExit(f"--calib-text {args.calib_text} is not a file")
            extra[base + "+text"] = (codec, target, f"file:{Path(args.calib_text).resolve()}")
        quality.ROWS.update(extra)
        cells = {name: (c, float(r)) for name in extra} | cells
        if base not in cells:
            cells[base] = (c, float(r))
            quality.ROWS[base] = (codec, target, calib)
    command = "python benchmarks/rd_table.py " + " ".join(sys.argv[1:])
    qargs = ["--rows", ",".join(["dense", *cells]), "--corpora", args.corpora, "--tokens", str(args.tokens),
             "--calib-tokens", str(args.calib_tokens), "--seed", str(args.seed), "--threads", str(args.threads),
             "--jobs", str(args.jobs), "--work", args.work, "--json-out", args.json_out]
    if args.src:
        qargs += ["--src", args.src]
    print(command, flush=True)
    if not args.minilm_only:
        sys.argv = ["benchmarks/quality.py", *qargs]
        quality.main()  # prints the perplexity table (rows "codec@rate"), each row measured with dense
    if not args.no_minilm:
        import torch

        torch.set_num_threads(args.threads)
        rows = minilm_sqnr(codecs, rates)
        with open(args.json_out, "a") as f:
            for r in rows:
                f.write(json.dumps(r | {"command": command}) + "\n")
        print("\n" + sqnr_table(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

"""Two-domain quality on the real SmolLM2-135M: calibrated codecs under different calibration text.

    python benchmarks/quality.py [--rows dense,rtn4,rtn4-gptq,cvxq4.25-self,cvxq4.25-ptb] [--tokens 8192]
                                 [--corpora ptb-test,pydoc] [--calib-tokens 32768] [--work DIR] [--json-out FILE]

Every row is compressed from the dense model (``runtime/compress/pipeline.py``, calibration as the row
says: ``self`` = text the model generates itself, the default; ``ptb`` = Penn Treebank train),
checked (file bpw from the checkpoint; rtn and rtn+gptq tensors must take the same bytes: GPTQ
changes codes, not the format; the header differs by the calibration record), then evaluated with ``thawed eval``'s protocol (``runtime/eval.py``: first
``--tokens`` tokens, no BOS, window 1024, stride 512) on each corpus; dense is measured in the same
run. No row is calibrated or tuned on an evaluated corpus. One JSON line per result goes to
``--json-out`` (a partial run keeps its figures); a Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROWS = {  # name -> (codec, target bpw or None, calibration source)
    "dense": (None, None, None),
    "rtn4": ("rtn:bits=4,group_size=128", None, None),
    "rtn4-gptq": ("rtn:bits=4,group_size=128,gptq=true", None, "self"),
    "rtn4-gptq-ptb": ("rtn:bits=4,group_size=128,gptq=true", None, "ptb-train"),
    "cvxq4.25-self": ("cvxq", 4.25, "self"),
    "cvxq4.25-ptb": ("cvxq", 4.25, "ptb-train"),
    "nwc4.25": ("nwc:target_bpw=4.25", None, "self"),  # alloc=global: one slope, the whole file at 4.25
    "nwc4.25-tensor": ("nwc:target_bpw=4.25,alloc=tensor", None, "self"),  # every tensor at 4.25 (the former default)
    "nwc4.25-s0.5": ("nwc:target_bpw=4.25,spread=0.5", None, "self"),  # global, every tensor within +-0.5 bpw
    "nwc4.25-s1": ("nwc:target_bpw=4.25,spread=1", None, "self"),
    "nwc4.25-kl": ("nwc:target_bpw=4.25,sens=kl", None, "self"),  # global, measured per-tensor KL
    "nwc3.25": ("nwc:target_bpw=3.25", None, "self"),
    "nwc3.25-tensor": ("nwc:target_bpw=3.25,alloc=tensor", None, "self"),
    "nwc4.25-gptq": ("nwc:target_bpw=4.25,ec=true", None, "self"),
    "nwc4.25-ec-inorder": ("nwc:target_bpw=4.25,ec=true,act_order=false", None, "self"),
    # error feedback with Hessians from many more calibration tokens (docs/QUALITY.md: 2,048 overfit
    # down_proj's 1,536 inputs); compare with nwc3.25 / nwc2.5 at the same --calib-tokens
    "nwc3.25-gptq": ("nwc:target_bpw=3.25,ec=true", None, "self"),
    "nwc2.5": ("nwc:target_bpw=2.5", None, "self"),
    "nwc2.5-gptq": ("nwc:target_bpw=2.5,ec=true", None, "self"),
}


def emit(out: Path, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _bpw(path: Path) -> dict:
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.inspection import inspect_checkpoint

    with Checkpoint.open(path) as ck:
        rep = inspect_checkpoint(ck)
    return {"linear_bpw": round(rep["linear"]["bpw"], 4), "file_bpw": round(rep["total"]["bpw"], 4),
            "file_bytes": rep["total"]["file_bytes"], "tensor_bytes": rep["total"]["tensor_bytes"]}


def calib_spec(calib: str | None, seed: int):
    """A row's calibration source: ``self`` (or None), ``ptb-train``, or ``file:PATH`` (``--calib-text``)."""
    from thawed.runtime.compress.calib_data import CalibSpec

    if calib and calib.startswith("file:"):
        return CalibSpec("file", Path(calib[len("file:"):]), seed=seed)
    return CalibSpec(calib or "self", seed=seed)


def _compress(src: Path, work: Path, row: str, calib_tokens: int, seed: int) -> tuple[Path, dict]:
    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice

    codec, target, calib = ROWS[row]
    path = work / row
    info: dict = {}
    if not (path / "model.thawed.safetensors").is_file() and not any(path.glob("*.safetensors")):
        if path.exists():
            shutil.rmtree(path)
        t0 = time.perf_counter()
        rep = compress(src, path, Plan(parse_codec_choice(codec)), progress=False, seed=seed, target_bpw=target,
                       calib_tokens=calib_tokens, calib=calib_spec(calib, seed))
        info["compress_seconds"] = round(rep.seconds, 1)
        info["wall_seconds"] = round(time.perf_counter() - t0, 1)
    from thawed.runtime.checkpoint import Checkpoint

    with Checkpoint.open(path) as ck:
        settings = ck.metadata["settings"]
    info["calibration"] = settings.get("calibration")
    return path, info | _bpw(path)


def _ppl(model_path: Path, corpus: str, tokens: int) -> dict:
    from thawed.runtime.eval import evaluate

    res, _ = evaluate(model_path, corpus, tokens=tokens, ctx=1024)
    assert math.isfinite(res.perplexity) and res.scored_tokens == res.tokens - 1, res
    return {"perplexity": round(res.perplexity, 3), "protocol": res.protocol, "eval_seconds": round(res.seconds, 1)}


def _row(row: str, src: Path, work: Path, corpora: list[str], args, command: str, out: Path):
    import torch

    torch.set_num_threads(args.threads)
    size = None
    if row == "dense":
        path, info = src, {"file_bpw": 32.0}
    else:
        path, info = _compress(src, work, row, args.calib_tokens, args.seed)
        size = info["tensor_bytes"]  # the header differs (it records the calibration), the tensors must not
        emit(out, {"row": row, "stage": "compress", "command": command} | info)
    ppl = {}
    for corpus in corpora:
        res = _ppl(path, corpus, args.tokens)
        ppl[corpus] = res["perplexity"]
        emit(out, {"row": row, "corpus": corpus, "file_bpw": info["file_bpw"], "command": command} | res)
    return row, size, ppl


def main() -> None:
    from thawed.runtime.compress.calib_data import DEFAULT_CALIB_TOKENS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="dense,rtn4,rtn4-gptq,cvxq4.25-self,cvxq4.25-ptb")
    ap.add_argument("--corpora", default="ptb-test,pydoc")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1, help="rows measured in parallel processes (default 1)")
    ap.add_argument("--work", default="out/quality")
    ap.add_argument("--json-out", default="out/quality/results.jsonl")
    ap.add_argument("--src", default=None, help="dense HF directory (default: thawed demo-model)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from thawed.runtime.demo_model import demo_model_dir

    src = Path(args.src) if args.src else demo_model_dir()
    work, out = Path(args.work), Path(args.json_out)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    corpora = [c for c in args.corpora.split(",") if c]
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    results: dict = {}
    sizes: dict = {}
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(_row, row, src, work, corpora, args, command, out) for row in rows]
            outcomes = [f.result() for f in futures]
    else:
        outcomes = [_row(row, src, work, corpora, args, command, out) for row in rows]
    for row, size, ppl in outcomes:
        if size is not None:
            sizes[row] = size
        results.update({(row, c): p for c, p in ppl.items()})
    if "rtn4" in sizes and "rtn4-gptq" in sizes:  # GPTQ changes codes, never the format
        assert sizes["rtn4"] == sizes["rtn4-gptq"], sizes
    print(f"\n{command}\n")
    head = "| row | file bpw | " + " | ".join(f"{c} ppl | × dense" for c in corpora) + " |"
    print(head)
    print("|" + "---|" * (2 + 2 * len(corpora)))
    for row in rows:
        cells = []
        for c in corpora:
            p, d = results.get((row, c)), results.get(("dense", c))
            cells += [f"{p:.3f}" if p else "—", f"×{p / d:.3f}" if p and d else "—"]
        bpw = "32" if row == "dense" else f"{_bpw(work / row)['file_bpw']:.3f}"
        print(f"| {row} | {bpw} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

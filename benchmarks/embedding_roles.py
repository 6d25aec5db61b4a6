"""Which role of a tied embedding costs perplexity (issue 17): a checkpoint's decoded embedding put
into the dense model as the input table only, as the output head only, and as both.

    python benchmarks/embedding_roles.py CKPT [--source DIR] [--corpus ptb-valid] [--tokens 4096]

The dense model is loaded untied in float32; each row replaces the input embedding and/or the head
with the checkpoint's decoded ``model.embed_tokens.weight`` and measures perplexity with
``thawed.runtime.eval.perplexity`` (the protocol of ``thawed eval``: window 1024, stride 512, no BOS).
Correctness first: the ``dense`` row must equal the dense model tied as it ships (same logits), and
the ``both`` row's embedding must be the checkpoint's, bit for bit.
"""

from __future__ import annotations

import argparse
import sys

import torch

EMB = "model.embed_tokens.weight"
ROLES = ("dense", "input", "head", "both")


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.eval import load_corpus, perplexity

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="thawed checkpoint of a model with a tied embedding")
    ap.add_argument("--source", default=None, help="its dense Hugging Face folder (default: the one it records)")
    ap.add_argument("--corpus", default="ptb-valid")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args(argv)

    with Checkpoint.open(args.ckpt) as ck:
        if EMB not in ck.index:
            print(f"error: {args.ckpt} has no tensor {EMB!r}; this benchmark needs a Llama-style tied embedding",
                  file=sys.stderr)
            return 2
        src = args.source or str(ck.metadata.get("source") or "")
        q = ck.decode(EMB, dtype=torch.float32).clone()
    if not src:
        print("error: the checkpoint records no source folder; give --source DIR", file=sys.stderr)
        return 2
    tok = AutoTokenizer.from_pretrained(src)
    name, text = load_corpus(args.corpus)
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.tokens]

    tied = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    if tied.lm_head.weight.data_ptr() != tied.model.embed_tokens.weight.data_ptr():
        print(f"error: {src} does not tie its head to its embedding; nothing to separate", file=sys.stderr)
        return 2
    probe = torch.tensor([ids[:64]])
    with torch.no_grad():
        ref = tied(input_ids=probe, use_cache=False).logits
    dense = tied.model.embed_tokens.weight.detach().clone()
    del tied
    m = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, tie_word_embeddings=False).eval()
    for role in ROLES:  # one untied model, its two tables swapped per row
        m.model.embed_tokens.weight = torch.nn.Parameter(q if role in ("input", "both") else dense)
        m.lm_head.weight = torch.nn.Parameter(q if role in ("head", "both") else dense)
        if role == "dense":  # correctness first: untied with the dense table on both sides is the shipped model
            with torch.no_grad():
                torch.testing.assert_close(m(input_ids=probe, use_cache=False).logits, ref, rtol=0, atol=1e-4)
        if role == "both":
            assert torch.equal(m.model.embed_tokens.weight, q) and torch.equal(m.lm_head.weight, q)
        r = perplexity(lambda x: m(input_ids=x, use_cache=False).logits, ids, corpus=name)
        print(f"{role:6s} perplexity {r.perplexity:9.3f}  ({r.scored_tokens} tokens of {name})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

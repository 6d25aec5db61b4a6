"""Calibration data for the compression pipeline: which token windows the calibrated stages see.

Three sources (``CalibSpec.source``):

- ``self`` (the default): text the dense model samples itself. Sequences of ``SELF_SEQ_LEN``
  tokens, each starting with the tokenizer's BOS (its EOS when it has no BOS) followed by one of
  ``STARTS`` in turn (the first is empty: BOS alone, so the model picks the opening), then tokens
  sampled at ``temperature`` (1.0: the model's own distribution, no top-k/top-p) from a
  ``torch.Generator`` seeded with ``seed``; end-of-sequence tokens are sampled like any other.
  Nothing of any evaluation corpus is involved, so the calibrated codecs fit the model's own
  distribution over text rather than one corpus. The ids are cached per model under
  ``$THAWED_CACHE/calib/`` (key: the model's config and safetensors headers and sizes plus every
  generation setting), and the record says how many tokens and how many seconds they took.
- ``file``: a user's UTF-8 text file (``--calib-text FILE``), tokenised without special tokens
  and cut into windows of ``seq_len``.
- ``ptb-train``: the first tokens of Penn Treebank train (the former default), likewise.

Imported only by the compression pipeline; the runtime never imports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from thawed.codecs.errors import ThawedError

__all__ = ["CalibSpec", "CalibData", "calibration_data", "resolve_calibration", "self_generate", "SOURCES", "STARTS",
           "SELF_SEQ_LEN", "DEFAULT_CALIB_TOKENS"]

log = logging.getLogger(__name__)

SOURCES = ("self", "file", "ptb-train")
# Calibration tokens of `thawed compress` (cvxq's sensitivities and bias correction, GPTQ's and nwc's
# layer-input statistics). 32,768 (128 self-generated sequences of 256): on SmolLM2, cvxq at 4.25 bpw
# went from x1.239 / x1.295 (PTB test / pydoc; pydoc's increase 1.24x PTB's) at 2,048 tokens to
# x1.164 / x1.142 (0.86x), and rtn+GPTQ at 3.25 from x14.1 / x10.1 to x7.05 / x6.58 (docs/QUALITY.md).
# GPTQ tools calibrate on more still (128-512 sequences of 2,048); here it costs cvxq's compression
# 24 min instead of 2.3 on two CPU cores, once per model (the text is cached).
DEFAULT_CALIB_TOKENS = 32768
SELF_SEQ_LEN = 256  # tokens per self-generated sequence (start included)
SELF_VERSION = 1  # bump when the generation procedure changes: old cache entries are then ignored
# Short, domain-neutral openings (prose, dialogue, code, lists, numbers); the first is BOS alone.
STARTS = ("", "The", "In", "I", "def", "#", "1.", "Q:", "A", "It was", "import", "When", "Dear", "<", "-",
          "This")


@dataclass(frozen=True)
class CalibSpec:
    """Where calibration text comes from (see the module docstring)."""

    source: str = "self"
    path: Path | None = None  # source == "file"
    seed: int = 0
    temperature: float = 1.0
    cache_dir: Path | None = None  # default: $THAWED_CACHE/calib

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ThawedError(f"calibration source {self.source!r} is unknown; choose one of {', '.join(SOURCES)}")
        if (self.source == "file") != (self.path is not None):
            raise ThawedError("a calibration text file goes with source 'file' (--calib-text FILE), and only there")
        if self.path is not None and not Path(self.path).is_file():
            raise ThawedError(f"--calib-text {self.path} does not exist or is not a file")
        if not 0 < self.temperature <= 10:
            raise ThawedError(f"calibration temperature must be in (0, 10], got {self.temperature}")

    @classmethod
    def from_args(cls, calib: str | None, calib_text: str | Path | None, seed: int = 0) -> "CalibSpec":
        """CLI: ``--calib self|ptb-train`` and ``--calib-text FILE`` (which implies ``file``)."""
        if calib_text is not None:
            if calib not in (None, "file"):
                raise ThawedError(f"--calib-text gives the calibration text; drop --calib {calib}")
            return cls("file", Path(calib_text), seed=seed)
        return cls(calib or "self", seed=seed)

    def describe(self) -> dict:
        d: dict = {"source": self.source, "seed": self.seed}
        if self.source == "self":
            d["temperature"] = self.temperature
        if self.path is not None:
            d["path"] = str(self.path)
        return d


@dataclass(frozen=True)
class CalibData:
    windows: tuple[tuple[int, ...], ...]  # token ids, each window run as one sequence
    record: dict = field(default_factory=dict)  # source, tokens, seconds, cached...

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    def flat(self) -> list[int]:
        return [t for w in self.windows for t in w]


def calibration_data(src: str | Path, tokens: int, spec: CalibSpec | None = None, *, seq_len: int = 512,
                     tokenizer=None) -> CalibData:
    """About ``tokens`` calibration tokens for the model at ``src`` as windows of at most ``seq_len``."""
    spec = spec or CalibSpec()
    if tokens < 2:
        raise ThawedError(f"--calib-tokens must be at least 2, got {tokens}")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(src))
    t0 = time.perf_counter()
    if spec.source == "self":
        return _self_data(src, tokenizer, tokens, spec, seq_len)
    extra: dict = {}
    if spec.source == "file":
        raw = Path(spec.path).read_bytes()  # type: ignore[arg-type]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ThawedError(f"--calib-text {spec.path} is not UTF-8 text ({e}); convert it to UTF-8") from None
        extra["sha256"] = hashlib.sha256(raw).hexdigest()  # the checkpoint records which text it saw
    else:
        from ..eval import load_corpus

        _, text = load_corpus("ptb-train")
        text = text[: max(20_000, tokens * 8)]  # enough characters for `tokens` tokens (~5 per token)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    if len(ids) < 2:
        raise ThawedError(f"the calibration text ({spec.source}{'' if spec.path is None else ' ' + str(spec.path)}) "
                          "has fewer than 2 tokens; give a longer --calib-text")
    windows = tuple(tuple(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) >= 2)
    rec = spec.describe() | extra | {"tokens": len(ids), "seconds": round(time.perf_counter() - t0, 2)}
    return CalibData(windows, rec)


def resolve_calibration(src: str | Path, tokens: int, calib: "CalibSpec | CalibData | str | None", *,
                        seq_len: int = 512, tokenizer=None) -> CalibData:
    """What every calibrated stage calls: ``CalibData`` is used as it is (one generation shared by
    several stages), a ``CalibSpec`` (or None: the default, self-generated) is produced, and a plain
    string is taken as calibration *text* (tests, notebooks)."""
    if isinstance(calib, CalibData):
        return calib
    if isinstance(calib, str):
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(src))
        ids = tokenizer(calib, add_special_tokens=False)["input_ids"][:tokens]
        if len(ids) < 2:
            raise ThawedError("the calibration text has fewer than 2 tokens")
        return CalibData(tuple(tuple(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)
                               if len(ids[i:i + seq_len]) >= 2), {"source": "text", "tokens": len(ids)})
    return calibration_data(src, tokens, calib, seq_len=seq_len, tokenizer=tokenizer)


# ---- self-generated text -------------------------------------------------------------------------
def _model_key(src: Path) -> str:
    """A cheap identity of the model's weights: config.json and every safetensors header and size."""
    h = hashlib.sha256()
    cfg = src / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + f.stat().st_size.to_bytes(8, "little") + fh.read(min(n, 1 << 26)))
    return h.hexdigest()[:16]


def _cache_path(src: Path, n_seq: int, spec: CalibSpec) -> Path:
    from ..demo_model import default_cache_dir

    base = Path(spec.cache_dir) if spec.cache_dir is not None else default_cache_dir() / "calib"
    key = f"v{SELF_VERSION}-{_model_key(src)}-n{n_seq}x{SELF_SEQ_LEN}-seed{spec.seed}-t{spec.temperature:g}"
    return base / f"self-{key}.json"


def _self_data(src: str | Path, tokenizer, tokens: int, spec: CalibSpec, seq_len: int) -> CalibData:
    src = Path(src)
    n_seq = max(1, math.ceil(tokens / SELF_SEQ_LEN))
    path = _cache_path(src, n_seq, spec)
    seqs: list[list[int]] | None = None
    seconds = 0.0
    cached = False
    if path.is_file():
        try:
            blob = json.loads(path.read_text())
            seqs, seconds, cached = blob["sequences"], float(blob["seconds"]), True
        except (ValueError, KeyError, OSError) as exc:  # a damaged cache entry is regenerated
            log.warning("calibration cache %s is unreadable (%s); generating again", path, exc)
            seqs = None
    if seqs is None:
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        model.eval()
        seqs = self_generate(model, tokenizer, n_seq, SELF_SEQ_LEN, seed=spec.seed, temperature=spec.temperature)
        seconds = time.perf_counter() - t0
        del model
        _write_json(path, {"sequences": seqs, "seconds": round(seconds, 2), "source": str(src),
                           "settings": spec.describe() | {"seq_len": SELF_SEQ_LEN, "version": SELF_VERSION}})
    flat_budget = tokens
    windows: list[tuple[int, ...]] = []
    for s in seqs:  # each sequence is cut into windows of seq_len; the total is cut at `tokens`
        s = s[:flat_budget]
        flat_budget -= len(s)
        windows.extend(tuple(s[i:i + seq_len]) for i in range(0, len(s), seq_len) if len(s[i:i + seq_len]) >= 2)
        if flat_budget <= 0:
            break
    data = CalibData(tuple(windows))
    rec = spec.describe() | {"tokens": data.tokens, "sequences": len(seqs), "seq_len": SELF_SEQ_LEN,
                             "generation_seconds": round(seconds, 2), "cached": cached, "cache": str(path)}
    log.info("self-generated calibration text: %d tokens in %d sequences, generated in %.1fs%s", data.tokens,
             len(seqs), seconds, " (from the cache)" if cached else "")
    return CalibData(data.windows, rec)


def _write_json(path: Path, blob: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(blob, fh)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache costs a regeneration next time, nothing more
        log.warning("could not cache calibration text at %s: %s", path, exc)


@torch.no_grad()
def self_generate(model, tokenizer, n_seq: int, length: int, *, seed: int = 0,
                  temperature: float = 1.0) -> list[list[int]]:
    """``n_seq`` sequences of ``length`` token ids sampled from ``model`` (see the module docstring).

    Sequences with starts of equal token length run as one batch (KV cache, no padding), so the
    result does not depend on batching choices; sequence ``i`` samples from its own generator
    seeded ``seed * 1_000_003 + i``.
    """
    from ..generate import cache_kwargs, output_cache

    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if first is None:
        raise ThawedError("self-generated calibration needs a tokenizer with a BOS or EOS token; give --calib-text FILE")
    device = next(model.parameters()).device
    prompts = []
    for i in range(n_seq):
        start = STARTS[i % len(STARTS)]
        ids = [first] + (tokenizer(start, add_special_tokens=False)["input_ids"] if start else [])
        prompts.append(ids[:length])
    out: list[list[int]] = [list(p) for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for plen, idx in sorted(by_len.items()):
        gens = [torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + i) for i in idx]
        x = torch.tensor([prompts[i] for i in idx], device=device)
        past = None
        for _ in range(length - plen):
            res = model(input_ids=x, use_cache=True, **({} if past is None else cache_kwargs(past)))
            past = output_cache(res)
            probs = torch.softmax(res.logits[:, -1].float().cpu() / temperature, dim=-1)
            nxt = [int(torch.multinomial(probs[j], 1, generator=g)) for j, g in enumerate(gens)]
            for j, i in enumerate(idx):
                out[i].append(nxt[j])
            x = torch.tensor([[t] for t in nxt], device=device)
    return out

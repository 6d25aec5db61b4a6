"""A tokenizer read straight from ``tokenizer.json`` with the ``tokenizers`` library (0.1 s to import),
for the start-up path that does not import transformers (runtime/native.py).

Only for folders whose ``tokenizer_config.json`` names a class that transformers itself runs as
``tokenizer.json`` unchanged (``TokenizersBackend``, ``PreTrainedTokenizerFast``) and that does not
ask for ``clean_up_tokenization_spaces``: then encoding and decoding are the same calls transformers
makes, and ``tests/test_native.py`` compares the two on the real model's tokenizer. Any other folder
(and chat templates) use transformers' ``AutoTokenizer`` (``loading.load_tokenizer``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from .files import read_json_file

__all__ = ["FastTokenizer", "load_fast_tokenizer"]

log = logging.getLogger(__name__)

_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class FastTokenizer:
    """The part of a transformers tokenizer that ``thawed generate`` uses: ``tok(text)["input_ids"]``,
    ``decode(ids, skip_special_tokens=...)`` and ``eos_token_id``."""

    def __init__(self, tokenizer: Any, eos_token: str | None) -> None:
        self._tok = tokenizer
        self.eos_token = eos_token
        self.eos_token_id = None if eos_token is None else tokenizer.token_to_id(eos_token)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens)["input_ids"]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("chat templates need transformers' tokenizer (loading.load_tokenizer)")


def load_fast_tokenizer(folder: str | Path) -> FastTokenizer | None:
    """The folder's tokenizer without transformers, or None (logged at debug) when it needs transformers."""
    folder = Path(folder)
    tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not (tj.is_file() and tc.is_file()):
        log.debug("%s: no tokenizer.json + tokenizer_config.json; using transformers' tokenizer", folder)
        return None
    try:
        cfg = read_json_file(tc, "tokenizer_config.json")
    except ValueError as exc:
        log.debug("%s: %s; using transformers' tokenizer", tc, exc)
        return None
    if not isinstance(cfg, dict) or cfg.get("tokenizer_class") not in _CLASSES or cfg.get("clean_up_tokenization_spaces"):
        log.debug("%s: tokenizer_class %r needs transformers", tc, cfg.get("tokenizer_class") if isinstance(cfg, dict) else None)
        return None
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tj))
    except Exception as exc:  # noqa: BLE001 - let transformers read it (and say what is wrong)
        log.debug("%s: the tokenizers library cannot read it (%s); using transformers' tokenizer", tj, exc)
        return None
    why = _needs_transformers(cfg, tok)
    if why is not None:
        log.debug("%s: %s; using transformers' tokenizer", tc, why)
        return None
    return FastTokenizer(tok, _token_text(cfg.get("eos_token")))


def _needs_transformers(cfg: dict, tok: Any) -> str | None:
    """Why transformers would tokenize differently from ``tokenizer.json`` as it is, or None.

    transformers' ``TokenizersBackend`` changes the loaded tokenizer when the config asks for BOS/EOS
    insertion, names special tokens the file lacks (it adds them), splits special tokens, or (vocab
    over 100k) patches Mistral's pre-tokenizer regex; such folders go through transformers."""
    if "add_bos_token" in cfg or "add_eos_token" in cfg:
        return "the config sets add_bos_token/add_eos_token"
    if cfg.get("split_special_tokens"):
        return "the config sets split_special_tokens"
    named = [_token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        extra = list(extra.values())
    named += [_token_text(t) for t in extra] if isinstance(extra, list) else [None]
    for t in named:
        if t is not None and tok.token_to_id(t) is None:
            return f"special token {t!r} is not in tokenizer.json"
    if tok.get_vocab_size() > 100000 and tok.pre_tokenizer is not None:
        return "a vocabulary over 100k may get transformers' Mistral regex patch"
    return None

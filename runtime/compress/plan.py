"""The compression plan: which codec (with which options) encodes each tensor.

Default: the chosen codec for every linear weight, embedding and untied lm_head (where the codec
supports that role); ``raw`` for everything else (norms, biases, buffers, non-float tensors).
Overrides by glob pattern on the tensor name, later ones winning::

    --codec rtn:bits=4,group_size=128 --codec-for '*.v_proj.weight=rtn:bits=6' \
        --codec-for 'model.embed_tokens.weight=raw'
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch

from thawed.codecs import Codec, get_codec
from thawed.codecs.errors import CodecError

__all__ = ["CodecChoice", "Plan", "parse_codec_choice", "parse_override"]


@dataclass(frozen=True)
class CodecChoice:
    name: str
    options: tuple[tuple[str, str], ...] = ()

    def build(self) -> Codec:
        return get_codec(self.name).from_options(dict(self.options))

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.name}:{opts}" if opts else self.name


def parse_codec_choice(text: str) -> CodecChoice:
    """``rtn`` or ``rtn:bits=4,group_size=128`` -> CodecChoice (the codec must exist)."""
    name, _, rest = text.strip().partition(":")
    if not name:
        raise CodecError(f"codec spec {text!r} has no codec name; write e.g. 'rtn:bits=4,group_size=128'")
    opts: list[tuple[str, str]] = []
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise CodecError(f"codec option {part!r} in {text!r} is not key=value")
        opts.append((key.strip(), value.strip()))
    choice = CodecChoice(name, tuple(opts))
    choice.build()  # fail now, naming the codec/option, rather than halfway through compressing
    return choice


def parse_override(text: str) -> tuple[str, CodecChoice]:
    """``'PATTERN=codec:key=value,...'`` -> (pattern, choice)."""
    pattern, eq, spec = text.partition("=")
    if not eq or not pattern.strip() or not spec.strip():
        raise CodecError(
            f"--codec-for {text!r} must look like 'PATTERN=codec:key=value,...', "
            "e.g. '*.v_proj.weight=rtn:bits=6'"
        )
    return pattern.strip(), parse_codec_choice(spec)


@dataclass(frozen=True)
class Plan:
    default: CodecChoice
    overrides: tuple[tuple[str, CodecChoice], ...] = field(default_factory=tuple)

    def choose(self, name: str, role: str, dtype: torch.dtype, ndim: int) -> CodecChoice:
        for pattern, choice in reversed(self.overrides):
            if fnmatch.fnmatchcase(name, pattern):
                return choice
        if not dtype.is_floating_point or ndim < 2:
            return CodecChoice("raw")
        if role in get_codec(self.default.name).roles and role != "other":
            return self.default
        return CodecChoice("raw")

    def as_dict(self) -> dict:
        return {"default": str(self.default), "overrides": [[p, str(c)] for p, c in self.overrides]}

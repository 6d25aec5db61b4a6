"""One-line error text: transformers and tokenizers raise messages that span many lines."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    """The message of ``exc`` with every run of whitespace (newlines included) made one space,
    cut at ``limit`` characters. Prefixed with the exception type when it says nothing alone."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    if not isinstance(exc, str) and type(exc).__name__ not in text and len(text) < 40:
        text = f"{type(exc).__name__}: {text}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

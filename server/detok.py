"""Incremental detokenization with stop strings held back until they are decided.

``TextAssembler.push(token)`` returns the new text of that token (``piece``; empty while a UTF-8
sequence is incomplete) and the text that is safe to send now (``delta``): text that could be the
start of a stop string is held back until the following tokens show it is not. Decoding uses a
sliding window (prefix/read offsets, as TGI and vLLM do), so each token costs O(window), not
O(length).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["TextAssembler"]

_CONTEXT = 6  # prompt tokens kept as decoding context


class TextAssembler:
    def __init__(self, tokenizer, stop: Sequence[str] = (), *, include_stop: bool = False,
                 context: Sequence[int] = ()) -> None:
        """``context``: the prompt's last tokens, so the first new token decodes with the spacing
        it has after the prompt (a leading space, say), as TGI and vLLM do."""
        self._tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop
        self.ids: list[int] = list(context)[-_CONTEXT:]
        self.text = ""  # decoded text of every complete token so far
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False
        self._prefix = 0
        self._read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, str]:
        """Add one token; return ``(piece, delta)``. After a stop string, ``self.stopped`` is True
        and ``delta`` ends right before it (or after it with ``include_stop``)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            piece = now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
        else:
            piece = ""
        return piece, self._advance()

    def _advance(self) -> str:
        text = self.text
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.sent - longest)
            best = None
            for s in self.stop:
                i = text.find(s, start)
                if i >= 0 and (best is None or i < best[0]):
                    best = (i, s)
            if best is not None:
                end = best[0] + (len(best[1]) if self.include_stop else 0)
                delta = text[self.sent:end] if end > self.sent else ""
                self.sent = max(self.sent, end)
                self.text = text[:self.sent]
                self.stopped = True
                return delta
            hold = 0
            for s in self.stop:  # longest suffix of the text that is a proper prefix of a stop string
                for k in range(min(len(s) - 1, len(text) - self.sent), hold, -1):
                    if text.endswith(s[:k]):
                        hold = k
                        break
            safe = len(text) - hold
        else:
            safe = len(text)
        delta = text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return delta

    def flush(self) -> str:
        """At the end of generation: everything not yet sent (held-back text, an incomplete
        UTF-8 tail decoded with replacement characters)."""
        if not self.stopped and self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix:self._read])
            now = self._decode(self.ids[self._prefix:])
            self.text += now[len(before):]
            self._read = len(self.ids)
        if self.stopped:
            return ""
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

    @property
    def output(self) -> str:
        """The text handed out so far (the final text once finished)."""
        return self.text[:self.sent]

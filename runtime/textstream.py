"""Incremental detokenization: text pieces from a growing token list, never splitting a UTF-8 character."""
from __future__ import annotations


class TextStream:
    """push(token) returns the new text since the last piece. Text ending in an incomplete multi-byte character
    (which the byte-level decoder shows as U+FFFD) is held back until the character is whole; flush() gives the
    rest at the end. Stop strings cut the text at their first occurrence."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        full = self._decode()
        if full.endswith("\ufffd"):
            return ""
        return self._advance(full)

    def flush(self) -> str:
        return "" if self.stopped else self._advance(self._decode())

    def _advance(self, full: str) -> str:
        before = self.text
        for s in self.stop:
            at = full.find(s, max(0, len(before) - len(s) + 1))
            if at != -1:
                full, self.stopped = full[:at], True
                break
        if not full.startswith(before):  # cannot happen for byte-level BPE; be safe rather than garble
            return ""
        self.text = full
        return full[len(before):]

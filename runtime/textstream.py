"""Incremental detokenization: text pieces from a growing token list, never splitting a UTF-8 character."""

from __future__ import annotations


class TextStream:
    """push(token) returns the new text since the last piece. Text ending in an incomplete multi-byte character
    (which the byte-level decoder shows as U+FFFD) is held back until the character is whole; flush() gives the
    rest at the end. Stop strings cut the text at their first occurrence.

    Each push decodes only the tokens since the last emitted piece plus the piece before it as left context (so a
    decoder that treats the first token specially, like Metaspace, sees the same context): O(1) per token on the
    decode loop instead of re-decoding everything generated so far."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = 0  # tokens[_prefix:_read] decode to the context already emitted
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        return self._emit(final=False)

    def flush(self) -> str:
        return "" if self.stopped else self._emit(final=True)

    def _emit(self, final: bool) -> str:
        context = self._decode(self.tokens[self._prefix : self._read])
        window = self._decode(self.tokens[self._prefix :])
        if (window.endswith("\ufffd") and not final) or len(window) <= len(context):
            return ""
        new = window[len(context) :]
        self._prefix, self._read = self._read, len(self.tokens)
        return self._advance(new)

    def _advance(self, new: str) -> str:
        before = self.text
        full = before + new
        for s in self.stop:
            at = full.find(s, max(0, len(before) - len(s) + 1))
            if at != -1:
                full, self.stopped = full[:at], True
                break
        self.text = full
        return full[len(before) :]

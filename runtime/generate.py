"""Cached generation over an export folder: prefill, then decode one token at a time with the latent cache.

No torch. The tokenizer is the export's tokenizer.json, read by the `tokenizers` library.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from mla_edge.contract import InputError, comparison, positions_from_mask

from .manifest import ManifestError
from .memory import peak_rss_bytes
from .sampling import Sampler, SamplingOptions
from .session import DEFAULT_PROVIDER, LatentSession
from .static import StaticSession
from .textstream import TextStream

# Long prompts are prefilled in chunks: attention scratch grows with chunk x context, and onnxruntime's arena keeps
# its peak. On the demo model at an 1,800-token prompt, chunks of 256 peak at 206 MiB RSS, 64 at 123 MiB, at the
# same prefill speed (README, "Edge memory budgets").
PREFILL_CHUNK = 64


class PromptError(InputError):
    """A prompt (or generation argument) that cannot run; the message says which and why."""


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # eos | stop | length
    prompt_tokens: int
    stats: dict = field(default_factory=dict)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask, positions_from_mask(mask, width)


class Generator:
    def __init__(
        self,
        export_dir: str | Path,
        precision: str | None = None,
        provider: str = DEFAULT_PROVIDER,
        *,
        iobinding: bool = False,
        prefill_chunk: int = PREFILL_CHUNK,
        protocol: str = "auto",
        **session: Any,
    ):
        """prefill_chunk bounds the attention scratch memory of long prompts: they are prefilled in pieces.
        protocol: "dynamic" (any batch; LatentSession) or "static" (batch 1 over fixed buffers; StaticSession, the
        device protocol). The remaining keywords (threads, opt_level, optimized_cache, verify) go to the session."""
        t0 = time.perf_counter()
        if prefill_chunk < 1:
            raise PromptError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self._lock = threading.Lock()
        self.session: LatentSession | StaticSession
        if protocol == "auto":  # Qualcomm's NPU takes only the static graphs; everything else the dynamic one
            protocol = "static" if provider == "qnn" else "dynamic"
        if protocol == "static":
            self.session = StaticSession(export_dir, precision, provider, **session)
            # the static graphs prefill in their own fixed chunks, as the Android engine does: one call per prompt
            self.prefill_chunk = self.session.capacity
        elif protocol == "dynamic":
            self.session = LatentSession(export_dir, precision, provider, **session)
        else:
            raise PromptError(f"protocol must be auto, dynamic or static, got {protocol!r}")
        self.manifest = self.session.manifest
        self.tokenizer = None
        self._chat: Any = None
        if self.manifest.tokenizer_path and self.manifest.tokenizer_path.is_file():
            from tokenizers import Tokenizer

            try:
                self.tokenizer = Tokenizer.from_file(str(self.manifest.tokenizer_path))
            except Exception as e:  # the tokenizers library raises its own exception type
                raise ManifestError(f"{self.manifest.tokenizer_path} is not a readable tokenizer: {e}") from None
        tokens = self.manifest.data["tokens"]
        self.bos = tokens.get("bos")
        self.eos = set(tokens.get("eos") or [])
        self.pad_id = tokens.get("pad") if tokens.get("pad") is not None else next(iter(self.eos), 0)
        self.iobinding = iobinding
        self.load_seconds = time.perf_counter() - t0
        cache = self.manifest.data["cache"]
        self.cache_bytes_per_token = cache["bytes_per_token"]
        model = SimpleNamespace(**self.manifest.data["model"])
        self.mha_bytes_per_token = comparison(model, cache["dtype"])["mha"]["bytes_per_token"]

    # ---- text <-> ids ---------------------------------------------------------------------------------
    def encode(self, prompt: str, add_bos: bool = True) -> list[int]:
        """Token ids of a prompt; the model's bos comes first unless add_bos is False (a rendered chat template
        writes its own special tokens)."""
        if not isinstance(prompt, str):
            raise PromptError(f"the prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise PromptError("the prompt is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise PromptError("the prompt is not valid UTF-8 text (it holds undecodable bytes)") from None
        if self.tokenizer is None:
            raise PromptError("this export has no tokenizer.json; pass token ids instead of text")
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_bos).ids
        if add_bos and self.bos is not None and (not ids or ids[0] != self.bos):
            ids = [self.bos] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- public API -------------------------------------------------------------------------------------
    def generate(self, prompt: str, **kw) -> GenerationResult:
        return self.generate_batch([prompt], **kw)[0]

    def generate_batch(self, prompts: list[str], **kw) -> list[GenerationResult]:
        if isinstance(prompts, str):
            raise PromptError("generate_batch takes a list of prompts, not one str (use generate for one prompt)")
        if not prompts:
            raise PromptError("no prompts given")
        return self.generate_ids([self.encode(p) for p in prompts], **kw)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation rendered by the model's own chat template (as transformers renders it), as token ids."""
        from .chat import ChatTemplate

        if self._chat is None:
            self._chat = ChatTemplate.from_folder(self.manifest.folder)
        return self.encode(self._chat.render(messages, add_generation_prompt=True), add_bos=False)

    def chat(self, messages: list[dict], **kw) -> GenerationResult:
        """The assistant's next turn; stops at the model's end-of-turn token (eos from generation_config.json)."""
        return self.generate_ids([self.chat_prompt(messages)], **kw)[0]

    def stream(self, prompt: str | list[int], **kw) -> Iterator[str]:
        """Text pieces as they are decided (from a prompt, or token ids such as chat_prompt's); multi-byte characters
        split across tokens are held back until whole. The full result is in self.last_result afterwards."""
        ids = prompt if isinstance(prompt, list) else self.encode(prompt)
        with self._lock:  # one generation at a time per Generator (a static session owns its buffers)
            events = self._run([ids], **kw)
            while True:
                try:
                    row, piece = next(events)
                except StopIteration as stop:
                    self.last_result = stop.value[0]
                    return
                if piece:
                    yield piece

    def generate_ids(self, rows: list[list[int]], **kw) -> list[GenerationResult]:
        """Generate from token ids; a Generator is safe to share between threads (it runs one call at a time)."""
        if isinstance(rows, (str, bytes)) or not isinstance(rows, (list, tuple)) or not rows:
            raise PromptError("generate_ids takes a non-empty list of prompts, each a list of token ids")
        if any(isinstance(r, (int, str)) or not hasattr(r, "__len__") for r in rows):
            raise PromptError("generate_ids takes a list of token-id lists, e.g. [[1, 2, 3]], not one flat list")
        with self._lock:
            events = self._run(rows, **kw)
            while True:
                try:
                    next(events)
                except StopIteration as stop:
                    return stop.value

    # ---- the loop ---------------------------------------------------------------------------------------
    def _check(self, rows: list[list[int]], max_new_tokens: int) -> None:
        vocab, ctx = self.session.vocab_size, self.session.max_context
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise PromptError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for i, r in enumerate(rows):
            if len(r) == 0:
                raise PromptError(f"prompt {i} is empty")
            bad = [t for t in r if not 0 <= int(t) < vocab]
            if bad:
                raise PromptError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            if len(r) >= ctx:
                raise PromptError(
                    f"prompt {i} has {len(r)} tokens; the model's context holds {ctx} (prompt + new tokens)"
                )

    def _run(
        self,
        rows,
        sampling: SamplingOptions | None = None,
        max_new_tokens: int = 128,
        stop: tuple[str, ...] | list[str] = (),
        eos: bool = True,
    ):
        """Generator of (row, text piece) events; returns the list of GenerationResult."""
        sampling = sampling or SamplingOptions()
        if not isinstance(sampling, SamplingOptions):
            raise PromptError(f"sampling must be a SamplingOptions, got {type(sampling).__name__}")
        if isinstance(stop, str):
            stop = (stop,)  # one stop string, not one per character
        if not all(isinstance(s, str) for s in stop):
            raise PromptError(f"stop must be a str or a list of str, got {stop!r}")
        try:
            rows = [[int(t) for t in r] for r in rows]
        except (TypeError, ValueError):
            raise PromptError("token ids must be integers") from None
        self._check(rows, max_new_tokens)
        sampler = Sampler(sampling)
        step = self.session.step_bound if self.iobinding else self.session.step
        B = len(rows)
        ids, mask, pos = left_pad(rows, self.pad_id)
        t0 = time.perf_counter()
        cache = self.session.empty_cache(B)
        for s0 in range(0, ids.shape[1], self.prefill_chunk):  # chunked prefill: later chunks see past > 0
            s1 = min(s0 + self.prefill_chunk, ids.shape[1])
            logits, cache = step(ids[:, s0:s1], mask[:, :s1], pos[:, s0:s1], cache, logits_to_keep=1)
        t_first = time.perf_counter()
        last = logits[:, -1]
        history = [list(r) for r in rows]
        out: list[list[int]] = [[] for _ in rows]
        streams = [TextStream(self.tokenizer, tuple(stop)) if self.tokenizer else None for _ in rows]
        finish: list[str | None] = [None] * B
        ctx = self.session.max_context
        length = ids.shape[1]
        full_mask = np.ones((B, ctx), np.int64)  # decode steps slice it: no growing concatenation per token
        full_mask[:, :length] = mask
        while True:
            nxt = sampler(last, history)
            for i in range(B):
                if finish[i]:
                    continue
                tok = int(nxt[i])
                history[i].append(tok)
                if eos and tok in self.eos:
                    finish[i] = "eos"
                    continue
                out[i].append(tok)
                stream = streams[i]
                if stream is not None:
                    piece = stream.push(tok)
                    if piece:
                        yield i, piece
                    if stream.stopped:
                        finish[i] = "stop"
                # the batch shares one cache as wide as its longest prompt: feeding this token would make it
                # length + 1 long, which must stay inside the context for every row, however short its own prompt
                if finish[i] is None and (len(out[i]) >= max_new_tokens or length + 1 >= ctx):
                    finish[i] = "length"
            if all(finish):
                break
            feed = np.asarray([[t if not f else self.pad_id] for t, f in zip(nxt, finish)], np.int64)
            mask = full_mask[:, : length + 1]
            pos = pos[:, -1:] + 1
            length += 1
            logits, cache = step(feed, mask, pos, cache)
            last = logits[:, -1]
        t_end = time.perf_counter()
        for i, st in enumerate(streams):  # a trailing partial character, if any
            piece = st.flush() if st else ""
            if piece:
                yield i, piece
        decoded = sum(len(o) for o in out)
        stats = {
            "prompt_tokens": int(mask[:, : ids.shape[1]].sum()),
            "new_tokens": decoded,
            "batch": B,
            "prefill_seconds": t_first - t0,
            "prefill_tok_s": float(mask[:, : ids.shape[1]].sum()) / max(t_first - t0, 1e-9),
            "decode_seconds": t_end - t_first,
            "decode_tok_s": max(length - ids.shape[1], 0) * B / max(t_end - t_first, 1e-9),
            "cache_tokens": length,
            "cache_bytes": self.cache_bytes_per_token * length * B,
            "mha_cache_bytes": self.mha_bytes_per_token * length * B,
            "load_seconds": self.load_seconds,
            "time_to_first_token_s": t_first - t0,
            "peak_rss_bytes": peak_rss_bytes(),
            "precision": self.session.precision,
        }
        return [
            GenerationResult(st.text if st else "", out[i], finish[i] or "length", len(rows[i]), stats)
            for i, st in enumerate(streams)
        ]

"""The measurements `mla-edge bench` makes, for any step function (onnxruntime or PyTorch). Torch-free.

step(ids, mask, positions, cache) -> (logits, cache), with numpy ids; the cache stays whatever type the
backend uses, so no backend pays for conversions the other does not.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

from .rss import peak_rss_bytes

PROMPT_LENS = (128, 512)
PASTS = (128, 1024)


def _prefill(step, empty_cache, ids):
    n = ids.shape[1]
    return step(ids, np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None], empty_cache(1))


def measure(step, empty_cache, vocab: int, repeats: int = 5, decode_steps: int = 16,
            prompt_lens=PROMPT_LENS, pasts=PASTS) -> dict:
    rng = np.random.default_rng(0)
    out: dict = {}
    ids = rng.integers(0, vocab, (1, prompt_lens[0]), dtype=np.int64)
    t = time.perf_counter()
    logits, _ = _prefill(step, empty_cache, ids)
    int(np.asarray(logits)[0, -1].argmax())
    out["ttft_ms"] = (time.perf_counter() - t) * 1e3  # first call: includes any lazy initialisation
    for n in prompt_lens:
        ids = rng.integers(0, vocab, (1, n), dtype=np.int64)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            _prefill(step, empty_cache, ids)
            times.append(time.perf_counter() - t)
        out[f"prefill_{n}_tok_s"] = n / statistics.median(times)
    for p in pasts:
        ids = rng.integers(0, vocab, (1, p), dtype=np.int64)
        _, start = _prefill(step, empty_cache, ids)
        per_token = []
        for _ in range(repeats):
            cache, mask = start, np.ones((1, p), np.int64)
            for k in range(decode_steps):
                mask = np.ones((1, p + k + 1), np.int64)
                x = rng.integers(0, vocab, (1, 1), dtype=np.int64)
                t = time.perf_counter()
                logits, cache = step(x, mask, np.asarray([[p + k]], np.int64), cache)
                int(np.asarray(logits)[0, -1].argmax())
                per_token.append(time.perf_counter() - t)
        out[f"decode_{p}_ms"] = statistics.median(per_token) * 1e3
    return out


def parse_lengths(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))



def emit(result: dict) -> None:
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["torch_imported"] = "torch" in sys.modules and sys.modules["torch"] is not None
    print("BENCH_JSON " + json.dumps(result))

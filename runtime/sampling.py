"""Logits in numpy: the next-token choice (greedy, temperature, top-k, top-p, repetition penalty, seeded) and a
text's perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mla_edge.contract import InputError


def _number(name: str, value: object, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok:
        raise InputError(f"{name} must be {'an integer' if integer else 'a finite number'}, got {value!r}")


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            _number(name, getattr(self, name))
        _number("top_k", self.top_k, integer=True)
        if self.seed is not None:
            _number("seed", self.seed, integer=True)
            if self.seed < 0:
                raise InputError(f"seed must be a non-negative integer, got {self.seed}")
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    def __init__(self, opts: SamplingOptions):
        self.opts = opts
        self.rng = np.random.default_rng(opts.seed)

    def __call__(self, logits: np.ndarray, history: list[list[int]]) -> np.ndarray:
        """logits (B, V) for the next position; history: tokens seen per row (prompt + generated)."""
        o = self.opts
        if o.temperature == 0 and o.repetition_penalty == 1.0:
            return logits.argmax(-1)  # greedy: no copy, no float64
        logits = logits.astype(np.float64, copy=True)
        if o.repetition_penalty != 1.0:  # CTRL-style: push seen tokens down whatever their sign
            for row, seen in zip(logits, history):
                idx = np.unique(np.asarray(seen, np.int64))
                vals = row[idx]
                row[idx] = np.where(vals > 0, vals / o.repetition_penalty, vals * o.repetition_penalty)
        if o.temperature == 0:
            return logits.argmax(-1)
        logits /= o.temperature
        if o.top_k and o.top_k < logits.shape[-1]:
            kth = np.partition(logits, -o.top_k, axis=-1)[:, -o.top_k][:, None]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if o.top_p < 1.0:
            order = np.argsort(-probs, axis=-1)
            sorted_p = np.take_along_axis(probs, order, -1)
            keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < o.top_p  # always keeps the top token
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum(-1, keepdims=True)
        return np.array([self.rng.choice(len(p), p=p) for p in probs])


def perplexity(step_fn: Callable[[np.ndarray], Any], ids: list[int], window: int) -> float:
    """exp(mean NLL) over non-overlapping windows, each a fresh prefill; step_fn(ids (1, S)) -> logits (1, S, V)
    as numpy or torch (PyTorch, both onnxruntime protocols and the research recipes all score text with this one)."""
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = np.asarray([ids[s : s + window + 1]], np.int64)
        if chunk.shape[1] < 2:
            break
        x, y = chunk[:, :-1], chunk[0, 1:]
        logits = np.asarray(step_fn(x))[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(y)), y].sum())
        count += len(y)
    return math.exp(nll / count)

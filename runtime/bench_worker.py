"""One onnxruntime precision, measured in its own process so that its peak RSS is its own (no torch here).

python -m mla_edge.runtime.bench_worker OUT_DIR PRECISION [--repeats N] [--threads T] [--no-iobinding]
"""
from __future__ import annotations

import argparse
import time

from .bench_core import PASTS, PROMPT_LENS, emit, measure, parse_lengths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("precision")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--prompt-lens", type=parse_lengths, default=PROMPT_LENS)
    ap.add_argument("--pasts", type=parse_lengths, default=PASTS)
    ap.add_argument("--no-iobinding", action="store_true")
    a = ap.parse_args()
    from .session import LatentSession

    t = time.perf_counter()
    sess = LatentSession(a.out_dir, a.precision, "cpu", a.threads)
    load = time.perf_counter() - t
    step = sess.step if a.no_iobinding else sess.step_bound
    res = measure(step, sess.empty_cache, sess.vocab_size, a.repeats, prompt_lens=a.prompt_lens, pasts=a.pasts)
    emit({"backend": f"ort-{a.precision}", "iobinding": not a.no_iobinding, "load_s": load, **res})


if __name__ == "__main__":
    main()

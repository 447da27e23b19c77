"""`mla-edge bench --profile`: where one decode token's time goes at a given past length, layer by layer of our
stack: onnxruntime's kernels (its own profiler), its Run overhead, our step wrapper, IO binding, and the
generation loop around it (sampling, detokenizing, Python). Medians; one process; nothing asserted.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _median_ms(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def profile_decode(out_dir: str | Path, precision: str = "int8", past: int = 128, steps: int = 64,
                   threads: int | None = None) -> dict:  # fmt: skip
    import onnxruntime as ort

    from .generate import Generator
    from .session import LatentSession, physical_cores

    threads = threads or physical_cores()
    sess = LatentSession(out_dir, precision, "cpu", threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, sess.vocab_size, (1, past), dtype=np.int64)
    _, cache = sess.step(ids, np.ones((1, past), np.int64), np.arange(past)[None], sess.empty_cache(1))
    x, mask, pos = np.asarray([[7]], np.int64), np.ones((1, past + 1), np.int64), np.asarray([[past]], np.int64)
    feed = {"input_ids": x, "attention_mask": mask, "position_ids": pos, **cache}
    for _ in range(5):
        sess.session.run(None, feed)
    out: dict[str, Any] = {"precision": precision, "past": past, "threads": threads}
    out["ort_run_ms"] = _median_ms(lambda: sess.session.run(None, feed), steps)
    out["step_ms"] = _median_ms(lambda: sess.step(x, mask, pos, cache), steps)
    bound = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in cache.items()}  # as the loop holds them
    out["step_bound_ms"] = _median_ms(lambda: sess.step_bound(x, mask, pos, bound), steps)

    # onnxruntime's own profiler: the kernels' share of a Run
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "p")
        prof = ort.InferenceSession(str(sess.path), so, providers=["CPUExecutionProvider"])
        for _ in range(5 + steps):
            prof.run(None, feed)
        events = json.loads(Path(prof.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    run_us, node_us = sum(e["dur"] for e in runs), sum(e["dur"] for e in nodes)
    share = node_us / run_us if run_us else 0.0  # the kernels' share of a profiled Run, applied to a plain one
    out["kernel_share"] = share
    out["kernels_ms"] = out["ort_run_ms"] * share
    top: dict[str, float] = {}
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        top[op] = top.get(op, 0.0) + e["dur"]
    out["kernels_by_op_share"] = {k: v / node_us for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:8]}

    prompt = rng.integers(0, sess.vocab_size, past).tolist()
    for iob in (True, False):
        gen = Generator(out_dir, precision, "cpu", threads=threads, iobinding=iob)
        gen.generate_ids([prompt], max_new_tokens=8, eos=False)
        r = gen.generate_ids([prompt], max_new_tokens=steps, eos=False)[0]
        out[f"generate_ms_per_token{'' if iob else '_no_iobinding'}"] = 1e3 / r.stats["decode_tok_s"]
    return out


def format_profile(p: dict) -> str:
    run, kern = p["ort_run_ms"], p["kernels_ms"]
    gen, gen_np = p["generate_ms_per_token"], p["generate_ms_per_token_no_iobinding"]
    rows = [
        (f"onnxruntime kernels ({p['kernel_share']:.0%} of a Run, by its profiler)", kern),
        ("onnxruntime Run overhead (plain run - kernels)", run - kern),
        ("our step wrapper, numpy cache (step - plain run)", p["step_ms"] - run),
        ("IO binding instead (step_bound - step)", p["step_bound_ms"] - p["step_ms"]),
        ("generation loop: sampling, detokenizing, Python (generate - step)", gen_np - p["step_ms"]),
    ]
    lines = [f"profile: one decode token at past {p['past']}, {p['precision']}, {p['threads']} threads (medians)"]
    lines += [f"  {name:68s} {ms:7.3f} ms" for name, ms in rows]
    lines.append(f"  {'= generate, numpy cache':68s} {gen_np:7.3f} ms/token")
    lines.append(f"  {'  generate, IO binding':68s} {gen:7.3f} ms/token")
    lines.append("  kernel time by op: " + ", ".join(f"{k} {v:.0%}" for k, v in p["kernels_by_op_share"].items()))
    return "\n".join(lines)

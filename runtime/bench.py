"""`mla-edge bench`: PyTorch eager fp32 and each onnxruntime precision, side by side in one run, batch 1.

Every backend runs in a fresh subprocess (so load time, time to first token and peak RSS are its own); the
onnxruntime ones never import torch. Medians over repeats; ratios are against PyTorch eager from the same run.
This is a benchmark, not a test: nothing here asserts a timing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from .manifest import Manifest

TARGET_SPEEDUP = 2.5  # int8 decode at past 1024 vs PyTorch eager fp32
RSS_FACTOR, RSS_SLACK = 1.3, 80 * 2**20  # int8 generate peak RSS <= 1.3 x (model + cache) + 80 MB
GEN_NEW_TOKENS = 256
GEN_PROMPT = ("It was late in the autumn when the travellers came at last to the old house on the hill, and the "
              "rain had not ceased since morning. The housekeeper met them at the door with a candle in her hand, "
              "and looked at the young man for a long moment before she spoke.")


def _run_worker(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"bench worker {' '.join(cmd[2:4])} failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")


def _generate_rss(out_dir: Path, precision: str, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "mla_edge.runtime.cli", "generate", str(out_dir), GEN_PROMPT, "--json", "--provider",
           "cpu", "--precision", precision, "--max-new-tokens", str(GEN_NEW_TOKENS)] + (["--threads", str(threads)] if threads else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"generate failed: {r.stderr.strip()[-1500:]}")
    return json.loads(r.stdout)["stats"]


def run_bench(out_dir: str | Path, precisions: list[str] | None = None, repeats: int = 5, threads: int | None = None,
              with_torch: bool = True, progress=None) -> dict:
    out_dir = Path(out_dir)
    manifest = Manifest.read(out_dir)
    precisions = precisions or [p for p in ("fp32", "int8", "int4") if p in manifest.precisions]
    py = [sys.executable, "-m"]
    thr = ["--threads", str(threads)] if threads else []
    jobs = []
    model_dir = Path(manifest.data["source"]["model_dir"])
    torch_ok = with_torch and importlib.util.find_spec("torch") is not None and (model_dir / "config.json").is_file()
    if torch_ok:
        jobs.append(("torch-eager-fp32", py + ["mla_edge.export.bench_torch", str(model_dir), "--repeats", str(repeats)] + thr))
    for p in precisions:
        jobs.append((f"ort-{p}", py + ["mla_edge.runtime.bench_worker", str(out_dir), p, "--repeats", str(repeats)] + thr))
    if "int8" in precisions:
        jobs.append(("ort-int8 (no iobinding)", py + ["mla_edge.runtime.bench_worker", str(out_dir), "int8", "--repeats",
                                                       str(repeats), "--no-iobinding"] + thr))
    rows = []
    for name, cmd in jobs:
        if progress:
            progress(name)
        row = _run_worker(cmd)
        row["name"] = name
        rows.append(row)
    base = next((r for r in rows if r["name"] == "torch-eager-fp32"), None)
    for r in rows:
        if base:
            r["decode_1024_speedup_vs_torch"] = base["decode_1024_ms"] / r["decode_1024_ms"]
            r["decode_128_speedup_vs_torch"] = base["decode_128_ms"] / r["decode_128_ms"]
            r["prefill_512_speedup_vs_torch"] = r["prefill_512_tok_s"] / base["prefill_512_tok_s"]
        if r["name"].startswith("ort-"):
            r["model_bytes"] = manifest.data["files"][r["name"].split()[0][4:]]["bytes"]
    report = {"export_dir": str(out_dir), "model": manifest.data["model"].get("model_type"), "repeats": repeats,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, {platform.python_implementation()} {platform.python_version()}",
              "threads": threads, "rows": rows, "targets": {}}
    int8 = next((r for r in rows if r["name"] == "ort-int8"), None)
    if int8 and base:
        report["targets"]["int8_decode_1024_speedup"] = {"measured": int8["decode_1024_speedup_vs_torch"], "target": TARGET_SPEEDUP,
                                                         "met": int8["decode_1024_speedup_vs_torch"] >= TARGET_SPEEDUP}
    if "int8" in precisions and manifest.tokenizer_path:
        if progress:
            progress("generate int8 (RSS)")
        g = _generate_rss(out_dir, "int8", threads)
        budget = RSS_FACTOR * (manifest.data["files"]["int8"]["bytes"] + g["cache_bytes"]) + RSS_SLACK
        report["generate_int8"] = g
        report["targets"]["int8_generate_peak_rss"] = {"measured_bytes": g["peak_rss_bytes"], "limit_bytes": int(budget),
                                                       "met": g["peak_rss_bytes"] <= budget}
    return report


def format_report(rep: dict) -> str:
    cols = [("load s", "load_s", "{:.2f}"), ("TTFT ms", "ttft_ms", "{:.1f}"), ("prefill128 tok/s", "prefill_128_tok_s", "{:,.0f}"),
            ("prefill512 tok/s", "prefill_512_tok_s", "{:,.0f}"), ("decode@128 ms", "decode_128_ms", "{:.2f}"),
            ("decode@1024 ms", "decode_1024_ms", "{:.2f}"), ("vs torch @1024", "decode_1024_speedup_vs_torch", "{:.2f}x"),
            ("peak RSS MB", "peak_rss_bytes", None)]
    lines = [f"bench: {rep['export_dir']} ({rep['machine']}; medians of {rep['repeats']} repeats, batch 1)",
             "  " + f"{'backend':26s}" + "".join(f"{c[0]:>17s}" for c in cols)]
    for r in rep["rows"]:
        cells = []
        for _, key, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else f"{v / 2**20:,.0f}" if fmt is None else fmt.format(v))
        lines.append("  " + f"{r['name']:26s}" + "".join(f"{c:>17s}" for c in cells))
    for name, t in rep["targets"].items():
        if "target" in t:
            lines.append(f"  target {name}: {t['measured']:.2f}x (>= {t['target']}x) -> {'met' if t['met'] else 'NOT met'}")
        else:
            lines.append(f"  target {name}: {t['measured_bytes'] / 2**20:.1f} MB (<= {t['limit_bytes'] / 2**20:.1f} MB) -> "
                         f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)

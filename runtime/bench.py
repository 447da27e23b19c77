"""`mla-edge bench`: PyTorch eager fp32 and each onnxruntime precision, side by side in one run, batch 1.

Every backend runs in a fresh worker process (`mla-edge _bench-worker`, so that load time, time to first token and
peak RSS are its own); the onnxruntime ones never import torch. Backends run round-robin in interleaved rounds;
medians over repeats and rounds; ratios are against PyTorch eager from the same run. This is a benchmark, not a
test: nothing here asserts a timing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mla_edge.contract import InputError, static_graph_name

from .manifest import Manifest
from .memory import cli_command, peak_rss_bytes, rss_bytes, run_generate

WORKER = "_bench-worker"  # the hidden CLI command that measures one backend
Step = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], tuple[Any, Any]]
TARGET_SPEEDUP = 2.5  # int8 decode at past 1024 vs PyTorch eager fp32
RSS_FACTOR, RSS_SLACK = 1.3, 80 * 2**20  # int8 generate peak RSS <= 1.3 x (model + cache) + 80 MB
GEN_NEW_TOKENS = 256
GEN_PROMPT = (
    "It was late in the autumn when the travellers came at last to the old house on the hill, and the "
    "rain had not ceased since morning. The housekeeper met them at the door with a candle in her hand, "
    "and looked at the young man for a long moment before she spoke."
)
PROMPT_LENS = (128, 512)
GREEDY_STEPS = 32
PASTS = (128, 1024)


def _prefill(step: Step, empty_cache: Callable[[int], Any], ids: np.ndarray) -> tuple[Any, Any]:
    n = ids.shape[1]
    return step(ids, np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None], empty_cache(1))


def measure(
    step: Step,
    empty_cache: Callable[[int], Any],
    vocab: int,
    repeats: int = 5,
    decode_steps: int = 16,
    prompt_lens: tuple[int, ...] = PROMPT_LENS,
    pasts: tuple[int, ...] = PASTS,
    greedy: tuple[int, ...] = (),
    rss_run: bool = False,
) -> dict:
    """TTFT, prefill tok/s at each prompt length and decode ms/token at each past length, medians over repeats.
    step(ids, mask, positions, cache) -> (logits, cache) with numpy ids; the cache stays whatever type the backend
    uses, so no backend pays for conversions the other does not."""
    if rss_run:  # the generation-sized footprint: the greedy prompt continued GEN_NEW_TOKENS tokens, nothing more
        t = time.perf_counter()
        first_token_at: list[float] = []
        tokens = _greedy(step, empty_cache, greedy, GEN_NEW_TOKENS, first_token_at)
        return {"generate_tokens": len(tokens), "first_token_s": first_token_at[0] - t}
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
    if greedy:  # the greedy continuation of a fixed prompt, for agreement between backends
        out["greedy"] = _greedy(step, empty_cache, greedy, GREEDY_STEPS)
    return out


def _greedy(
    step: Step, empty_cache: Callable[[int], Any], prompt: tuple[int, ...], steps: int, first_at: list | None = None
) -> list[int]:
    logits, cache = _prefill(step, empty_cache, np.asarray([prompt], np.int64))
    tokens = [int(np.asarray(logits)[0, -1].argmax())]
    if first_at is not None:
        first_at.append(time.perf_counter())
    for k in range(steps - 1):
        n = len(prompt) + k
        x = np.asarray([[tokens[-1]]], np.int64)
        logits, cache = step(x, np.ones((1, n + 1), np.int64), np.asarray([[n]], np.int64), cache)
        tokens.append(int(np.asarray(logits)[0, -1].argmax()))
    return tokens


def parse_lengths(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def emit(result: dict) -> None:
    """A worker's result: one BENCH_JSON line on stdout, with this process's peak RSS and whether it holds torch."""
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["torch_imported"] = "torch" in sys.modules and sys.modules["torch"] is not None
    print("BENCH_JSON " + json.dumps(result))


def measure_ort(
    out_dir: str,
    precision: str,
    repeats: int,
    threads: int | None,
    prompt_lens: tuple[int, ...],
    pasts: tuple[int, ...],
    iobinding: bool = False,
    greedy: tuple[int, ...] = (),
    rss_run: bool = False,
) -> None:
    """The worker for one onnxruntime precision, "static-<precision>" for the static graphs (no torch here), and
    "static-<precision>@N" for those of one capacity only (lengths that do not fit it are left out)."""
    from .session import LatentSession
    from .static import StaticSession

    before = rss_bytes()
    t = time.perf_counter()
    static = precision.startswith("static-")
    sess: LatentSession | StaticSession
    if static:
        name, _, pin = precision.removeprefix("static-").partition("@")
        sess = StaticSession(out_dir, name, "cpu", threads, capacity=int(pin) if pin else None)
        prompt_lens = tuple(n for n in prompt_lens if n < sess.capacity)
        pasts = tuple(k for k in pasts if k + 17 <= sess.capacity)  # 16 decode steps after the past
    else:
        sess = LatentSession(out_dir, precision, "cpu", threads)
    load = time.perf_counter() - t
    # a prompt's logits at its last position only (llama.cpp and genai compute no more); decode steps have one
    step = functools.partial(sess.step_bound if iobinding else sess.step, logits_to_keep=1)
    res = measure(
        step,
        sess.empty_cache,
        sess.vocab_size,
        repeats,
        prompt_lens=prompt_lens,
        pasts=pasts,
        greedy=greedy,
        rss_run=rss_run,
    )
    if rss_run:  # from the start of the model's load to the prompt's first token, as llama.cpp's "load time"
        res["load_ttft_s"] = load + res.pop("first_token_s")
    emit(
        {
            "backend": f"ort-{precision}",
            "iobinding": iobinding and not static,
            "load_s": load,
            "rss_before_load_bytes": before,
            "cache_bytes_per_token": sess.manifest.data.get("cache", {}).get("bytes_per_token"),
            **res,
        }
    )


def _run_worker(cmd: list[str]) -> dict:
    """One worker process; its last BENCH_JSON line is the result."""
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :])
    raise RuntimeError(f"bench worker {' '.join(cmd[4:6])} failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")


def _generate_rss(out_dir: Path, precision: str, threads: int | None, manifest: Manifest) -> dict:
    from tokenizers import Tokenizer

    tok, ctx = Tokenizer.from_file(str(manifest.tokenizer_path)), manifest.data["max_context"]
    words = GEN_PROMPT.split()
    while len(words) > 1 and len(tok.encode(" ".join(words)).ids) + 1 > ctx // 2:  # small contexts: a shorter prompt
        words.pop()
    prompt = " ".join(words)
    new = min(GEN_NEW_TOKENS, ctx - len(tok.encode(prompt).ids) - 1)
    return run_generate(out_dir, prompt, precision, new, threads)


def _median_rows(runs: list[dict]) -> dict:
    """One row from several rounds of the same backend: the median of every number."""
    row = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            row[k] = statistics.median(r[k] for r in runs)
    row["rounds"] = len(runs)
    return row


def run_bench(
    out_dir: str | Path,
    precisions: list[str] | None = None,
    repeats: int = 5,
    threads: int | None = None,
    with_torch: bool = True,
    progress: Callable[[str], None] | None = None,
    prompt_lens: tuple[int, ...] = PROMPT_LENS,
    pasts: tuple[int, ...] = PASTS,
    rounds: int = 3,
    peers: Sequence[tuple[str, Path]] = (),
) -> dict:
    """Backends run round-robin, `rounds` times each, so that a slow spell of a shared machine hits all of them."""
    out_dir = Path(out_dir)
    manifest = Manifest.read(out_dir)
    precisions = precisions or [p for p in ("fp32", "int8", "int4", "int8-block") if p in manifest.precisions]
    for p in precisions:
        manifest.model_path(p)  # an unknown precision or a tampered file: one clear error before any work
    longest = max(max(prompt_lens), max(pasts) + 16)
    if longest > manifest.data["max_context"]:
        raise InputError(
            f"the benchmark needs {longest} positions but the model's context holds {manifest.data['max_context']}"
        )
    common = [
        "--repeats",
        str(repeats),
        "--prompt-lens",
        ",".join(map(str, prompt_lens)),
        "--pasts",
        ",".join(map(str, pasts)),
        *(["--threads", str(threads)] if threads else []),
    ]
    if manifest.tokenizer_path:  # every backend continues the same prompt greedily: agreement with our fp32
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(manifest.tokenizer_path)).encode(GEN_PROMPT).ids[:24]
        bos = manifest.data["tokens"]["bos"]
        common += ["--greedy-prompt", ",".join(map(str, ([bos] if bos is not None else []) + ids))]
    greedy = "--greedy-prompt" in common
    jobs: list[tuple[str, Callable[[], dict], Callable[[], dict] | None]] = []  # name, one round, generation's RSS

    def worker(name: str, *args: str) -> None:
        cmd = cli_command(WORKER, *args, *common)
        jobs.append((name, lambda: _run_worker(cmd), (lambda: _run_worker([*cmd, "--rss-run"])) if greedy else None))

    model_dir = Path(manifest.data["source"]["model_dir"])
    torch_ok = with_torch and importlib.util.find_spec("torch") is not None and (model_dir / "config.json").is_file()
    if torch_ok:
        worker("torch-eager-fp32", str(model_dir), "torch")
    for p in precisions:
        worker(f"ort-{p}", str(out_dir), p)
    if "int8" in precisions:
        worker("ort-int8 (iobinding)", str(out_dir), "int8", "--iobinding")
    static = manifest.data.get("static")
    if static and static["capacity"] >= longest + 1:  # the static graphs, where their buffer holds the benchmark
        for p in [p for p in ("fp32", "int8") if p in static["files"] and p in precisions]:
            worker(f"ort-static-{p}", str(out_dir), f"static-{p}")
            levels = static.get("capacities", [])
            for n in dict.fromkeys(levels[:1] + levels[-1:]) if len(levels) > 1 else ():  # what one capacity costs
                cmd = cli_command(WORKER, str(out_dir), f"static-{p}@{n}", *common)
                jobs.append((f"ort-static-{p}@{n}", functools.partial(_run_worker, cmd), None))
    notes = {}
    foreign = set()  # peers running some other model: no greedy agreement with our fp32
    peer_info: dict[str, Any] = {}
    for peer, path in peers:
        from .peers import llamacpp_job, missing

        name = f"{peer} ({path.name})"
        if out_dir.resolve() not in (path.resolve(), path.resolve().parent):
            foreign.add(name)
        if hint := missing(peer):
            notes[name] = hint
        elif peer == "llama.cpp":  # today's llama.cpp: its own tools, built here once
            run, gen, peer_info[peer] = llamacpp_job(path, manifest, threads, prompt_lens, pasts, repeats, progress)
            jobs.append((name, run, gen))
        else:
            worker(name, str(path), f"peer-{peer}")
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in jobs}
    for k in range(rounds):
        for name, run, _ in jobs:
            if progress:
                progress(f"{name} (round {k + 1}/{rounds})")
            runs[name].append(run())
    rss: dict[str, dict] = {}
    for name, _, generation in jobs:
        if generation is not None:
            if progress:
                progress(f"{name} (generate {GEN_NEW_TOKENS} tokens: peak RSS, load to first token)")
            rss[name] = generation()
    rows = []
    for name, _, _ in jobs:
        row: dict[str, Any] = _median_rows(runs[name])
        row["name"] = name
        if name in rss:
            row["generate_peak_rss_bytes"] = rss[name].get("generate_peak_rss_bytes", rss[name].get("peak_rss_bytes"))
            row["load_ttft_s"] = rss[name].get("load_ttft_s")
        rows.append(row)
    rows += [{"name": name, "note": note} for name, note in notes.items()]
    ref = next((r for r in rows if r["name"] == "ort-fp32" and "greedy" in r), None)
    for r in rows:
        if ref and "greedy" in r and r["name"] not in foreign:
            same = next((i for i, (a, b) in enumerate(zip(r["greedy"], ref["greedy"])) if a != b), len(ref["greedy"]))
            r["greedy_agree_vs_fp32"] = f"{same}/{len(ref['greedy'])}"
    base = next((r for r in rows if r["name"] == "torch-eager-fp32"), None)
    for r in rows:
        if base and "note" not in r:
            for past in pasts:
                r[f"decode_{past}_speedup_vs_torch"] = base[f"decode_{past}_ms"] / r[f"decode_{past}_ms"]
            for n in prompt_lens:
                r[f"prefill_{n}_speedup_vs_torch"] = r[f"prefill_{n}_tok_s"] / base[f"prefill_{n}_tok_s"]
        if r["name"].startswith("ort-"):
            name = r["name"].split()[0][4:]
            if name.startswith("static-"):  # the static protocol's graphs (one capacity's with @N), weights once
                prec, _, pin = name[7:].partition("@")
                st = manifest.data["static"]
                levels = [int(pin)] if pin else st.get("capacities", [st["capacity"]])
                graphs = [static_graph_name(k, n, st["capacity"]) for n in levels for k in ("decode", "prefill")]
                files = {f["path"]: f["bytes"] for g in graphs for f in st["files"][prec][g]["files"]}
                r["model_bytes"] = sum(files.values())
            else:
                r["model_bytes"] = manifest.data["files"][name]["bytes"]
    report: dict[str, Any] = {
        "export_dir": str(out_dir),
        "model": manifest.data["model"].get("model_type"),
        "repeats": repeats,
        "rounds": rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, "
        f"{platform.python_implementation()} {platform.python_version()}",
        "threads": threads,
        "prompt_lens": list(prompt_lens),
        "pasts": list(pasts),
        "rows": rows,
        "targets": {},
    }
    int8 = next((r for r in rows if r["name"] == "ort-int8"), None)
    key = f"decode_{pasts[-1]}_speedup_vs_torch"
    static8 = next((r for r in rows if r["name"] == "ort-static-int8"), None)
    for past in pasts if int8 and static8 else ():  # the device protocol on the CPU: not slower than the dynamic graph
        ratio = int8[f"decode_{past}_ms"] / static8[f"decode_{past}_ms"]  # type: ignore[index]
        report["targets"][f"static_int8_decode_{past}_vs_dynamic_int8"] = {
            "measured": ratio,
            "target": 1.0,
            "met": ratio >= 1.0,
        }
    levels = (static or {}).get("capacities", [])
    small = next((r for r in rows if len(levels) > 1 and r["name"] == f"ort-static-int8@{levels[0]}"), None)
    if static8 and small and f"decode_{pasts[0]}_ms" in small:  # a short context pays for the buffer it uses
        ratio = small[f"decode_{pasts[0]}_ms"] / static8[f"decode_{pasts[0]}_ms"]
        report["targets"][f"static_int8_decode_{pasts[0]}_capacity_{levels[-1]}_vs_{levels[0]}"] = {
            "measured": ratio,
            "target": round(1 / 1.5, 2),  # within 1.5x of the smallest capacity's cost
            "met": ratio >= 1 / 1.5,
        }
    if int8 and base:
        report["targets"][f"int8_decode_{pasts[-1]}_speedup"] = {
            "measured": int8[key],
            "target": TARGET_SPEEDUP,
            "met": int8[key] >= TARGET_SPEEDUP,
        }
    llama = next((r for r in rows if r["name"].startswith("llama.cpp (") and "note" not in r), None)
    if llama:
        report["peers"] = peer_info
        for ours in [r for r in rows if r["name"] in ("ort-int8", "ort-int8-block", "ort-int4")]:
            report["targets"] |= peer_targets(ours, llama, prompt_lens, pasts)
    if "int8" in precisions and manifest.tokenizer_path:
        if progress:
            progress("generate int8 (RSS)")
        g = _generate_rss(out_dir, "int8", threads, manifest)
        budget = RSS_FACTOR * (manifest.data["files"]["int8"]["bytes"] + g["cache_bytes"]) + RSS_SLACK
        report["generate_int8"] = g
        report["targets"]["int8_generate_peak_rss"] = {
            "measured_bytes": g["peak_rss_bytes"],
            "limit_bytes": int(budget),
            "met": g["peak_rss_bytes"] <= budget,
        }
    return report


def peer_targets(ours: dict, peer: dict, prompt_lens: Sequence[int], pasts: Sequence[int]) -> dict:
    """Issue 20's targets for one of our rows against today's llama.cpp, as ratios from this one run (>= 1 is ours
    faster): decode at every past and prefill at every length at least as fast, load to first token <= 2x theirs,
    a generation's peak RSS <= theirs + 10%."""
    tag, out = ours["name"][4:], {}
    ratios = {f"{tag}_decode_{k}_vs_llama.cpp": (peer.get(f"decode_{k}_ms"), ours[f"decode_{k}_ms"], 1.0)
              for k in pasts}  # fmt: skip
    for n in prompt_lens:
        ratios[f"{tag}_prefill_{n}_vs_llama.cpp"] = (ours[f"prefill_{n}_tok_s"], peer.get(f"prefill_{n}_tok_s"), 1.0)
    ratios[f"{tag}_load_to_first_token_vs_llama.cpp"] = (peer.get("load_ttft_s"), ours.get("load_ttft_s"), 0.5)
    for name, (num, den, target) in ratios.items():
        if num and den:
            out[name] = {"measured": num / den, "target": target, "met": num / den >= target}
    if ours.get("generate_peak_rss_bytes") and peer.get("generate_peak_rss_bytes"):
        limit = int(peer["generate_peak_rss_bytes"] * 1.10)
        out[f"{tag}_generate_rss_vs_llama.cpp"] = {
            "measured_bytes": ours["generate_peak_rss_bytes"],
            "limit_bytes": limit,
            "met": ours["generate_peak_rss_bytes"] <= limit,
        }
    return out


def format_report(rep: dict) -> str:
    n, p = rep["prompt_lens"], rep["pasts"]
    cols: list[tuple[str, str, str | None]] = [("load ms", "load_s", "{:.0f}")]
    cols += [("load+1st ms", "load_ttft_s", "{:.0f}")]
    cols += [(f"prefill{k} tok/s", f"prefill_{k}_tok_s", "{:,.0f}") for k in n]
    cols += [(f"decode@{k} ms", f"decode_{k}_ms", "{:.2f}") for k in p]
    cols += [
        (f"vs torch @{p[-1]}", f"decode_{p[-1]}_speedup_vs_torch", "{:.2f}x"),
        ("peak RSS MB", "peak_rss_bytes", None),
        (f"gen{GEN_NEW_TOKENS} RSS MB", "generate_peak_rss_bytes", None),
        ("RSS pre-load MB", "rss_before_load_bytes", None),
        ("cache B/token", "cache_bytes_per_token", "{:,.0f}"),
        ("model MB", "model_bytes", None),
        ("greedy = fp32", "greedy_agree_vs_fp32", "{}"),
    ]
    lines = [
        f"bench: {rep['export_dir']} ({rep['machine']}; batch 1; medians of {rep['repeats']} repeats x "
        f"{rep['rounds']} interleaved rounds)",
        "  " + f"{'backend':26s}" + "".join(f"{c[0]:>17s}" for c in cols),
    ]
    for peer, info in rep.get("peers", {}).items():
        lines.insert(1, f"  {peer}: {info.get('version')} ({info.get('sdist', 'built elsewhere')}; {info.get('run')})")
    for r in rep["rows"]:
        if "note" in r:
            lines.append(f"  {r['name']:26s}   {r['note']}")
            continue
        cells = []
        for _, key, fmt in cols:
            v = r.get(key)
            v = v * 1e3 if v is not None and key in ("load_s", "load_ttft_s") else v  # seconds shown as ms
            cells.append("-" if v is None else f"{v / 2**20:,.1f}" if fmt is None else fmt.format(v))
        lines.append("  " + f"{r['name']:26s}" + "".join(f"{c:>17s}" for c in cells))
    for name, t in rep["targets"].items():
        if "target" in t:
            lines.append(
                f"  target {name}: {t['measured']:.2f}x (>= {t['target']}x) -> {'met' if t['met'] else 'NOT met'}"
            )
        else:
            lines.append(
                f"  target {name}: {t['measured_bytes'] / 2**20:.1f} MB (<= {t['limit_bytes'] / 2**20:.1f} MB) -> "
                f"{'met' if t['met'] else 'NOT met'}"
            )
    return "\n".join(lines)

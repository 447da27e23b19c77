"""Edge memory budgets: the largest context (and batch) that fits a memory budget, for this model as MLA and as
the same model would be with an MHA or a GQA cache, for fp32/fp16/int8 weights and fp32/fp16/int8 cache. Torch-free.

RSS = weights + batch x context x cache_bytes_per_token + overhead(context), where overhead(context) = base +
per_token x context is *measured*: `calibrate` runs `mla-edge generate` at several contexts and fits it.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from mla_edge.contract import CACHE_DTYPES, MANIFEST, InputError, comparison
from mla_edge.models.config import MLAConfig

from .generate import PREFILL_CHUNK
from .manifest import Manifest, sha256
from .memory import run_generate

# What the exporter writes, and bytes per weight where no export exists yet to measure: int4 is MatMulNBits with
# a float32 scale per block of 32 (0.5 + 4 / 32 bytes per weight), except its LM head and embedding (see ENDS_BYTES).
WEIGHT_PRECISIONS = {"fp32": 4.0, "int8": 1.0, "int4": 0.625}
ENDS_BYTES = {"int4": (1.125 + 1.0) / 2}  # int4's 8-bit LM head (by blocks of 32) and embedding (per row), per weight
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class BudgetError(InputError):
    """A budget that cannot be planned (bad size, too small for the weights, a failed calibration run)."""


def parse_memory(text: str) -> int:
    """'512MB', '1.5GiB', '300000000B' -> bytes (decimal MB/GB, binary MiB/GiB). A bare number is refused: 512
    meant as MB would silently be 512 bytes."""
    m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or (m.group(2) and m.group(2).upper() not in UNITS):
        raise BudgetError(f"memory {text!r} is not a size: write e.g. 512MB, 1.5GB or 300MiB")
    n = float(m.group(1))
    if n <= 0:
        raise BudgetError(f"memory must be more than 0, got {text!r}")
    if not m.group(2):
        raise BudgetError(f"memory {text!r} has no unit: write {m.group(1)}MB, {m.group(1)}MiB or {m.group(1)}B")
    return int(n * UNITS[m.group(2).upper()])


def param_count(cfg: MLAConfig) -> int:
    """Parameters of the dense MLA decoder from its config alone (the checkpoint's tensor table, summed)."""
    C, H, V, I = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size, cfg.intermediate_size
    R, Dr, Dn, Dv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    q = C * H * (Dn + Dr) if not cfg.q_lora_rank else C * cfg.q_lora_rank + cfg.q_lora_rank * (1 + H * (Dn + Dr))
    attention = 2 * C + q + C * (R + Dr) + R + R * H * (Dn + Dv) + H * Dv * C
    E, M = cfg.n_routed_experts, cfg.moe_intermediate_size
    moe = E * C + (E if cfg.topk_method == "noaux_tc" else 0) + 3 * C * M * (E + cfg.n_shared_experts)
    mlps = sum(moe if cfg.moe_layer(i) else 3 * C * I for i in range(cfg.num_hidden_layers))
    return V * C * (1 if cfg.tie_word_embeddings else 2) + cfg.num_hidden_layers * attention + mlps + C


def graph_weight_count(cfg: MLAConfig) -> int:
    """Weights in the exported graph: the checkpoint's, plus a second V x C for a tied LM head, which the export
    unties so that the quantizers reach it."""
    return param_count(cfg) + (cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0)


def estimated_bytes(cfg: MLAConfig, precision: str) -> int:
    """An export's weight bytes in `precision` before it exists: graph weights x bytes per weight."""
    n, ends = graph_weight_count(cfg), 2 * cfg.vocab_size * cfg.hidden_size
    if precision not in ENDS_BYTES:
        return int(n * WEIGHT_PRECISIONS[precision])
    return int((n - ends) * WEIGHT_PRECISIONS[precision] + ends * ENDS_BYTES[precision])


def model_facts(folder: str | Path) -> dict[str, Any]:
    """Config and weight bytes from an export folder (measured file sizes) or a HF model folder (parameter count)."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        man = Manifest.read(folder)
        model = man.data["model"]
        cfg = MLAConfig.from_dict(model)
        n = graph_weight_count(cfg)
        weights = {
            p: man.data["files"][p]["bytes"] if p in man.data["files"] else estimated_bytes(cfg, p)
            for p in WEIGHT_PRECISIONS
        }
        measured = [p for p in WEIGHT_PRECISIONS if p in man.data["files"]]
        source = f"export file sizes for {', '.join(measured)}; {n:,} graph weights x bytes per weight for the rest"
    else:
        cfg = MLAConfig.from_pretrained(folder)
        n = graph_weight_count(cfg)
        weights = {p: estimated_bytes(cfg, p) for p in WEIGHT_PRECISIONS}
        source = f"{n:,} graph weights x bytes per weight (an export's file sizes are exact)"
    return {"config": cfg, "weights": weights, "weights_source": source}


def cache_per_token(cfg: MLAConfig, cache: str) -> dict[str, int]:
    cmp = comparison(cfg, cache)
    return {form: cmp[form]["bytes_per_token"] for form in ("mla", "gqa", "mha")}


def predict_rss(weights_bytes: int, cache_bytes_per_token: int, context: int, batch: int, calibration: dict) -> float:
    """The planner's one formula: weights + the runtime's base + per sequence of the batch, its cache and its prefill
    scratch per token of context."""
    return (
        weights_bytes
        + calibration["base_bytes"]
        + batch * context * (cache_bytes_per_token + calibration["per_token_bytes"])
    )


def max_context(memory: int, weights_bytes: int, cache_bytes_per_token: int, batch: int, calibration: dict) -> int:
    """The largest context whose predicted RSS fits `memory` (predict_rss inverted; it is linear in the context)."""
    at0 = predict_rss(weights_bytes, cache_bytes_per_token, 0, batch, calibration)
    per_token = predict_rss(weights_bytes, cache_bytes_per_token, 1, batch, calibration) - at0
    return int((memory - at0) // per_token) if memory > at0 else 0


def _is_demo(folder: str | Path) -> bool:
    """The demo model (or its `mla-edge demo` export): the default calibration was measured on it, not borrowed."""
    from mla_edge.models import DEMO_DIR

    from .manifest import demo_export_dir

    return Path(folder).resolve() in (DEMO_DIR.resolve(), demo_export_dir().resolve())


def plan(folder: str | Path, memory: int, batch: int = 1, calibration: dict | None = None) -> dict:
    """Every (weights, cache dtype, attention form): the largest context that fits. Without a measured calibration
    the runtime's overhead is borrowed from the demo model's, and each answer is also given as a range: from the
    borrowed overhead per token (low) to none at all (high, the weights, the base and the cache alone)."""
    if batch < 1:
        raise BudgetError(f"batch must be >= 1, got {batch}")
    facts = model_facts(folder)
    cfg = facts["config"]
    cal = calibration or {**DEFAULT_CALIBRATION, "borrowed": not _is_demo(folder)}
    no_scratch = {**cal, "per_token_bytes": 0.0}
    rows = []
    for w, wbytes in facts["weights"].items():
        for c in CACHE_DTYPES:
            for form, cbytes in cache_per_token(cfg, c).items():
                ctx = max_context(memory, wbytes, cbytes, batch, cal)
                row = {
                    "attention": form,
                    "weights": w,
                    "cache": c,
                    "weights_bytes": wbytes,
                    "cache_bytes_per_token": cbytes,
                    "max_context": ctx,
                    "max_context_capped": min(ctx, cfg.max_position_embeddings),
                    "fits": ctx > 0,
                }
                if cal.get("borrowed"):
                    row["max_context_range"] = [ctx, max_context(memory, wbytes, cbytes, batch, no_scratch)]
                rows.append(row)
    smallest = min(facts["weights"].values()) + cal["base_bytes"]
    if memory < smallest:
        raise BudgetError(
            f"a budget of {memory / 2**20:.1f} MiB cannot even hold the smallest weights plus the runtime "
            f"({smallest / 2**20:.1f} MiB: {min(facts['weights'].values()) / 2**20:.1f} MiB weights + "
            f"{cal['base_bytes'] / 2**20:.1f} MiB {'borrowed' if cal.get('borrowed') else 'measured'} runtime "
            "overhead)"
        )
    return {
        "memory_bytes": memory,
        "batch": batch,
        "model_type": cfg.model_type,
        "max_position_embeddings": cfg.max_position_embeddings,
        "weights_source": facts["weights_source"],
        "calibration": cal,
        "rows": rows,
    }


def measure_generate(out_dir: Path, precision: str, context: int, new_tokens: int = 8) -> dict:
    """Peak RSS of a real `mla-edge generate` whose cache ends at `context` tokens (prompt = context - new_tokens)."""
    prompt_len = context - new_tokens
    words = ("the old house stood at the end of the lane and " * (prompt_len // 4 + 8)).split()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Manifest.read(out_dir).tokenizer_path))
    lo, hi = 1, len(words)
    while lo < hi:  # the longest word prefix that tokenizes to at most prompt_len - 1 tokens (bos is added)
        mid = (lo + hi + 1) // 2
        if len(tok.encode(" ".join(words[:mid])).ids) + 1 <= prompt_len:
            lo = mid
        else:
            hi = mid - 1
    try:
        return run_generate(out_dir, " ".join(words[:lo]), precision, new_tokens)
    except RuntimeError as e:
        raise BudgetError(f"calibration run failed: {e}") from None


def calibrate(out_dir: str | Path, precision: str = "int8", contexts=(64, 512, 1536)) -> dict:
    """Fit overhead(context) = base + per_token x context by least squares on real runs."""
    out_dir = Path(out_dir)
    man = Manifest.read(out_dir)
    if precision not in man.data["files"]:
        precision = "int8" if "int8" in man.data["files"] else "fp32"
    weights = man.data["files"][precision]["bytes"]
    points = []
    for ctx in contexts:
        s = measure_generate(out_dir, precision, ctx)
        overhead = s["peak_rss_bytes"] - weights - s["cache_bytes"]
        points.append({"context": s["cache_tokens"], "peak_rss_bytes": s["peak_rss_bytes"], "overhead_bytes": overhead})
    n = len(points)
    mx = sum(p["context"] for p in points) / n
    my = sum(p["overhead_bytes"] for p in points) / n
    sxx = sum((p["context"] - mx) ** 2 for p in points)
    slope = sum((p["context"] - mx) * (p["overhead_bytes"] - my) for p in points) / sxx if sxx else 0.0
    slope = max(slope, 0.0)
    cal = {
        "base_bytes": int(my - slope * mx),
        "per_token_bytes": slope,
        "precision": precision,
        "export": str(out_dir),
        "contexts": [p["context"] for p in points],
        "prefill_chunk": PREFILL_CHUNK,
        "points": points,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        **_calibration_key(out_dir),
    }
    _save_calibration(out_dir, cal)
    return cal


CALIBRATION_FILE = ".mla-edge-budget.json"  # beside the export's manifest; `budget OUT_DIR` reuses it


def _calibration_key(out_dir: Path) -> dict:
    """What a calibration belongs to: this very manifest (a re-export invalidates it) on this kind of machine."""
    import platform

    import onnxruntime

    return {
        "manifest_sha256": sha256(out_dir / MANIFEST),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, onnxruntime {onnxruntime.__version__}",
    }


def _save_calibration(out_dir: Path, cal: dict) -> None:
    tmp = out_dir / f".{CALIBRATION_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(cal, indent=2))
        os.replace(tmp, out_dir / CALIBRATION_FILE)
    except OSError as e:  # a read-only export: the answer stands, only the cache is lost
        tmp.unlink(missing_ok=True)
        warnings.warn(
            f"could not keep the calibration in {out_dir} ({e.strerror}); --calibrate measures again next time",
            stacklevel=2,
        )


def load_calibration(out_dir: str | Path) -> dict | None:
    """The calibration `budget --calibrate` kept beside this export, if it still belongs to it and to this machine."""
    path = Path(out_dir) / CALIBRATION_FILE
    try:
        cal = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cal, dict) or not all(k in cal for k in ("base_bytes", "per_token_bytes", "manifest_sha256")):
        return None
    return cal if {k: cal.get(k) for k in ("manifest_sha256", "machine")} == _calibration_key(Path(out_dir)) else None


# Measured by `calibrate` on this project's 2-core x86_64 machine: the demo model, int8, prefill chunks of 64
# (README "Edge memory budgets"). The per-token part is mostly prefill attention scratch held by onnxruntime's
# arena (heads x chunk x context floats, a few copies), not the cache: recalibrate for other models.
DEFAULT_CALIBRATION: dict[str, Any] = {
    "base_bytes": 80_468_046,
    "per_token_bytes": 20_944.8,
    "precision": "int8",
    "export": "demo model, 2026-11-28",
    "contexts": [63, 767, 1535],
    "prefill_chunk": 64,
}


def format_plan(p: dict) -> str:
    cal = p["calibration"]
    origin = (
        f"BORROWED from a measurement of {cal['export']} on a 2-core x86_64 machine; measure yours with "
        "`mla-edge budget OUT_DIR --calibrate`"
        if cal.get("borrowed")
        else f"measured on {cal['export']}" + (f" ({cal['measured_at']}; {cal['machine']})" if "machine" in cal else "")
    )
    lines = [
        f"budget {p['memory_bytes'] / 2**20:,.1f} MiB, batch {p['batch']} ({p['model_type']}; weights from "
        f"{p['weights_source']})",
        f"  runtime overhead {cal['base_bytes'] / 2**20:.1f} MiB + {cal['per_token_bytes']:.0f} B/token per sequence, "
        f"{origin}",
    ]
    by: dict[tuple[str, str], dict[str, str]] = {}
    for r in p["rows"]:
        lo_hi = r.get("max_context_range")
        cell = f"{lo_hi[0]:,d}-{lo_hi[1]:,d}" if lo_hi else f"{r['max_context']:,d}"
        by.setdefault((r["weights"], r["cache"]), {})[r["attention"]] = cell
    width = max(14, *(len(v) for d in by.values() for v in d.values()))
    heads = ("MLA max ctx", "GQA max ctx", "MHA max ctx")
    lines.append(f"  {'weights':8s} {'cache':6s} " + " ".join(f"{h:>{width}s}" for h in heads))
    for (w, c), ctx in by.items():
        lines.append(f"  {w:8s} {c:6s} " + " ".join(f"{ctx[f]:>{width}s}" for f in ("mla", "gqa", "mha")))
    if cal.get("borrowed"):
        lines.append(
            "  (ranges: the borrowed overhead per token .. none at all; `--calibrate` measures this export and "
            "gives one number)"
        )
    lines.append(
        f"  (contexts past the model's max_position_embeddings = {p['max_position_embeddings']:,} "
        "would need RoPE scaling)"
    )
    return "\n".join(lines)


def plot(
    p: dict, folder, path: str | Path, weights: str = "int8", cache: str = "fp32", max_context: int | None = None
) -> Path:
    """Memory against context length for MLA, GQA and MHA caches (matplotlib, the optional `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BudgetError("--plot needs matplotlib: pip install 'mla-edge[plot]'") from None
    facts = model_facts(folder)
    cfg, cal = facts["config"], p["calibration"]
    mla_fit = max(
        (
            r["max_context"]
            for r in p["rows"]
            if r["attention"] == "mla" and r["weights"] == weights and r["cache"] == cache
        ),
        default=0,
    )
    top = max_context or max(cfg.max_position_embeddings, int(1.15 * mla_fit))  # show where each line meets the budget
    xs = list(range(0, top + 1, max(1, top // 200)))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for form, color in (("mha", "tab:red"), ("gqa", "tab:orange"), ("mla", "tab:blue")):
        per_tok = cache_per_token(cfg, cache)[form]
        ys = [predict_rss(facts["weights"][weights], per_tok, x, p["batch"], cal) / 2**20 for x in xs]
        ax.plot(xs, ys, color=color, label=f"{form.upper()} cache ({per_tok:,} B/token, {cache})")
    ax.axhline(
        p["memory_bytes"] / 2**20, color="black", linestyle="--", label=f"budget {p['memory_bytes'] / 2**20:,.0f} MiB"
    )
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("predicted RSS (MiB)")
    origin = "BORROWED (demo model's) runtime overhead" if cal.get("borrowed") else "measured runtime overhead"
    ax.set_title(f"{cfg.model_type}: {weights} weights, batch {p['batch']}, {origin}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

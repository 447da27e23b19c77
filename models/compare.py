"""The seed article's cache-vs-quality table, reproduced at small scale: MHA, GQA and MLA trained with the same
width, depth, MLP, tokenizer, training tokens, batches and seed; only attention differs.

python -m mla_edge.models.compare --out runs/compare [--tokens 1.5e6]     (resumable: rerun the same command)
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .baselines import kv_heads_for
from .config import MLAConfig
from .train import DEFAULT_DATA, DEMO
from .train import main as train_main

ARCHS = ("mha", "gqa", "mla")
CLAIMS = {"mha": {"units": 8192, "ppl": 94.31}, "mla": {"units": 2856, "ppl": 96.70}}  # the article's numbers


def cache_elements(cfg: MLAConfig, arch: str) -> int:
    if arch == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * kv_heads_for(cfg, arch) * (cfg.hidden_size // cfg.num_attention_heads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--tokens", type=float, default=1.5e6)
    ap.add_argument("--tokenizer", type=Path, help="reuse this tokenizer.json (default: train one on the corpus)")
    args = ap.parse_args(argv)
    cfg = MLAConfig.from_dict(DEMO)
    rows = []
    first = None
    for arch in ARCHS:
        out = args.out / arch
        out.mkdir(parents=True, exist_ok=True)
        src = first or (args.tokenizer.parent if args.tokenizer else None)
        if src and not (out / "tokenizer.json").exists():  # one tokenizer and one tokenized corpus for all three
            shutil.copyfile(src / "tokenizer.json" if first else args.tokenizer, out / "tokenizer.json")
            if first and (first / "data").is_dir() and not (out / "data").exists():
                shutil.copytree(first / "data", out / "data")
        if not (out / "train_log.json").is_file():
            resume = ["--resume"] if (out / "train_state" / "state.json").is_file() else []
            train_main(["--out", str(out), "--data", str(args.data), "--arch", arch, "--tokens", str(args.tokens),
                        "--eval-every", "100000", *resume])
        log = json.loads((out / "train_log.json").read_text())
        first = first or out
        units = cache_elements(cfg, arch)
        rows.append({"arch": arch, "parameters": log["parameters"], "cache_elements_per_token_per_layer": units,
                     "cache_bytes_per_token_per_layer_fp16": units * 2, "val_ppl": log["val_ppl"],
                     "tokens": log["tokens_seen"], "train_seconds": log["train_seconds"]})
    mha = rows[0]
    for r in rows:
        r["cache_vs_mha"] = r["cache_elements_per_token_per_layer"] / mha["cache_elements_per_token_per_layer"] - 1
        r["ppl_vs_mha"] = r["val_ppl"] / mha["val_ppl"] - 1
    result = {"config": DEMO, "tokens": args.tokens, "rows": rows, "claims": CLAIMS}
    (args.out / "compare.json").write_text(json.dumps(result, indent=2))
    lines = ["| attention | parameters | KV cache elements / token / layer | bytes / token / layer (fp16) | vs MHA | val ppl | vs MHA |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch'].upper()} | {r['parameters'] / 1e6:.2f}M | {r['cache_elements_per_token_per_layer']:,} | "
                     f"{r['cache_bytes_per_token_per_layer_fp16']:,} | {r['cache_vs_mha']:+.0%} | {r['val_ppl']:.2f} | {r['ppl_vs_mha']:+.1%} |")
    (args.out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""MHA and GQA twins of the MLA decoder, and the small-scale cache-vs-quality table (training and evaluation only;
twins are never exported).

python -m mla_edge.models.recipes.twins --data CORPUS_DIR --out runs/compare [--tokens 1.5e6]   (resumable)

Same width, depth, MLP, norms, RoPE dims, tokenizer, training tokens, batches and seed as the MLA model; only
attention differs: standard per-head K/V with head_dim = hidden_size / heads, RoPE on the first qk_rope_head_dim dims
of each head.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mla_edge.contract import gqa_kv_heads, kv_elements

from ..config import MLAConfig
from ..mla import MLAForCausalLM, ModelOptions
from ..rope import apply_rope

ARCHS = ("mha", "gqa", "mla")
CLAIMS = {"mha": {"units": 8192, "ppl": 94.31}, "mla": {"units": 2856, "ppl": 96.70}}  # the article's numbers


class GQAttention(nn.Module):
    def __init__(self, cfg: MLAConfig, kv_heads: int):
        super().__init__()
        H, C = cfg.num_attention_heads, cfg.hidden_size
        if H % kv_heads:
            raise ValueError(f"num_attention_heads={H} is not a multiple of kv_heads={kv_heads}")
        self.cfg, self.kv_heads, self.head_dim = cfg, kv_heads, C // H
        if cfg.qk_rope_head_dim > self.head_dim:
            raise ValueError("qk_rope_head_dim must fit in hidden_size / num_attention_heads")
        self.q_proj = nn.Linear(C, H * self.head_dim, bias=False)
        self.k_proj = nn.Linear(C, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(H * self.head_dim, C, bias=False)

    def forward(self, x, cos, sin, allowed, past):
        if allowed is not None or past[0].shape[1]:
            raise NotImplementedError("the MHA/GQA twins are for full-sequence training and evaluation only")
        B, S, _ = x.shape
        H, G, D, Dr = self.cfg.num_attention_heads, self.kv_heads, self.head_dim, self.cfg.qk_rope_head_dim
        q = self.q_proj(x).view(B, S, H, D).transpose(1, 2)  # (B,H,S,D)
        k = self.k_proj(x).view(B, S, G, D).transpose(1, 2)  # (B,G,S,D)
        v = self.v_proj(x).view(B, S, G, D).transpose(1, 2)
        q = torch.cat([apply_rope(q[..., :Dr], cos[:, None], sin[:, None], False), q[..., Dr:]], -1)
        k = torch.cat([apply_rope(k[..., :Dr], cos[:, None], sin[:, None], False), k[..., Dr:]], -1)
        if G != H:
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * D)), past


def kv_heads_for(cfg: MLAConfig, arch: str) -> int:
    return cfg.num_attention_heads if arch == "mha" else gqa_kv_heads(cfg.num_attention_heads, cfg.num_key_value_heads)


def twin(cfg: MLAConfig, arch: str) -> MLAForCausalLM:
    """The decoder with MHA or GQA attention blocks in place of MLA (built so, not patched afterwards)."""
    heads = kv_heads_for(cfg, arch)
    return MLAForCausalLM(cfg, ModelOptions(attention="naive"), attention_block=lambda i: GQAttention(cfg, heads))


def cache_elements(cfg: MLAConfig, arch: str) -> int:
    if arch == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return kv_elements(kv_heads_for(cfg, arch), head_dim, head_dim)


def main(argv: list[str] | None = None) -> int:
    from .train import DEMO
    from .train import main as train_main

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="folder with train.txt.xz and valid.txt.xz")
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
            train_main(
                [
                    "--out",
                    str(out),
                    "--data",
                    str(args.data),
                    "--arch",
                    arch,
                    "--tokens",
                    str(args.tokens),
                    "--eval-every",
                    "100000",
                    *resume,
                ]
            )
        log = json.loads((out / "train_log.json").read_text())
        first = first or out
        units = cache_elements(cfg, arch)
        rows.append(
            {
                "arch": arch,
                "parameters": log["parameters"],
                "cache_elements_per_token_per_layer": units,
                "cache_bytes_per_token_per_layer_fp16": units * 2,
                "val_ppl": log["val_ppl"],
                "tokens": log["tokens_seen"],
                "train_seconds": log["train_seconds"],
            }
        )
    mha = rows[0]
    for r in rows:
        r["cache_vs_mha"] = r["cache_elements_per_token_per_layer"] / mha["cache_elements_per_token_per_layer"] - 1
        r["ppl_vs_mha"] = r["val_ppl"] / mha["val_ppl"] - 1
    result = {"config": DEMO, "tokens": args.tokens, "rows": rows, "claims": CLAIMS}
    (args.out / "compare.json").write_text(json.dumps(result, indent=2))
    lines = [
        "| attention | parameters | KV cache elements / token / layer | bytes / token / layer (fp16) | vs MHA "
        "| val ppl | vs MHA |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch'].upper()} | {r['parameters'] / 1e6:.2f}M | {r['cache_elements_per_token_per_layer']:,} | "
            f"{r['cache_bytes_per_token_per_layer_fp16']:,} | {r['cache_vs_mha']:+.0%} | {r['val_ppl']:.2f} | "
            f"{r['ppl_vs_mha']:+.1%} |"
        )
    (args.out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

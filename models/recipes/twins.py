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

    def forward(self, x, cos, sin, mask, past, bias=None):
        """Training (mask None, no past): fused causal attention. Otherwise the per-head K/V cache: past is
        (k, v), each (B, P, G*D) with RoPE applied, and the present (B, T, G*D) pair comes back."""
        B, S, _ = x.shape
        H, G, D, Dr = self.cfg.num_attention_heads, self.kv_heads, self.head_dim, self.cfg.qk_rope_head_dim
        q = self.q_proj(x).view(B, S, H, D).transpose(1, 2)  # (B,H,S,D)
        k = self.k_proj(x).view(B, S, G, D).transpose(1, 2)  # (B,G,S,D)
        v = self.v_proj(x).view(B, S, G, D).transpose(1, 2)
        q = torch.cat([apply_rope(q[..., :Dr], cos[:, None], sin[:, None], False), q[..., Dr:]], -1)
        k = torch.cat([apply_rope(k[..., :Dr], cos[:, None], sin[:, None], False), k[..., Dr:]], -1)
        if mask is None:  # plain causal over the new tokens (training): the cache is not kept
            ks, vs = self._heads(k, v)
            out = F.scaled_dot_product_attention(q, ks, vs, is_causal=True)
            return self.o_proj(out.transpose(1, 2).reshape(B, S, H * D)), past
        k = torch.cat([past[0].view(B, -1, G, D).transpose(1, 2), k], dim=2)  # (B,G,T,D)
        v = torch.cat([past[1].view(B, -1, G, D).transpose(1, 2), v], dim=2)
        present = (k.transpose(1, 2).reshape(B, -1, G * D), v.transpose(1, 2).reshape(B, -1, G * D))
        ks, vs = self._heads(k, v)
        scores = (q @ ks.transpose(-1, -2)) * D**-0.5  # (B,H,S,T)
        scores = scores + mask  # additive (B,1,S,T)
        out = scores.softmax(-1) @ vs  # (B,H,S,D)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * D)), present

    def _heads(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H, G = self.cfg.num_attention_heads, self.kv_heads
        return (k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)) if G != H else (k, v)


def kv_heads_for(cfg: MLAConfig, arch: str) -> int:
    return cfg.num_attention_heads if arch == "mha" else gqa_kv_heads(cfg.num_attention_heads, cfg.num_key_value_heads)


def twin(cfg: MLAConfig, arch: str) -> MLAForCausalLM:
    """The decoder with MHA or GQA attention blocks in place of MLA (built so, not patched afterwards)."""
    heads = kv_heads_for(cfg, arch)
    return MLAForCausalLM(cfg, ModelOptions(attention="naive"), attention_block=lambda i: GQAttention(cfg, heads))


def export_twin(model: MLAForCausalLM, arch: str, out_dir: Path, tokenizer: Path | None = None) -> Path:
    """An export folder of a twin with its per-head K/V cache (past.{i}.k / past.{i}.v, each [batch, past_len,
    kv_heads x head_dim]) as graph inputs and outputs, fp32 and int8, that mla-edge's runtime runs like any export:
    the cache, not the compute, is what differs from the MLA model."""
    from mla_edge.contract import (
        ATTENTION_MASK,
        BATCH,
        FORMAT,
        FORMAT_VERSION,
        INPUT_IDS,
        LOGITS,
        MANIFEST,
        MODEL_FILE,
        PAST,
        PAST_LEN,
        POSITION_IDS,
        PRESENT,
        SEQ,
        TOTAL_LEN,
        io_specs,
    )
    from mla_edge.export.onnx_graph import OnnxDecoder, dynamic_dims, model_files, trace
    from mla_edge.export.quantize import quantize_int8
    from mla_edge.runtime.manifest import check_written, file_entry

    cfg = model.cfg
    L, width = cfg.num_hidden_layers, kv_heads_for(cfg, arch) * (cfg.hidden_size // cfg.num_attention_heads)
    names = [(i, kind) for i in range(L) for kind in ("k", "v")]
    ids: list = [BATCH, SEQ]
    spec = {
        "inputs": io_specs(
            [(INPUT_IDS, ids, "int64"), (ATTENTION_MASK, [BATCH, TOTAL_LEN], "int64"), (POSITION_IDS, ids, "int64")]
            + [(PAST.format(layer=i, kind=k), [BATCH, PAST_LEN, width], "float32") for i, k in names]
        ),
        "outputs": io_specs(
            [(LOGITS, [BATCH, SEQ, cfg.vocab_size], "float32")]
            + [(PRESENT.format(layer=i, kind=k), [BATCH, TOTAL_LEN, width], "float32") for i, k in names]
        ),
    }
    g = torch.Generator().manual_seed(0)
    example = (
        torch.randint(0, cfg.vocab_size, (2, 3), generator=g),
        torch.ones(2, 7, dtype=torch.long),
        (torch.arange(3) + 4)[None].expand(2, 3).contiguous(),
        *[torch.randn(2, 4, width, generator=g) for _ in names],
    )
    out_dir.mkdir(parents=True)
    fp32 = trace(OnnxDecoder(model.eval()), example, spec, out_dir / MODEL_FILE["fp32"], 21, dynamic_dims(len(names)))
    quantize_int8(fp32, out_dir / MODEL_FILE["int8"])
    if tokenizer:
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": "the twins recipe (models/recipes/twins.py)",
        "model": cfg.to_dict(),
        "max_context": cfg.max_position_embeddings,
        "cache": {
            "format": f"{arch}-per-head-kv",
            "dtype": "fp32",
            "num_layers": L,
            "bytes_per_token": L * 2 * width * 4,
        },
        "graph": {"attention": arch, "opset": 21, **spec},
        "tokens": {"bos": cfg.bos_token_id, "eos": list(cfg.eos_token_id), "pad": cfg.pad_token_id},
        "tokenizer": "tokenizer.json" if tokenizer else None,
        "files": {p: file_entry(out_dir, p, model_files(out_dir / MODEL_FILE[p])) for p in ("fp32", "int8")},
    }
    check_written(manifest)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


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

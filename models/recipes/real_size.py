"""Real-size checkpoints with random weights (no download), and what exporting and running them costs.

python -m mla_edge.models.recipes.real_size write  deepseek-v2-lite --layers 3 --out ckpt/v2lite-3l
python -m mla_edge.models.recipes.real_size measure ckpt/v2lite-3l --work runs/v2lite-3l [--json] [--experts dense]
python -m mla_edge.models.recipes.real_size extrapolate runs/v2lite-1l.json runs/v2lite-3l.json --layers 27

`write` gives the exact dimensions of a public model's config.json, truncated to --layers (DeepSeek-V2-Lite keeps its
first layer dense, so 3 layers = 1 dense + 2 MoE), bf16 safetensors as published, weights N(0, initializer_range).
No tokenizer: the real ones are not on this machine. `measure` exports int8 and int4 in a fresh process (its own
peak RSS, per stage, from the manifest), then runs each precision in a fresh process: load time, decode ms/token
at past 1024 (median) and peak RSS. `extrapolate` draws a line through two depths to the full one. Random weights
say nothing of quality; they cost what real weights cost (MoE routing aside: random routers spread tokens evenly).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

# The published config.json fields that set dimensions and routing (DeepSeek-V2-Lite as released by deepseek-ai;
# MiniCPM3-4B's dimensions are transformers' MiniCPM3Config defaults, which are the 4B model's). MiniCPM3's 16
# LongRoPE factors are placeholders (1.0 short, 1.0-4.0 long): they change RoPE values, not the cost.
CONFIGS: dict[str, dict[str, Any]] = {
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_shared_experts": 2,
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
        "routed_scaling_factor": 1.0,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "torch_dtype": "bfloat16",
    },
    "minicpm3-4b": {
        "architectures": ["MiniCPM3ForCausalLM"],
        "model_type": "minicpm3",
        "vocab_size": 73448,
        "hidden_size": 2560,
        "intermediate_size": 6400,
        "num_hidden_layers": 62,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "q_lora_rank": 768,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "initializer_range": 0.1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "rope_type": "longrope",
            "short_factor": [1.0] * 16,
            "long_factor": [1.0 + 0.2 * i for i in range(16)],
            "original_max_position_embeddings": 32768,
        },
        "scale_emb": 12,
        "scale_depth": 1.4,
        "dim_model_base": 256,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": [2, 73440],
        "torch_dtype": "bfloat16",
    },
}
# Youtu-LLM-2B: the dimensions its model card lists (32 layers, 16 heads, q/kv ranks 1536/512, nope/rope/v
# 128/64/128, 131,072 context, 128,256 vocabulary) with hidden/intermediate sizes and norms from transformers'
# YoutuConfig, whose defaults are that model's. GLM-4.7-Flash (zai-org): transformers' Glm4MoeLiteConfig defaults
# (47 layers, the first dense, 64 routed experts of 1536 + 1 shared, 4 per token, rms_norm_eps 1e-5).
CONFIGS["youtu-llm-2b"] = {
    "architectures": ["YoutuForCausalLM"],
    "model_type": "youtu",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "initializer_range": 2.0 / (5.0 * 2048) ** 0.5,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_interleave": True,
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
CONFIGS["glm-4.7-flash"] = {
    "architectures": ["Glm4MoeLiteForCausalLM"],
    "model_type": "glm4_moe_lite",
    "vocab_size": 154880,
    "hidden_size": 2048,
    "intermediate_size": 10240,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 47,
    "num_attention_heads": 20,
    "num_key_value_heads": 20,
    "n_shared_experts": 1,
    "n_routed_experts": 64,
    "num_experts_per_tok": 4,
    "routed_scaling_factor": 1.8,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "kv_lora_rank": 512,
    "q_lora_rank": 768,
    "qk_rope_head_dim": 64,
    "v_head_dim": 256,
    "qk_nope_head_dim": 192,
    "hidden_act": "silu",
    "max_position_embeddings": 202752,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_interleave": True,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}
SHARD_BYTES = 2 << 30


def write(name: str, layers: int, out: Path, seed: int = 0) -> dict:
    """Random bf16 weights for every tensor the (truncated) config implies, written tensor by tensor in shards."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..checkpoint import INDEX_FILE, atomic_folder, tensor_table
    from ..config import MLAConfig

    d = {**CONFIGS[name], "num_hidden_layers": layers}
    table = tensor_table(MLAConfig.from_dict(d))
    g = torch.Generator().manual_seed(seed)
    std = d["initializer_range"]
    with atomic_folder(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(d, indent=2) + "\n")
        shard: dict[str, torch.Tensor] = {}
        size = 0
        files: list[str] = []
        weight_map: dict[str, str] = {}

        def flush() -> None:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            files.append(fname)
            weight_map.update({n: fname for n in shard})
            shard.clear()

        for n, (shape, _) in tqdm(table.items(), desc=f"write {name}", unit="tensor"):
            if len(shape) == 1:
                t = torch.zeros(shape) if n.endswith("correction_bias") else torch.ones(shape)
            else:
                t = torch.randn(shape, generator=g) * std
            t = t.to(torch.bfloat16)
            if shard and size + t.numel() * 2 > SHARD_BYTES:
                flush()
                size = 0
            shard[n] = t
            size += t.numel() * 2
        flush()
        total = sum(math.prod(shape) for shape, _ in table.values()) * 2
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"model": name, "layers": layers, "params": total // 2, "out": str(out)}


EXPORT = (
    "import sys; from pathlib import Path; from mla_edge.export.pipeline import ExportOptions, export_folder; "
    "export_folder(Path(sys.argv[1]), Path(sys.argv[2]), ExportOptions(quantize=tuple(sys.argv[4:]), "
    "progress=False, require_tokenizer=False, force=True, moe_op=sys.argv[3] == 'op'))"
)


def measure(
    ckpt: Path, work: Path, precisions: tuple[str, ...] = ("int8", "int4"), repeats: int = 3, experts: str = "op"
) -> dict:
    """Export (fresh process) and run each precision (fresh process each); no torch is imported here. experts:
    "op" (onnxruntime's MoE/QMoE, the default export) or "dense" (every expert runs), to compare the two."""
    from mla_edge.runtime.memory import cli_command

    export = work / "export"
    r = subprocess.run(
        [sys.executable, "-c", EXPORT, str(ckpt), str(export), experts, *precisions], capture_output=True, text=True
    )
    if r.returncode:
        raise RuntimeError(f"export failed: {r.stderr.strip()[-2000:]}")
    manifest = json.loads((export / "mla_edge.json").read_text())
    peaks = manifest["export_peak_rss_bytes"]
    weight_bytes = peaks.pop("fp32_weight_bytes")
    cfg = manifest["model"]
    result: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "experts": experts,
        "layers": cfg["num_hidden_layers"],
        "moe_layers": sum(
            1
            for i in range(cfg["num_hidden_layers"])
            if cfg.get("n_routed_experts") and i >= cfg.get("first_k_dense_replace", 0)
        ),
        "fp32_weight_bytes": weight_bytes,
        "export_seconds": manifest["export_seconds"],
        "export_peak_rss_bytes": max(peaks.values()),
        "export_peak_rss_by_stage": peaks,
        "export_peak_over_fp32_weights": max(peaks.values()) / weight_bytes,
        "cache_bytes_per_token": manifest["cache"]["bytes_per_token"],
        "precisions": {},
    }
    for p in ("fp32", *precisions):
        w = subprocess.run(
            cli_command(
                "_bench-worker", str(export), p, "--repeats", str(repeats), "--prompt-lens", "128", "--pasts", "1024"
            ),
            capture_output=True,
            text=True,
        )
        line = next((x for x in w.stdout.splitlines()[::-1] if x.startswith("BENCH_JSON ")), None)
        if line is None:
            raise RuntimeError(f"{p} run failed: {w.stderr.strip()[-2000:]}")
        b = json.loads(line[len("BENCH_JSON ") :])
        result["precisions"][p] = {
            "file_bytes": manifest["files"][p]["bytes"],
            "load_s": b["load_s"],
            "decode_1024_ms": b["decode_1024_ms"],
            "prefill_128_tok_s": b["prefill_128_tok_s"],
            "peak_rss_bytes": b["peak_rss_bytes"],
        }
    return result


def extrapolate(small: dict, big: dict, full_layers: int) -> dict:
    """Linear in the layer count: per-layer cost = (big - small) / (layers between them), full = small + the
    remaining layers at that cost. With DeepSeek-V2-Lite's 1 and 3 layers the per-layer cost is a MoE layer's (its
    only dense layer is in both). An extrapolation, not a measurement: say so wherever it is shown."""
    n = big["layers"] - small["layers"]
    extra = full_layers - small["layers"]

    def line(a: float, b: float) -> float:
        return a + extra * (b - a) / n

    out: dict[str, Any] = {
        "layers": full_layers,
        "from_layers": [small["layers"], big["layers"]],
        "fp32_weight_bytes": line(small["fp32_weight_bytes"], big["fp32_weight_bytes"]),
        # per stage, then the largest: the stage that peaks moves with depth (a quantizer at 1 layer, loading at 62)
        "export_peak_rss_bytes": max(
            line(small["export_peak_rss_by_stage"][k], v) for k, v in big["export_peak_rss_by_stage"].items()
        ),
        "cache_bytes_per_token": line(small["cache_bytes_per_token"], big["cache_bytes_per_token"]),
        "precisions": {},
    }
    for p, b in big["precisions"].items():
        a = small["precisions"][p]
        out["precisions"][p] = {k: line(a[k], b[k]) for k in ("file_bytes", "decode_1024_ms", "peak_rss_bytes")}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mla_edge.models.recipes.real_size", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a random-weight checkpoint with a public model's dimensions")
    w.add_argument("model", choices=sorted(CONFIGS))
    w.add_argument("--layers", type=int, required=True)
    w.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("measure", help="export int8/int4 and run each precision, in fresh processes")
    m.add_argument("checkpoint", type=Path)
    m.add_argument("--work", type=Path, required=True)
    m.add_argument("--precision", nargs="+", default=["int8", "int4"])
    m.add_argument("--experts", choices=["op", "dense"], default="op", help="MoE layers as onnxruntime's op, or dense")
    m.add_argument("--json", action="store_true")
    x = sub.add_parser("extrapolate", help="full-depth figures from two measured depths (linear in layers)")
    x.add_argument("small", type=Path, help="measure --json output, fewer layers")
    x.add_argument("big", type=Path, help="measure --json output, more layers")
    x.add_argument("--layers", type=int, required=True, help="the full model's layer count")
    a = ap.parse_args(argv)
    if a.cmd == "extrapolate":
        small, big = (json.loads(f.read_text()) for f in (a.small, a.big))
        print(json.dumps(extrapolate(small, big, a.layers), indent=2))
    elif a.cmd == "write":
        print(json.dumps(write(a.model, a.layers, a.out)))
    else:
        res = measure(a.checkpoint, a.work, tuple(a.precision), experts=a.experts)
        print(json.dumps(res, indent=None if a.json else 2))


if __name__ == "__main__":
    main()

"""`mla-edge info MODEL_DIR`: the config and the cache cost per token, without loading weights or torch."""
from __future__ import annotations

import json

from .cache import CacheContract, comparison
from .config import MLAConfig


def add_arguments(p) -> None:
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                   help="Hugging Face model folder (config.json + *.safetensors; default: the embedded demo model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "int8"], help="cache dtype for the byte counts")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def describe(model_dir: str, dtype: str = "float32") -> dict:
    cfg = MLAConfig.from_pretrained(model_dir)
    contract = CacheContract.from_config(cfg, dtype)
    config = {k: v for k, v in cfg.to_dict().items() if k in _SHOWN}
    return {"model_dir": str(model_dir), "config": config, "cache": comparison(cfg, dtype),
            "cache_names": {"past": contract.past_names()[:2], "present": contract.present_names()[:2]}}


_SHOWN = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_parameters",
          "rope_interleave", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id")


def run(args) -> int:
    from .demo_path import default_model_dir

    info = describe(str(default_model_dir(args.model_dir)), args.dtype)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {info['model_dir']}")
    for k, v in info["config"].items():
        print(f"  {k:26s} {v}")
    c = info["cache"]
    print(f"\ncache per token ({c['dtype']}, {c['num_layers']} layers):")
    print(f"  {'form':20s} {'elements/token/layer':>22s} {'bytes/token':>12s} {'vs MHA':>8s}")
    for form in ("mla", "gqa", "mha"):
        r = c[form]
        label = form.upper() + (f" ({r['kv_heads']} kv heads)" if form == "gqa" else "")
        print(f"  {label:20s} {r['elements_per_token_per_layer']:>22,d} {r['bytes_per_token']:>12,d} {r['ratio_vs_mha']:>7.1%}")
    return 0

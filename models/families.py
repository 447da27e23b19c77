"""The MLA family: every model type in transformers whose config has `kv_lora_rank`, and what we do with each.

Torch-free. One row per model type: supported (the config reader builds it, with the type's own defaults and
semantics) or refused (with a one-line reason that `mla-edge info/export` prints). `tests/test_families.py` walks
transformers' config classes and fails when a type with `kv_lora_rank` is missing here, and the README's model table
is generated from this table (`python -m mla_edge.models.families --markdown`).

Semantics read from each type's modeling code in transformers 5.25 (not assumed):
- latent norms: DeepSeek-V2/V3 and every type built on their attention class construct `q_a_layernorm` and
  `kv_a_layernorm` with the norm class's default eps, 1e-6, whatever `rms_norm_eps` says;
- routers: V2 softmax (greedy / group-limited by the best expert, never renormalised); V3 and its descendants
  sigmoid + score-correction bias, groups ranked by their two best scores, whatever `topk_method` says; Mistral 4
  softmax with groups ranked by their two best scores, renormalised by `norm_topk_prob`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_NORM_EPS = 1e-6  # transformers' RMSNorm default, used by the latent norms of every supported type


@dataclass(frozen=True)
class Family:
    model_type: str
    example: str  # a public checkpoint of this type
    supported: bool
    note: str  # supported: what it adds to DeepSeek's MLA; refused: the one-line reason
    arch: str = ""  # architectures[0] that transformers loads it with
    router: tuple[str, str] | None = None  # fixed (scoring_func, topk_method); None: from the config (DeepSeek-V2)
    renormalise: bool | None = None  # False: the router never renormalises; None: norm_topk_prob from the config
    moe_rule: str = "first_k_dense_replace"  # or "mlp_layer_types" (a list per layer) or "dense"
    post_mlp_norm: bool = False  # A.X-K1: an RMSNorm on the MoE block's output
    defaults: dict[str, Any] = field(default_factory=dict)  # transformers' class defaults for fields left out
    aliases: dict[str, str] = field(default_factory=dict)  # legacy config.json names -> ours (transformers reads both)
    gguf: str = ""  # "" = our GGUF writer writes llama.cpp's deepseek2 for it; else why --format gguf refuses
    verified: str = ""  # how the tests verify it


_V3_DEFAULTS = {
    "max_position_embeddings": 4096,
    "q_lora_rank": 1536,
    "v_head_dim": 128,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "n_group": 8,
    "topk_group": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048,
}
_NO_FIRST_K = {k: v for k, v in _V3_DEFAULTS.items() if k != "first_k_dense_replace"}  # mlp_layer_types types
_PARITY = "transformers' class = ours = fp32 ONNX (prefill + 16 steps, both attention forms); static = dynamic tokens"

_SUPPORTED = [
    Family(
        "deepseek_v2",
        "deepseek-ai/DeepSeek-V2-Lite",
        True,
        "the original MLA; dense or DeepSeek-MoE (softmax greedy / group-limited router)",
        arch="DeepseekV2ForCausalLM",
        renormalise=False,
        defaults={
            "max_position_embeddings": 2048,
            "q_lora_rank": 1536,
            "v_head_dim": 128,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "first_k_dense_replace": 0,
            "topk_method": "greedy",
            "norm_topk_prob": False,
            "routed_scaling_factor": 1.0,
            "n_shared_experts": 2,
            "moe_intermediate_size": 1407,
        },
        verified=_PARITY,
    ),
    Family(
        "deepseek_v3",
        "deepseek-ai/DeepSeek-V3, moonshotai/Moonlight-16B-A3B",
        True,
        "sigmoid router with score-correction bias and group-limited choice (noaux_tc); optional interleaved RoPE",
        arch="DeepseekV3ForCausalLM",
        router=("sigmoid", "noaux_tc"),
        defaults=_V3_DEFAULTS,
        verified=_PARITY,
    ),
    Family(
        "minicpm3",
        "openbmb/MiniCPM3-4B",
        True,
        "dense; scaled embeddings, residuals and logits; LongRoPE; RoPE on halves",
        arch="MiniCPM3ForCausalLM",
        moe_rule="dense",
        defaults={
            "max_position_embeddings": 32768,
            "q_lora_rank": 768,
            "v_head_dim": 64,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
        },
        gguf="llama.cpp runs MiniCPM3 as its own minicpm3 architecture, which our GGUF writer does not write",
        verified=_PARITY,
    ),
    Family(
        "sarvam_mla",
        "sarvamai/sarvam-105b",
        True,
        "DeepSeek-V3 exactly (transformers loads it with DeepseekV3ForCausalLM)",
        arch="DeepseekV3ForCausalLM",
        router=("sigmoid", "noaux_tc"),
        defaults={**_V3_DEFAULTS, "q_lora_rank": None, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
        aliases={"num_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts"},
        verified=_PARITY,
    ),
    Family(
        "youtu",
        "tencent/Youtu-LLM-2B",
        True,
        "dense: Llama blocks around DeepSeek-V3's attention, tied embeddings",
        arch="YoutuForCausalLM",
        moe_rule="dense",
        defaults={
            "max_position_embeddings": 131072,
            "q_lora_rank": 1536,
            "v_head_dim": 128,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "rope_interleave": True,
        },
        verified=_PARITY,
    ),
    Family(
        "glm4_moe_lite",
        "zai-org/GLM-4.7-Flash",
        True,
        "DeepSeek-V3 attention and router; MoE layers from a per-layer list (mlp_layer_types); rms_norm_eps 1e-5",
        arch="Glm4MoeLiteForCausalLM",
        router=("sigmoid", "noaux_tc"),
        moe_rule="mlp_layer_types",
        defaults={
            **_NO_FIRST_K,
            "max_position_embeddings": 202752,
            "q_lora_rank": 768,
            "v_head_dim": 256,
            "rms_norm_eps": 1e-5,
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.8,
            "n_group": 1,
            "topk_group": 1,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 1536,
        },
        verified=_PARITY,
    ),
    Family(
        "mistral4",
        "mistralai/Mistral-Small-4-119B-2603",
        True,
        "softmax router with groups ranked by their two best scores; queries scaled by 1 + beta ln(1 + floor(pos / "
        "original context)) (llama_4_scaling_beta)",
        arch="Mistral4ForCausalLM",
        router=("softmax", "group_top2"),
        defaults={
            **_V3_DEFAULTS,
            "max_position_embeddings": 1048576,
            "q_lora_rank": 1024,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 128.0,
                "original_max_position_embeddings": 8192,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale_all_dim": 1.0,
                "mscale": 1.0,
                "llama_4_scaling_beta": 0.1,
            },
            "first_k_dense_replace": 0,
            "routed_scaling_factor": 1.0,
            "n_group": 1,
            "topk_group": 1,
            "num_experts_per_tok": 4,
        },
        gguf="llama.cpp runs Mistral 4 as its own mistral4 architecture, which our GGUF writer does not write",
        verified=_PARITY,
    ),
    Family(
        "axk1",
        "skt/A.X-K1",
        True,
        "DeepSeek-V3 with an RMSNorm on each MoE block's output; MoE layers from mlp_layer_types",
        arch="AXK1ForCausalLM",
        router=("sigmoid", "noaux_tc"),
        moe_rule="mlp_layer_types",
        post_mlp_norm=True,
        defaults={**_NO_FIRST_K, "max_position_embeddings": 32768},
        gguf="llama.cpp has no architecture for A.X-K1's post-MoE norm",
        verified=_PARITY,
    ),
]

_INDEXER = "a sparse attention indexer picks each query's top-{k} past tokens (DeepSeek Sparse Attention)"
_REFUSED = [
    Family(
        "deepseek_v32",
        "deepseek-ai/DeepSeek-V3.2-Exp",
        False,
        _INDEXER.format(k="index_topk")
        + ": dense MLA equals it only up to index_topk (2048) tokens, and its indexer keys are a second cache the "
        "latent-cache contract does not hold yet",
    ),
    Family(
        "glm_moe_dsa",
        "zai-org/GLM-5",
        False,
        _INDEXER.format(k="index_topk") + ", with its own key cache that the latent-cache contract does not hold yet",
    ),
    Family(
        "mistral_large4",
        "mistralai/Mistral-Large-4-1T-A52B",
        False,
        "a vision-language model whose text attention adds a sparse indexer and softmax scaling",
    ),
    Family(
        "mistral_large4_text",
        "mistralai/Mistral-Large-4-1T-A52B",
        False,
        "text part of mistral_large4: a sparse indexer",
    ),
    Family(
        "axk2",
        "skt/A.X-K2",
        False,
        "gated RMSNorms around the blocks and a sparse attention indexer with its own key cache",
    ),
    Family(
        "hy_v4",
        "tencent/Hy4-preview",
        False,
        "hyper-connections (several residual streams per layer) and a sparse attention indexer",
    ),
    Family("hy_v4_vl", "tencent/Hy4", False, "vision-language wrapper of hy_v4 (hyper-connections, indexer)"),
    Family("hy_v4_vl_text", "tencent/Hy4", False, "text part of hy_v4_vl: hyper-connections and an indexer"),
    Family(
        "longcat_flash",
        "meituan-longcat/LongCat-Flash-Chat",
        False,
        "two attention blocks per layer with a shortcut MoE and zero-compute experts",
    ),
    Family(
        "kimi_linear",
        "moonshotai/Kimi-Linear-48B-A3B-Instruct",
        False,
        "recurrent linear-attention (KDA) layers between the MLA layers: their state is not a latent cache",
    ),
    Family(
        "bailing_hybrid",
        "inclusionAI/Ling-3.0-Flash",
        False,
        "recurrent linear-attention layers between the MLA layers: their state is not a latent cache",
    ),
    Family(
        "glm5_next",
        "zai-org/GLM-5.3-Flash",
        False,
        "vision-language model; text layers mix linear attention, hyper-connections and a sparse indexer",
    ),
    Family(
        "glm5_next_text", "zai-org/GLM-5.3-Flash", False, "text part of glm5_next: linear attention, hyper-connections"
    ),
    Family(
        "dots3_note",
        "dots-studio/dots3-note-prev",
        False,
        "vision/audio-language model; text attention adds a rope-only key norm and a sparse indexer",
    ),
    Family(
        "dots3_note_text", "dots-studio/dots3-note-prev", False, "text part of dots3_note: rope-only key norm, indexer"
    ),
    Family(
        "kimi_k25",
        "moonshotai/Kimi-K2.6",
        False,
        "vision-language wrapper: export its text model (a deepseek_v3 config and language_model.* weights) on its own",
    ),
]

FAMILIES: dict[str, Family] = {f.model_type: f for f in _SUPPORTED + _REFUSED}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(f.model_type for f in _SUPPORTED)


def family(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


def refusal(model_type: Any) -> str:
    """The one-line reason a config of this model type does not load (the config reader raises it)."""
    f = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if f is None:
        return f"model_type {model_type!r} is not an MLA model we know (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    return f"model_type {model_type!r} ({f.example}) is not supported: {f.note}"


def markdown_table() -> str:
    """The README's model table."""
    rows = [
        "| model type | example checkpoint | status | what it adds, or why not | verified by |",
        "|---|---|---|---|---|",
    ]
    for f in _SUPPORTED + _REFUSED:
        status = "supported" + ("" if not f.gguf else " (no GGUF)") if f.supported else "refused"
        why = f.note + (f"; GGUF: {f.gguf}" if f.supported and f.gguf else "")
        rows.append(f"| `{f.model_type}` | {f.example} | {status} | {why} | {f.verified or '-'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown"]:
        print(markdown_table())
    else:
        for f in _SUPPORTED + _REFUSED:
            print(f"{f.model_type:20} {'supported' if f.supported else 'refused  '}  {f.note}")

"""The latent-cache contract, defined once. No heavy imports: the runtime and the Android demo's tooling use it too.

Per layer the cache holds only MLA's latent (DeepSeek's kv_cache / pe_cache):
  c_kv  [batch, past_len, kv_lora_rank]      after kv_a_layernorm
  k_pe  [batch, past_len, qk_rope_head_dim]  after RoPE, rotary dims in half-rotation layout
For interleaved-RoPE models (DeepSeek-V2/V3) the pairs (x0,x1),(x2,x3),... are rotated and then stored
de-interleaved as [x0', x2', ..., x1', x3', ...], exactly what transformers' DeepseekV3 cache holds.

Graph inputs are named `past.{i}.c_kv` / `past.{i}.k_pe`, outputs `present.{i}.c_kv` / `present.{i}.k_pe`;
layers are ordered 0..L-1 with c_kv before k_pe (the flat order used by every part).

With dtype "int8" each latent is stored as int8 with one float32 scale per token (symmetric, max|x| / 127), so
every layer has four entries: c_kv, c_kv_scale [batch, len, 1], k_pe, k_pe_scale. The graph quantizes new tokens on
write and dequantizes the whole cache on read; old tokens never change.
"""
from __future__ import annotations

from dataclasses import dataclass

CACHE_FORMAT = "mla-latent-v1"
PAST = "past.{layer}.{kind}"
PRESENT = "present.{layer}.{kind}"
KINDS = ("c_kv", "k_pe")
INT8_KINDS = ("c_kv", "c_kv_scale", "k_pe", "k_pe_scale")
CACHE_DTYPES = ("float32", "int8")
SCALE_DTYPE = "float32"
BATCH, PAST_LEN, SEQ, TOTAL_LEN = "batch", "past_len", "seq", "total_len"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def past_name(layer: int, kind: str) -> str:
    return PAST.format(layer=layer, kind=kind)


def present_name(layer: int, kind: str) -> str:
    return PRESENT.format(layer=layer, kind=kind)


@dataclass(frozen=True)
class CacheContract:
    num_layers: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    dtype: str = "float32"

    @classmethod
    def from_config(cls, cfg, dtype: str = "float32") -> "CacheContract":
        return cls(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype)

    @property
    def kinds(self) -> tuple[str, ...]:
        return INT8_KINDS if self.dtype == "int8" else KINDS

    def width(self, kind: str) -> int:
        return {"c_kv": self.kv_lora_rank, "k_pe": self.qk_rope_head_dim}.get(kind, 1)

    def kind_dtype(self, kind: str) -> str:
        return SCALE_DTYPE if kind.endswith("_scale") else self.dtype

    def entries(self) -> list[tuple[int, str]]:
        """(layer, kind) in the one flat order: layer 0 c_kv, layer 0 k_pe, layer 1 c_kv, ... (int8: each latent
        followed by its scale)."""
        return [(i, k) for i in range(self.num_layers) for k in self.kinds]

    def past_names(self) -> list[str]:
        return [past_name(i, k) for i, k in self.entries()]

    def present_names(self) -> list[str]:
        return [present_name(i, k) for i, k in self.entries()]

    def past_specs(self) -> list[tuple[str, list, str]]:
        """(name, shape with symbolic dims, dtype) for every past input."""
        return [(past_name(i, k), [BATCH, PAST_LEN, self.width(k)], self.kind_dtype(k)) for i, k in self.entries()]

    def present_specs(self) -> list[tuple[str, list, str]]:
        return [(present_name(i, k), [BATCH, TOTAL_LEN, self.width(k)], self.kind_dtype(k)) for i, k in self.entries()]

    @property
    def elements_per_token_per_layer(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * sum(self.width(k) * DTYPE_BYTES[self.kind_dtype(k)] for k in self.kinds)

    def bytes_for(self, tokens: int, batch: int = 1) -> int:
        return self.bytes_per_token * tokens * batch

    def to_manifest(self) -> dict:
        return {
            "format": CACHE_FORMAT,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "bytes_per_token": self.bytes_per_token,
            "past": [{"name": n, "shape": s, "dtype": t} for n, s, t in self.past_specs()],
            "present": [{"name": n, "shape": s, "dtype": t} for n, s, t in self.present_specs()],
        }


def default_gqa_heads(cfg) -> int:
    """KV heads for the GQA comparison: the config's num_key_value_heads when it is a real grouping,
    else a quarter of the query heads (a common GQA ratio)."""
    kv = getattr(cfg, "num_key_value_heads", None)
    if kv and kv < cfg.num_attention_heads and cfg.num_attention_heads % kv == 0:
        return kv
    return max(1, cfg.num_attention_heads // 4)


def comparison(cfg, dtype: str = "float32", gqa_kv_heads: int | None = None) -> dict:
    """Cache elements and bytes per token for this model as MLA, and as the same attention would cost
    with a decompressed per-head cache (MHA: every head keeps K of qk_head_dim and V of v_head_dim)
    and with a grouped cache (GQA: gqa_kv_heads such heads). An int8 cache also stores a float32 scale per token
    for every stored vector (MLA: c_kv and k_pe; MHA/GQA: K and V of every KV head)."""
    size = DTYPE_BYTES[dtype]
    scale = DTYPE_BYTES[SCALE_DTYPE] if dtype == "int8" else 0
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    per_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    g = gqa_kv_heads or default_gqa_heads(cfg)
    mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    rows = {
        "mla": {"elements_per_token_per_layer": mla, "vectors": 2},
        "mha": {"elements_per_token_per_layer": H * per_head, "kv_heads": H, "vectors": 2 * H},
        "gqa": {"elements_per_token_per_layer": g * per_head, "kv_heads": g, "vectors": 2 * g},
    }
    for r in rows.values():
        r["bytes_per_token"] = L * (r["elements_per_token_per_layer"] * size + r.pop("vectors") * scale)
        r["ratio_vs_mha"] = r["elements_per_token_per_layer"] / (H * per_head)
    return {"dtype": dtype, "num_layers": L, **rows}

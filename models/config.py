"""The one architecture config: a frozen dataclass read from a Hugging Face config.json.

Torch-free on purpose: the CLI, the exporter's manifest and the budget planner read it without torch.
Field names are Hugging Face's (DeepSeek-V2/V3, MiniCPM3, ...), so a config.json maps field for field; what each
model type means by them (defaults, router, which layers are MoE) comes from its row in `families.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mla_edge.contract import InputError

from .families import DEFAULT_NORM_EPS, FAMILIES, SUPPORTED_MODEL_TYPES, refusal

__all__ = ["SUPPORTED_MODEL_TYPES", "ConfigError", "MLAConfig", "RopeScaling"]


class ConfigError(InputError):
    """A config.json that we cannot run; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE context extension: YaRN (DeepSeek-V2/V3) or LongRoPE (MiniCPM3), with Hugging Face's field names."""

    rope_type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None  # longrope: per-frequency divisors up to the original context
    long_factor: tuple[float, ...] | None = None  # longrope: past it


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class MLAConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Only used for the GQA comparison in the cache contract; MLA itself has no KV heads. Missing means
    # num_attention_heads (transformers' DeepSeek classes would default it to 128, which breaks their eager attention).
    num_key_value_heads: int | None = None
    # MiniCPM3 scalings; the DeepSeek defaults make them no-ops.
    scale_emb: float = 1.0
    scale_depth: float | None = None
    dim_model_base: int | None = None
    # Mixture of experts (DeepSeek-V2/V3): layers from first_k_dense_replace on route each token to
    # num_experts_per_tok of n_routed_experts, plus n_shared_experts always on. 0 experts = a dense model.
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    topk_method: str = "greedy"  # V2: greedy | group_limited_greedy; V3: noaux_tc
    scoring_func: str = "softmax"  # V2: softmax; V3: sigmoid
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # GLM-4.7-Flash, A.X-K1: "dense" / "sparse" per layer (instead of first_k_dense_replace)
    mlp_layer_types: tuple[str, ...] | None = None
    # Mistral 4: queries scaled by 1 + beta * ln(1 + floor(position / original)) (transformers' llama_4 scaling)
    attn_scale_beta: float | None = None
    attn_scale_original: int | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return any(self.moe_layer(i) for i in range(self.num_hidden_layers))

    def moe_layer(self, layer: int) -> bool:
        """Whether this layer's MLP is a mixture of experts (as transformers builds each type)."""
        if self.mlp_layer_types is not None:
            return self.n_routed_experts > 0 and self.mlp_layer_types[layer] == "sparse"
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @property
    def latent_norm_eps(self) -> float:
        """q_a_layernorm / kv_a_layernorm eps: every supported type builds them with the norm's default, 1e-6,
        whatever rms_norm_eps says (transformers and DeepSeek's reference code alike)."""
        return DEFAULT_NORM_EPS

    @property
    def post_mlp_norm(self) -> bool:
        """A.X-K1: an RMSNorm (rms_norm_eps) on each MoE block's output."""
        return FAMILIES[self.model_type].post_mlp_norm

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def residual_scale(self) -> float:
        if self.scale_depth is None:
            return 1.0
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logits_scale(self) -> float:
        """Hidden states are divided by this before the LM head (MiniCPM3); 1.0 for DeepSeek."""
        if self.dim_model_base is None:
            return 1.0
        return self.hidden_size / self.dim_model_base

    # ---- (de)serialisation --------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> MLAConfig:
        return _from_hf(d)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> MLAConfig:
        path = Path(model_dir)
        if path.is_dir():
            path = path / "config.json"
        elif path.is_file() and path.suffix != ".json":
            raise ConfigError(f"{path} is a file: pass the model folder that holds config.json and *.safetensors")
        if not path.is_file():
            raise ConfigError(f"no config.json in {Path(model_dir)}: is this a Hugging Face model folder?")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
        return _from_hf(data)

    def to_dict(self) -> dict:
        """A Hugging Face-style config.json dict that `from_dict` reads back to an equal config."""
        d = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("extra", "rope_scaling", "rope_theta")
        }
        d["eos_token_id"] = list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**dataclasses.asdict(self.rope_scaling), "rope_theta": self.rope_theta}
            if self.rope_scaling.rope_type == "longrope":  # only LongRoPE's own fields
                rope = {
                    k: rope[k]
                    for k in (
                        "rope_type",
                        "rope_theta",
                        "factor",
                        "original_max_position_embeddings",
                        "attention_factor",
                        "short_factor",
                        "long_factor",
                    )
                }
            rope = {k: list(v) if isinstance(v, tuple) else v for k, v in rope.items() if v is not None}
        if self.attn_scale_beta is not None:
            rope["llama_4_scaling_beta"] = self.attn_scale_beta
            rope["original_max_position_embeddings"] = self.attn_scale_original
        d["rope_parameters"] = rope
        for k in ("attn_scale_beta", "attn_scale_original"):
            d.pop(k)
        if self.model_type != "minicpm3":
            for k in ("scale_emb", "scale_depth", "dim_model_base"):
                d.pop(k)
        if not self.is_moe:  # dense: tell HF-style loaders that no layer is MoE, and write no MoE fields
            for k in (*MOE_FIELDS, "mlp_layer_types"):
                d.pop(k)
            d["first_k_dense_replace"] = self.num_hidden_layers
            if FAMILIES[self.model_type].moe_rule == "mlp_layer_types":
                d["mlp_layer_types"] = ["dense"] * self.num_hidden_layers
        elif self.mlp_layer_types is None:
            d.pop("mlp_layer_types")
        else:
            d["mlp_layer_types"] = list(self.mlp_layer_types)
        d["architectures"] = [FAMILIES[self.model_type].arch]
        return {**self.extra, **d}


_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
)


def _rope(d: dict) -> tuple[float, RopeScaling | None]:
    """Read rope_theta and YaRN from either the v5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = d.get("rope_parameters") or {}
    legacy = d.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise ConfigError("rope_parameters / rope_scaling must be JSON objects")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    merged = {**legacy, **params}
    rtype = merged.get("rope_type", merged.get("type", "default"))
    rtype = "yarn" if rtype == "deepseek_yarn" else rtype  # Sarvam's name for DeepSeek's YaRN
    if rtype in (None, "default"):
        return float(theta), None
    if rtype not in ("yarn", "longrope"):
        raise ConfigError(f"rope_scaling type {rtype!r} is not supported (supported: default, yarn, longrope)")
    orig = merged.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    if orig is None:
        raise ConfigError(f"rope_scaling ({rtype}) needs original_max_position_embeddings")
    factor = merged.get("factor")
    if factor is None:
        factor = d.get("max_position_embeddings", orig) / orig
    if rtype == "longrope":
        return float(theta), _longrope(merged, d, int(orig), float(factor))
    rs = RopeScaling(
        rope_type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(merged.get("beta_fast") or 32),
        beta_slow=float(merged.get("beta_slow") or 1),
        mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"),
        attention_factor=merged.get("attention_factor"),
        truncate=bool(merged.get("truncate", True)),
    )
    return float(theta), rs


def _longrope(merged: dict, d: dict, orig: int, factor: float) -> RopeScaling:
    """LongRoPE as transformers computes it: inverse frequencies divided by short_factor up to the original context
    and by long_factor past it, and cos/sin scaled by sqrt(1 + ln(factor) / ln(original)) when factor > 1."""
    half = d["qk_rope_head_dim"] // 2
    factors = {}
    for key in ("short_factor", "long_factor"):
        f = merged.get(key)
        if not isinstance(f, list) or len(f) != half or not all(isinstance(x, (int, float)) and x > 0 for x in f):
            raise ConfigError(
                f"rope_scaling (longrope) field {key!r} must list {half} positive numbers "
                f"(qk_rope_head_dim / 2), got {f!r}"
            )
        factors[key] = tuple(float(x) for x in f)
    attention = merged.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0
    return RopeScaling(
        rope_type="longrope",
        factor=factor,
        original_max_position_embeddings=orig,
        attention_factor=float(attention),
        short_factor=factors["short_factor"],
        long_factor=factors["long_factor"],
    )


MOE_FIELDS = (
    "n_routed_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "moe_intermediate_size",
    "first_k_dense_replace",
    "topk_method",
    "scoring_func",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
)
_TOPK = {"softmax": ("greedy", "group_limited_greedy")}
MLP_LAYER_TYPES = ("dense", "sparse")


def _moe_layers(d: dict, rule: str) -> tuple[int, tuple[str, ...] | None]:
    """(first_k_dense_replace, mlp_layer_types or None) as the model type's transformers class decides them."""
    n = d["num_hidden_layers"]
    if rule == "first_k_dense_replace":
        return d["first_k_dense_replace"], None
    types = d.get("mlp_layer_types")
    if types is None:
        if d["model_type"] == "axk1":  # transformers converts A.X-K1's legacy fields
            first, freq = d.get("first_k_dense_replace", 1), d.get("moe_layer_freq", 1)
            types = ["sparse" if i >= first and i % freq == 0 else "dense" for i in range(n)]
        else:  # GLM-4.7-Flash: the first layer dense, the rest MoE
            types = ["dense"] + ["sparse"] * (n - 1)
    if not isinstance(types, list) or len(types) != n or any(t not in MLP_LAYER_TYPES for t in types):
        raise ConfigError(
            f"config field 'mlp_layer_types' must list 'dense' or 'sparse' for each of the {n} layers, got {types!r}"
        )
    first = types.index("sparse") if "sparse" in types else n
    return first, tuple(types)


def _moe(d: dict) -> dict:
    """The MoE fields of a config (all zero for a dense model), checked: an error names the field."""
    fam = FAMILIES[d["model_type"]]
    routed = d.get("n_routed_experts") or 0
    if not routed or fam.moe_rule == "dense":
        return {}
    first, types = _moe_layers(d, fam.moe_rule)
    if first >= d["num_hidden_layers"]:
        return {}
    out: dict[str, Any] = {k: d.get(k) for k in MOE_FIELDS}
    if fam.router is not None:  # the type's class fixes the router; a config that names another one is refused
        for k, v in zip(("scoring_func", "topk_method"), fam.router):
            if out[k] is not None and out[k] != v:
                raise ConfigError(
                    f"config field {k!r} is {out[k]!r}, but transformers' {d['model_type']} router is always {v!r}"
                )
        out["scoring_func"], out["topk_method"] = fam.router
    out.update(
        n_routed_experts=routed,
        first_k_dense_replace=first,
        n_shared_experts=d.get("n_shared_experts") or 0,
        n_group=d.get("n_group") or 1,
        topk_group=d.get("topk_group") or 1,
        mlp_layer_types=types,
    )
    if fam.router is None:  # DeepSeek-V2: always softmax, greedy or group-limited as the config says
        out["scoring_func"] = out["scoring_func"] or "softmax"
        if out["scoring_func"] != "softmax":
            raise ConfigError(
                f"config field 'scoring_func' is {out['scoring_func']!r}, but transformers' {d['model_type']} "
                "router is always 'softmax'"
            )
        if out["topk_method"] not in _TOPK["softmax"]:
            raise ConfigError(
                f"config field 'topk_method' is {out['topk_method']!r}; supported: {', '.join(_TOPK['softmax'])}"
            )
    if fam.renormalise is False:
        out["norm_topk_prob"] = False  # transformers' DeepSeek-V2 router never renormalises, whatever it says
    for k in ("num_experts_per_tok", "moe_intermediate_size"):
        if not isinstance(out[k], int) or out[k] <= 0:
            raise ConfigError(f"config field {k!r} must be a positive integer for a MoE model, got {out[k]!r}")
    if routed % out["n_group"] or not 0 < out["topk_group"] <= out["n_group"]:
        raise ConfigError(
            f"config fields n_group={out['n_group']} / topk_group={out['topk_group']} do not divide "
            f"n_routed_experts={routed} into groups"
        )
    if out["num_experts_per_tok"] > routed * out["topk_group"] // out["n_group"]:
        raise ConfigError(
            f"config field 'num_experts_per_tok'={out['num_experts_per_tok']} is more than the experts "
            "the chosen groups hold"
        )
    out["norm_topk_prob"], out["routed_scaling_factor"] = (
        bool(out["norm_topk_prob"]),
        float(out["routed_scaling_factor"]),
    )
    return out


def _rotary_dim_check(d: dict, params: dict) -> None:
    """transformers rotates int(head_dim * partial_rotary_factor) dims; we rotate qk_rope_head_dim: they must agree."""
    prf = params.get("partial_rotary_factor")
    if prf is None:
        return
    base = d["qk_nope_head_dim"] + d["qk_rope_head_dim"] if d["model_type"] == "mistral4" else d["qk_rope_head_dim"]
    if int(base * prf) != d["qk_rope_head_dim"]:
        raise ConfigError(
            f"rope partial_rotary_factor {prf} rotates {int(base * prf)} dims, not qk_rope_head_dim "
            f"({d['qk_rope_head_dim']}): partial rotary inside the rope part is not supported"
        )


def _with_defaults(d: dict) -> dict:
    """The config with its type's transformers defaults for fields it leaves out, and legacy names translated."""
    fam = FAMILIES[d["model_type"]]
    defaults = dict(fam.defaults)
    if "rope_scaling" in d or "rope_theta" in d:  # the older spelling: the class's default rope does not apply
        defaults.pop("rope_parameters", None)
    d = {**defaults, **d}
    for old, new in fam.aliases.items():
        if old in d and new not in d:
            d[new] = d[old]
    return d


def _from_hf(d: dict) -> MLAConfig:
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(refusal(mt))
    d = _with_defaults(d)
    for k in _REQUIRED:
        if d.get(k) is None:
            raise ConfigError(f"config field {k!r} is missing")
        if not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] <= 0:
            raise ConfigError(f"config field {k!r} must be a positive integer, got {d[k]!r}")
    moe = _moe(d)
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config field 'hidden_act' is {d['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    theta, rs = _rope(d)
    params = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    _rotary_dim_check(d, params)
    if mt == "mistral4" and rs is None:
        raise ConfigError(
            "mistral4 with default RoPE: transformers' Mistral4 rotates the whole head then (a shape error); "
            "its configs use YaRN"
        )
    beta = params.get("llama_4_scaling_beta") if mt == "mistral4" else None
    if beta is not None and params.get("original_max_position_embeddings") is None:
        raise ConfigError("rope llama_4_scaling_beta needs original_max_position_embeddings")
    if d["qk_rope_head_dim"] % 2:
        raise ConfigError(f"config field 'qk_rope_head_dim' must be even, got {d['qk_rope_head_dim']}")
    q_lora = d.get("q_lora_rank")
    if q_lora is not None and (not isinstance(q_lora, int) or q_lora <= 0):
        raise ConfigError(f"config field 'q_lora_rank' must be null or a positive integer, got {q_lora!r}")
    if q_lora is None and mt == "axk1":
        raise ConfigError("config field 'q_lora_rank' must be a positive integer: A.X-K1 always has a query LoRA")
    v_head = d.get("v_head_dim") or d["hidden_size"] // d["num_attention_heads"]
    eos = d.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    # DeepSeek-V2 always rotates interleaved pairs; MiniCPM3 always rotates halves; the rest say which.
    interleave = {"deepseek_v2": True, "minicpm3": False}.get(mt, bool(d.get("rope_interleave", True)))
    minicpm = mt == "minicpm3"
    known = {f.name for f in dataclasses.fields(MLAConfig)}
    cfg = MLAConfig(
        model_type=mt,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"],
        v_head_dim=int(v_head),
        q_lora_rank=q_lora,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=rs,
        rope_interleave=interleave,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=d.get("pad_token_id"),
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        # MiniCPM3's class defaults match openbmb/MiniCPM3-4B; null means no-op.
        scale_emb=float(d.get("scale_emb", 12) or 1.0) if minicpm else 1.0,
        scale_depth=(d.get("scale_depth", 1.4) if minicpm else None),
        dim_model_base=(d.get("dim_model_base", 256) if minicpm else None),
        attn_scale_beta=None if beta is None else float(beta),
        attn_scale_original=None if beta is None else int(params["original_max_position_embeddings"]),
        **moe,
        extra={
            k: v
            for k, v in d.items()
            if k not in known
            and k not in ("rope_parameters", "rope_scaling", "moe_layer_freq", *MOE_FIELDS, *FAMILIES[mt].defaults)
        },
    )
    return cfg

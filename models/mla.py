"""The MLA decoder (DeepSeek-V2/V3 dense, MiniCPM3) in PyTorch, with the latent cache passed in and out.

Shapes: B batch, S new tokens, P past tokens, T = P + S, H heads, Dn/Dr/Dv nope/rope/value head dims,
R kv_lora_rank, C hidden size. Einsum letters: b s t h, d (qk nope), r (rope), v (value), c (latent).

Module and parameter names equal the Hugging Face DeepSeek names, so a state_dict is a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mla_edge.contract import CACHE_DTYPES, CacheContract, InputError, positions_from_mask

from .config import MLAConfig
from .rope import apply_rope, cos_sin, inv_freq_and_factor

__all__ = ["MLAForCausalLM", "ModelOptions", "empty_cache", "positions_from_mask", "quantize_per_token"]

# Per layer, in the cache contract's order: (c_kv (B,P,R), k_pe (B,P,Dr)), or with an int8 cache
# (c_kv int8, c_kv_scale (B,P,1), k_pe int8, k_pe_scale (B,P,1)).
LatentCache = list[tuple[torch.Tensor, ...]]
ATTENTION_FORMS = ("naive", "absorbed")
MASK_MIN = torch.finfo(torch.float32).min  # finite: -inf would give NaN rows that live on in the cache


# A cache quantizer: (x (B,S,W), layer, kind) -> (int8 codes, float32 scale (B,S,1)) with x ~ codes * scale.
CacheQuantizer = Callable[[torch.Tensor, int, str], tuple[torch.Tensor, torch.Tensor]]


def quantize_per_token(x: torch.Tensor, layer: int = 0, kind: str = "c_kv") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per token (last dim): x ~ q * scale. What every export ships."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


@dataclass(frozen=True)
class ModelOptions:
    """How a model computes, chosen when it is built; the architecture itself is MLAConfig.

    attention      "naive" decompresses per-head K/V from the latent; "absorbed" folds W_UK into the query and W_UV
                   into the output so attention runs over the latent
    cache_dtype    "fp32", or "int8" with one scale per token (see mla_edge.contract)
    graph_weights  for export: W_UK / W_UV^T and an untied LM head held as tensors of their own, derived from the
                   checkpoint at load, so that they become plain initializers the quantizers reach
    cache_quantizer  the int8 scheme (default: per token); studies pass their own
    device_ops     for the static device graphs: norms take their mean with a MatMul instead of ReduceMean, which
                   CoreML's NeuralNetwork format lacks (the same numbers; onnxruntime's CPU fusion wants ReduceMean)
    moe_op         for the dynamic graph: MoE layers export as onnxruntime's com.microsoft MoE op, which runs only
                   the chosen experts (needs graph_weights and MLAForCausalLM.stack_experts after loading); PyTorch
                   itself always computes the dense form, so parity tests compare the two
    rope_in_weights  for the exported graphs: the RoPE rotation folded into the projections (needs graph_weights): the
                   query and kv_a projections also emit their rope part rotated by 90 degrees, so RoPE is x*cos +
                   x_rot*sin, 3 nodes instead of 8 (plus a Split) per query and key: 11 fewer nodes per layer
    """

    attention: str = "absorbed"
    cache_dtype: str = "fp32"
    graph_weights: bool = False
    cache_quantizer: CacheQuantizer = quantize_per_token
    device_ops: bool = False
    moe_op: bool = False
    rope_in_weights: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_FORMS:
            raise InputError(f"attention must be one of {ATTENTION_FORMS}, got {self.attention!r}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise InputError(f"cache dtype must be one of {CACHE_DTYPES}, got {self.cache_dtype!r}")
        if self.graph_weights and self.attention != "absorbed":
            raise InputError("graph_weights holds the absorbed weights: it needs attention='absorbed'")
        if self.moe_op and (not self.graph_weights or self.device_ops):
            raise InputError("moe_op is for the dynamic graph: it needs graph_weights and no device_ops")
        if self.rope_in_weights and not self.graph_weights:
            raise InputError("rope_in_weights is for the exported graphs: it needs graph_weights")


def empty_cache(
    cfg: MLAConfig, batch: int, dtype: torch.dtype = torch.float32, cache_dtype: str = "fp32"
) -> LatentCache:
    contract = CacheContract.from_config(cfg, cache_dtype)
    torch_dtype = {"float32": dtype, "float16": torch.float16, "int8": torch.int8}
    return [
        tuple(
            torch.zeros(batch, 0, contract.width(k), dtype=torch_dtype[contract.element_type(k)])
            for k in contract.kinds
        )
        for _ in range(cfg.num_hidden_layers)
    ]


def attention_allowed(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """attention_mask (B, T) of 1/0 over past+new tokens -> allowed (B, S, T): causal in cache order, pads masked.
    Causality is by cache index, so a prefill after a non-empty past (chunked prefill) is right."""
    total = attention_mask.shape[1]
    key = torch.arange(total, device=attention_mask.device)
    query = key[total - seq :]
    causal = key[None, :] <= query[:, None]  # (S, T)
    return causal[None] & attention_mask[:, None, :].bool()


def rope_rows(w: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rows (..., Dr, K) of a projection that makes a rope part x -> (..., 2 Dr, K) making [x', x'_rot]: x' in
    half-rotation layout (de-interleaved if `interleave`) and x'_rot = [-x'2, x'1], so that
    apply_rope(x, cos, sin) == x' * [cos, cos] + x'_rot * [sin, sin]. A bias (..., Dr) goes in as (..., Dr, 1)."""
    half = w.shape[-2] // 2
    if interleave:
        w = torch.cat([w[..., 0::2, :], w[..., 1::2, :]], dim=-2)
    return torch.cat([w, -w[..., half:, :], w[..., :half, :]], dim=-2)


def additive_mask(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """The same as an additive mask (B, 1, S, T): 0 where allowed, MASK_MIN elsewhere, made once per forward and
    added to every layer's scores. (An Add per layer, not a Where: onnxruntime's broadcasting Where was 26% of the
    demo's 512-token prefill, the Add that replaces it ~2%.)"""
    zero = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
    return torch.where(attention_allowed(attention_mask, seq), zero, MASK_MIN)[:, None]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, with a Div (never Reciprocal: Qualcomm's HTP computes a quantized
    Sqrt -> Reciprocal wrongly). With matmul_mean the mean is x^2 @ (1/dim) ones, for mobile providers."""

    def __init__(self, dim: int, eps: float, matmul_mean: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.matmul_mean = eps, matmul_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.matmul_mean:
            sq = (xf * xf) @ torch.full((xf.shape[-1], 1), 1.0 / xf.shape[-1], device=x.device)
        else:
            sq = xf.pow(2).mean(-1, keepdim=True)  # this form onnxruntime fuses into one op
        return self.weight * (xf / torch.sqrt(sq + self.eps)).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: MLAConfig, intermediate: int | None = None):
        super().__init__()
        inter = intermediate or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """The DeepSeek-family top-k routers, as transformers computes them. Softmax scores: greedy, or the topk_group
    groups ranked by their best score (V2's group_limited_greedy) or by their two best (Mistral 4's group_top2).
    Sigmoid (V3's noaux_tc): experts chosen on score + e_score_correction_bias within the groups whose two best biased
    scores sum highest, weighted by the unbiased scores. Weights are renormalised when norm_topk_prob (never for V2:
    its config reader clears it), then scaled by routed_scaling_factor."""

    def __init__(self, cfg: MLAConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C) -> routing weights (N, E), zero but for each token's chosen experts, and the choice (N, K)."""
        cfg = self.cfg
        E, G, K = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        if cfg.scoring_func == "softmax":
            scores = choice = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias
        if cfg.topk_method != "greedy":  # keep the topk_group best groups of E / G experts
            grouped = choice.view(-1, G, E // G)
            best = (
                grouped.max(-1).values if cfg.topk_method == "group_limited_greedy" else grouped.topk(2, -1)[0].sum(-1)
            )
            keep = torch.zeros_like(best).scatter(1, best.topk(cfg.topk_group, dim=-1)[1], 1.0)  # (N, G)
            keep = keep[:, :, None].expand(-1, G, E // G).reshape(-1, E).bool()
            choice = choice.masked_fill(~keep, 0.0 if cfg.scoring_func == "softmax" else float("-inf"))
        chosen = choice.topk(K, dim=-1)[1]  # (N, K)
        weights = scores.gather(1, chosen)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
        return torch.zeros_like(scores).scatter(1, chosen, weights), chosen


class MoE(nn.Module):
    """Routed experts plus always-on shared experts.

    PyTorch runs every expert on every token and mixes them with the router's dense weights (zero for unchosen
    experts): exact, and the reference. Under ONNX export, after `stack_experts`, the routed experts become one
    com.microsoft MoE node (onnxruntime's kernel runs only the chosen experts). The routing itself stays in plain
    ops, since DeepSeek's group-limited and bias-corrected choices are not the op's built-in softmax top-k: the node
    gets log(weights), -inf for unchosen experts, so its softmax over the chosen k gives weights / sum(weights), and
    the output is scaled back by the sum."""

    fc1: torch.Tensor  # (E, 2I, C): gate and up rows interleaved, onnxruntime's fused SwiGLU layout
    fc2: torch.Tensor  # (E, C, I): down

    def __init__(self, cfg: MLAConfig):
        super().__init__()
        self.k = cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts))
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)

    @torch.no_grad()
    def stack_experts(self) -> None:
        """Copy the experts' weights into the op's two stacked tensors and make each expert's parameters views
        into them, so that the weights are held once (each expert's own tensor is freed as it is copied)."""
        experts = [e for e in self.experts if isinstance(e, MLP)]
        inter, C = experts[0].gate_proj.weight.shape
        dtype = experts[0].gate_proj.weight.dtype
        fc1 = torch.empty(len(experts), inter, 2, C, dtype=dtype)
        fc2 = torch.empty(len(experts), C, inter, dtype=dtype)
        for j, e in enumerate(experts):
            fc1[j, :, 0], fc1[j, :, 1], fc2[j] = e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight
            e.gate_proj.weight = nn.Parameter(fc1[j, :, 0], requires_grad=False)
            e.up_proj.weight = nn.Parameter(fc1[j, :, 1], requires_grad=False)
            e.down_proj.weight = nn.Parameter(fc2[j], requires_grad=False)
        self.register_buffer("fc1", fc1.view(len(experts), 2 * inter, C), persistent=False)
        self.register_buffer("fc2", fc2, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        mix, _ = self.gate(flat)  # (N, E)
        if hasattr(self, "fc1") and torch.onnx.is_in_onnx_export():
            out = torch.onnx.ops.symbolic(
                "com.microsoft::MoE",
                (flat, torch.log(mix), self.fc1, None, self.fc2),
                dict(
                    k=self.k,
                    activation_type="swiglu",
                    swiglu_fusion=1,
                    activation_alpha=1.0,
                    activation_beta=0.0,
                    normalize_routing_weights=0,
                ),
                dtype=flat.dtype,
                shape=flat.shape,
                version=1,
            ) * mix.sum(-1, keepdim=True)
        else:
            experts = [e for e in self.experts if isinstance(e, MLP)]
            gate = torch.stack([e.gate_proj.weight for e in experts])  # (E, I, C)
            up = torch.stack([e.up_proj.weight for e in experts])
            down = torch.stack([e.down_proj.weight for e in experts])  # (E, C, I)
            h = F.silu(torch.einsum("nc,eic->nei", flat, gate)) * torch.einsum("nc,eic->nei", flat, up)  # (N,E,I)
            out = torch.einsum("nei,eci,ne->nc", h, down, mix.to(h.dtype))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(flat)
        return out.reshape(shape)


class MLAttention(nn.Module):
    w_uk: torch.Tensor  # (H, Dn, R), with ModelOptions.graph_weights
    w_uv_t: torch.Tensor  # (H, R, Dv)
    q_rope_w: torch.Tensor  # (H * (Dn + 2 Dr), C or q_lora_rank), with ModelOptions.rope_in_weights
    kv_rope_w: torch.Tensor  # (R + 2 Dr, C)
    kv_rope_b: torch.Tensor | None  # (R + 2 Dr,) with attention_bias

    def __init__(self, cfg: MLAConfig, layer: int, options: ModelOptions):
        super().__init__()
        self.cfg, self.layer, self.options = cfg, layer, options
        H, C, bias = cfg.num_attention_heads, cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(C, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(C, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps, options.device_ops)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.latent_norm_eps, options.device_ops)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, C, bias=bias)
        if options.graph_weights:  # not in state_dict: derived from kv_b_proj whenever weights are loaded
            self.register_buffer("w_uk", torch.empty(H, cfg.qk_nope_head_dim, cfg.kv_lora_rank), persistent=False)
            self.register_buffer("w_uv_t", torch.empty(H, cfg.kv_lora_rank, cfg.v_head_dim), persistent=False)
        if options.rope_in_weights:  # derived too: the projections with rotated rope rows (see rope_rows)
            Dr, q_in = cfg.qk_rope_head_dim, cfg.q_lora_rank or C
            self.register_buffer("q_rope_w", torch.empty(H * (cfg.qk_head_dim + Dr), q_in), persistent=False)
            self.register_buffer("kv_rope_w", torch.empty(cfg.kv_lora_rank + 2 * Dr, C), persistent=False)
            kv_b = torch.empty(cfg.kv_lora_rank + 2 * Dr) if bias else None
            self.register_buffer("kv_rope_b", kv_b, persistent=False)

    @torch.no_grad()
    def derive_rope_weights(self) -> None:
        cfg, H, Dn, R = self.cfg, self.cfg.num_attention_heads, self.cfg.qk_nope_head_dim, self.cfg.kv_lora_rank
        qw = (self.q_proj if cfg.q_lora_rank is None else self.q_b_proj).weight.view(H, cfg.qk_head_dim, -1)
        self.q_rope_w = torch.cat([qw[:, :Dn], rope_rows(qw[:, Dn:], cfg.rope_interleave)], 1).flatten(0, 1)
        kw = self.kv_a_proj_with_mqa.weight
        self.kv_rope_w = torch.cat([kw[:R], rope_rows(kw[R:], cfg.rope_interleave)])
        if (kb := self.kv_a_proj_with_mqa.bias) is not None:
            self.kv_rope_b = torch.cat([kb[:R], rope_rows(kb[R:, None], cfg.rope_interleave)[:, 0]])

    def split_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK (H, Dn, R) folds into the query, W_UV^T (H, R, Dv) into the output."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :].transpose(1, 2)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.w_uk, self.w_uv_t) if self.options.graph_weights else self.split_kv_b()

    def forward(self, x, cos, sin, mask, past, bias=None, q_scale=None):
        """x (B,S,C); cos/sin (B,S,Dr/2), or (B,S,Dr) doubled with rope_in_weights; mask: additive (B,1,S,T) (see
        additive_mask), or None for plain causal with no past; past: this layer's cache entries (see LatentCache).
        Returns out (B,S,C) and the present entries (length T = P + S).
        With `bias` (1,S,N+S), the static protocol instead: past is the fixed buffer (c_kv (1,N,R), k_pe (1,N,Dr)),
        bias the additive mask over its slots and the new tokens, and only the S new rows come back.
        q_scale (B,1,S,1): Mistral 4's per-position query scale (see MLAForCausalLM.query_scale), or None."""
        cfg = self.cfg
        B, S, _ = x.shape
        H, Dn, Dv, scale = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.softmax_scale
        Dr, R = cfg.qk_rope_head_dim, cfg.kv_lora_rank
        cos_h, sin_h = cos.reshape(B, 1, S, -1), sin.reshape(B, 1, S, -1)  # Reshape, not Unsqueeze: mobile EPs take it
        q_in = x if cfg.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))
        if self.options.rope_in_weights:  # cos/sin come doubled: (B,S,Dr) (see rope_rows)
            q = F.linear(q_in, self.q_rope_w).view(B, S, H, Dn + 2 * Dr).transpose(1, 2)
            q_nope, q_pe, q_rot = q.split([Dn, Dr, Dr], dim=-1)
            q_pe = q_pe * cos_h + q_rot * sin_h  # (B,H,S,Dr)
            c_new, pe_new, pe_rot = F.linear(x, self.kv_rope_w, self.kv_rope_b).split([R, Dr, Dr], dim=-1)
            c_new, pe_new = self.kv_a_layernorm(c_new), pe_new * cos + pe_rot * sin  # (B,S,R), (B,S,Dr)
        else:
            q = self.q_proj(q_in) if cfg.q_lora_rank is None else self.q_b_proj(q_in)
            q = q.view(B, S, H, cfg.qk_head_dim).transpose(1, 2)  # (B,H,S,Dn+Dr)
            q_nope = q[..., :Dn]
            q_pe = apply_rope(q[..., Dn:], cos_h, sin_h, cfg.rope_interleave)  # (B,H,S,Dr)
            kv = self.kv_a_proj_with_mqa(x)
            c_new = self.kv_a_layernorm(kv[..., :R])  # (B,S,R)
            pe_new = apply_rope(kv[..., R:], cos, sin, cfg.rope_interleave)  # (B,S,Dr)
        if q_scale is not None:
            q_nope, q_pe = q_nope * q_scale, q_pe * q_scale
        if bias is not None:
            return self._static(q_nope, q_pe, c_new, pe_new, bias, past), (c_new, pe_new)
        if self.options.cache_dtype == "int8":  # quantize on write, dequantize the whole latent on read
            quant = self.options.cache_quantizer
            new = (*quant(c_new, self.layer, "c_kv"), *quant(pe_new, self.layer, "k_pe"))
            present = tuple(torch.cat([p, n], dim=1) for p, n in zip(past, new))  # c_kv, scale, k_pe, scale
            c_kv, k_pe = present[0].float() * present[1], present[2].float() * present[3]
        elif self.options.cache_dtype == "fp16":  # stored in fp16 (llama.cpp's default), attended in fp32
            present = (torch.cat([past[0], c_new.half()], dim=1), torch.cat([past[1], pe_new.half()], dim=1))
            c_kv, k_pe = present[0].to(c_new.dtype), present[1].to(pe_new.dtype)
        else:
            c_kv = torch.cat([past[0], c_new], dim=1)  # (B,T,R)
            k_pe = torch.cat([past[1], pe_new], dim=1)  # (B,T,Dr)
            present = (c_kv, k_pe)

        if self.options.attention == "naive":  # decompress per-head K/V from the latent
            kv_full = self.kv_b_proj(c_kv).view(B, -1, H, Dn + Dv).transpose(1, 2)
            k_nope, v = kv_full[..., :Dn], kv_full[..., Dn:]  # (B,H,T,Dn), (B,H,T,Dv)
            if mask is None:  # plain causal, no past, no padding (training): fused SDPA
                k = torch.cat([k_nope, k_pe[:, None].expand(B, H, -1, -1)], dim=-1)
                out = F.scaled_dot_product_attention(torch.cat([q_nope, q_pe], -1), k, v, is_causal=True, scale=scale)
                return self.o_proj(out.transpose(1, 2).reshape(B, S, H * Dv)), present
            scores = (q_nope * scale) @ k_nope.transpose(-1, -2)  # bhsd,bhtd->bhst
        else:  # attend over the latent: W_UK folded into q, W_UV applied after
            w_uk, w_uv_t = self.absorbed_weights()
            q_lat = (q_nope @ w_uk) * scale  # bhsd,hdc->bhsc  (B,H,S,R)
            scores = q_lat @ c_kv[:, None].transpose(-1, -2)  # bhsc,btc->bhst (transpose feeding MatMul: fused)
        scores = scores + (q_pe * scale) @ k_pe[:, None].transpose(-1, -2)  # bhsr,btr->bhst
        if mask is None:
            mask = additive_mask(torch.ones(B, S, dtype=torch.long, device=x.device), S)
        scores = scores + mask
        probs = scores.float().softmax(dim=-1).to(x.dtype)  # (B,H,S,T)
        if self.options.attention == "naive":
            out = probs @ v  # bhst,bhtv->bhsv
        else:
            out = (probs @ c_kv[:, None]) @ w_uv_t  # bhst,btc->bhsc; bhsc,hcv->bhsv
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * Dv)), present

    def _static(self, q_nope, q_pe, c_new, pe_new, bias, buffer) -> torch.Tensor:
        """Absorbed attention over a fixed buffer plus the new rows, never concatenating the cache: scores against
        the buffer (1,H,S,N) and against the new rows (1,H,S,S) are joined, softmaxed under the additive bias, and
        split again. Nothing here depends on a runtime shape (no Shape, Range, Where)."""
        cfg = self.cfg
        S, N, H, scale = q_nope.shape[2], buffer[0].shape[1], cfg.num_attention_heads, cfg.softmax_scale
        w_uk, w_uv_t = self.absorbed_weights()
        q_lat = (q_nope @ w_uk) * scale  # (1,H,S,R)
        q_rot = q_pe * scale  # (1,H,S,Dr)
        c_buf, pe_buf, c_row, pe_row = buffer[0], buffer[1], c_new, pe_new  # (1,N,R), (1,N,Dr), (1,S,R), (1,S,Dr)
        if self.options.device_ops:  # ranks made equal for mobile providers: Reshape, never Unsqueeze (CoreML's
            # NeuralNetwork format lacks it); onnxruntime's CPU broadcasts MatMul and Add itself (fewer nodes)
            c_buf, pe_buf = c_buf.reshape(1, 1, N, -1), pe_buf.reshape(1, 1, N, -1)  # (1,1,N,R), (1,1,N,Dr)
            c_row, pe_row = c_row.reshape(1, 1, S, -1), pe_row.reshape(1, 1, S, -1)  # (1,1,S,R), (1,1,S,Dr)
            bias = bias.reshape(1, 1, S, N + S)
        old = q_lat @ c_buf.transpose(-1, -2) + q_rot @ pe_buf.transpose(-1, -2)  # (1,H,S,N)
        new = q_lat @ c_row.transpose(-1, -2) + q_rot @ pe_row.transpose(-1, -2)  # (1,H,S,S)
        probs = (torch.cat([old, new], -1) + bias).softmax(dim=-1)  # (1,H,S,N+S)
        out_lat = probs[..., :N] @ c_buf + probs[..., N:] @ c_row  # (1,H,S,R)
        out = (out_lat @ w_uv_t).transpose(1, 2).reshape(1, S, H * cfg.v_head_dim)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MLAConfig, layer: int, attention: nn.Module, options: ModelOptions):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, options.device_ops)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, options.device_ops)
        self.mlp: nn.Module = MoE(cfg) if cfg.moe_layer(layer) else MLP(cfg)
        if cfg.post_mlp_norm and cfg.moe_layer(layer):  # A.X-K1: a norm on the MoE block's output
            self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, options.device_ops)
        self.residual_scale = cfg.residual_scale

    def forward(self, h, cos, sin, mask, past, bias=None, q_scale=None):
        extra = () if q_scale is None else (q_scale,)  # attention blocks of the research twins take no q_scale
        a, present = self.self_attn(self.input_layernorm(h), cos, sin, mask, past, bias, *extra)
        h = h + a * self.residual_scale
        m = self.mlp(self.post_attention_layernorm(h))
        if hasattr(self, "post_mlp_layernorm"):
            m = self.post_mlp_layernorm(m)
        h = h + m * self.residual_scale
        return h, present


class MLABody(nn.Module):
    def __init__(self, cfg: MLAConfig, attention: Callable[[int], nn.Module], options: ModelOptions):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layers = (DecoderLayer(cfg, i, attention(i), options) for i in range(cfg.num_hidden_layers))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, options.device_ops)


class MLAForCausalLM(nn.Module):
    """forward(input_ids, position_ids, attention_mask, cache) -> (logits, new_cache); nothing is kept inside.

    attention_block: a factory layer index -> attention module (default: MLA with `options`); the MHA/GQA twins of
    the research recipes pass their own."""

    inv_freq: torch.Tensor
    long_inv_freq: torch.Tensor  # LongRoPE only

    def __init__(
        self,
        cfg: MLAConfig,
        options: ModelOptions = ModelOptions(),
        attention_block: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        self.cfg, self.options = cfg, options
        self.model = MLABody(cfg, attention_block or (lambda i: MLAttention(cfg, i, options)), options)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings and not options.graph_weights:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.longrope = cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "longrope"
        self.init_rope()
        if options.graph_weights:
            self.register_load_state_dict_post_hook(MLAForCausalLM._derive_graph_weights)

    def init_rope(self) -> None:
        """(Re)compute the RoPE buffers, which checkpoints do not hold (a model built on the meta device needs this)."""
        inv_freq, self.rope_factor = inv_freq_and_factor(self.cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if self.longrope:
            self.register_buffer("long_inv_freq", inv_freq_and_factor(self.cfg, long=True)[0], persistent=False)

    @staticmethod
    def _derive_graph_weights(module: nn.Module, incompatible_keys) -> None:
        assert isinstance(module, MLAForCausalLM)
        module.derive_graph_weights()
        if module.cfg.tie_word_embeddings and "lm_head.weight" in incompatible_keys.missing_keys:
            incompatible_keys.missing_keys.remove("lm_head.weight")

    @torch.no_grad()
    def derive_graph_weights(self) -> None:
        """ModelOptions.graph_weights, run after weights load and after anything that changes them (smoothing):
        W_UK / W_UV^T from kv_b_proj, the rope-rotated projections, and an untied copy of a tied embedding. New
        tensors are bound (not copied into), so this also works after load_state_dict(assign=True) on meta."""
        for attn in self.modules():
            if isinstance(attn, MLAttention):
                w_uk, w_uv_t = attn.split_kv_b()
                attn.w_uk, attn.w_uv_t = w_uk.contiguous(), w_uv_t.contiguous()
                if self.options.rope_in_weights:
                    attn.derive_rope_weights()
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = nn.Parameter(self.model.embed_tokens.weight.clone(), requires_grad=False)

    def stack_experts(self) -> None:
        """ModelOptions.moe_op: hold every MoE layer's experts in the MoE op's stacked layout (see MoE)."""
        if not self.options.moe_op:
            raise InputError("stack_experts is for a model built with ModelOptions(moe_op=True)")
        for m in self.modules():
            if isinstance(m, MoE):
                m.stack_experts()

    def hidden_states(self, input_ids, position_ids=None, attention_mask=None, cache: LatentCache | None = None):
        """Final-normed hidden states (B,S,C) and the new cache; `forward` adds the LM head."""
        cfg = self.cfg
        B, S = input_ids.shape
        if cache is None:
            cache = empty_cache(cfg, B, self.lm_head.weight.dtype, self.options.cache_dtype)
        P = cache[0][0].shape[1]
        plain = attention_mask is None and P == 0
        if attention_mask is None:
            attention_mask = torch.ones(B, P + S, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (torch.arange(S, device=input_ids.device) + P)[None].expand(B, S)
        inv_freq = self.inv_freq
        if self.longrope:  # as transformers does: the long factors once this call reaches past the original context
            past_original = position_ids.max() + 1 > self.cfg.rope_scaling.original_max_position_embeddings  # type: ignore[union-attr]
            inv_freq = torch.where(past_original, self.long_inv_freq, self.inv_freq)
        cos, sin = cos_sin(inv_freq, self.rope_factor, position_ids)
        # None = plain causal over S new tokens with no past and no padding (lets training use fused SDPA)
        mask = None if plain else additive_mask(attention_mask, S)
        return self._decode_layers(input_ids, cos, sin, mask, cache, q_scale=self.query_scale(position_ids))

    def query_scale(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """Mistral 4 (transformers' llama_4 attention scaling): queries times 1 + beta * ln(1 + floor(pos / original)),
        as (B,1,S,1); None for every other type. It is 1 below the original context."""
        beta, original = self.cfg.attn_scale_beta, self.cfg.attn_scale_original
        if beta is None or original is None:
            return None
        scale = 1 + beta * torch.log(1 + torch.floor(position_ids.float() / original))
        return scale[:, None, :, None]

    def _decode_layers(self, input_ids, cos, sin, mask, cache, bias=None, q_scale=None):
        if self.options.rope_in_weights:  # cos/sin (B,S,Dr/2) doubled once, for every layer (see rope_rows)
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
        h = self.model.embed_tokens(input_ids)
        if self.cfg.scale_emb != 1.0:
            h = h * self.cfg.scale_emb
        new_cache: LatentCache = []
        for layer, past in zip(self.model.layers, cache):
            h, present = layer(h, cos, sin, mask, past, bias, q_scale)
            new_cache.append(present)
        return self.model.norm(h), new_cache

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h / self.cfg.logits_scale if self.cfg.logits_scale != 1.0 else h)

    def forward(
        self, input_ids, position_ids=None, attention_mask=None, cache: LatentCache | None = None, logits_to_keep=0
    ):
        """logits_to_keep k > 0: logits for the last k positions only (a prompt needs its last); 0 keeps all."""
        h, new_cache = self.hidden_states(input_ids, position_ids, attention_mask, cache)
        return self._logits(h[:, -logits_to_keep:] if logits_to_keep else h), new_cache

    def forward_static(self, input_ids, cos, sin, attn_bias, buffers: LatentCache):
        """The static protocol (mla_edge.contract): batch 1, ids (1,S), RoPE rows cos/sin (1,S,Dr/2), the additive
        mask (1,S,N+S) and every layer's buffer (c_kv (1,N,R), k_pe (1,N,Dr)) -> logits (1,S,V) and each layer's
        new rows (c_kv (1,S,R), k_pe (1,S,Dr)), which the host writes into its buffers."""
        if self.options.attention != "absorbed" or self.options.cache_dtype != "fp32":
            raise InputError("the static protocol runs the absorbed form over an fp32 cache")
        h, rows = self._decode_layers(input_ids, cos, sin, None, buffers, attn_bias)
        return self._logits(h), rows

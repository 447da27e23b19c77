"""MHA and GQA twins of the MLA decoder, for the cache-vs-quality comparison only (training and evaluation;
they are never exported). Same width, depth, MLP, norms and RoPE dims as the MLA model; only attention differs:
standard per-head K/V with head_dim = hidden_size / heads, RoPE on the first qk_rope_head_dim dims of each head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MLAConfig
from .mla import MLAForCausalLM
from .rope import apply_rope


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

    def cache_elements_per_token(self) -> int:
        return 2 * self.kv_heads * self.head_dim

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
    return {"mha": cfg.num_attention_heads, "gqa": max(1, cfg.num_attention_heads // 4)}[arch]


def with_attention(cfg: MLAConfig, arch: str) -> MLAForCausalLM:
    """The MLA decoder with every attention block replaced by an MHA or GQA block."""
    model = MLAForCausalLM(cfg, attention="naive")
    for layer in model.model.layers:
        layer.self_attn = GQAttention(cfg, kv_heads_for(cfg, arch))
    return model

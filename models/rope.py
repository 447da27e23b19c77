"""Decoupled RoPE for MLA's rope dims: plain, YaRN or LongRoPE frequencies, interleaved-pair or half rotation."""

from __future__ import annotations

import math

import torch

from .config import MLAConfig, yarn_mscale


def inv_freq_and_factor(cfg: MLAConfig, long: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (qk_rope_head_dim // 2,) and the cos/sin multiplier (the attention factor). For LongRoPE,
    `long` gives the set used once a sequence passes original_max_position_embeddings."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extrapolated = 1.0 / (base**exponents)
    rs = cfg.rope_scaling
    if rs is None:
        return extrapolated, 1.0
    if rs.rope_type == "longrope":
        factors = torch.tensor(rs.long_factor if long else rs.short_factor, dtype=torch.float32)
        return 1.0 / (factors * base**exponents), float(rs.attention_factor or 1.0)

    interpolated = extrapolated / rs.factor

    # YaRN: keep high-frequency dims (many rotations within the original context) as they are,
    # interpolate low-frequency dims, and ramp linearly in between.
    def dim_for_rotations(n_rot: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(rs.beta_fast), dim_for_rotations(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (original frequency), 0 = interpolate
    inv_freq = interpolated * (1 - keep) + extrapolated * keep

    factor = rs.attention_factor
    if factor is None:
        if rs.mscale and rs.mscale_all_dim:
            factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
        else:
            factor = yarn_mscale(rs.factor)
    return inv_freq, float(factor)


def cos_sin(inv_freq: torch.Tensor, factor: float, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, S) -> cos, sin (B, S, rope_dim // 2)."""
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, S, D/2)
    return freqs.cos() * factor, freqs.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (..., D) by angles cos/sin (..., D/2) that broadcast against it. Output is in half-rotation
    layout: [rotated first members..., rotated second members...]; for interleaved pairs that de-interleaves."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

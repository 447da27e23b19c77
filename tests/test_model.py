"""Internal agreement of the decoder: two attention forms, cached vs uncached, chunked prefill, left padding."""

import pytest
import torch
from conftest import TINY

from mla_edge.models.config import MLAConfig
from mla_edge.models.mla import MLAForCausalLM, ModelOptions, positions_from_mask


def tiny(attention="absorbed", seed=0, **over):
    d = {
        "model_type": "deepseek_v3",
        **TINY,
        "q_lora_rank": 12,
        "first_k_dense_replace": 2,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        **over,
    }
    torch.manual_seed(seed)
    m = MLAForCausalLM(MLAConfig.from_dict(d), ModelOptions(attention=attention)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5) if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    return m


def rebuild(m, **options):
    """The same weights in a model built with other options (options are never flipped on a built model)."""
    other = MLAForCausalLM(m.cfg, ModelOptions(**options)).eval()
    other.load_state_dict(m.state_dict())
    return other


def ids(b, s, seed=0):
    return torch.randint(3, 97, (b, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_naive_equals_absorbed():
    m = tiny()
    x = ids(2, 24)
    a, ca = m(x)
    n, cn = rebuild(m, attention="naive")(x)
    assert (a - n).abs().max().item() <= 1e-5
    assert torch.equal(ca[0][0], cn[0][0]) and torch.equal(ca[0][1], cn[0][1])  # layer 0's latent: same ops
    for (c1, p1), (c2, p2) in zip(ca, cn):
        torch.testing.assert_close(c1, c2, atol=1e-5, rtol=0)
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@torch.no_grad()
def test_rope_in_weights_equals_rope_after(interleave, bias):
    """The export's RoPE folded into the projections (rotated rows) computes what apply_rope does, for both rope
    layouts and with a kv_a bias, through padding and a decode step; and a deliberately wrong rotated row shows."""
    m = tiny(rope_interleave=interleave, attention_bias=bias)
    if bias:  # tiny() leaves biases at 1 + noise: give the rope part of kv_a's bias some sign structure
        m.model.layers[0].self_attn.kv_a_proj_with_mqa.bias.copy_(
            torch.randn(m.cfg.kv_lora_rank + m.cfg.qk_rope_head_dim)
        )
    plain, folded = rebuild(m, graph_weights=True), rebuild(m, graph_weights=True, rope_in_weights=True)
    x, mask = ids(2, 9), torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    pos = positions_from_mask(mask, 9)
    a, ca = plain(x, pos, mask)
    b, cb = folded(x, pos, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for pa, pb in zip(ca, cb):
        for ta, tb in zip(pa, pb):
            torch.testing.assert_close(ta, tb, atol=1e-5, rtol=0)
    step = ids(2, 1, seed=1), pos[:, -1:] + 1, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    torch.testing.assert_close(plain(step[0], step[1], step[2], ca)[0], folded(step[0], step[1], step[2], cb)[0],
                               atol=1e-5, rtol=0)  # fmt: skip
    attn = folded.model.layers[0].self_attn
    Dn, Dr = m.cfg.qk_nope_head_dim, m.cfg.qk_rope_head_dim
    attn.q_rope_w[Dn + Dr] *= -1  # head 0's first rotated row, sign flipped: RoPE is now wrong
    assert (folded(x, pos, mask)[0] - a).abs().max().item() > 1e-3


@pytest.mark.parametrize("attention", ["naive", "absorbed"])
@torch.no_grad()
def test_stepwise_decode_equals_full_forward(attention):
    m = tiny(attention)
    x = ids(2, 20)
    full, full_cache = m(x)
    logits, cache = m(x[:, :5])
    steps = [logits]
    for t in range(5, 20):
        logits, cache = m(x[:, t : t + 1], cache=cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    for (c1, p1), (c2, p2) in zip(cache, full_cache):
        torch.testing.assert_close(c1, c2, atol=1e-5, rtol=0)
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=0)


@torch.no_grad()
def test_chunked_prefill_equals_one_prefill():
    m = tiny()
    x = ids(1, 30, seed=3)
    full, _ = m(x)
    a, cache = m(x[:, :11])
    b, cache = m(x[:, 11:23], cache=cache)  # a prefill after a non-empty past
    c, cache = m(x[:, 23:], cache=cache)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=1e-5, rtol=0)
    assert cache[0][0].shape == (1, 30, 16)


@pytest.mark.parametrize("attention", ["naive", "absorbed"])
@torch.no_grad()
def test_left_padded_batch_equals_each_alone(attention):
    m = tiny(attention)
    long, short = ids(1, 12, seed=4)[0], ids(1, 7, seed=5)[0]
    pad = 12 - 7
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :pad] = 0
    pos = positions_from_mask(mask, 12)
    logits, cache = m(batch, pos, mask)
    assert torch.isfinite(logits).all() and all(torch.isfinite(c).all() and torch.isfinite(p).all() for c, p in cache)
    alone_long, _ = m(long[None])
    alone_short, short_cache = m(short[None])
    torch.testing.assert_close(logits[0], alone_long[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, pad:], alone_short[0], atol=1e-5, rtol=0)
    # decode three more tokens for both: the pads stay masked and the short row still matches
    nxt = ids(2, 3, seed=6)
    for t in range(3):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        step, cache = m(nxt[:, t : t + 1], positions_from_mask(mask, 1), mask, cache)
        ref, short_cache = m(nxt[1:, t : t + 1], cache=short_cache)
        torch.testing.assert_close(step[1], ref[0], atol=1e-5, rtol=0)


def test_bad_attention_form_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        tiny("flash")


@torch.no_grad()
def test_int8_cache_stepwise_equals_full_and_stays_close_to_fp32():
    m = rebuild(tiny(), cache_dtype="int8")
    x = ids(2, 16, seed=7)
    full, full_cache = m(x)
    assert [t.dtype for t in full_cache[0]] == [torch.int8, torch.float32, torch.int8, torch.float32]
    assert full_cache[0][1].shape == (2, 16, 1)
    logits, cache = m(x[:, :6])
    steps = [logits]
    for t in range(6, 16):
        logits, cache = m(x[:, t : t + 1], cache=cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    for a, b in zip(cache[0], full_cache[0]):  # layer 0: the same int8 codes, up to float noise at a rounding edge
        assert (a.float() - b.float()).abs().max() <= (1 if a.dtype == torch.int8 else 1e-6)
    fp32, _ = rebuild(m, cache_dtype="fp32")(x)
    assert 0 < (fp32 - full).abs().max() < 0.1 * fp32.abs().max()
    with pytest.raises(ValueError, match="cache dtype must be one of"):
        ModelOptions(cache_dtype="int4")

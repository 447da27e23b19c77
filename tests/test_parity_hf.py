"""Our decoder, loaded from a save_pretrained checkpoint, against transformers' own DeepSeek/MiniCPM3 classes."""

import pytest
import torch
from conftest import hf_model, save_hf

from mla_edge.models.checkpoint import load_model
from mla_edge.models.mla import ModelOptions

CASES = [
    ("deepseek_v3", None, True, False),
    ("deepseek_v3", 12, True, True),
    ("deepseek_v3", 12, False, False),
    ("deepseek_v3", None, False, True),
    ("deepseek_v2", None, True, False),
    ("deepseek_v2", 12, True, True),
    ("minicpm3", 12, False, False),
]


@pytest.mark.parametrize("kind,q_lora,interleave,yarn", CASES)
@pytest.mark.parametrize("attention", ["naive", "absorbed"])
def test_logits_match_transformers(tmp_path, kind, q_lora, interleave, yarn, attention):
    ref = hf_model(kind, q_lora_rank=q_lora, rope_interleave=interleave, yarn=yarn, tie=(kind == "minicpm3"))
    save_hf(ref, tmp_path / "m")
    ours = load_model(tmp_path / "m", ModelOptions(attention=attention))
    assert ours.cfg.q_lora_rank == q_lora and ours.cfg.rope_interleave == (interleave or kind == "deepseek_v2")
    ids = torch.randint(0, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got, _ = ours(ids)
    assert want.abs().max() > 0.5, "reference logits are too small for the comparison to mean anything"
    assert (got - want).abs().max().item() <= 1e-4


def test_cache_equals_transformers_cache(tmp_path):
    ref = hf_model("deepseek_v3", q_lora_rank=12, rope_interleave=True, yarn=True)
    save_hf(ref, tmp_path / "m")
    ours = load_model(tmp_path / "m")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ref(input_ids=ids, use_cache=True)
        _, cache = ours(ids)
    hf_cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    for i, (c_kv, k_pe) in enumerate(cache):
        layer = hf_cache.layers[i]
        # transformers keeps the latent as single-head 4-D tensors: (B, 1, T, R) and (B, 1, T, Dr)
        assert layer.keys.shape == (2, 1, 12, 16) and layer.values.shape == (2, 1, 12, 8)
        torch.testing.assert_close(c_kv, layer.keys[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(k_pe, layer.values[:, 0], atol=1e-5, rtol=0)


LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 16,
    "short_factor": [1.0, 1.3, 1.9, 2.6],
    "long_factor": [1.1, 2.0, 3.5, 6.0],
}


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("seq", [12, 40])  # within the original 16 positions (short factors), and past them (long)
def test_minicpm3_longrope_matches_transformers(tmp_path, spelling, seq):
    """MiniCPM3's LongRoPE (MiniCPM3-4B's scaling): short factors up to original_max_position_embeddings, long past
    it, and the sqrt(1 + ln(factor) / ln(original)) attention factor, against transformers' MiniCPM3ForCausalLM, in
    both config spellings."""
    import json
    import math

    ref = hf_model("minicpm3", q_lora_rank=12, tie=True, max_position_embeddings=64)
    ref.config.rope_parameters = dict(LONGROPE)
    ref = type(ref)(ref.config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * 0.6 / p.shape[-1] ** 0.5)
    save_hf(ref, tmp_path / "m")
    if spelling == "rope_scaling":  # the older spelling real MiniCPM3 checkpoints use
        cfg = json.loads((tmp_path / "m" / "config.json").read_text())
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = {"type": params.pop("rope_type"), **params}
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ours = load_model(tmp_path / "m")
    rs = ours.cfg.rope_scaling
    assert rs.rope_type == "longrope" and rs.factor == 4.0  # max_position_embeddings 64 / original 16
    assert rs.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)))
    ids = torch.randint(0, ref.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got, _ = ours(ids)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_longrope_export_matches_pytorch_on_both_sides_of_the_switch(tmp_path):
    """The dynamic graph picks the short or long factors from the positions it is fed, as PyTorch does."""
    import numpy as np

    from mla_edge.export.pipeline import ExportOptions, export_folder
    from mla_edge.runtime.session import LatentSession

    ref = hf_model("minicpm3", q_lora_rank=12, tie=True, max_position_embeddings=64)
    ref.config.rope_parameters = dict(LONGROPE)
    save_hf(type(ref)(ref.config).eval(), tmp_path / "m")
    opts = ExportOptions(quantize=(), progress=False, require_tokenizer=False, cache_dtype="fp32")  # exact: fp32 cache
    export_folder(tmp_path / "m", tmp_path / "out", opts)
    ours, sess = load_model(tmp_path / "m"), LatentSession(tmp_path / "out", "fp32", "cpu")
    for seq in (12, 40):
        ids = np.random.default_rng(seq).integers(0, 97, (1, seq))
        mask, pos = np.ones_like(ids), np.arange(seq)[None]
        got, _ = sess.step(ids, mask, pos, sess.empty_cache(1))
        with torch.no_grad():
            want = ours(torch.as_tensor(ids))[0].numpy()
        assert np.abs(got - want).max() <= 1e-4, seq

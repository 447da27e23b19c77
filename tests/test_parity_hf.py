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

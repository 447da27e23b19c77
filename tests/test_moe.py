"""Mixture-of-experts layers (DeepSeek-V2/V3) against transformers' own classes, and through the ONNX export."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY, save_hf

from mla_edge.models.checkpoint import load_model
from mla_edge.models.config import ConfigError, MLAConfig
from mla_edge.models.mla import ModelOptions

MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=12, first_k_dense_replace=1)
CASES = {
    "v2-greedy-shared": ("deepseek_v2", dict(topk_method="greedy", n_shared_experts=1, routed_scaling_factor=1.5)),
    "v2-group-limited": (
        "deepseek_v2",
        dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, n_shared_experts=0),
    ),
    "v3-noaux-tc-shared": (
        "deepseek_v3",
        dict(n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5),
    ),
    "v3-noaux-tc-no-shared": (
        "deepseek_v3",
        dict(n_group=2, topk_group=1, n_shared_experts=0, norm_topk_prob=False, routed_scaling_factor=1.0),
    ),
}


def moe_model(kind: str, extra: dict, seed: int = 0):
    import transformers as tf

    kw = {**TINY, "q_lora_rank": 12, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **MOE, **extra}
    cfg = (tf.DeepseekV2Config if kind == "deepseek_v2" else tf.DeepseekV3Config)(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = (tf.DeepseekV2ForCausalLM if kind == "deepseek_v2" else tf.DeepseekV3ForCausalLM)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0:
                continue
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p)
                if p.dim() == 1
                else torch.randn_like(p) * (0.5 if "embed" in name else 0.6 / p.shape[-1] ** 0.5)
            )
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))  # a real bias changes which experts win
    return model


@pytest.mark.parametrize("attention", ["naive", "absorbed"])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_logits_match_transformers(tmp_path, case, attention):
    kind, extra = CASES[case]
    ref = moe_model(kind, extra)
    save_hf(ref, tmp_path / "m")
    ours = load_model(tmp_path / "m", ModelOptions(attention=attention))
    assert ours.cfg.is_moe and ours.cfg.moe_layer(1) and not ours.cfg.moe_layer(0)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got, _ = ours(ids)
    assert want.abs().max() > 0.5
    assert (got - want).abs().max().item() <= 1e-4


def test_moe_config_round_trips_and_bad_fields_are_named(tmp_path):
    kind, extra = CASES["v3-noaux-tc-shared"]
    save_hf(moe_model(kind, extra), tmp_path / "m")
    d = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg = MLAConfig.from_dict(d)
    assert (cfg.topk_method, cfg.scoring_func, cfg.n_group, cfg.topk_group) == ("noaux_tc", "sigmoid", 4, 2)
    assert MLAConfig.from_dict(cfg.to_dict()) == cfg
    for field, value, match in [
        ("topk_method", "random", "'topk_method'"),
        ("scoring_func", "relu", "'scoring_func'"),
        ("n_group", 3, "n_group=3"),
        ("num_experts_per_tok", 0, "'num_experts_per_tok'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            MLAConfig.from_dict({**d, field: value})


def test_moe_config_that_contradicts_its_tensors_is_named(tmp_path):
    from mla_edge.models.checkpoint import CheckpointError

    kind, extra = CASES["v2-greedy-shared"]
    save_hf(moe_model(kind, extra), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["n_routed_experts"] = 6
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected tensors.*experts.6"):
        load_model(tmp_path / "m")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["v2-group-limited", "v3-noaux-tc-shared"])
def test_moe_onnx_matches_pytorch_over_32_steps(tmp_path, case):
    """The exported graph (routing included) equals PyTorch over a prefill and 32 decode steps; int8 and int4 run
    and their error is reported, not judged (random weights)."""
    from mla_edge.export.parity import teacher_forced
    from mla_edge.export.pipeline import ExportOptions, export_folder
    from mla_edge.runtime.session import LatentSession

    kind, extra = CASES[case]
    save_hf(moe_model(kind, extra), tmp_path / "m")
    export_folder(
        tmp_path / "m",
        tmp_path / "out",
        ExportOptions(quantize=("int8", "int4"), progress=False, require_tokenizer=False),
    )
    model = load_model(tmp_path / "m")
    rows = [np.random.default_rng(4).integers(3, 97, 11 + 32).tolist()]
    rep = teacher_forced(model, LatentSession(tmp_path / "out", "fp32", "cpu"), rows, [11], 32)
    assert rep["max_abs_logit_diff"] <= 1e-4 and rep["top1_agreement"] == 1.0
    for precision in ("int8", "int4"):
        q = teacher_forced(model, LatentSession(tmp_path / "out", precision, "cpu"), rows, [11], 32)
        print(f"{case} {precision}: max|dlogit| {q['max_abs_logit_diff']:.3f}, top-1 {q['top1_agreement']:.2f}")
        assert np.isfinite(q["max_abs_logit_diff"])


def test_budget_counts_the_experts(tmp_path):
    from mla_edge.runtime.budget import param_count

    for case in ("v2-greedy-shared", "v3-noaux-tc-no-shared"):
        kind, extra = CASES[case]
        save_hf(moe_model(kind, extra), tmp_path / case)
        model = load_model(tmp_path / case)
        assert param_count(model.cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_moe_static_export_gives_the_dynamic_tokens(tmp_path):
    from mla_edge.export.pipeline import ExportOptions, export_folder
    from mla_edge.runtime.generate import Generator

    kind, extra = CASES["v3-noaux-tc-shared"]
    save_hf(moe_model(kind, extra), tmp_path / "m")
    opts = ExportOptions(
        quantize=(), progress=False, require_tokenizer=False, ort_format=False, static_cache=120, static_chunk=8
    )
    export_folder(tmp_path / "m", tmp_path / "out", opts)
    prompt = np.random.default_rng(1).integers(3, 97, 19).tolist()
    want, got = (
        Generator(tmp_path / "out", "fp32", "cpu", protocol=p)
        .generate_ids([prompt], max_new_tokens=64, eos=False)[0]
        .token_ids
        for p in ("dynamic", "static")
    )
    assert got == want and len(want) == 64

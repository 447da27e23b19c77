"""Mixture-of-experts layers (DeepSeek-V2/V3) against transformers' own classes, and through the ONNX export."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY, save_hf

from mla_edge.contract import InputError
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
@pytest.mark.parametrize("case", ["v3-noaux-tc-shared"])  # V2's group-limited ONNX parity: test_families
def test_moe_onnx_matches_pytorch_over_32_steps(tmp_path, case):
    """The exported graph (routing included) equals PyTorch over a prefill and 32 decode steps; int8 and int4 run
    and their error is reported, not judged (random weights)."""
    from mla_edge.export.parity import teacher_forced
    from mla_edge.export.pipeline import ExportOptions, export_folder
    from mla_edge.runtime.session import LatentSession

    kind, extra = CASES[case]
    save_hf(moe_model(kind, {**extra, "moe_intermediate_size": 32}), tmp_path / "m")  # widths int8's blocks divide
    export_folder(
        tmp_path / "m",
        tmp_path / "out",
        ExportOptions(quantize=("int8", "int4"), progress=False, require_tokenizer=False, cache_dtype="fp32"),
    )
    model = load_model(tmp_path / "m")
    rows = [np.random.default_rng(4).integers(3, 97, 11 + 32).tolist()]
    rep = teacher_forced(model, LatentSession(tmp_path / "out", "fp32", "cpu"), rows, [11], 32)
    assert rep["max_abs_logit_diff"] <= 1e-4 and rep["top1_agreement"] == 1.0
    graph = onnx.load(str(tmp_path / "out" / "model.int8.onnx"), load_external_data=False)
    qmoe = [n for n in graph.graph.node if "MoE" in n.op_type]
    assert [n.op_type for n in qmoe] == ["QMoE"]  # int8 experts, not fp32 ones
    # by blocks, which onnxruntime runs on MatMulNBits' int8 kernels (with one scale per row it dequantizes to fp32)
    assert onnx.helper.get_attribute_value(next(a for a in qmoe[0].attribute if a.name == "block_size")) > 0
    for precision in ("int8", "int4"):
        q = teacher_forced(model, LatentSession(tmp_path / "out", precision, "cpu"), rows, [11], 32)
        print(f"{case} {precision}: max|dlogit| {q['max_abs_logit_diff']:.3f}, top-1 {q['top1_agreement']:.2f}")
        assert np.isfinite(q["max_abs_logit_diff"])


@pytest.mark.parametrize("case", ["v2-group-limited", "v3-noaux-tc-shared"])  # the two group-limited rules
def test_router_fidelity_onnx_chooses_the_experts_pytorch_chooses(tmp_path, case):
    """On every token of a prefill and 32 decode steps, every MoE layer of the fp32 graph (a com.microsoft MoE
    node behind plain-op routing) picks exactly PyTorch's experts; near-ties are reported, none occur here."""
    from mla_edge.export.parity import router_agreement
    from mla_edge.export.pipeline import ExportOptions, export_folder
    from mla_edge.runtime.session import LatentSession

    kind, extra = CASES[case]
    save_hf(moe_model(kind, extra, seed=2), tmp_path / "m")
    quantize = ("int8",) if case == "v3-noaux-tc-shared" else ()  # a QMoE graph, its weights in external data
    opts = ExportOptions(quantize=quantize, progress=False, require_tokenizer=False, ort_format=False)
    export_folder(tmp_path / "m", tmp_path / "out", opts)
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in graph.graph.node if "MoE" in n.op_type] == ["MoE"]
    model = load_model(tmp_path / "m")
    row = np.random.default_rng(5).integers(3, 97, 13 + 32).tolist()
    rep = router_agreement(model, LatentSession(tmp_path / "out", "fp32", "cpu"), row, 13, 32)
    print(case, rep)
    assert rep["tokens"] == 13 + 32 and rep["layers"] == 1 and rep["graph_picks_k"]
    assert rep["agree"] == rep["total"]
    if quantize:  # reported, not judged: int8 hidden states may move a choice
        q = router_agreement(model, LatentSession(tmp_path / "out", "int8", "cpu"), row, 13, 32)
        assert q["graph_picks_k"] and q["total"] == 45
        assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []


def test_moe_op_runs_only_in_the_graph_and_stacking_keeps_weights_once(tmp_path):
    """moe_op: PyTorch still computes the dense reference; the experts' parameters become views into the op's
    stacked tensors (no second copy), and the options refuse a model that cannot hold them."""
    kind, extra = CASES["v2-greedy-shared"]
    save_hf(moe_model(kind, extra), tmp_path / "m")
    plain = load_model(tmp_path / "m")
    stacked = load_model(tmp_path / "m", ModelOptions(graph_weights=True, moe_op=True))
    moe = stacked.model.layers[1].mlp
    assert moe.fc1.shape == (8, 2 * 12, 32) and moe.fc2.shape == (8, 32, 12)
    assert moe.experts[3].up_proj.weight.data_ptr() == moe.fc1[3, 1].data_ptr()
    assert torch.equal(moe.fc1[3, 0::2], plain.model.layers[1].mlp.experts[3].gate_proj.weight)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(plain(ids)[0], stacked(ids)[0], atol=1e-5)
    with pytest.raises(InputError, match="moe_op"):
        ModelOptions(moe_op=True)


def test_budget_counts_the_experts(tmp_path):
    from mla_edge.runtime.budget import param_count

    for case in ("v2-greedy-shared", "v3-noaux-tc-no-shared"):
        kind, extra = CASES[case]
        save_hf(moe_model(kind, extra), tmp_path / case)
        model = load_model(tmp_path / case)
        assert param_count(model.cfg) == sum(p.numel() for p in model.parameters())


def test_streaming_int8_equals_onnxruntime_quantize_dynamic(tmp_path):
    """Big graphs are quantized tensor by tensor; the result is bit for bit what onnxruntime's quantize_dynamic
    (plus the QMoE pass) writes, on a graph with every kind of weight: 2-D MatMul, 3-D absorbed MatMul, Gemm
    (router, shared experts), the embedding Gather and the MoE experts."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from mla_edge.export import quantize as q
    from mla_edge.export.pipeline import ExportOptions, export_folder

    kind, extra = CASES["v3-noaux-tc-shared"]
    save_hf(moe_model(kind, extra), tmp_path / "m")
    opts = ExportOptions(quantize=(), progress=False, require_tokenizer=False, ort_format=False, cache_dtype="fp32")
    export_folder(tmp_path / "m", tmp_path / "out", opts)
    src = tmp_path / "out" / "model.onnx"
    q.quantize_int8(src, tmp_path / "ref.onnx")
    q.quantize_int8_streaming(src, tmp_path / "new.onnx")
    assert (tmp_path / "new.onnx.data").is_file()
    ref = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "ref.onnx")).graph.initializer}
    new = {
        t.name: numpy_helper.to_array(t, base_dir=str(tmp_path))
        for t in onnx.load(str(tmp_path / "new.onnx"), load_external_data=False).graph.initializer
    }
    quantized = [n for n in ref if n.endswith(("_quantized", "_scale", "_zero_point", "_q8"))]
    assert len(quantized) > 30 and any("Transposed" in n for n in quantized) and any("_q8" in n for n in quantized)
    for n in quantized:
        assert n in new and new[n].dtype == ref[n].dtype and np.array_equal(new[n], ref[n]), n
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 97, (1, 5)), "attention_mask": np.ones((1, 8), np.int64)}
    feeds["position_ids"] = np.arange(3, 8)[None]
    sessions = [
        ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]) for f in ("ref.onnx", "new.onnx")
    ]
    for i in sessions[0].get_inputs()[3:]:
        feeds[i.name] = rng.standard_normal((1, 3, i.shape[2])).astype(np.float16 if "16" in i.type else np.float32)
    a, b = (s.run(None, feeds) for s in sessions)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_int4_with_external_data_loads_and_equals_the_inline_file(tmp_path):
    """Quantized graphs past 2 GiB must keep weights outside the protobuf: the external-data writer, forced on a
    small graph, gives a file that loads and computes exactly what the inline one does."""
    import onnxruntime as ort

    from mla_edge.export import quantize as q
    from mla_edge.export.pipeline import ExportOptions, export_folder

    kind, extra = CASES["v2-greedy-shared"]
    save_hf(moe_model(kind, extra), tmp_path / "m")
    opts = ExportOptions(quantize=(), progress=False, require_tokenizer=False, ort_format=False, cache_dtype="fp32")
    export_folder(tmp_path / "m", tmp_path / "out", opts)
    src = tmp_path / "out" / "model.onnx"
    q.quantize_int4(src, tmp_path / "inline.onnx", 16, external=False)
    q.quantize_int4(src, tmp_path / "external.onnx", 16, external=True)
    assert not (tmp_path / "inline.onnx.data").exists() and (tmp_path / "external.onnx.data").stat().st_size > 1000
    assert (tmp_path / "external.onnx").stat().st_size < (tmp_path / "inline.onnx").stat().st_size - 1000
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 97, (1, 4)),
        "attention_mask": np.ones((1, 4), np.int64),
        "position_ids": np.arange(4)[None],
    }
    outs = []
    for f in ("inline.onnx", "external.onnx"):
        s = ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"])
        cache = {i.name: np.zeros((1, 0, i.shape[2]), np.float32) for i in s.get_inputs()[3:]}
        outs.append(s.run(None, {**feeds, **cache}))
    assert all(np.array_equal(x, y) for x, y in zip(*outs))


def test_real_size_configs_have_the_published_parameter_counts():
    """The real-size recipe's dimensions reproduce the published totals (DeepSeek-V2-Lite 15.7B, MiniCPM3-4B
    4.07B), and its extrapolation is exact on costs that are linear in the layer count."""
    from mla_edge.models.recipes.real_size import CONFIGS, extrapolate
    from mla_edge.runtime.budget import param_count

    counts = {k: param_count(MLAConfig.from_dict(v)) for k, v in CONFIGS.items()}
    assert round(counts["deepseek-v2-lite"] / 1e8) == 157 and round(counts["minicpm3-4b"] / 1e7) == 407

    def run(layers: int) -> dict:
        cost = {"file_bytes": 10 + 3 * layers, "decode_1024_ms": 1 + 2 * layers, "peak_rss_bytes": 5 + layers}
        return {
            "layers": layers,
            "fp32_weight_bytes": 7 * layers,
            "export_peak_rss_bytes": max(100 + 9 * layers, 10 + 11 * layers),
            "export_peak_rss_by_stage": {"load": 10 + 11 * layers, "quantize": 100 + 9 * layers},
            "cache_bytes_per_token": 4 * layers,
            "precisions": {"int8": cost},
        }

    full = extrapolate(run(1), run(3), 27)
    assert full["precisions"]["int8"] == run(27)["precisions"]["int8"]
    assert full["export_peak_rss_bytes"] == run(27)["export_peak_rss_bytes"]


def _unpack(codes: np.ndarray, scale: np.ndarray, bits: int, block: int) -> np.ndarray:
    """QMoE's raw layout read with numpy, independently of the writer: uint8 codes offset by 2^(bits-1); int4 two per
    byte, the low nibble first; one scale per row, or per block of `block` along K."""
    if bits == 4:
        q = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
    else:
        q = codes
    q = q.astype(np.float32) - (1 << (bits - 1))
    per = np.repeat(scale, block, axis=-1) if block else scale[..., None]
    return q * per


@pytest.mark.parametrize("bits,block", [(4, 0), (4, 32), (8, 0), (8, 32)])
def test_qmoe_expert_codes_are_what_numpy_and_onnxruntime_read(bits, block, monkeypatch):
    """The packed experts, dequantized by numpy, are the weights to within half a step (a swapped nibble order or a
    wrong offset is off by whole steps), and onnxruntime's QMoE on the codes equals its fp32 MoE on numpy's
    dequantized weights (so numpy's reading is onnxruntime's). int8 by blocks (what the int8 export writes) runs on
    MatMulNBits' int8 kernels, activations quantized per block: exact only with those kernels held to fp32
    activations (ORT_QMOE_CPU_QNBIT_GEMM=fp32), near and not equal without (so the fast path is the one taken)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mla_edge.export.quantize import quantize_rows

    E, C, inner, N, k = 4, 64, 32, 6, 2
    rng = np.random.default_rng(bits + block)
    fc1 = rng.normal(0, 0.2, (E, 2 * inner, C)).astype(np.float32)
    fc2 = rng.normal(0, 0.2, (E, C, inner)).astype(np.float32)
    packed = {}
    for name, w in (("fc1", fc1), ("fc2", fc2)):
        codes, scale = quantize_rows(w, bits, block)
        deq = _unpack(codes, scale, bits, block)
        step = np.repeat(scale, block, axis=-1) if block else scale[..., None]
        assert np.all(np.abs(deq - w) <= step / 2 * (1 + 1e-5)), (name, float((np.abs(deq - w) / step).max()))
        packed[name] = (codes, scale, deq)

    attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    attrs["normalize_routing_weights"] = 0

    def run(op: str, inits: list, inputs: list[str], extra: dict) -> np.ndarray:
        node = helper.make_node(op, ["x", "r", *inputs], ["y"], domain="com.microsoft", **attrs, **extra)
        graph = helper.make_graph(
            [node],
            "moe",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, C]),
                helper.make_tensor_value_info("r", TensorProto.FLOAT, [N, E]),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N, C])],
            inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        )
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(None, {"x": x, "r": r})[0]

    x = rng.normal(0, 1, (N, C)).astype(np.float32)
    # the exporter's routing input: log of the final mixing weights, k of them non-zero per token (models/mla.py MoE;
    # the op's softmax over it gives them back normalised, which QMoE's CPU kernel does whatever its attribute says)
    mix = np.zeros((N, E), np.float32)
    for n in range(N):
        mix[n, rng.choice(E, k, replace=False)] = rng.uniform(0.1, 1.0, k)
    with np.errstate(divide="ignore"):
        r = np.log(mix)
    (c1, s1, d1), (c2, s2, d2) = packed["fc1"], packed["fc2"]

    def qmoe() -> np.ndarray:
        return run(
            "QMoE",
            [numpy_helper.from_array(a, n) for a, n in ((c1, "w1"), (s1, "s1"), (c2, "w2"), (s2, "s2"))],
            ["w1", "s1", "", "w2", "s2"],
            dict(expert_weight_bits=bits, weights_prepacked=0, **({"block_size": block} if block else {})),
        )

    reference = run("MoE", [numpy_helper.from_array(d1, "w1"), numpy_helper.from_array(d2, "w2")], ["w1", "", "w2"], {})
    top = max(1.0, float(np.abs(reference).max()))
    if bits == 8 and block:
        fast = np.abs(qmoe() - reference).max()
        assert 1e-5 * top < fast <= 0.03 * top, fast
        monkeypatch.setenv("ORT_QMOE_CPU_QNBIT_GEMM", "fp32")
    assert np.abs(qmoe() - reference).max() <= 1e-4 * top

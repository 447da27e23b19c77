"""Our exports in the peers' formats: a GGUF for llama.cpp (deepseek2: every tensor read back with `gguf` against our
weights, the rope rows permuted into llama.cpp's adjacent pairs; where llama-cpp-python is installed, llama.cpp's
greedy tokens equal our fp32 ONNX export's) and an onnxruntime-genai folder (genai's own loop and search give our
runtime's greedy tokens)."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mla_edge.cli import main
from mla_edge.export.gguf_file import rope_pairs
from mla_edge.models import DEMO_DIR

PROMPTS = ("It was a dark and stormy night, and", "The old man looked at the letter", "She said that")


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    """The demo model exported to fp32 ONNX, with an f32 GGUF and a genai graph beside it (the CLI a user runs)."""
    out = tmp_path_factory.mktemp("peers") / "demo"
    argv = ["export", "-o", str(out), "--quantize", "none", "--cache-dtype", "fp32"]  # genai keeps a float32 cache
    assert main([*argv, "--format", "gguf", "--gguf-type", "f32"]) == 0
    assert main(["export", "-o", str(out), "--format", "genai"]) == 0  # the export exists: only the genai files
    return out


def test_rope_pairs_turn_halves_into_adjacent_pairs():
    assert rope_pairs(8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_every_tensor_reads_back_with_the_rope_permutation(demo_gguf):
    import gguf

    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    H, R, dn, dr, dv = (cfg[k] for k in ("num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                                         "qk_rope_head_dim", "v_head_dim"))  # fmt: skip
    sd = {k: v.float().numpy() for k, v in load_file(str(DEMO_DIR / "model.safetensors")).items()}
    manifest = json.loads((demo_gguf / "mla_edge.json").read_text())
    from mla_edge.manifest_schema import problems

    assert problems(manifest) == [] and set(manifest["genai"]) == {"fp32"}  # the GGUF and genai writers' entries
    entry = manifest["gguf"]["f32"]
    assert entry["path"] == "model.f32.gguf" and entry["rope_permuted"] is True and len(entry["sha256"]) == 64
    reader = gguf.GGUFReader(str(demo_gguf / entry["path"]))
    got = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    fields = {f.name: f for f in reader.fields.values()}
    assert fields["general.architecture"].contents() == "deepseek2"
    assert fields["deepseek2.attention.q_lora_rank"].contents() == 0
    assert fields["deepseek2.attention.head_count_kv"].contents() == 1
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2" and fields["tokenizer.ggml.add_bos_token"].contents()
    assert not any("expert_count" in k or "expert_used" in k or "gating" in k for k in fields)  # dense: no router
    p = rope_pairs(dr)
    expect = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        a, b = f"model.layers.{i}.self_attn.", f"blk.{i}."
        q = sd[a + "q_proj.weight"].reshape(H, dn + dr, -1)
        expect[b + "attn_q.weight"] = np.concatenate([q[:, :dn], q[:, dn:][:, p]], 1).reshape(H * (dn + dr), -1)
        kv_a = sd[a + "kv_a_proj_with_mqa.weight"]
        expect[b + "attn_kv_a_mqa.weight"] = np.concatenate([kv_a[:R], kv_a[R:][p]])
        kv_b = sd[a + "kv_b_proj.weight"].reshape(H, dn + dv, R)
        expect[b + "attn_k_b.weight"] = kv_b[:, :dn].transpose(0, 2, 1)
        expect[b + "attn_v_b.weight"] = kv_b[:, dn:]
        expect[b + "attn_kv_a_norm.weight"] = sd[a + "kv_a_layernorm.weight"]
        expect[b + "attn_output.weight"] = sd[a + "o_proj.weight"]
        expect[b + "attn_norm.weight"] = sd[f"model.layers.{i}.input_layernorm.weight"]
        expect[b + "ffn_norm.weight"] = sd[f"model.layers.{i}.post_attention_layernorm.weight"]
        for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            expect[b + theirs + ".weight"] = sd[f"model.layers.{i}.mlp.{ours}.weight"]
    assert set(got) == set(expect)  # tied embeddings: no output.weight
    for name, want in expect.items():
        assert got[name].shape == want.shape, name
        assert np.array_equal(got[name], want.astype(np.float32)), name
    # the permutation is the one that matters: the rope rows differ from the checkpoint's own order
    assert not np.array_equal(
        got["blk.0.attn_kv_a_mqa.weight"][R:], sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"][R:]
    )


def test_gguf_bad_input_is_one_line(demo_gguf, capsys, tmp_path):
    assert main(["export", "-o", str(demo_gguf), "--format", "gguf", "--gguf-type", "f32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.f32.gguf already exists; pass --force" in err[0]
    out = tmp_path / "x"
    assert main(["export", "-o", str(out), "--format", "genai", "--cache-dtype", "int8"]) == 2
    assert "onnxruntime-genai keeps a float32 cache" in capsys.readouterr().err and not out.exists()
    assert main(["export", "-o", str(demo_gguf), "--format", "genai"]) == 2
    assert "model.genai.onnx already exists; pass --force" in capsys.readouterr().err


def _expected_deepseek2_fields(c: dict) -> dict:
    """What llama.cpp's deepseek2 loader reads, worked out from a raw config.json (transformers' key names), without
    the writer's code: every `deepseek2.*` field the GGUF must have, and no other."""
    L, R, dr = c["num_hidden_layers"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    moe = bool(c.get("n_routed_experts")) and c.get("first_k_dense_replace", 0) < L  # else every layer is dense
    v3 = c["model_type"] == "deepseek_v3"  # its class defaults: sigmoid scores, noaux_tc groups
    rope = c["rope_parameters"]
    f = {
        "block_count": L,
        "context_length": c["max_position_embeddings"],
        "embedding_length": c["hidden_size"],
        "feed_forward_length": c["intermediate_size"],
        "attention.head_count": c["num_attention_heads"],
        "attention.head_count_kv": 1,  # MLA as one latent "KV head"
        "rope.freq_base": rope["rope_theta"],
        "attention.layer_norm_rms_epsilon": c["rms_norm_eps"],
        "vocab_size": c["vocab_size"],
        "leading_dense_block_count": c["first_k_dense_replace"] if moe else L,
        "attention.q_lora_rank": c.get("q_lora_rank") or 0,
        "attention.kv_lora_rank": R,
        "attention.key_length": R + dr,
        "attention.value_length": R,
        "attention.key_length_mla": c["qk_nope_head_dim"] + dr,
        "attention.value_length_mla": c["v_head_dim"],
        "rope.dimension_count": dr,
        "expert_feed_forward_length": c["moe_intermediate_size"] if moe else c["intermediate_size"],
        "expert_shared_count": c.get("n_shared_experts") or 0 if moe else 0,
    }
    if moe:
        sigmoid = c.get("scoring_func", "sigmoid" if v3 else "softmax") == "sigmoid"
        f.update(
            {
                "expert_count": c["n_routed_experts"],
                "expert_used_count": c["num_experts_per_tok"],
                "expert_weights_scale": c["routed_scaling_factor"],
                "expert_weights_norm": sigmoid and bool(c["norm_topk_prob"]),
                "expert_gating_func": 2 if sigmoid else 1,  # llama.cpp: 1 softmax, 2 sigmoid
            }
        )
        method = c.get("topk_method", "noaux_tc" if v3 else "greedy")
        if method == "noaux_tc" and c["n_group"] > 1:
            f.update({"expert_group_count": c["n_group"], "expert_group_used_count": c["topk_group"]})
    if rope.get("rope_type") == "yarn":
        f.update(
            {
                "rope.scaling.type": "yarn",
                "rope.scaling.factor": rope["factor"],
                "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
                "rope.scaling.yarn_log_multiplier": 0.1 * rope["mscale_all_dim"],
                "rope.scaling.yarn_beta_fast": rope["beta_fast"],
                "rope.scaling.yarn_beta_slow": rope["beta_slow"],
            }
        )
    return {"deepseek2." + k: v for k, v in f.items()}


@pytest.mark.parametrize("case", ["demo", "v3-noaux-tc-shared", "v2-greedy-shared", "yarn"])
def test_every_gguf_metadata_field_is_the_config_s(tmp_path, case):
    """Every `deepseek2.*` field, for a dense, two MoE and a YaRN model, against the config.json (a field that is
    wrong, missing or extra fails: e.g. rope.freq_base x 10), plus the architecture and the tokenizer's ids."""
    import gguf

    from mla_edge.export.gguf_file import write_gguf

    folder = DEMO_DIR if case == "demo" else _real_shape_checkpoint(tmp_path / "m", case)
    write_gguf(folder, tmp_path / "m.gguf", "f32")
    f = {x.name: x.contents() for x in gguf.GGUFReader(str(tmp_path / "m.gguf")).fields.values()}
    c = json.loads((folder / "config.json").read_text())
    want = _expected_deepseek2_fields(c)
    got = {k: v for k, v in f.items() if k.startswith("deepseek2.")}
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    for k, v in want.items():
        assert got[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), (k, got[k], v)
    assert f["general.architecture"] == "deepseek2" and f["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    eos = c["eos_token_id"][0] if isinstance(c["eos_token_id"], list) else c["eos_token_id"]
    assert (f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.eos_token_id")) == (c["bos_token_id"], eos)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_greedy_tokens_equal_our_fp32_onnx(demo_gguf):
    """llama.cpp (f32 weights, f32 cache, flash attention off) and our fp32 ONNX: 3 prompts x 64 greedy tokens."""
    import llama_cpp

    from mla_edge.runtime.generate import Generator

    gen = Generator(demo_gguf, "fp32", provider="cpu")
    llm = llama_cpp.Llama(str(demo_gguf / "model.f32.gguf"), n_ctx=256, n_threads=torch.get_num_threads(),
                          flash_attn=False, type_k=0, type_v=0, verbose=False)  # fmt: skip
    for prompt in PROMPTS:
        ids = gen.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=True) == ids  # same tokens, same BOS
        ours = gen.generate_ids([ids], max_new_tokens=64, eos=False)[0].token_ids
        llm.reset()
        llm.eval(ids)
        theirs = []
        for _ in range(64):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
            theirs.append(int(logits.argmax()))
            llm.eval([theirs[-1]])
        assert theirs == ours, prompt


def test_genai_runs_our_latent_cache_with_its_own_loop_and_search(demo_gguf):
    """onnxruntime-genai (its tokenizer, Generator and greedy search) on our folder = our runtime, 3 x 64 tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    from mla_edge.runtime.generate import Generator

    manifest = json.loads((demo_gguf / "mla_edge.json").read_text())
    assert manifest["genai"]["fp32"]["path"] == "model.genai.onnx"
    gen = Generator(demo_gguf, "fp32", provider="cpu")
    model = og.Model(str(demo_gguf))
    tok = og.Tokenizer(model)
    for prompt in PROMPTS:
        ids = gen.encode(prompt)
        theirs_ids = [int(t) for t in tok.encode(prompt)]
        assert theirs_ids == ids[1:]  # genai's tokenizer adds no BOS: the caller gives it, as with any genai model
        ours = gen.generate_ids([ids], max_new_tokens=64, eos=False)[0].token_ids
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 64, do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens([ids[0], *theirs_ids])
        theirs = []
        while not g.is_done() and len(theirs) < 64:
            g.generate_next_token()
            theirs.append(int(g.get_next_tokens()[0]))
        assert theirs == ours, prompt


# ---- mixtures of experts and YaRN: real DeepSeek checkpoints (V2-Lite, V3, Moonlight) are both --------------------


def _real_shape_checkpoint(folder, case):
    """A tiny checkpoint from transformers' own classes with a tokenizer beside it: an MoE case of test_moe, or
    "yarn" (dense V3, YaRN with mscale == mscale_all_dim as the real configs have, rotate-half rope, q LoRA)."""
    import test_moe
    from conftest import TINY, YARN, hf_model, make_tokenizer, save_hf

    if case == "yarn":
        save_hf(hf_model(q_lora_rank=12, rope_interleave=False, yarn=True, vocab_size=320), folder)
        cfg = json.loads((folder / "config.json").read_text())  # our model reads it; transformers' is not run
        cfg["rope_parameters"] = {**YARN, "mscale": YARN["mscale_all_dim"]}
        (folder / "config.json").write_text(json.dumps(cfg))
    else:
        kind, extra = test_moe.CASES[case]
        save_hf(test_moe.moe_model(kind, {**extra, "vocab_size": 320}), folder)
    make_tokenizer(folder / "tokenizer.json", 320)
    assert TINY["vocab_size"] != 320  # the override above is what makes the tokenizer fit
    return folder


def test_moe_gguf_has_router_experts_and_routing_fields(tmp_path):
    import gguf

    from mla_edge.export.gguf_file import write_gguf

    m = _real_shape_checkpoint(tmp_path / "m", "v3-noaux-tc-shared")
    write_gguf(m, tmp_path / "m.gguf", "f32")
    sd = {k: v.float().numpy() for k, v in load_file(str(m / "model.safetensors")).items()}
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    got = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    f = {x.name: x.contents() for x in reader.fields.values()}
    counts = (f["deepseek2.expert_count"], f["deepseek2.expert_used_count"], f["deepseek2.expert_shared_count"])
    assert counts == (8, 2, 1)
    assert (f["deepseek2.expert_group_count"], f["deepseek2.expert_group_used_count"]) == (4, 2)
    assert f["deepseek2.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    assert f["deepseek2.expert_weights_norm"] is True and f["deepseek2.expert_weights_scale"] == pytest.approx(2.5)
    assert f["deepseek2.leading_dense_block_count"] == 1 and f["deepseek2.expert_feed_forward_length"] == 12
    p = "model.layers.1.mlp."
    assert np.array_equal(got["blk.1.ffn_gate_inp.weight"], sd[p + "gate.weight"])
    assert np.array_equal(got["blk.1.exp_probs_b.bias"], sd[p + "gate.e_score_correction_bias"])
    for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
        want = np.stack([sd[p + f"experts.{j}.{ours}.weight"] for j in range(8)])
        assert np.array_equal(got[f"blk.1.{theirs}_exps.weight"], want)
        assert np.array_equal(got[f"blk.1.{theirs}_shexp.weight"], sd[p + f"shared_experts.{ours}.weight"])
        assert np.array_equal(got[f"blk.0.{theirs}.weight"], sd[f"model.layers.0.mlp.{ours}.weight"])  # dense layer 0


def test_yarn_gguf_fields(tmp_path):
    import gguf

    from mla_edge.export.gguf_file import write_gguf

    m = _real_shape_checkpoint(tmp_path / "m", "yarn")
    write_gguf(m, tmp_path / "m.gguf", "f32")
    f = {x.name: x.contents() for x in gguf.GGUFReader(str(tmp_path / "m.gguf")).fields.values()}
    assert f["deepseek2.rope.scaling.type"] == "yarn" and f["deepseek2.rope.scaling.factor"] == pytest.approx(4.0)
    assert f["deepseek2.rope.scaling.original_context_length"] == 32
    assert f["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)
    assert "deepseek2.expert_count" not in f
    from mla_edge.models.checkpoint import load_model

    assert load_model(m).cfg.rope_scaling.factor == 4.0  # and our model reads it as YaRN


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("case", ["v2-greedy-shared", "v3-noaux-tc-shared", "yarn"])
def test_llama_cpp_logits_equal_ours_for_moe_and_yarn(tmp_path, case):
    """llama.cpp on our GGUF = our PyTorch model (= transformers, test_moe / test_parity_hf), every position's
    logits over 40 tokens: past YaRN's original 32-token context, through both routers and the shared experts."""
    import llama_cpp

    from mla_edge.export.gguf_file import write_gguf
    from mla_edge.models.checkpoint import load_model

    m = _real_shape_checkpoint(tmp_path / "m", case)
    write_gguf(m, tmp_path / "m.gguf", "f32")
    ids = [int(t) for t in np.random.default_rng(0).integers(1, 320, 40)]
    with torch.no_grad():
        want = load_model(m)(torch.tensor([ids]))[0][0].numpy()
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, logits_all=True, flash_attn=False, type_k=0, type_v=0,
                          n_threads=torch.get_num_threads(), verbose=False)  # fmt: skip
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(want).max() > 1.0
    assert np.abs(got - want).max() <= 1e-4, case


@pytest.mark.parametrize(
    "case, expect",
    [
        ("v2-group-limited", "group_limited_greedy routing"),
        ("v3-noaux-tc-no-shared", "needs shared experts"),
        ("yarn-mscale", "mscale 0.8 != mscale_all_dim 0.707"),
        ("minicpm3", "is minicpm3: llama.cpp runs MiniCPM3 as its own minicpm3 architecture"),
    ],
)
def test_gguf_refuses_what_llama_cpp_cannot_say_before_any_work(tmp_path, capsys, case, expect):
    from conftest import hf_model, make_tokenizer, save_hf

    if case in ("yarn-mscale", "minicpm3"):
        kind = "minicpm3" if case == "minicpm3" else "deepseek_v3"
        m = save_hf(hf_model(kind, yarn=True, vocab_size=320), tmp_path / "m")
        make_tokenizer(m / "tokenizer.json", 320)
    else:
        m = _real_shape_checkpoint(tmp_path / "m", case)
    capsys.readouterr()  # transformers' own output while the checkpoint was written
    out = tmp_path / "out"
    assert main(["export", str(m), "-o", str(out), "--format", "gguf", "--gguf-type", "f32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists()  # refused before the ONNX export it would sit beside


def test_genai_runs_an_moe_export(tmp_path):
    """A V3 MoE export (routed experts as onnxruntime's MoE op) in genai's folder form: genai's own loop and greedy
    search give our runtime's tokens, 32 of them."""
    og = pytest.importorskip("onnxruntime_genai")
    import onnx

    from mla_edge.runtime.generate import Generator

    m, out = _real_shape_checkpoint(tmp_path / "m", "v3-noaux-tc-shared"), tmp_path / "out"
    assert (
        main(["export", str(m), "-o", str(out), "--quantize", "none", "--format", "genai"]) == 0
    )  # fp32 cache for genai
    assert any(n.op_type == "MoE" for n in onnx.load(str(out / "model.genai.onnx")).graph.node)
    ids = [int(t) for t in np.random.default_rng(0).integers(1, 320, 12)]
    ours = Generator(out, "fp32", provider="cpu").generate_ids([ids], max_new_tokens=32, eos=False)[0].token_ids
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 32, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(ids)
    theirs = []
    while not g.is_done() and len(theirs) < 32:
        g.generate_next_token()
        theirs.append(int(g.get_next_tokens()[0]))
    assert theirs == ours

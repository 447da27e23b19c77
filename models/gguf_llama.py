"""A llama-architecture GGUF file -> a Hugging Face llama folder (fp32 safetensors, config.json, tokenizer.json,
tokenizer_config.json with the chat template, generation_config.json), read with the `gguf` package.

Quantized tensors are dequantized by gguf's own code. llama.cpp's converter permutes the rows of Q and K so that
RoPE rotates adjacent pairs; they are permuted back to the Hugging Face (rotate-half) layout here. The tokenizer is
rebuilt from the GGUF vocabulary and merges as a byte-level BPE `tokenizers` tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .convert import ConvertError

NAMES = {  # GGUF tensor name (per block: blk.{i}.) -> Hugging Face llama name
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# GGUF pre-tokenizer names whose splitting is GPT-2 byte-level with single digits (SmolLM's tokenizer.json)
DIGIT_SPLIT = ("smollm", "gpt-2", "gpt2")


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows (pair i: 2i, 2i+1) -> (i, i + head_dim/2)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray], Any]:
    """(transformers llama config dict, fp32 tensors with HF names, the reader for tokenizer metadata)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises plain ValueError/struct errors on a non-GGUF file
        raise ConvertError(f"{path} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConvertError(f"{path}: architecture {arch!r}; only llama-family GGUF files convert (GQA/MHA llama)")
    a = "llama."
    heads = int(_field(reader, a + "attention.head_count"))
    kv_heads = int(_field(reader, a + "attention.head_count_kv", heads))
    hidden = int(_field(reader, a + "embedding_length"))
    head_dim = int(_field(reader, a + "rope.dimension_count", hidden // heads))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = t.name
        if name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            hf = f"model.layers.{i}.{NAMES.get(rest, rest)}"
        else:
            hf = NAMES.get(name, name)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
        if hf.endswith("q_proj.weight"):
            w = unpermute(w, heads)
        elif hf.endswith("k_proj.weight"):
            w = unpermute(w, kv_heads)
        tensors[hf] = w
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, a + "vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if _field(reader, a + "rope.scaling.type") not in (None, "none"):
        raise ConvertError(f"{path}: rope scaling {_field(reader, a + 'rope.scaling.type')!r} is not converted")
    return cfg, tensors, reader


def build_tokenizer(reader: Any) -> tuple[Any, dict]:
    """(a `tokenizers` Tokenizer, tokenizer_config dict) from the GGUF's gpt2-style vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ConvertError(f"tokenizer model {kind!r}: only GPT-2 style byte-level BPE vocabularies are rebuilt")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    steps: list[Any] = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre in DIGIT_SPLIT:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    elif pre != "default":
        steps.insert(0, pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(special)

    def token(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
    }
    return tok, {k: v for k, v in config.items() if v is not None}


def write_hf_folder(gguf_path: Path, out: Path) -> dict:
    """Dequantize a llama GGUF into a Hugging Face folder at `out` (atomic); returns the config dict."""
    import torch
    from safetensors.torch import save_file

    from .checkpoint import atomic_folder

    cfg, tensors, reader = read_gguf(gguf_path)
    tok, tok_cfg = build_tokenizer(reader)
    with atomic_folder(out) as tmp:
        save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return cfg

"""A dense MLA checkpoint (DeepSeek-V2/V3 format) -> a `deepseek2` GGUF that llama.cpp runs with its MLA latent
cache, written with the `gguf` package directly (no llama.cpp script).

What llama.cpp needs that the Hugging Face checkpoint does not say the same way:
- llama.cpp always rotates adjacent pairs; a checkpoint with `rope_interleave: false` rotates halves, so the rope
  rows of the query projection and of `k_pe` in `kv_a_proj_with_mqa` are permuted into pairs (`rope_pairs`);
- `kv_b_proj` is split per head into `attn_k_b` (stored transposed) and `attn_v_b`, the absorbed form its MLA uses;
- `q_lora_rank` is written as 0 when there is none, and MLA is declared as one KV head of width R + rope;
- a dense model gets no MoE fields but the two that llama.cpp's loader insists on (both unused); a mixture of
  experts gets its router (`ffn_gate_inp`, V3's `exp_probs_b` bias), stacked experts (`ffn_*_exps`), shared experts
  (`ffn_*_shexp`) and the routing fields (count, used, groups, gating function, normalization, scale);
- YaRN is written as llama.cpp's deepseek2 reads it: factor, original context, beta_fast/slow, and
  yarn_log_multiplier = 0.1 * mscale_all_dim, which it squares into the softmax scale as transformers does;
- the tokenizer is GPT-2 byte-level BPE with its pre-tokenizer named as llama.cpp names it.
What llama.cpp's deepseek2 cannot say is refused with one line: MiniCPM3 (and so LongRoPE), a YaRN whose cos/sin
factor is not 1 (mscale != mscale_all_dim), V2's group_limited_greedy routing with more than one group (llama.cpp
ranks groups by their two best scores, V3's rule), and MoE without shared experts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mla_edge.contract import InputError

GGUF_TYPES = ("f32", "f16", "q8_0")


def rope_pairs(d: int) -> np.ndarray:
    """Row order that turns rotate-half rope rows (i pairs with i + d/2) into adjacent pairs (2i, 2i + 1)."""
    return np.stack([np.arange(d // 2), np.arange(d // 2) + d // 2], 1).reshape(-1)


def _pre_tokenizer(tok: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, or one clear line when it has none."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if tok.get("model", {}).get("type") == "BPE" and kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise InputError(f"tokenizer pre-tokenization {kinds} has no llama.cpp equivalent here (GPT-2 byte-level only)")


def _tokenizer(w: Any, folder: Path, bos: int | None, eos: int | None, vocab_size: int) -> None:
    """The tokenizer, its list padded to the model's vocab_size with unused tokens (llama.cpp needs one entry per
    embedding row; models often have more rows than tokens, and llama.cpp's own converter pads the same way)."""
    import gguf

    tok = json.loads((folder / "tokenizer.json").read_text())
    pre = _pre_tokenizer(tok)
    vocab = dict(tok["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab.update(special)
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    if len(tokens) > vocab_size:
        raise InputError(f"tokenizer.json has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    pad = range(len(tokens), vocab_size)
    tokens += [f"[PAD{i}]" for i in pad]
    types += [gguf.TokenType.UNUSED for _ in pad]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    w.add_add_bos_token(bos is not None)  # as our runtime does: bos first when the model has one
    tc = folder / "tokenizer_config.json"
    if tc.is_file() and (template := json.loads(tc.read_text()).get("chat_template")):
        w.add_chat_template(template)


def write_gguf(
    model_dir: str | Path, dst: str | Path, gguf_type: str = "q8_0", progress: Callable[[int, int], None] | None = None
) -> dict:
    """Write `dst` (atomically: a temporary name, renamed when whole); returns a summary of what was written."""
    import gguf
    from safetensors.torch import load_file

    model_dir, dst = Path(model_dir), Path(dst)
    if gguf_type not in GGUF_TYPES:
        raise InputError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    cfg = check_gguf(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    state = {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    H, R, dn, dr, dv = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                        cfg.v_head_dim)  # fmt: skip
    perm = np.arange(dr) if raw.get("rope_interleave", True) else rope_pairs(dr)

    def q_rows(w: np.ndarray) -> np.ndarray:  # per head: [nope | rope], rope rows into pairs
        w = w.reshape(H, dn + dr, -1)
        return np.concatenate([w[:, :dn], w[:, dn:][:, perm]], 1).reshape(H * (dn + dr), -1)

    tensors: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        return state[name].float().numpy()

    # llama.cpp's deepseek2 applies rms_norm_eps to the latent norms, which the checkpoint builds with eps 1e-6
    # (cfg.latent_norm_eps). Scaling the latent rows by k makes them the same function: k c / sqrt(k^2 ms + eps) =
    # c / sqrt(ms + eps / k^2), so k = sqrt(rms_norm_eps / latent_norm_eps) turns llama.cpp's eps into ours, exactly.
    k = float(np.sqrt(cfg.rms_norm_eps / cfg.latent_norm_eps))

    tensors["token_embd.weight"] = get("model.embed_tokens.weight")
    tensors["output_norm.weight"] = get("model.norm.weight")
    if "lm_head.weight" in state and not cfg.tie_word_embeddings:
        tensors["output.weight"] = get("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        a = p + "self_attn."
        tensors[b + "attn_norm.weight"] = get(p + "input_layernorm.weight")
        tensors[b + "ffn_norm.weight"] = get(p + "post_attention_layernorm.weight")
        if cfg.q_lora_rank:
            tensors[b + "attn_q_a.weight"] = get(a + "q_a_proj.weight") * k
            tensors[b + "attn_q_a_norm.weight"] = get(a + "q_a_layernorm.weight")
            tensors[b + "attn_q_b.weight"] = q_rows(get(a + "q_b_proj.weight"))
        else:
            tensors[b + "attn_q.weight"] = q_rows(get(a + "q_proj.weight"))
        kv_a = get(a + "kv_a_proj_with_mqa.weight")
        tensors[b + "attn_kv_a_mqa.weight"] = np.concatenate([kv_a[:R] * k, kv_a[R:][perm]])
        tensors[b + "attn_kv_a_norm.weight"] = get(a + "kv_a_layernorm.weight")
        kv_b = get(a + "kv_b_proj.weight").reshape(H, dn + dv, R)
        tensors[b + "attn_k_b.weight"] = np.ascontiguousarray(kv_b[:, :dn].transpose(0, 2, 1))  # (H, R, dn)
        tensors[b + "attn_v_b.weight"] = np.ascontiguousarray(kv_b[:, dn:])  # (H, dv, R)
        tensors[b + "attn_output.weight"] = get(a + "o_proj.weight")
        if not cfg.moe_layer(i):
            for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                tensors[b + theirs + ".weight"] = get(p + f"mlp.{ours}.weight")
            continue
        tensors[b + "ffn_gate_inp.weight"] = get(p + "mlp.gate.weight")  # (E, C)
        if cfg.topk_method == "noaux_tc":
            tensors[b + "exp_probs_b.bias"] = get(p + "mlp.gate.e_score_correction_bias")
        for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            experts = [get(p + f"mlp.experts.{j}.{ours}.weight") for j in range(cfg.n_routed_experts)]
            tensors[b + theirs + "_exps.weight"] = np.stack(experts)  # (E, I, C), down (E, C, I)
            tensors[b + theirs + "_shexp.weight"] = get(p + f"mlp.shared_experts.{ours}.weight")  # always some
    state.clear()

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]  # fmt: skip
    tmp = dst.with_name(f".{dst.name}.partial")
    w = gguf.GGUFWriter(str(tmp), "deepseek2")
    w.add_name(model_dir.resolve().name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(1)  # MLA as MQA over the latent: one "KV head" of width R + rope
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace if cfg.is_moe else cfg.num_hidden_layers)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(R)
    w.add_key_length(R + dr)
    w.add_value_length(R)
    w.add_key_length_mla(dn + dr)
    w.add_value_length_mla(dv)
    w.add_rope_dimension_count(dr)
    if cfg.is_moe:
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        # ours (as transformers): only sigmoid scores are renormalized over the chosen experts
        w.add_expert_weights_norm(cfg.scoring_func == "sigmoid" and cfg.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType[cfg.scoring_func.upper()])  # softmax | sigmoid
        if cfg.topk_method == "noaux_tc" and cfg.n_group > 1:
            w.add_expert_group_count(cfg.n_group)
            w.add_expert_group_used_count(cfg.topk_group)
    else:
        # llama.cpp's deepseek2 loader reads these two even for a dense model (every layer is a leading dense
        # block, so neither is used); no expert count, router or scaling fields are written
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        w.add_expert_shared_count(0)
    if (rs := cfg.rope_scaling) is not None:  # YaRN (anything else was refused)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs.factor)
        w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings)
        w.add_rope_scaling_yarn_log_mul(0.1 * (rs.mscale_all_dim or 0.0))
        w.add_rope_scaling_yarn_beta_fast(rs.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(rs.beta_slow)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(w, model_dir, cfg.bos_token_id, cfg.eos_token_id[0] if cfg.eos_token_id else None, cfg.vocab_size)
    types: dict[str, str] = {}
    for k, (name, t) in enumerate(tensors.items()):
        kind = "f32" if t.ndim == 1 else gguf_type
        if kind == "q8_0" and t.shape[-1] % 32:
            kind = "f16"  # Q8_0 blocks are 32 along the row
        if kind == "q8_0":
            w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        else:
            w.add_tensor(name, t.astype(np.float16 if kind == "f16" else np.float32))
        types[name] = kind
        if progress:
            progress(k + 1, len(tensors))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": dst.name, "gguf_type": gguf_type, "tensors": len(tensors), "rope_permuted": not np.array_equal(
        perm, np.arange(dr)), "types": sorted(set(types.values()))}  # fmt: skip


def check_gguf(model_dir: str | Path) -> Any:
    """The model's config, or one clear line for what llama.cpp's deepseek2 cannot compute the way the checkpoint
    does; run before any export work, so that a refused model leaves nothing behind."""
    from mla_edge.models.config import MLAConfig
    from mla_edge.models.rope import inv_freq_and_factor

    model_dir = Path(model_dir)
    cfg = MLAConfig.from_pretrained(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"{model_dir} has no tokenizer.json: a GGUF carries its tokenizer")
    from mla_edge.models.families import FAMILIES

    if FAMILIES[cfg.model_type].gguf:  # e.g. MiniCPM3: llama.cpp's own minicpm3 architecture
        raise InputError(f"{model_dir} is {cfg.model_type}: {FAMILIES[cfg.model_type].gguf}")
    if cfg.mlp_layer_types is not None and cfg.is_moe:
        if any(cfg.moe_layer(i) != (i >= cfg.first_k_dense_replace) for i in range(cfg.num_hidden_layers)):
            raise InputError(
                f"{model_dir}: MoE layers {cfg.mlp_layer_types} are not 'dense layers first, then MoE', the only "
                "pattern llama.cpp's deepseek2 has (leading_dense_block_count)"
            )
    if cfg.attention_bias:
        raise InputError(f"{model_dir}: attention_bias is true; llama.cpp's deepseek2 has no attention biases")
    rs = cfg.rope_scaling
    if rs is not None and rs.rope_type != "yarn":
        raise InputError(f"{model_dir} uses {rs.rope_type} rope scaling: llama.cpp's deepseek2 has YaRN only")
    if rs is not None and abs(inv_freq_and_factor(cfg)[1] - 1.0) > 1e-6:
        raise InputError(
            f"{model_dir}: YaRN with mscale {rs.mscale} != mscale_all_dim {rs.mscale_all_dim} scales cos/sin, which "
            "llama.cpp's deepseek2 does not (it takes only the softmax scale from mscale_all_dim)"
        )
    if not cfg.n_routed_experts:
        return cfg
    if cfg.topk_method == "group_limited_greedy" and cfg.n_group > 1:
        raise InputError(
            f"{model_dir}: group_limited_greedy routing (groups ranked by their best score) has no llama.cpp "
            "equivalent (it ranks groups by their two best scores, DeepSeek-V3's noaux_tc rule)"
        )
    if not cfg.n_shared_experts:
        raise InputError(f"{model_dir}: llama.cpp's deepseek2 needs shared experts (n_shared_experts is 0)")
    return cfg  # (MoE layers are every layer from first_k_dense_replace on, in our config as in llama.cpp's)


def add_gguf(model_dir: str | Path, out_dir: str | Path, gguf_type: str = "q8_0", force: bool = False) -> dict:
    """Write OUT_DIR/model.<type>.gguf beside an mla-edge export and list it (path, bytes, sha256) under the
    manifest's "gguf" key. An existing GGUF is replaced only with force."""
    from mla_edge.runtime.manifest import Manifest, record_file

    out_dir = Path(out_dir)
    Manifest.read(out_dir)  # one clear line when OUT_DIR is not an export
    # the export's own cache dtype says nothing to a GGUF: llama.cpp picks its cache type at load (f16 by default)
    dst = out_dir / f"model.{gguf_type}.gguf"
    if dst.exists() and not force:
        raise InputError(f"{dst} already exists; pass --force to replace it")
    info = write_gguf(model_dir, dst, gguf_type)
    return record_file(out_dir, "gguf", gguf_type, dst, architecture="deepseek2", rope_permuted=info["rope_permuted"])

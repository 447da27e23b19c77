"""GQA/MHA (llama family) -> MLA in DeepSeek-V3's own format, training-free: partial RoPE, one shared rope key,
and an activation-aware low-rank latent for the non-rope keys and the values.

Per layer, with head_dim d, rope dim D (the D/2 highest-frequency RoPE pairs keep their rotation), G KV heads:
- q_proj rows per head are reordered to DeepSeek's [q_nope (d - D) | q_pe (D)]; the kept pairs keep their
  frequencies because rope_theta becomes theta^(D/d) (DeepSeek computes frequencies over D dims, llama over d).
- k_pe, one per token for all heads: per kept pair, the G heads' rope keys (complex numbers, since RoPE is a complex
  rotation) are replaced by their top complex principal component on calibration activations; each query head's
  pe rows absorb its group's coefficient, so RoPE's relative-position form is kept exactly.
- [W_k_nope; W_v] (G (2d - D) rows, M) is factored as B A: A (kv_a_proj's latent rows) is M's top R right singular
  vectors; B (kv_b_proj, repeated per query head of each group) is the least-squares fit, on the calibration
  activations, of the true keys and values from the latent after DeepSeek's RMS norm (kv_a_layernorm = 1, eps 1e-6
  as transformers builds it, whatever rms_norm_eps says), so the norm the latent passes through is part of the fit.
  A's rows are scaled so the latent's mean square is 1 on the calibration tokens: no reader's eps (transformers'
  1e-6, llama.cpp's rms_norm_eps) then changes what the checkpoint means.
Everything else (embeddings, norms, MLP, o_proj) is copied. Calibration text is never the evaluation text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mla_edge.contract import InputError, kv_elements

from .families import DEFAULT_NORM_EPS

# 2: the latent is fitted under kv_a_layernorm's eps 1e-6 (as transformers builds it), not rms_norm_eps
# 3: and scaled to a mean square of 1 on the calibration tokens, so that no reader's eps matters
CONVERT_REVISION = 3


class ConvertError(InputError):
    """A source model or option the conversion cannot take; the message names it."""


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    theta: float
    eps: float


def llama_shape(cfg: dict) -> LlamaShape:
    """The llama-family fields the conversion needs, from a transformers config dict; refuses what it cannot map."""
    if cfg.get("model_type") not in ("llama", None):
        raise ConvertError(f"model_type {cfg.get('model_type')!r}: only llama-family (GQA/MHA) models convert")
    for k, v in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if cfg.get(k, v) != v:
            raise ConvertError(f"{k} is {cfg.get(k)!r}: DeepSeek-V3's format has no place for it (needs {v!r})")
    rope = cfg.get("rope_scaling") or {}
    params = cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type")) or params.get("rope_type", "default")
    if kind not in (None, "default"):
        raise ConvertError(f"rope scaling {kind!r} is not converted (only plain RoPE)")
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    return LlamaShape(
        hidden=int(cfg["hidden_size"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        layers=int(cfg["num_hidden_layers"]),
        theta=float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        eps=float(cfg.get("rms_norm_eps", 1e-6)),
    )


def check_ranks(shape: LlamaShape, kv_lora_rank: int, rope_dim: int) -> None:
    d, G = shape.head_dim, shape.kv_heads
    if rope_dim <= 0 or rope_dim % 2 or rope_dim >= d:
        raise ConvertError(f"--rope-dim must be even and between 2 and head_dim - 2 ({d - 2}), got {rope_dim}")
    width = G * (2 * d - rope_dim)
    if not 1 <= kv_lora_rank <= width:
        raise ConvertError(
            f"--kv-lora-rank must be between 1 and the non-rope key + value width {width} "
            f"({G} KV heads x (2 x {d} - {rope_dim})), got {kv_lora_rank}"
        )


def deepseek_config(src: dict, shape: LlamaShape, kv_lora_rank: int, rope_dim: int) -> dict:
    """A dense DeepSeek-V3 config.json for the converted model (fields only DeepSeek-V3 defines; no new dialect)."""
    d = shape.head_dim
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": src["vocab_size"],
        "hidden_size": shape.hidden,
        "intermediate_size": src["intermediate_size"],
        "moe_intermediate_size": src["intermediate_size"],
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "n_routed_experts": 1,  # unused: every layer is dense (first_k_dense_replace = num_hidden_layers)
        "n_shared_experts": 0,
        "num_experts_per_tok": 1,
        "first_k_dense_replace": shape.layers,
        "n_group": 1,
        "topk_group": 1,
        "q_lora_rank": None,
        "kv_lora_rank": kv_lora_rank,
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": d - rope_dim,
        "v_head_dim": d,
        "hidden_act": "silu",
        "max_position_embeddings": src.get("max_position_embeddings", 2048),
        "rms_norm_eps": src.get("rms_norm_eps", 1e-6),
        "rope_theta": shape.theta ** (rope_dim / d),
        "rope_scaling": None,
        "rope_interleave": False,
        "attention_bias": False,
        "tie_word_embeddings": bool(src.get("tie_word_embeddings", False)),
        "bos_token_id": src.get("bos_token_id"),
        "eos_token_id": src.get("eos_token_id"),
        "pad_token_id": src.get("pad_token_id"),
        "torch_dtype": "float32",
    }


def _pairs(d: int, rope_dim: int) -> tuple[list[int], list[int]]:
    """Row indices within a rotate-half head: the kept pairs' dims in DeepSeek's half layout, and the others."""
    keep = list(range(rope_dim // 2))
    drop = list(range(rope_dim // 2, d // 2))
    return keep + [i + d // 2 for i in keep], drop + [i + d // 2 for i in drop]


@torch.no_grad()
def convert_layer(
    w: dict[str, torch.Tensor],
    x: torch.Tensor,
    shape: LlamaShape,
    kv_lora_rank: int,
    rope_dim: int,
    ridge: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """One layer's attention: w holds q/k/v weights (HF rotate-half layout, rows = output dims), x the layer's
    attention inputs on calibration text (N, C). Returns q_proj, kv_a_proj_with_mqa, kv_a_layernorm and kv_b_proj."""
    d, D, H, G, C = shape.head_dim, rope_dim, shape.heads, shape.kv_heads, shape.hidden
    rep = H // G
    x = x.double()
    pe_rows, nope_rows = _pairs(d, D)
    wq = w["q_proj"].double().view(H, d, C)
    wk = w["k_proj"].double().view(G, d, C)
    wv = w["v_proj"].double().view(G, d, C)

    # the shared rope key: per kept pair, the top complex principal component of the G heads' keys
    half = D // 2
    k_re, k_im = wk[:, :half], wk[:, d // 2 : d // 2 + half]  # (G, half, C): pair i = (dim i, dim i + d/2)
    keys = torch.complex(torch.einsum("ghc,nc->nhg", k_re, x), torch.einsum("ghc,nc->nhg", k_im, x))  # (N, half, G)
    coef = torch.empty(half, G, dtype=torch.complex128)
    for i in range(half):
        _, _, vh = torch.linalg.svd(keys[:, i, :], full_matrices=False)
        coef[i] = vh[0]  # u (unit): k_g ~ s u_g with the shared key s = sum_g conj(u_g) k_g
    # rows of s = sum_g conj(u_g) (k_re + i k_im)
    a = coef.conj()  # (half, G)
    s_re = torch.einsum("hg,ghc->hc", a.real, k_re) - torch.einsum("hg,ghc->hc", a.imag, k_im)
    s_im = torch.einsum("hg,ghc->hc", a.imag, k_re) + torch.einsum("hg,ghc->hc", a.real, k_im)
    k_pe = torch.cat([s_re, s_im])  # (D, C) in DeepSeek's half layout

    # q_pe: RoPE's score on pair i is Re(conj(q) k) for complex q = q_re + i q_im (dims i, i + d/2); with
    # k_g ~ s u_g it is Re(conj(q) u_g s) = Re(conj(conj(u_g) q) s): the new query is conj(u_g) q
    q_rows = []
    for h in range(H):
        g = h // rep
        q_re, q_im = wq[h, :half], wq[h, d // 2 : d // 2 + half]
        u = coef[:, g][:, None]  # (half, 1)
        nq_re = u.real * q_re + u.imag * q_im  # Re(conj(u) q) = u_re q_re + u_im q_im
        nq_im = u.real * q_im - u.imag * q_re  # Im(conj(u) q)
        q_rows.append(torch.cat([wq[h, nope_rows], nq_re, nq_im]))
    q_proj = torch.cat(q_rows)  # (H * d, C): per head [nope (d - D) | pe (D)]

    # the latent: A spans the top right singular vectors of [k_nope; v] (G (2d - D) rows); B is fitted by least
    # squares to the calibration keys and values from the latent *after* DeepSeek's RMS norm, so the norm is part
    # of the fit (measured on SmolLM2: the whitened activation-aware A keeps the latent's RMS far less steady
    # across tokens, and its held-out key/value error after the norm is 2-3x larger)
    m = torch.cat([torch.cat([wk[g, nope_rows], wv[g]]) for g in range(G)])  # (G (2d - D), C)
    R = kv_lora_rank
    a_lat = torch.linalg.svd(m, full_matrices=False)[2][:R]  # (R, C), orthonormal rows
    # scaled so that the latent's mean square is 1 on the calibration tokens: then the latent norm's eps (1e-6 in
    # transformers and here, rms_norm_eps in llama.cpp's own converter and runtime) is irrelevant to whoever reads
    # the checkpoint (a norm is scale-free but for its eps), and the fit below is for that exact latent
    a_lat = a_lat / (x @ a_lat.T).pow(2).mean().sqrt().clamp(min=1e-12)
    c = x @ a_lat.T
    c = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + DEFAULT_NORM_EPS)  # kv_a_layernorm's eps (not rms_norm_eps)
    target = x @ m.T  # (N, G (2d - D))
    gram = c.T @ c
    gram += ridge * gram.diagonal().mean() * torch.eye(R, dtype=gram.dtype)
    b_lat = torch.linalg.solve(gram, c.T @ target).T  # (G (2d - D), R)
    b_groups = b_lat.view(G, 2 * d - D, R)
    kv_b = torch.cat([b_groups[h // rep] for h in range(H)])  # (H (2d - D), R): per head [k_nope | v]
    return {
        "q_proj.weight": q_proj.float(),
        "kv_a_proj_with_mqa.weight": torch.cat([a_lat, k_pe]).float(),
        "kv_a_layernorm.weight": torch.ones(R),
        "kv_b_proj.weight": kv_b.float(),
    }


def attention_inputs(model: Any, ids: list[list[int]]) -> list[torch.Tensor]:
    """Each layer's attention input (after input_layernorm) over calibration windows, from a transformers llama."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(
            lambda m, args, out, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.inference_mode():
            for window in ids:
                model(input_ids=torch.tensor([window]))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(c) for c in captured]


def convert_state(
    state: dict[str, torch.Tensor], inputs: list[torch.Tensor], shape: LlamaShape, kv_lora_rank: int, rope_dim: int
) -> dict[str, torch.Tensor]:
    """A llama state dict (HF names, rotate-half q/k) -> a DeepSeek-V3 state dict with the MLA attention."""
    out = {}
    for name, t in state.items():
        if ".self_attn." in name and not name.endswith("o_proj.weight"):
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        out[name] = t.float()
    for i in range(shape.layers):
        p = f"model.layers.{i}.self_attn."
        w = {k: state[p + k + ".weight"] for k in ("q_proj", "k_proj", "v_proj")}
        for k, v in convert_layer(w, inputs[i], shape, kv_lora_rank, rope_dim).items():
            out[p + k] = v
    return out


def summary(shape: LlamaShape, kv_lora_rank: int, rope_dim: int) -> dict:
    mla, d = kv_lora_rank + rope_dim, shape.head_dim
    mha = kv_elements(shape.heads, d, d)
    return {
        "cache_elements_per_token_per_layer": mla,
        "gqa_elements": kv_elements(shape.kv_heads, d, d),
        "mha_elements": mha,
        "vs_mha": mla / mha,
        "rope_theta": shape.theta ** (rope_dim / d),
    }


def calibration_windows(ids: list[int], windows: int, length: int, seed: int = 0) -> list[list[int]]:
    """`windows` windows of `length` tokens at evenly spread offsets of the calibration text."""
    if len(ids) < length:
        raise ConvertError(f"calibration text is too short: {len(ids)} tokens, need at least {length}")
    starts = torch.linspace(0, len(ids) - length, windows).long().unique().tolist()
    return [ids[s : s + length] for s in starts]


@dataclass
class Source:
    """A llama model read for conversion: its config dict, fp32 state dict (HF names), tokenizer and the text files
    the converted folder carries over (tokenizer, chat template, generation config)."""

    path: Path
    cfg: dict
    state: dict[str, torch.Tensor]
    tokenizer: Any
    files: dict[str, str]

    def llama(self) -> Any:
        """The source as transformers' LlamaForCausalLM (eager attention, eval mode), sharing the state's tensors."""
        import transformers as tf

        cfg = tf.LlamaConfig(**{k: v for k, v in self.cfg.items() if k not in ("architectures", "model_type")})
        cfg._attn_implementation = "eager"
        with torch.device("meta"):
            llama = tf.LlamaForCausalLM(cfg)
        llama.load_state_dict(self.state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            llama.tie_weights()
        llama.model.rotary_emb = type(llama.model.rotary_emb)(cfg)  # its buffers were on the meta device
        return llama.eval()


def read_source(src: str | Path) -> Source:
    """A llama GGUF file or Hugging Face llama folder, read and checked (one ConvertError line when it cannot be)."""
    import json

    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from .gguf_llama import build_tokenizer, read_gguf

    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src} not found (a llama .gguf file or Hugging Face llama folder)")
    files: dict[str, str] = {}
    if src.suffix == ".gguf" and src.is_file():
        cfg, arrays, reader = read_gguf(src)
        tok, tok_cfg = build_tokenizer(reader)
        state = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
        files["tokenizer.json"] = tok.to_str()
        files["tokenizer_config.json"] = json.dumps(tok_cfg, indent=2)
    elif src.is_dir() and (src / "config.json").is_file():
        cfg = json.loads((src / "config.json").read_text())
        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            raise ConvertError(f"{src} has no *.safetensors weights (pickle checkpoints are never loaded)")
        state = {k: v for f in shards for k, v in load_file(str(f)).items()}
        if not (src / "tokenizer.json").is_file():
            raise ConvertError(f"{src} has no tokenizer.json: the calibration text cannot be tokenized")
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (src / name).is_file():
                files[name] = (src / name).read_text()
    else:
        raise ConvertError(f"{src} is neither a .gguf file nor a Hugging Face model folder with a config.json")
    llama_shape(cfg)  # refuses what cannot be mapped before anything is computed
    return Source(src, cfg, {k: v.float() for k, v in state.items()}, tok, files)


def convert_checkpoint(
    src: str | Path | Source,
    out: str | Path,
    kv_lora_rank: int,
    rope_dim: int,
    calibration_text: str | Path,
    windows: int = 32,
    window: int = 512,
) -> dict:
    """A llama GGUF file or Hugging Face llama folder (or one already read) -> a DeepSeek-V3 MLA checkpoint folder
    (config.json, model.safetensors, tokenizer files, chat template), written atomically; returns a summary."""
    import json

    from safetensors.torch import save_file

    from .checkpoint import atomic_folder

    out = Path(out)
    calibration_text = Path(calibration_text)
    if not calibration_text.is_file():
        raise ConvertError(f"calibration text {calibration_text} not found (pass --calibration-text FILE)")
    source = src if isinstance(src, Source) else read_source(src)
    cfg, files = source.cfg, source.files
    shape = llama_shape(cfg)
    check_ranks(shape, kv_lora_rank, rope_dim)
    llama = source.llama()
    ids = source.tokenizer.encode(calibration_text.read_text(encoding="utf-8")).ids
    calib = calibration_windows(ids, windows, window)
    inputs = attention_inputs(llama, calib)
    new = convert_state(llama.state_dict(), inputs, shape, kv_lora_rank, rope_dim)
    if cfg.get("tie_word_embeddings"):
        new.pop("lm_head.weight", None)
    config = deepseek_config(cfg, shape, kv_lora_rank, rope_dim)
    with atomic_folder(out) as tmp:
        save_file({k: v.contiguous() for k, v in new.items()}, str(tmp / "model.safetensors"), {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, text in files.items():
            (tmp / name).write_text(text)
        marker = {"source": str(source.path), **summary(shape, kv_lora_rank, rope_dim)}
        (tmp / ".mla-edge-convert").write_text(json.dumps(marker) + "\n")  # what --force may replace
        if "generation_config.json" not in files:
            gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return {
        "source": str(source.path),
        "out": str(out),
        "calibration_tokens": sum(len(w) for w in calib),
        **summary(shape, kv_lora_rank, rope_dim),
    }

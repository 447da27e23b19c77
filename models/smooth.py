"""Activation smoothing before int8 (SmoothQuant's idea): move each input channel's outlier scale from the
activations into the weights, through a norm or projection that feeds them, so that the model computes the same
function in exact arithmetic while dynamic int8's per-tensor activation scale no longer has to span outliers.

For input channel j of the matrices W that one activation X feeds: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha);
X_j is divided by s_j where it is made and W[:, j] is multiplied by s_j. The places that make X here:
- input_layernorm's weight        -> q_proj (or q_a_proj) and kv_a_proj_with_mqa;
- post_attention_layernorm's weight -> gate_proj and up_proj (dense MLP layers);
- up_proj's rows (silu(gate) * up is linear in up) -> down_proj.
MoE layers, o_proj and the (often tied) LM head are left as they are.
"""

from __future__ import annotations

from typing import Any

import torch

from .mla import MLAForCausalLM


@torch.no_grad()
def activation_amax(model: MLAForCausalLM, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of every activation that smoothing moves, over the calibration windows: the outputs of
    each layer's two norms (what the attention projections and gate/up read) and the input of each down_proj."""
    amax: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> None:
        x = x.detach().abs().flatten(0, -2).amax(0).float()
        amax[name] = torch.maximum(amax[name], x) if name in amax else x

    hooks = []
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ("input_layernorm", "post_attention_layernorm"):
            hooks.append(mod.register_forward_hook(lambda m, args, out, name=name: keep(name, out)))
        elif isinstance(mod, torch.nn.Linear) and last == "down_proj":
            hooks.append(mod.register_forward_pre_hook(lambda m, args, name=name: keep(name, args[0])))
    try:
        for w in windows:
            model(torch.tensor([w]))
    finally:
        for h in hooks:
            h.remove()
    return amax


def _scale(x_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_amax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).float()
    s = x_amax.clamp(min=1e-5) ** alpha / w_amax.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-2, max=1e2)


@torch.no_grad()
def smooth(model: MLAForCausalLM, windows: list[list[int]], alpha: float = 0.5) -> dict:
    """Smooth `model` in place (see the module doc); returns what was done, for the manifest."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"smoothing alpha must be between 0 and 1, got {alpha}")
    amax = activation_amax(model, windows)
    done = 0
    layers: list[Any] = list(model.model.layers)
    for i, layer in enumerate(layers):
        attn, p = layer.self_attn, f"model.layers.{i}."
        q = attn.q_proj if hasattr(attn, "q_proj") else attn.q_a_proj
        consumers = [q.weight, attn.kv_a_proj_with_mqa.weight]
        s = _scale(amax[p + "input_layernorm"], consumers, alpha).to(q.weight.dtype)
        layer.input_layernorm.weight.div_(s)
        for w in consumers:
            w.mul_(s)
        done += 1
        mlp = layer.mlp
        if not hasattr(mlp, "gate_proj"):
            continue  # an MoE layer
        s = _scale(amax[p + "post_attention_layernorm"], [mlp.gate_proj.weight, mlp.up_proj.weight], alpha)
        layer.post_attention_layernorm.weight.div_(s.to(mlp.gate_proj.weight.dtype))
        mlp.gate_proj.weight.mul_(s)
        mlp.up_proj.weight.mul_(s)
        s = _scale(amax[p + "mlp.down_proj"], [mlp.down_proj.weight], alpha)
        mlp.up_proj.weight.div_(s[:, None])
        mlp.down_proj.weight.mul_(s)
        done += 2
    if model.options.graph_weights:
        model.derive_graph_weights()  # the export's derived tensors follow the smoothed weights
    return {"alpha": alpha, "windows": len(windows), "tokens": sum(map(len, windows)), "smoothed_inputs": done}

"""Which int8 scaling for the latent cache: one scale per token (what the export does) or one per channel?

python -m mla_edge.models.cache_study [MODEL_DIR]      (default: the demo model and its heldout/calibration texts)

Per channel cannot be computed on the fly for an append-only cache (a new maximum would change every old token),
so it is measured here the way it would have to ship: static scales calibrated on calibration.txt, then perplexity
on heldout.txt with the model's cache quantized each way, against the float32 cache.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from . import mla
from .checkpoint import load_model
from .demo_path import default_model_dir


def _nll(model, ids: list[int], window: int = 256) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[s:s + window + 1]])
            if chunk.shape[1] < 2:
                break
            logits, _ = model(chunk[:, :-1])
            total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(total / count)


class _PerChannel:
    """Stands in for mla.quantize_per_token, whose calls come in a fixed order (layer 0 c_kv, layer 0 k_pe, ...).
    It returns the already dequantized values with a unit scale, so the model's cache plumbing is unchanged."""

    def __init__(self, n_calls: int, per_token):
        self.n, self.k, self.max, self.per_token = n_calls, 0, [None] * n_calls, per_token
        self.calibrating = True

    def __call__(self, x):
        i, self.k = self.k, (self.k + 1) % self.n
        if self.calibrating:
            m = x.abs().amax(dim=(0, 1))
            self.max[i] = m if self.max[i] is None else torch.maximum(self.max[i], m)
            return self.per_token(x)
        scale = self.max[i].clamp(min=1e-8) / 127.0
        dequantized = torch.round(x / scale).clamp(-127, 127) * scale
        return dequantized, torch.ones(*x.shape[:-1], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    model_dir = default_model_dir(args.model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    held = tok.encode((model_dir / "heldout.txt").read_text(encoding="utf-8")).ids[: args.tokens]
    calib = tok.encode((model_dir / "calibration.txt").read_text(encoding="utf-8")).ids
    model = load_model(model_dir)
    result = {"tokens": len(held), "float32": _nll(model, held)}
    model.set_cache_dtype("int8")
    result["int8_per_token"] = _nll(model, held)
    original = mla.quantize_per_token
    per_channel = _PerChannel(2 * model.cfg.num_hidden_layers, original)
    mla.quantize_per_token = per_channel
    try:
        _nll(model, calib)  # calibrate the static per-channel maxima
        per_channel.calibrating = False
        per_channel.k = 0
        result["int8_per_channel_static"] = _nll(model, held)
    finally:
        mla.quantize_per_token = original
    for k in ("int8_per_token", "int8_per_channel_static"):
        result[k + "_change"] = result[k] / result["float32"] - 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

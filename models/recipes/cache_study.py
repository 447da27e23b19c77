"""Which int8 scaling for the latent cache: one scale per token (what the export does) or one per channel?

python -m mla_edge.models.recipes.cache_study MODEL_DIR --heldout FILE --calibration FILE [--tokens 4096]

Per channel cannot be computed on the fly for an append-only cache (a new maximum would change every old token),
so it is measured here the way it would have to ship: static scales calibrated on the calibration text, then
perplexity on the held-out text with the model's cache quantized each way, against the float32 cache. Each scheme is
a cache quantizer passed to the model when it is built (ModelOptions.cache_quantizer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..mla import ModelOptions, quantize_per_token


class StaticPerChannel:
    """A cache quantizer with one fixed scale per channel for each (layer, kind). While calibrating it records the
    running max |x| per channel and quantizes per token; afterwards it uses the recorded scales. It returns the
    dequantized values as 'codes' with a unit scale, so the model's cache plumbing stays the same."""

    def __init__(self) -> None:
        self.max: dict[tuple[int, str], torch.Tensor] = {}
        self.calibrating = True

    def __call__(self, x: torch.Tensor, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, kind)
        if self.calibrating:
            m = x.abs().amax(dim=(0, 1))
            self.max[key] = torch.maximum(self.max[key], m) if key in self.max else m
            return quantize_per_token(x)
        scale = self.max[key].clamp(min=1e-8) / 127.0
        return torch.round(x / scale).clamp(-127, 127) * scale, torch.ones(*x.shape[:-1], 1)


def main(argv: list[str] | None = None) -> int:
    from tokenizers import Tokenizer

    from mla_edge.runtime.sampling import perplexity

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--heldout", type=Path, required=True, help="text scored for perplexity")
    ap.add_argument("--calibration", type=Path, required=True, help="text the static per-channel scales come from")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    tok = Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    held = tok.encode(args.heldout.read_text(encoding="utf-8")).ids[: args.tokens]
    calib = tok.encode(args.calibration.read_text(encoding="utf-8")).ids

    def ppl(options: ModelOptions, ids: list[int]) -> float:
        model = load_model(args.model_dir, options)
        with torch.inference_mode():
            return perplexity(lambda x: model(torch.as_tensor(x))[0].numpy(), ids, window=256)

    result: dict = {"tokens": len(held), "float32": ppl(ModelOptions(), held)}
    result["int8_per_token"] = ppl(ModelOptions(cache_dtype="int8"), held)
    per_channel = StaticPerChannel()
    options = ModelOptions(cache_dtype="int8", cache_quantizer=per_channel)
    ppl(options, calib)  # records the static per-channel maxima
    per_channel.calibrating = False
    result["int8_per_channel_static"] = ppl(options, held)
    for k in ("int8_per_token", "int8_per_channel_static"):
        result[k + "_change"] = result[k] / result["float32"] - 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

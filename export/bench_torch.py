"""PyTorch eager fp32 with the same latent cache, measured like the onnxruntime workers (see runtime/bench_core).

python -m mla_edge.export.bench_torch MODEL_DIR [--repeats N] [--threads T]
"""
from __future__ import annotations

import argparse
import time

from mla_edge.runtime.bench_core import PASTS, PROMPT_LENS, emit, measure, parse_lengths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--prompt-lens", type=parse_lengths, default=PROMPT_LENS)
    ap.add_argument("--pasts", type=parse_lengths, default=PASTS)
    a = ap.parse_args()
    import torch

    from mla_edge.models.checkpoint import load_model
    from mla_edge.models.mla import empty_cache
    from mla_edge.runtime.session import physical_cores

    torch.set_num_threads(a.threads or physical_cores())
    t = time.perf_counter()
    model = load_model(a.model_dir, attention="absorbed")
    load = time.perf_counter() - t

    @torch.inference_mode()
    def step(ids, mask, pos, cache):
        logits, cache = model(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask), cache)
        return logits.numpy(), cache

    res = measure(step, lambda b: empty_cache(model.cfg, b), model.cfg.vocab_size, a.repeats, prompt_lens=a.prompt_lens, pasts=a.pasts)
    emit({"backend": "torch-eager-fp32", "load_s": load, **res})


if __name__ == "__main__":
    main()

"""`mla-edge demo`: the whole pipeline on the embedded demo model, with no arguments and no network.

export to ONNX (cached after the first run) -> int8 -> parity summary -> generation -> memory summary.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from mla_edge.contract import MANIFEST, comparison
from mla_edge.models import DEMO_DIR
from mla_edge.models.config import MLAConfig
from mla_edge.runtime.generate import Generator
from mla_edge.runtime.manifest import Manifest, demo_export_dir

from .parity import format_table, run_parity
from .pipeline import ExportOptions, export_folder

DEFAULT_PROMPT = "It was a dark and stormy night, and"


def run_demo(
    prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 80, refresh: bool = False, out: TextIO = sys.stdout
) -> dict:
    """Export (cached under `demo_export_dir()` after the first run), check parity, generate, and compare memory,
    narrating to `out` (generated text streams there as it is decided). Returns everything measured."""

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    t_start = time.time()
    model_dir = DEMO_DIR
    export_dir = demo_export_dir()
    cfg = MLAConfig.from_pretrained(model_dir)
    report: dict = {"model_dir": str(model_dir), "export_dir": str(export_dir)}

    say(f"== 1. export + int8: {model_dir.name} -> {export_dir}")
    if refresh or not (export_dir / MANIFEST).is_file():
        t = time.time()
        export_folder(
            model_dir, export_dir, ExportOptions(quantize=("int8",), force=True, progress=sys.stderr.isatty())
        )
        say(f"   exported in {time.time() - t:.1f} s")
    else:
        say("   cached export found (use --refresh to redo it)")
    man = Manifest.read(export_dir)
    for prec, e in man.data["files"].items():
        say(f"   {prec:5s} {e['path']:18s} {e['bytes'] / 1e6:6.2f} MB")

    say("\n== 2. parity: PyTorch vs ONNX (prefill + 16 decode steps; perplexity on held-out text)")
    heldout = model_dir / "heldout.txt"
    text = heldout.read_text(encoding="utf-8") if heldout.is_file() else None
    par = run_parity(model_dir, export_dir, text, steps=16, ppl_tokens=2048)
    report["parity"] = par
    say(format_table(par))

    say(f"\n== 3. generate (int8, onnxruntime, no torch in the loop): {prompt!r}")
    gen = Generator(export_dir, "int8", provider="cpu")
    out.write(prompt)
    for piece in gen.stream(prompt, max_new_tokens=max_new_tokens):
        out.write(piece)
        out.flush()
    r = gen.last_result
    s = r.stats
    say(f"\n   [{r.finish_reason}] prefill {s['prefill_tok_s']:,.0f} tok/s, decode {s['decode_tok_s']:,.1f} tok/s")
    report["generate"] = {"prompt": prompt, "text": r.text, "stats": s}

    say("\n== 4. memory: the latent cache vs what MHA/GQA would keep")
    cmp = comparison(cfg)
    ctx = cfg.max_position_embeddings
    for form in ("mla", "gqa", "mha"):
        row = cmp[form]
        say(
            f"   {form.upper():4s} {row['elements_per_token_per_layer']:5d} elements/token/layer  "
            f"{row['bytes_per_token']:7,d} B/token  "
            f"{row['bytes_per_token'] * ctx / 2**20:7.2f} MiB at {ctx} tokens (fp32)"
        )
    say(
        f"   this run: {s['cache_bytes'] / 1024:.1f} KiB latent cache for {s['cache_tokens']} tokens "
        f"(MHA: {s['mha_cache_bytes'] / 1024:.1f} KiB); int8 model {man.data['files']['int8']['bytes'] / 1e6:.2f} MB; "
        f"peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB (this process also holds PyTorch)"
    )
    report["cache_comparison"] = cmp
    report["seconds"] = time.time() - t_start
    say(f"\ndone in {report['seconds']:.0f} s")
    return report

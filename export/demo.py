"""`mla-edge demo`: the whole pipeline on the embedded demo model, with no arguments and no network.

export to ONNX (cached after the first run) -> int8 -> parity summary -> generation -> memory summary.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "It was a dark and stormy night, and"


def add_arguments(p) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt for the generation step (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--refresh", action="store_true", help="export again even if a cached export exists")
    p.add_argument("--json", metavar="FILE", help="also write everything measured as JSON")


def _say(msg: str) -> None:
    print(msg, flush=True)


def run(args) -> int:
    from mla_edge.models.cache import comparison
    from mla_edge.models.config import MLAConfig
    from mla_edge.models.demo_path import default_model_dir
    from mla_edge.runtime.demo_export import demo_export_dir
    from mla_edge.runtime.generate import Generator
    from mla_edge.runtime.manifest import MANIFEST, Manifest

    from .parity import format_table, run_parity
    from .pipeline import ExportOptions, export_folder

    t_start = time.time()
    model_dir = default_model_dir(None)
    out = demo_export_dir()
    cfg = MLAConfig.from_pretrained(model_dir)
    report: dict = {"model_dir": str(model_dir), "export_dir": str(out)}

    _say(f"== 1. export + int8: {model_dir.name} -> {out}")
    if args.refresh or not (out / MANIFEST).is_file():
        t = time.time()
        export_folder(model_dir, out, ExportOptions(quantize=("int8",), force=True, progress=sys.stderr.isatty()))
        _say(f"   exported in {time.time() - t:.1f} s")
    else:
        _say("   cached export found (use --refresh to redo it)")
    man = Manifest.read(out)
    for prec, e in man.data["files"].items():
        _say(f"   {prec:5s} {e['path']:18s} {e['bytes'] / 1e6:6.2f} MB")

    _say("\n== 2. parity: PyTorch vs ONNX (prefill + 16 decode steps; perplexity on held-out text)")
    heldout = model_dir / "heldout.txt"
    text = heldout.read_text(encoding="utf-8") if heldout.is_file() else None
    par = run_parity(model_dir, out, text, steps=16, ppl_tokens=2048)
    report["parity"] = par
    _say(format_table(par))

    _say(f"\n== 3. generate (int8, onnxruntime, no torch in the loop): {args.prompt!r}")
    gen = Generator(out, "int8", provider="cpu")
    sys.stdout.write(args.prompt)
    for piece in gen.stream(args.prompt, max_new_tokens=args.max_new_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    r = gen.last_result
    s = r.stats
    _say(f"\n   [{r.finish_reason}] prefill {s['prefill_tok_s']:,.0f} tok/s, decode {s['decode_tok_s']:,.1f} tok/s")
    report["generate"] = {"prompt": args.prompt, "text": r.text, "stats": s}

    _say("\n== 4. memory: the latent cache vs what MHA/GQA would keep")
    cmp = comparison(cfg)
    ctx = cfg.max_position_embeddings
    for form in ("mla", "gqa", "mha"):
        row = cmp[form]
        _say(f"   {form.upper():4s} {row['elements_per_token_per_layer']:5d} elements/token/layer  "
             f"{row['bytes_per_token']:7,d} B/token  {row['bytes_per_token'] * ctx / 2**20:7.2f} MiB at {ctx} tokens (fp32)")
    _say(f"   this run: {s['cache_bytes'] / 1024:.1f} KiB latent cache for {s['cache_tokens']} tokens "
         f"(MHA: {s['mha_cache_bytes'] / 1024:.1f} KiB); int8 model {man.data['files']['int8']['bytes'] / 1e6:.2f} MB; "
         f"peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB (this process also holds PyTorch)")
    report["cache_comparison"] = cmp
    report["seconds"] = time.time() - t_start
    _say(f"\ndone in {report['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0

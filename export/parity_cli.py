"""`mla-edge parity [MODEL_DIR] OUT_DIR [--text FILE] [--steps N] [--json FILE]`."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("dirs", nargs="+", metavar="[MODEL_DIR] OUT_DIR",
                   help="the HF model folder and its export folder; with one folder, MODEL_DIR comes from the manifest")
    p.add_argument("--text", type=Path, help="text for perplexity (default: MODEL_DIR/heldout.txt when present)")
    p.add_argument("--steps", type=int, default=32, help="teacher-forced / greedy decode steps (default 32)")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="text tokens scored for perplexity (default 4096)")
    p.add_argument("--precision", nargs="+", help="precisions to compare (default: all in the export)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-' for stdout only)")


def run(args) -> int:
    from mla_edge.runtime.manifest import Manifest

    from .parity import format_table, run_parity, write_json

    if len(args.dirs) > 2:
        raise ValueError("give at most two folders: [MODEL_DIR] OUT_DIR")
    out_dir = Path(args.dirs[-1])
    manifest = Manifest.read(out_dir)
    model_dir = Path(args.dirs[0]) if len(args.dirs) == 2 else Path(manifest.data["source"]["model_dir"])
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    text_path = args.text or (model_dir / "heldout.txt" if (model_dir / "heldout.txt").is_file() else None)
    if text_path is not None and not Path(text_path).is_file():
        raise FileNotFoundError(f"--text {text_path} not found")
    text = Path(text_path).read_text(encoding="utf-8") if text_path else None
    report = run_parity(model_dir, out_dir, text, args.steps, args.ppl_tokens, precisions=args.precision,
                        progress=sys.stderr.isatty())
    report["text"] = str(text_path) if text_path else None
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
    return 0

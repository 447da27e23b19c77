"""`mla-edge bench [OUT_DIR] [--json FILE]`."""
from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="export folder (default: the demo model's cached export)")
    p.add_argument("--precision", nargs="+", help="onnxruntime precisions to measure (default: fp32 int8 int4 present)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement inside one process")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all backends (medians across rounds)")
    p.add_argument("--threads", type=int, help="threads for every backend (default: physical cores)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager baseline")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def run(args) -> int:
    from .bench import format_report, run_bench
    from .demo_export import default_export_dir

    if args.repeats < 1 or args.rounds < 1:
        raise ValueError(f"--repeats and --rounds must be >= 1, got {args.repeats} and {args.rounds}")
    out_dir = default_export_dir(args.out_dir)
    rep = run_bench(out_dir, args.precision, args.repeats, args.threads, not args.no_torch, rounds=args.rounds,
                    progress=lambda name: print(f"[bench] {name}", file=sys.stderr, flush=True))
    print(format_report(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0

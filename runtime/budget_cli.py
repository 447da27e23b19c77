"""`mla-edge budget [MODEL_DIR|OUT_DIR] --memory 512MB [--batch N] [--calibrate] [--json FILE]`."""
from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("folder", nargs="?", metavar="MODEL_DIR|OUT_DIR", help="HF model or export folder (default: the demo model)")
    p.add_argument("--memory", required=True, help="the memory budget, e.g. 512MB, 1.5GB, 300MiB")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calibrate", action="store_true",
                   help="measure the runtime overhead on this export (runs `mla-edge generate` at 3 contexts) instead of "
                        "using the demo model's measured calibration")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw memory against context for MHA, GQA and MLA (needs matplotlib)")
    p.add_argument("--plot-weights", default="int8", choices=["fp32", "fp16", "int8"])
    p.add_argument("--plot-cache", default="fp32", choices=["fp32", "fp16", "int8"])


def run(args) -> int:
    from mla_edge.models.demo_path import default_model_dir

    from .budget import calibrate, format_plan, parse_memory, plan, plot

    memory = parse_memory(args.memory)
    folder = default_model_dir(args.folder)
    cal = None
    if args.calibrate:
        from .manifest import MANIFEST
        if not (folder / MANIFEST).is_file():
            raise ValueError(f"--calibrate needs an export folder (with {MANIFEST}); {folder} is not one")
        cal = calibrate(folder)
    p = plan(folder, memory, args.batch, cal)
    print(format_plan(p))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(p, f, indent=2)
    if args.plot:
        print(f"plot: {plot(p, folder, args.plot, args.plot_weights, args.plot_cache)}")
    return 0

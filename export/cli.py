"""`mla-edge export [MODEL_DIR] -o OUT_DIR [--quantize ...]`: thin wrapper over export.pipeline.export_folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from mla_edge.models.demo_path import default_model_dir

from .pipeline import QUANT_CHOICES  # noqa: E402


def add_arguments(p) -> None:
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="HF model folder (default: the embedded demo model)")
    p.add_argument("-o", "--out", metavar="OUT_DIR", help="export folder to create (default: ./<model name>-onnx)")
    p.add_argument("--quantize", nargs="+", default=["int8"], choices=QUANT_CHOICES, metavar="P",
                   help="precisions besides fp32: none, int8 (dynamic), int4 (MatMulNBits), int8-qdq (static, calibrated); default int8")
    p.add_argument("--int4-block-size", type=int, default=32, help="int4 quantization block size (power of two >= 16)")
    p.add_argument("--calibration-text", type=Path, help="text file for int8-qdq calibration (default for the demo model: its calibration.txt)")
    p.add_argument("--cache-dtype", default="float32", choices=["float32", "int8"],
                   help="latent cache storage: float32, or int8 with a per-token scale (quantized in the graph)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args) -> int:
    from .pipeline import ExportOptions, export_folder

    model_dir = default_model_dir(args.model_dir)
    out = Path(args.out) if args.out else Path.cwd() / f"{model_dir.resolve().name}-onnx"
    calib = args.calibration_text
    if calib is None and (model_dir / "calibration.txt").is_file():
        calib = model_dir / "calibration.txt"
    opts = ExportOptions(quantize=tuple(args.quantize), int4_block_size=args.int4_block_size, calibration_text=calib,
                         force=args.force, progress=sys.stderr.isatty(), cache_dtype=args.cache_dtype)
    manifest = export_folder(model_dir, out, opts)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"exported {model_dir} -> {out}")
    for prec, entry in manifest["files"].items():
        print(f"  {prec:9s} {entry['path']:22s} {entry['bytes'] / 1e6:9.2f} MB  sha256 {entry['files'][0]['sha256'][:12]}")
    c = manifest["cache"]
    scales = " + 2 float32 scales" if c["dtype"] == "int8" else ""
    print(f"  latent cache: {c['bytes_per_token']} bytes/token ({c['num_layers']} layers x ({c['kv_lora_rank']} + "
          f"{c['qk_rope_head_dim']}) x {c['dtype']}{scales})")
    return 0

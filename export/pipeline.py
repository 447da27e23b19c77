"""`mla-edge export`: a Hugging Face MLA checkpoint -> an export folder (ONNX files + tokenizer + manifest).

Everything is written to a temp folder beside OUT_DIR and renamed into place only when complete, so a
failure at any stage leaves no half-written export behind.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mla_edge.models.cache import CACHE_DTYPES, CacheContract
from mla_edge.models.config import MLAConfig
from mla_edge.runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, MODEL_FILE, file_entry, ort_name

QUANT_CHOICES = ("none", "int8", "int4", "int8-qdq")


class ExportError(ValueError):
    """Bad input to the exporter; the message names the path or option."""


@dataclass(frozen=True)
class ExportOptions:
    quantize: tuple[str, ...] = ("int8",)
    int4_block_size: int = 32
    calibration_text: Path | None = None
    opset: int = 21
    force: bool = False
    progress: bool = True
    ort_format: bool = True  # also write model.<precision>.ort, optimized for this machine
    cache_dtype: str = "float32"  # or "int8": the latent stored as int8 with a per-token scale
    extra_manifest: dict = field(default_factory=dict)


def _check_output(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise ExportError(f"output folder {out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} exists and is not a folder")
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {out_dir} is not writable (no write permission on {parent})")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def export_folder(model_dir: str | Path, out_dir: str | Path, opts: ExportOptions = ExportOptions()) -> dict:
    """Export and quantize; returns the manifest written to OUT_DIR/mla_edge.json."""
    from .onnx_graph import quiet

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = MLAConfig.from_pretrained(model_dir)  # clear errors for a missing config.json or a MoE config
    wanted = tuple(dict.fromkeys(p for p in opts.quantize if p != "none"))
    if opts.cache_dtype not in CACHE_DTYPES:
        raise ExportError(f"unknown cache dtype {opts.cache_dtype!r} (choose from {', '.join(CACHE_DTYPES)})")
    for p in wanted:
        if p not in QUANT_CHOICES:
            raise ExportError(f"unknown --quantize {p!r} (choose from {', '.join(QUANT_CHOICES)})")
    tokenizer = model_dir / "tokenizer.json"
    calib = opts.calibration_text
    if "int8-qdq" in wanted:
        if calib is None:
            raise ExportError("int8-qdq needs calibration text: pass --calibration-text FILE")
        if not Path(calib).is_file():
            raise ExportError(f"calibration text {calib} not found")
        if not tokenizer.is_file():
            raise ExportError(f"int8-qdq calibration needs {tokenizer} to tokenize the calibration text")
    _check_output(out_dir, opts.force)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the parent of output folder {out_dir}: {e.strerror}") from None

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise ExportError(f"output folder {out_dir} is not writable: {e.strerror}") from None
    try:
        with quiet():
            manifest = _build(model_dir, tmp, cfg, wanted, tokenizer, calib, opts)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the export is an ordinary folder
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _build(model_dir: Path, tmp: Path, cfg: MLAConfig, wanted: tuple[str, ...], tokenizer: Path,
           calib: Path | None, opts: ExportOptions) -> dict:
    """Every file of the export, written into tmp; one progress-bar stage per step."""
    import torch
    from tqdm import tqdm

    from mla_edge.models.checkpoint import load_model

    from . import quantize as q
    from .onnx_graph import export_onnx, graph_specs, model_files, save_ort_format

    stages = ["load", "export fp32", *[f"quantize {p}" for p in wanted], *(["ort format"] if opts.ort_format else []),
              "manifest"]
    timings: dict[str, float] = {}
    with tqdm(total=len(stages), desc="export", unit="stage", disable=not opts.progress, dynamic_ncols=True) as bar:
        def run_stage(name, fn):
            bar.set_postfix_str(name)
            t0 = time.time()
            result = fn()
            timings[name] = round(time.time() - t0, 2)
            bar.update(1)
            return result

        model = run_stage("load", lambda: load_model(model_dir))
        fp32 = run_stage("export fp32", lambda: export_onnx(model, tmp / MODEL_FILE["fp32"], opts.opset, opts.cache_dtype))
        contract = CacheContract.from_config(cfg, opts.cache_dtype)
        for p in wanted:
            dst = tmp / MODEL_FILE[p]
            if p == "int8":
                run_stage("quantize int8", lambda: q.quantize_int8(fp32, dst))
            elif p == "int4":
                run_stage("quantize int4", lambda: q.quantize_int4(fp32, dst, opts.int4_block_size))
            else:
                text = Path(calib).read_text(encoding="utf-8")
                run_stage("quantize int8-qdq", lambda: q.quantize_int8_qdq(
                    fp32, dst, q.calibration_feeds(fp32, tokenizer, text, contract)))
        ort_ok = {}
        if opts.ort_format:
            ort_ok = run_stage("ort format", lambda: {p: save_ort_format(tmp / MODEL_FILE[p], tmp / ort_name(p))
                                                     for p in ("fp32", *wanted)})
        bar.set_postfix_str("manifest")
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        files = {p: file_entry(tmp, p, model_files(tmp / MODEL_FILE[p])) for p in ("fp32", *wanted)}
        for p in files:
            if ort_ok.get(p):
                files[p]["ort"] = {**file_entry(tmp, p, [ort_name(p)])["files"][0], "platform": platform.machine(),
                                   "optimization": "all"}
        if "int4" in files:
            files["int4"]["block_size"] = opts.int4_block_size
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": "mla-edge export",
            "source": {"model_dir": str(model_dir.resolve()), "torch": torch.__version__},
            "model": cfg.to_dict(),
            "max_context": cfg.max_position_embeddings,
            "cache": contract.to_manifest(),
            "graph": {"attention": "absorbed", "opset": opts.opset, **graph_specs(cfg, opts.cache_dtype)},
            "tokens": {"bos": cfg.bos_token_id, "eos": list(cfg.eos_token_id), "pad": cfg.pad_token_id},
            "tokenizer": "tokenizer.json" if tokenizer.is_file() else None,
            "files": files,
            "export_seconds": timings,
            **opts.extra_manifest,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        bar.update(1)
    return manifest

"""`mla-edge export`: a Hugging Face MLA checkpoint -> an export folder (ONNX files + tokenizer + manifest).

Everything is written to a temp folder beside OUT_DIR and renamed into place only when complete, so a
failure at any stage leaves no half-written export behind.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mla_edge.contract import (
    ATTN_BIAS,
    CACHE_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    INPUT_IDS,
    MANIFEST,
    MODEL_FILE,
    POSITION_IDS,
    PRECISIONS,
    STATIC_CAPACITY_RULE,
    STATIC_MASK_VALUE,
    STATIC_MASK_VALUES,
    STATIC_PRECISIONS,
    STATIC_WRITE_RULE,
    CacheContract,
    InputError,
    dynamic_graph,
    ort_name,
    read_user_text,
    static_file,
    static_graph,
    static_graph_name,
)
from mla_edge.models.config import MLAConfig
from mla_edge.runtime.chat import GENERATION_CONFIG, TOKENIZER_CONFIG, ChatTemplate, eos_ids
from mla_edge.runtime.manifest import check_written, file_entry, ort_target

from .quantize import QNN_QDQ

QUANT_CHOICES = ("none", *PRECISIONS[1:])
BLOCK_PRECISIONS = {"int4": (4, 4), "w8a32": (8, 0), "int8-block": (8, 4)}  # MatMulNBits: bits, accuracy_level


class ExportError(InputError):
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
    # None: fp16 (stored half, attended fp32; llama.cpp's default cache type, half of fp32's bytes at +0.00% perplexity
    # on the demo), or fp32 with static_cache (the static protocol keeps an fp32 buffer). "int8": a per-token scale.
    cache_dtype: str | None = None
    # also write the static protocol's graphs, for a buffer of this many tokens; several (256, 1024, 4096): graphs for
    # each, whose host runs the smallest that holds the sequence (decode then costs what the context uses)
    static_cache: int | tuple[int, ...] | None = None
    static_chunk: int = 16  # tokens per static prefill chunk
    static_quantize: tuple[str, ...] = ()  # static precisions besides fp32: int8 (CPU), w8a16 / w4a16 / w8a8 (QDQ)
    require_tokenizer: bool = True  # refuse a model folder without a readable tokenizer.json (--no-tokenizer: allow)
    qnn_context: str | None = None  # compile the static graphs for this Snapdragon SoC (sm8650, ...): EPContext files
    moe_op: bool = True  # MoE layers as onnxruntime's MoE/QMoE op (only chosen experts run), else dense plain ops
    smooth: float | None = None  # smooth activation outliers into the weights (alpha) before export: models/smooth.py


def static_capacities(static_cache: int | tuple[int, ...] | None) -> tuple[int, ...]:
    """ExportOptions.static_cache as the ascending capacities (the last is the largest); () without it."""
    if static_cache is None:
        return ()
    return (static_cache,) if isinstance(static_cache, int) else tuple(sorted(set(static_cache)))


def default_cache_dtype(static_cache: int | tuple[int, ...] | None) -> str:
    """fp16, as llama.cpp's default cache; fp32 where the static protocol's graphs are written too."""
    return "fp32" if static_cache else "fp16"


def is_export(folder: Path) -> bool:
    """A folder that an mla-edge export wrote (its manifest says so): the only kind --force may replace."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out_dir: Path, force: bool) -> None:
    """Refuse, before any work, an output path that exists (without --force, or that is not an mla-edge export) or
    that cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} exists and is not a folder")
    if out_dir.exists() and not force:
        raise ExportError(f"output folder {out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not is_export(out_dir):
        raise ExportError(
            f"output folder {out_dir} exists and is not an mla-edge export (no {MANIFEST}): --force "
            "replaces only earlier exports, so choose another -o"
        )
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {out_dir} is not writable (no write permission on {parent})")


def check_calibration_text(path: Path) -> None:
    """Before any work: calibration text that exists, is UTF-8, and holds some text (one line naming the problem)."""
    try:
        read_user_text(path, "calibration text")
    except InputError as e:
        raise ExportError(str(e)) from None


def export_folder(model_dir: str | Path, out_dir: str | Path, opts: ExportOptions = ExportOptions()) -> dict:
    """Export and quantize; returns the manifest written to OUT_DIR/mla_edge.json."""
    from mla_edge.models.checkpoint import atomic_folder

    from .onnx_graph import quiet

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cache_dtype = opts.cache_dtype or default_cache_dtype(opts.static_cache)
    opts = replace(opts, cache_dtype=cache_dtype)
    cfg = MLAConfig.from_pretrained(model_dir)  # clear errors for a missing config.json or a MoE config
    wanted = tuple(dict.fromkeys(p for p in opts.quantize if p != "none"))
    if opts.static_cache is not None:
        levels = static_capacities(opts.static_cache)
        if not levels or levels[0] < 2 or levels[-1] > cfg.max_position_embeddings:
            raise ExportError(
                f"--static-cache must be between 2 and the model's context "
                f"({cfg.max_position_embeddings}), got {','.join(map(str, levels)) or 'nothing'}"
            )
        if not 1 <= opts.static_chunk < levels[0]:
            raise ExportError(
                f"--static-chunk must be between 1 and the smallest --static-cache - 1 ({levels[0] - 1}), "
                f"got {opts.static_chunk}"
            )
        opts = replace(opts, static_cache=levels[-1] if len(levels) == 1 else levels)
        if cache_dtype != "fp32":
            raise ExportError(
                f"the static protocol keeps an fp32 cache: drop --cache-dtype {cache_dtype} or --static-cache"
            )
        rs = cfg.rope_scaling
        if rs is not None and rs.rope_type == "longrope" and levels[-1] > rs.original_max_position_embeddings:
            raise ExportError(
                f"--static-cache {levels[-1]} passes this model's LongRoPE switch at "
                f"{rs.original_max_position_embeddings} tokens, which the static RoPE table cannot follow"
            )
        if cfg.attn_scale_original is not None and levels[-1] > cfg.attn_scale_original:
            raise ExportError(
                f"--static-cache {levels[-1]} passes this model's query scaling step at "
                f"{cfg.attn_scale_original} tokens (llama_4_scaling_beta), which the static graphs do not compute"
            )
        for p in opts.static_quantize:
            if p not in STATIC_PRECISIONS[1:]:
                raise ExportError(f"unknown --static-quantize {p!r} (choose from {', '.join(STATIC_PRECISIONS[1:])})")
        if set(QNN_QDQ) & set(opts.static_quantize) and (
            opts.calibration_text is None
            or not Path(opts.calibration_text).is_file()
            or not (model_dir / "tokenizer.json").is_file()
        ):
            raise ExportError(
                "--static-quantize w8a16/w4a16/w8a8 calibrates on text: pass --calibration-text FILE "
                "(and the model folder needs its tokenizer.json)"
            )
        if opts.qnn_context:
            from mla_edge.runtime.static import qnn_session_options, qnn_target

            qnn_target(opts.qnn_context)  # a wrong SoC name fails here, before any work
            qnn_session_options()  # and so does a missing onnxruntime-qnn
    elif opts.static_quantize or opts.qnn_context:
        raise ExportError("--static-quantize and --qnn-context need --static-cache N")
    if cache_dtype not in CACHE_DTYPES:
        raise ExportError(f"unknown cache dtype {cache_dtype!r} (choose from {', '.join(CACHE_DTYPES)})")
    for p in wanted:
        if p not in QUANT_CHOICES:
            raise ExportError(f"unknown --quantize {p!r} (choose from {', '.join(QUANT_CHOICES)})")
    bs = opts.int4_block_size
    if "int4" in wanted and (not isinstance(bs, int) or bs < 16 or bs & (bs - 1)):
        raise ExportError(f"--int4-block-size must be a power of two >= 16, got {bs}")
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.is_file():
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(tokenizer))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise ExportError(f"{tokenizer} is not a readable tokenizer: {e}") from None
        if (model_dir / TOKENIZER_CONFIG).is_file():  # a broken chat template fails here, not in a user's chat
            try:
                ChatTemplate.from_folder(model_dir)
            except InputError as e:
                if "no chat_template" not in str(e):
                    raise ExportError(str(e)) from None
        eos_ids(model_dir)
    elif opts.require_tokenizer:
        raise ExportError(
            f"{model_dir} has no tokenizer.json, so the export could not read or write text; add it, "
            "or pass --no-tokenizer to export a model that takes token ids only"
        )
    calib = opts.calibration_text
    if opts.smooth is not None:
        if not 0.0 < opts.smooth < 1.0:
            raise ExportError(f"--smooth must be between 0 and 1 (SmoothQuant's alpha; 0.5 is usual): {opts.smooth}")
        if calib is None or not Path(calib).is_file():
            raise ExportError("--smooth measures activations on text: pass --calibration-text FILE")
        if not tokenizer.is_file():
            raise ExportError(f"--smooth needs {tokenizer} to tokenize the calibration text")
    if "int8-qdq" in wanted:
        if calib is None:
            raise ExportError("int8-qdq needs calibration text: pass --calibration-text FILE")
        if not Path(calib).is_file():
            raise ExportError(f"calibration text {calib} not found")
        if not tokenizer.is_file():
            raise ExportError(f"int8-qdq calibration needs {tokenizer} to tokenize the calibration text")
    if calib is not None:
        check_calibration_text(Path(calib))
    check_output(out_dir, opts.force)
    try:
        with atomic_folder(out_dir) as tmp, quiet():
            manifest = _build(model_dir, tmp, cfg, wanted, tokenizer, calib, opts)
    except PermissionError as e:
        raise ExportError(f"output folder {out_dir} is not writable: {e.strerror or e}") from None
    return manifest


def _static(
    model: Any,
    tmp: Path,
    cfg: MLAConfig,
    contract: CacheContract,
    opts: ExportOptions,
    tokenizer: Path,
    calib: Path | None,
) -> dict:
    """The static protocol's graphs (decode and prefill chunk) in each static precision, and their manifest section.
    The graphs are traced from a twin of the model built with device_ops (mobile-friendly ops, the same numbers);
    int8, which is for the CPU, from one with the norms' plain form (onnxruntime fuses each into one node)."""
    from mla_edge.models.mla import MLAForCausalLM, ModelOptions
    from mla_edge.runtime.static import StaticSession

    from . import quantize as q
    from .onnx_graph import export_static, model_files, share_weights

    def twin(device_ops: bool) -> MLAForCausalLM:
        m = MLAForCausalLM(cfg, ModelOptions(graph_weights=True, device_ops=device_ops, rope_in_weights=True)).eval()
        m.load_state_dict(model.state_dict(), assign=True)  # the same weight tensors: no second copy
        return m

    device = twin(device_ops=True)
    cpu_twin = functools.cache(lambda: twin(device_ops=False))
    levels, c = static_capacities(opts.static_cache), opts.static_chunk
    n = levels[-1]
    kinds = (("decode", 1), ("prefill", c))
    plan = [(static_graph_name(kind, level, n), kind, level, seq) for level in levels for kind, seq in kinds]
    graphs = {name: static_graph(contract, cfg.vocab_size, level, seq) for name, _, level, seq in plan}
    section: dict[str, Any] = {
        "protocol": "static",
        "capacity": n,
        "capacities": list(levels),
        "capacity_rule": STATIC_CAPACITY_RULE,
        "chunk": c,
        "mask_value": STATIC_MASK_VALUE,
        "mask_values": {p: STATIC_MASK_VALUES[p] for p in ("fp32", *opts.static_quantize)},
        "write_rule": STATIC_WRITE_RULE,
        "graphs": graphs,
        "files": {"fp32": {}},
    }

    def written(p: str, files: list[Path]) -> None:
        if len(levels) > 1:  # every capacity's graphs read one weights file per precision
            share_weights(files, tmp / static_file("weights", p).replace(".onnx", ".data"))
        section["files"][p] = {name: file_entry(tmp, p, model_files(f)) for name, f in zip(graphs, files)}

    written("fp32", [export_static(device, tmp / static_file(g, "fp32"), lv, sq, opts.opset) for g, _, lv, sq in plan])
    feeds = None
    for p in opts.static_quantize:
        if p in q.QNN_QDQ and feeds is None:  # the fp32 graphs fed the QDQ graphs' mask (all QDQ share it)
            session = StaticSession(tmp, "fp32", "cpu", section=section, capacity=n)
            session.mask_value = STATIC_MASK_VALUES[p]
            feeds = static_calibration_feeds(session, tokenizer, calib)
        files = []
        for name, kind, level, seq in plan:
            src, dst = tmp / static_file(name, "fp32"), tmp / static_file(name, p)
            if p == "int8":  # for the CPU: traced from a twin whose norms onnxruntime fuses into one op each
                src = export_static(cpu_twin(), tmp / f".cpu-{src.name}", level, seq, opts.opset)
                q.quantize_int8(src, dst)
                for f in model_files(src):
                    (tmp / f).unlink()
            else:  # the largest capacity's feeds, cut to this graph's buffer
                q.quantize_qnn(src, dst, level_feeds(feeds[kind], seq, level), p)  # type: ignore[index]
            files.append(dst)
        written(p, files)
    from .mobile import mobile_ort_files, qnn_context_files, tokenizer_graphs

    section["required_operators"] = mobile_ort_files(tmp, section)
    if opts.qnn_context:
        qnn_context_files(tmp, section, opts.qnn_context)
    if tokenizer.is_file():
        section["tokenizer_graphs"] = tokenizer_graphs(tokenizer, tmp)
    return section


def level_feeds(feeds: list[dict], seq: int, n: int) -> list[dict]:
    """Calibration feeds recorded at the largest capacity, for a graph with a smaller buffer: each buffer's first N
    slots and the bias over them and the new tokens; feeds whose filled slots reach past N are left out."""
    out = []
    for f in feeds:
        bias = f[ATTN_BIAS]
        top = bias.shape[-1] - seq
        if top == n:
            out.append(f)
        elif not (bias[0, :, n:top] == 0).any():
            cut = {k: v[:, :n] if k not in (INPUT_IDS, POSITION_IDS, ATTN_BIAS) else v for k, v in f.items()}
            cut[ATTN_BIAS] = np.concatenate([bias[..., :n], bias[..., top:]], -1)
            cut[POSITION_IDS] = np.minimum(f[POSITION_IDS], n - 1)
            out.append(cut)
    if not out:
        raise ExportError(f"no calibration step fits a static buffer of {n} tokens: use a larger smallest capacity")
    return out


def static_calibration_feeds(
    session: Any, tokenizer: Path, calib: Path | None, windows: int = 4, prefill: int = 96, decode: int = 64
) -> dict[str, list[dict]]:
    """Feeds of both static graphs from real text: each window is prefilled in chunks, then decoded token by token
    (teacher-forced), at different positions: windows x decode steps for the decode graph (256 by default)."""
    from tokenizers import Tokenizer

    if calib is None or not tokenizer.is_file():
        raise ExportError("QDQ static graphs need calibration text and a tokenizer: pass --calibration-text FILE")
    ids = Tokenizer.from_file(str(tokenizer)).encode(Path(calib).read_text(encoding="utf-8")).ids
    prefill = min(prefill, session.capacity - decode - 1)
    need = prefill + decode
    if len(ids) < need:
        raise ExportError(f"calibration text is too short: {len(ids)} tokens, the static graphs need {need}")
    session.recorded = {}
    for start in np.linspace(0, len(ids) - need, num=windows).astype(int):
        session.reset()
        session.prefill(ids[start : start + prefill])
        for t in ids[start + prefill : start + need]:
            session.decode(t)
    return session.recorded


def _smooth(model: Any, tokenizer: Path, calib: Path, alpha: float, windows: int = 8, length: int = 512) -> dict:
    """SmoothQuant-style smoothing of the loaded model on `windows` windows of the calibration text."""
    import torch
    from tokenizers import Tokenizer

    from mla_edge.models.convert import calibration_windows
    from mla_edge.models.smooth import smooth

    ids = Tokenizer.from_file(str(tokenizer)).encode(Path(calib).read_text(encoding="utf-8")).ids
    length = min(length, len(ids))
    with torch.inference_mode(False):
        return smooth(model, calibration_windows(ids, windows, length), alpha) | {"text": Path(calib).name}


def _build(
    model_dir: Path,
    tmp: Path,
    cfg: MLAConfig,
    wanted: tuple[str, ...],
    tokenizer: Path,
    calib: Path | None,
    opts: ExportOptions,
) -> dict:
    """Every file of the export, written into tmp; one progress-bar stage per step."""
    import torch
    from tqdm import tqdm

    from mla_edge.models.checkpoint import load_model
    from mla_edge.models.mla import ModelOptions
    from mla_edge.runtime.memory import peak_rss_bytes

    from . import quantize as q
    from .onnx_graph import export_onnx, model_files, save_ort_format

    stages = [
        "load",
        *(["smooth"] if opts.smooth is not None else []),
        "export fp32",
        *(["static graphs"] if opts.static_cache else []),
        *[f"quantize {p}" for p in wanted],
        *(["ort format"] if opts.ort_format else []),
        "manifest",
    ]
    timings: dict[str, float] = {}
    peaks: dict[str, int] = {}  # this process's peak RSS after each stage (VmHWM: it only grows)
    with tqdm(total=len(stages), desc="export", unit="stage", disable=not opts.progress, dynamic_ncols=True) as bar:

        def run_stage(name: str, fn: Callable[[], Any]) -> Any:
            bar.set_postfix_str(name)
            t0 = time.time()
            result = fn()
            timings[name] = round(time.time() - t0, 2)
            peaks[name] = peak_rss_bytes()
            bar.update(1)
            return result

        options = ModelOptions(
            attention="absorbed",
            cache_dtype=opts.cache_dtype or "fp32",  # (export_folder has set it)
            graph_weights=True,
            moe_op=cfg.is_moe and opts.moe_op,
            rope_in_weights=True,
        )
        model = run_stage("load", lambda: load_model(model_dir, options))
        smoothing = None
        if opts.smooth is not None:
            smoothing = run_stage("smooth", partial(_smooth, model, tokenizer, Path(calib or ""), opts.smooth))
        weight_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
        fp32 = run_stage("export fp32", partial(export_onnx, model, tmp / MODEL_FILE["fp32"], opts.opset))
        contract = CacheContract.from_config(cfg, options.cache_dtype)
        static = None
        if opts.static_cache:
            static = run_stage("static graphs", partial(_static, model, tmp, cfg, contract, opts, tokenizer, calib))
        del model  # the PyTorch weights are not needed again: quantizers read the graph files
        gc.collect()
        for p in wanted:
            dst = tmp / MODEL_FILE[p]
            if p == "int8":
                run_stage("quantize int8", lambda: q.quantize_int8(fp32, dst))
            elif p in BLOCK_PRECISIONS:
                bits, level = BLOCK_PRECISIONS[p]
                run_stage(f"quantize {p}", partial(q.quantize_int4, fp32, dst, opts.int4_block_size, None, bits, level))
            else:
                text = Path(calib).read_text(encoding="utf-8")  # type: ignore[arg-type]  # checked before
                run_stage(
                    "quantize int8-qdq",
                    lambda: q.quantize_int8_qdq(fp32, dst, q.calibration_feeds(fp32, tokenizer, text, contract)),
                )
        ort_ok: dict[str, bool] = {}
        if opts.ort_format:
            ort_ok = run_stage(
                "ort format",
                lambda: {  # MatMulNBits graphs stay .onnx: their .ort peaked at 732 vs 490 MiB on SmolLM2 (int8-block)
                    p: save_ort_format(tmp / MODEL_FILE[p], tmp / ort_name(MODEL_FILE[p]))
                    for p in ("fp32", *wanted)
                    if p not in BLOCK_PRECISIONS
                },
            )
        bar.set_postfix_str("manifest")
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        chat_files = [n for n in (TOKENIZER_CONFIG, GENERATION_CONFIG) if (model_dir / n).is_file()]
        for name in chat_files:  # the chat template, special tokens and end-of-turn ids travel with the export
            shutil.copyfile(model_dir / name, tmp / name)
        eos = list(dict.fromkeys([*cfg.eos_token_id, *eos_ids(model_dir)]))
        files = {p: file_entry(tmp, p, model_files(tmp / MODEL_FILE[p])) for p in ("fp32", *wanted)}
        for p in files:
            if ort_ok.get(p):
                files[p]["ort"] = {**file_entry(tmp, p, [ort_name(MODEL_FILE[p])])["files"][0], **ort_target()}
        for p in BLOCK_PRECISIONS:
            if p in files:
                files[p]["block_size"] = opts.int4_block_size
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": "mla-edge export",
            "source": {"model_dir": str(model_dir.resolve()), "torch": torch.__version__},
            "model": cfg.to_dict(),
            "max_context": cfg.max_position_embeddings,
            "cache": contract.to_manifest(),
            "graph": {
                "attention": "absorbed",
                "opset": opts.opset,
                "experts": ("moe-op" if opts.moe_op else "dense") if cfg.is_moe else None,
                **dynamic_graph(contract, cfg.vocab_size),
            },
            "tokens": {"bos": cfg.bos_token_id, "eos": eos, "pad": cfg.pad_token_id},
            "tokenizer": "tokenizer.json" if tokenizer.is_file() else None,
            "chat": {"template": TOKENIZER_CONFIG, "files": chat_files} if TOKENIZER_CONFIG in chat_files else None,
            "files": files,
            "export_seconds": timings,
            "export_peak_rss_bytes": {**peaks, "fp32_weight_bytes": weight_bytes},
        }
        if static:
            manifest["static"] = static
        if smoothing:
            manifest["smoothing"] = smoothing
        check_written(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        bar.update(1)
    return manifest

"""One onnxruntime session over an export folder: the numpy twin of MLAForCausalLM.forward.

step(input_ids, attention_mask, position_ids, cache) -> (logits, new_cache); the cache is a dict keyed by
the cache contract's past names, passed in and returned, never kept inside. No torch.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .manifest import Manifest, ManifestError

# --provider name -> onnxruntime execution provider (and default options)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", {}),
    "xnnpack": ("XnnpackExecutionProvider", {}),
    "coreml": ("CoreMLExecutionProvider", {}),
    "nnapi": ("NnapiExecutionProvider", {}),
    "qnn": ("QNNExecutionProvider", {"backend_path": "libQnnHtp.so"}),
}
AUTO_ORDER = ("qnn", "nnapi", "coreml", "xnnpack")
OPT_LEVELS = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


class ProviderError(ValueError):
    pass


def physical_cores() -> int:
    """Physical cores where Linux tells us (sibling hyperthreads share a core id), else the logical count."""
    try:
        cores = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def resolve_providers(name: str) -> list:
    """--provider -> the providers list for InferenceSession; CPU is always last as the fallback."""
    available = ort.get_available_providers()
    if name == "auto":
        for key in AUTO_ORDER:
            ep, opts = PROVIDERS[key]
            if ep in available:
                return [(ep, opts), "CPUExecutionProvider"]
        warnings.warn("no mobile/accelerator execution provider in this onnxruntime build; running on the CPU", stacklevel=2)
        return ["CPUExecutionProvider"]
    if name not in PROVIDERS:
        raise ProviderError(f"unknown provider {name!r} (choose from auto, {', '.join(PROVIDERS)})")
    ep, opts = PROVIDERS[name]
    if ep not in available:
        raise ProviderError(f"provider {name!r} ({ep}) is not in this onnxruntime build; available: {', '.join(available)}")
    return [(ep, opts), "CPUExecutionProvider"] if ep != "CPUExecutionProvider" else [ep]


class LatentSession:
    def __init__(self, export_dir: str | Path, precision: str | None = None, provider: str = "cpu",
                 threads: int | None = None, opt_level: str = "all", optimized_cache: str | Path | None = None,
                 verify: bool = True):
        """optimized_cache: a folder where onnxruntime's optimized graph is saved on the first load and loaded
        (with optimizations off) afterwards; one file per model hash and optimization level."""
        self.manifest = Manifest.read(export_dir)
        if precision is None:
            precision = "int8" if "int8" in self.manifest.precisions else "fp32"
        self.precision = precision
        if opt_level not in OPT_LEVELS:
            raise ValueError(f"opt_level must be one of {', '.join(OPT_LEVELS)}, got {opt_level!r}")
        self.providers = resolve_providers(provider)
        # On the CPU, the export's pre-optimized ORT-format file loads with less memory; other providers (and other
        # optimization levels) take the .onnx so that onnxruntime can partition and optimize it for them.
        self.ort_format = (self.providers == ["CPUExecutionProvider"] and opt_level == "all" and not optimized_cache
                           and self.manifest.ort_format_usable(precision))
        path = self.manifest.model_path(precision, verify=verify, ort_format=self.ort_format)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or physical_cores()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = OPT_LEVELS[opt_level]
        self.loaded_from_cache = False
        if optimized_cache:
            digest = self.manifest.data["files"][precision]["files"][0]["sha256"][:16]
            cached = Path(optimized_cache) / f"{digest}.{opt_level}.opt.onnx"
            if cached.is_file():
                path, self.loaded_from_cache = cached, True
                so.graph_optimization_level = OPT_LEVELS["none"]
            else:
                cached.parent.mkdir(parents=True, exist_ok=True)
                so.optimized_model_filepath = str(cached)
        so.log_severity_level = 3
        if self.ort_format:
            so.graph_optimization_level = OPT_LEVELS["none"]  # applied when the file was written
        try:
            self.session = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own types for corrupt or invalid files
            raise ManifestError(f"onnxruntime cannot load {path.name}: {e}") from None
        m = self.manifest.data
        self.past_names = self.manifest.past_names
        self.present_names = self.manifest.present_names
        self.past_specs = [(p["name"], p["shape"][2], np.dtype(p["dtype"])) for p in m["cache"]["past"]]
        self.vocab_size = m["model"]["vocab_size"]
        self.max_context = m["max_context"]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, 0, w), dt) for n, w, dt in self.past_specs}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feed = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64),
                "position_ids": np.asarray(position_ids, np.int64), **cache}
        outs = self.session.run(None, feed)
        return outs[0], dict(zip(self.past_names, outs[1:]))

    def step_bound(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                   cache: dict) -> tuple[np.ndarray, dict]:
        """Like step, but with IO binding: the present cache stays in onnxruntime-owned OrtValues that are bound
        as the next step's past, so no cache tensor is copied into or out of numpy between steps."""
        b = self.session.io_binding()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        for name, value in cache.items():
            if isinstance(value, ort.OrtValue):
                b.bind_ortvalue_input(name, value)
            else:
                b.bind_cpu_input(name, np.ascontiguousarray(value))
        b.bind_output("logits", "cpu")
        for name in self.present_names:
            b.bind_output(name, "cpu")
        self.session.run_with_iobinding(b)
        outs = b.get_outputs()
        return outs[0].numpy(), dict(zip(self.past_names, outs[1:]))

    def cache_length(self, cache: dict) -> int:
        v = cache[self.past_names[0]]
        return int(v.shape()[1] if isinstance(v, ort.OrtValue) else v.shape[1])

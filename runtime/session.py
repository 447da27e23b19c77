"""One onnxruntime session over an export folder: the numpy twin of MLAForCausalLM.forward.

step(input_ids, attention_mask, position_ids, cache) -> (logits, new_cache); the cache is a dict keyed by
the cache contract's past names, passed in and returned, never kept inside. No torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mla_edge.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, POSITION_IDS, InputError

from .manifest import Manifest, ManifestError, ort_target

# --provider name -> onnxruntime execution provider (and default options)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", {}),
    "xnnpack": ("XnnpackExecutionProvider", {}),
    "coreml": ("CoreMLExecutionProvider", {}),
    "nnapi": ("NnapiExecutionProvider", {}),
    "qnn": ("QNNExecutionProvider", {"backend_path": "libQnnHtp.so"}),
}
# "auto": the first of these this onnxruntime has, else the CPU. Not QNN: Qualcomm's HTP takes only the static graphs
# (runtime/static.py), and once onnxruntime-qnn's plugin is registered in a process it would be "available" here.
AUTO_ORDER = ("nnapi", "coreml", "xnnpack")
DEFAULT_PROVIDER = "auto"
OPT_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ProviderError(InputError):
    """A provider name this onnxruntime cannot give; the message lists what it has."""


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
        return ["CPUExecutionProvider"]  # the usual case on a laptop: nothing to warn about
    if name not in PROVIDERS:
        raise ProviderError(f"unknown provider {name!r} (choose from auto, {', '.join(PROVIDERS)})")
    ep, opts = PROVIDERS[name]
    if name == "qnn":  # even where onnxruntime-qnn's plugin is registered: the HTP needs static shapes
        raise ProviderError(
            "provider 'qnn' takes only the static graphs (Qualcomm's HTP needs static shapes): --protocol static"
        )
    if ep not in available:
        raise ProviderError(
            f"provider {name!r} ({ep}) is not in this onnxruntime build; available: {', '.join(available)}"
        )
    return [(ep, opts), "CPUExecutionProvider"] if ep != "CPUExecutionProvider" else [ep]


ORT_FORMAT_MAX_BYTES = 64 * 2**20  # see LatentSession: the .ort file is used for models up to this size


class LatentSession:
    def __init__(
        self,
        export_dir: str | Path,
        precision: str | None = None,
        provider: str = DEFAULT_PROVIDER,
        threads: int | None = None,
        opt_level: str = "all",
        optimized_cache: str | Path | None = None,
        verify: bool | str = True,
        ort_format: bool = True,
    ):
        """optimized_cache: a folder where onnxruntime's optimized graph is saved on the first load and loaded
        (with optimizations off) afterwards; one file per model hash, optimization level, provider, onnxruntime
        version and platform."""
        self.manifest = Manifest.read(export_dir)
        if precision is None:
            precision = next((p for p in ("int8", "int8-block") if p in self.manifest.precisions), "fp32")
        self.precision = precision
        if opt_level not in OPT_LEVELS:
            raise InputError(f"opt_level must be one of {', '.join(OPT_LEVELS)}, got {opt_level!r}")
        self.providers = resolve_providers(provider)
        # On the CPU, a small model's pre-optimized ORT-format file loads faster (42 vs 51 ms, the demo's int8) at
        # the same memory; a big one's costs memory (peak 421 vs 231 MiB for SmolLM2's 164 MB int8: onnxruntime holds
        # the file's bytes and the tensors made from them at once), so past ORT_FORMAT_MAX_BYTES the .onnx loads.
        # Other providers (and other optimization levels) take the .onnx so that onnxruntime partitions it for them.
        small = self.manifest.data["files"].get(precision, {}).get("bytes", 0) <= ORT_FORMAT_MAX_BYTES
        self.ort_format = (
            ort_format
            and small
            and self.providers == ["CPUExecutionProvider"]
            and opt_level == "all"
            and not optimized_cache
        )
        why = self.manifest.ort_mismatch(precision) if self.ort_format else None
        if why and "ort" in self.manifest.data["files"].get(precision, {}):
            # optimized for another build or machine: the portable .onnx is always right
            warnings.warn(f"{why}; loading the .onnx instead", stacklevel=2)
        self.ort_format = self.ort_format and why is None
        path = self.manifest.model_path(precision, verify=verify, ort_format=self.ort_format)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or physical_cores()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = OPT_LEVELS[opt_level]
        self.loaded_from_cache = False
        if optimized_cache:
            key = json.dumps(
                [
                    self.manifest.data["files"][precision]["files"][0]["sha256"],
                    opt_level,
                    [p if isinstance(p, str) else p[0] for p in self.providers],
                    ort_target(),
                ]
            )
            cached = Path(optimized_cache) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.opt.onnx"
            if cached.is_file():
                path, self.loaded_from_cache = cached, True
                so.graph_optimization_level = OPT_LEVELS["none"]
            else:
                if cached.parent.exists() and not cached.parent.is_dir():
                    raise ManifestError(f"--optimized-cache {cached.parent} is a file, not a folder")
                cached.parent.mkdir(parents=True, exist_ok=True)
                so.optimized_model_filepath = str(cached)
        so.log_severity_level = 3
        if self.ort_format:
            so.graph_optimization_level = OPT_LEVELS["none"]  # applied when the file was written
            # Map the file instead of reading it into a buffer: the demo's int8 loads in ~20 ms instead of ~26
            # (medians of 8 fresh processes). Not use_ort_model_bytes_for_initializers as well (tensors used in
            # place, ~18 ms): the whole mapping then stays resident beside onnxruntime's re-packed weight copies,
            # +5 MiB peak RSS on a 256-token generation (89.8 vs 84.6 MiB), and memory is the budget here.
            so.add_session_config_entry("session.use_ort_model_bytes_directly", "1")
            so.add_session_config_entry("session.use_memory_mapped_ort_model", "1")
        self.path = path
        try:
            self.session = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own types for corrupt or invalid files
            raise ManifestError(f"onnxruntime cannot load {path.name}: {e}") from None
        m = self.manifest.data
        self.past_names = self.manifest.past_names
        self.present_names = self.manifest.present_names
        inputs = {v["name"]: v for v in m["graph"]["inputs"]}
        self.past_specs = [(n, inputs[n]["shape"][2], np.dtype(inputs[n]["dtype"])) for n in self.past_names]
        self.vocab_size = m["model"]["vocab_size"]
        self.max_context = m["max_context"]
        # exports older than logits_to_keep compute every position's logits; step slices them instead
        self.keeps_logits = any(v["name"] == LOGITS_TO_KEEP for v in m["graph"].get("optional_inputs", []))

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, 0, w), dt) for n, w, dt in self.past_specs}

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: dict[str, np.ndarray],
        logits_to_keep: int = 0,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """logits_to_keep k > 0: logits (B, k, V) of the last k positions only (a prompt needs one); 0: all."""
        feed = {
            INPUT_IDS: np.asarray(input_ids, np.int64),
            ATTENTION_MASK: np.ascontiguousarray(attention_mask, np.int64),
            POSITION_IDS: np.asarray(position_ids, np.int64),
            **cache,
        }
        if logits_to_keep and self.keeps_logits:
            feed[LOGITS_TO_KEEP] = np.asarray([logits_to_keep], np.int64)
        outs = self.session.run(None, feed)
        logits = outs[0][:, -logits_to_keep:] if logits_to_keep else outs[0]
        return logits, dict(zip(self.past_names, outs[1:]))

    def step_bound(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: dict,
        logits_to_keep: int = 0,
    ) -> tuple[np.ndarray, dict]:
        """Like step, but with IO binding: the present cache stays in onnxruntime-owned OrtValues that are bound
        as the next step's past, so no cache tensor is copied into or out of numpy between steps."""
        b = self.session.io_binding()
        b.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(input_ids, np.int64))
        b.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(attention_mask, np.int64))
        b.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(position_ids, np.int64))
        # (IO binding cannot bind an overridable initializer such as logits_to_keep: every row is computed here)
        for name, value in cache.items():
            if isinstance(value, ort.OrtValue):
                b.bind_ortvalue_input(name, value)
            else:
                b.bind_cpu_input(name, np.ascontiguousarray(value))
        b.bind_output(LOGITS, "cpu")
        for name in self.present_names:
            b.bind_output(name, "cpu")
        self.session.run_with_iobinding(b)
        outs = b.get_outputs()
        logits = outs[0].numpy()
        return logits[:, -logits_to_keep:] if logits_to_keep else logits, dict(zip(self.past_names, outs[1:]))

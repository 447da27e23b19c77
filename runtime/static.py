"""The static protocol's host side: fixed-capacity latent buffers, the additive mask, and the write rule. No torch.

The graphs (a 1-token decode step and a C-token prefill chunk, every dim fixed, batch 1) read each layer's whole
buffer plus a mask over its valid slots and return only the new rows; this class owns the buffers and writes the
rows at the write index, exactly as `mla_edge.contract.STATIC_WRITE_RULE` says and as the Android engine does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mla_edge.contract import ATTN_BIAS, INPUT_IDS, POSITION_IDS

from .manifest import Manifest, ManifestError


class CapacityError(ValueError):
    """More tokens than the static buffer holds."""


def static_bias(length: int, valid: int, seq: int, capacity: int, mask_value: float) -> np.ndarray:
    """attn_bias (1, seq, capacity + seq): filled slots [0, length) and, for each new token q < valid, the new tokens
    0..q are open (0); everything else is mask_value. Padded queries (q >= valid) see the filled slots only."""
    bias = np.full((1, seq, capacity + seq), mask_value, np.float32)
    bias[0, :, :length] = 0.0
    q = np.arange(seq)
    open_new = (q[None, :] <= q[:, None]) & (q[None, :] < valid)  # (query, new key)
    bias[0, :, capacity:][open_new] = 0.0
    return bias


# HTP runs an fp32 graph in its fp16 mode, which needs a named SoC: 57 = Snapdragon 8 Gen 3 (Hexagon v75).
QNN_HTP_FP16 = {"enable_htp_fp16_precision": "1", "soc_model": "57", "htp_arch": "75"}


class StaticSession:
    """Both static graphs of one precision over an export folder, with the host-owned buffers.

    prefill(ids) -> logits of the last prompt token; decode(token) -> logits of the next; reset() empties the buffers.
    It also offers LatentSession's step interface, so that Generator runs either protocol: the cache it passes
    around is only a token for the buffers kept here (batch 1).
    provider: "cpu" (or "auto"), or "qnn": Qualcomm's HTP through onnxruntime-qnn, with CPU fallback disabled.
    """

    def __init__(
        self,
        export_dir: str | Path,
        precision: str | None = None,
        provider: str = "auto",
        threads: int | None = None,
        qnn_options: dict | None = None,
        verify: bool = True,
    ):
        from .session import physical_cores

        precision = precision or "fp32"
        if provider not in ("auto", "cpu", "qnn"):
            raise ManifestError(f"the static protocol runs on provider cpu or qnn, not {provider!r}")
        session_options = None
        if provider == "qnn":
            session_options = qnn_session_options("htp", {**QNN_HTP_FP16, **(qnn_options or {})})
        providers = None
        self.manifest = Manifest.read(export_dir)
        st = self.manifest.data.get("static")
        if not st:
            raise ManifestError(f"{self.manifest.folder} has no static protocol: export it with --static-cache N")
        if precision not in st["files"]:
            raise ManifestError(
                f"precision {precision!r} has no static graphs in this export (has: {', '.join(st['files'])})"
            )
        self.precision, self.capacity, self.chunk = precision, st["capacity"], st["chunk"]
        self.max_context, self.provider = self.capacity, provider
        self.mask_value = float(st["mask_value"])
        self.graphs = st["graphs"]
        self.vocab_size = self.manifest.data["model"]["vocab_size"]
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name, entry in st["files"][precision].items():
            path = self.manifest.verified_path(entry, verify)
            so = session_options
            if so is None:
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads or physical_cores()
                so.log_severity_level = 3
            try:  # with session options from qnn_providers, the provider is in them
                kw = {} if session_options is not None else {"providers": providers or ["CPUExecutionProvider"]}
                self.sessions[name] = ort.InferenceSession(str(path), so, **kw)
            except Exception as e:  # onnxruntime's own error types
                raise ManifestError(f"onnxruntime cannot load {path.name}: {e}") from None
        spec = self.graphs["decode"]["inputs"][len((INPUT_IDS, POSITION_IDS, ATTN_BIAS)) :]
        self.buffer_specs = [(v["name"], v["shape"], np.dtype(v["dtype"])) for v in spec]
        self.row_names = [v["name"] for v in self.graphs["decode"]["outputs"][1:]]
        self.reset()

    def reset(self) -> None:
        self.buffers = {n: np.zeros(shape, dt) for n, shape, dt in self.buffer_specs}
        self.length = 0

    @property
    def cache_bytes(self) -> int:
        """Bytes of the fixed buffers (what the device holds whatever the length)."""
        return sum(b.nbytes for b in self.buffers.values())

    def _run(self, graph: str, ids: list[int]) -> np.ndarray:
        seq, valid = self.graphs[graph]["seq"], len(ids)
        if self.length + valid > self.capacity:
            raise CapacityError(
                f"the static cache holds {self.capacity} tokens and is full (re-export with a larger --static-cache)"
            )
        feed = {
            INPUT_IDS: np.zeros((1, seq), np.int32),
            POSITION_IDS: np.zeros((1, seq), np.int32),
            ATTN_BIAS: static_bias(self.length, valid, seq, self.capacity, self.mask_value),
            **self.buffers,
        }
        feed[INPUT_IDS][0, :valid] = ids
        feed[POSITION_IDS][0] = np.minimum(self.length + np.arange(seq), self.capacity - 1)
        outs = self.sessions[graph].run(None, feed)
        for name, rows in zip(self.buffer_specs, outs[1:]):  # the write rule: rows [0, valid) at [length, +valid)
            self.buffers[name[0]][0, self.length : self.length + valid] = rows[0, :valid]
        self.length += valid
        return outs[0][0, valid - 1]

    def prefill(self, ids: list[int]) -> np.ndarray:
        if self.length + len(ids) + 1 > self.capacity:
            raise CapacityError(
                f"the prompt has {len(ids)} tokens; the static cache holds {self.capacity} "
                "(prompt + new tokens): re-export with a larger --static-cache"
            )
        logits = None
        for s in range(0, len(ids), self.chunk):  # the last chunk is padded at its end; only valid rows are written
            logits = self._run("prefill", ids[s : s + self.chunk])
        assert logits is not None
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self._run("decode", [token])

    # ---- LatentSession's interface, for Generator ---------------------------------------------------------------
    def empty_cache(self, batch: int) -> dict:
        if batch != 1:
            raise CapacityError(f"the static protocol runs one sequence at a time, not a batch of {batch}")
        self.reset()
        return {}

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: dict
    ) -> tuple[np.ndarray, dict]:
        ids = [int(t) for t in np.asarray(input_ids)[0]]
        logits = self.decode(ids[0]) if len(ids) == 1 else self.prefill(ids)
        return logits[None, None], cache

    step_bound = step


def qnn_session_options(backend: str = "htp", options: dict | None = None) -> ort.SessionOptions:
    """Register onnxruntime-qnn's plugin execution provider and return (providers, session options) that run a graph
    on Qualcomm's HTP (the Hexagon NPU; simulated on x86_64) with CPU fallback disabled: a session that loads runs
    wholly on the NPU."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise ManifestError("--provider qnn needs onnxruntime-qnn: pip install 'mla-edge[qnn]'") from None
    if "QNNExecutionProvider" not in {d.ep_name for d in ort.get_ep_devices()}:
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        raise ManifestError("onnxruntime-qnn is installed but offers no QNN device here")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    path = onnxruntime_qnn.get_qnn_htp_path() if backend == "htp" else onnxruntime_qnn.get_library_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        so.add_provider_for_devices(devices[:1], {"backend_path": path, **(options or {})})
    return so

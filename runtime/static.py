"""The static protocol's host side: fixed-capacity latent buffers, the additive mask, and the write rule. No torch.

The graphs (a 1-token decode step and a C-token prefill chunk, every dim fixed, batch 1) read each layer's whole
buffer plus a mask over its valid slots and return only the new rows; this class owns the buffers and writes the
rows at the write index, exactly as `mla_edge.contract.STATIC_WRITE_RULE` says and as the Android engine does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mla_edge.contract import ATTN_BIAS, INPUT_IDS, POSITION_IDS, InputError, static_graph_name

from .manifest import Manifest, ManifestError


def debugging() -> bool:
    """`mla-edge --debug` (or a caller's logging config) turns on the "mla_edge" logger's DEBUG level."""
    return logging.getLogger("mla_edge").isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def native_chatter() -> Iterator[None]:
    """Qualcomm's libraries print banners (`# LIBNATIVE ...`) on the process's C-level stdout and stderr when they load
    and compile, and onnxruntime's Python tools log INFO lines: kept out of the user's terminal (and of `--json`
    output), shown on stderr with --debug. Errors still raise as exceptions."""
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            logging.disable(logging.INFO)
            yield
        finally:
            logging.disable(logging.NOTSET)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if debugging():
                sink.seek(0)
                sys.stderr.write(sink.read().decode("utf-8", "replace"))
                sys.stderr.flush()


class CapacityError(InputError):
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


# Snapdragon SoCs by name -> (QNN soc_model, Hexagon HTP arch), as Qualcomm's QNN SDK numbers them (QnnTypes.h).
QNN_SOCS = {"sm8450": (36, 69), "sm8475": (42, 69), "sm8550": (43, 73), "sm8650": (57, 75), "sm8750": (69, 79)}
# HTP runs an fp32 graph in its fp16 mode, which needs a named SoC: 57 = SM8650, Snapdragon 8 Gen 3 (Hexagon v75).
QNN_HTP_FP16 = {"enable_htp_fp16_precision": "1", "soc_model": "57", "htp_arch": "75"}


def qnn_target(soc: str) -> dict:
    """QNN provider options for one SoC by name (sm8650, ...); a wrong name is a clear error."""
    if soc.lower() not in QNN_SOCS:
        raise ManifestError(f"unknown Snapdragon SoC {soc!r} (choose from {', '.join(QNN_SOCS)})")
    model, arch = QNN_SOCS[soc.lower()]
    return {"soc_model": str(model), "htp_arch": str(arch)}


def qnn_versions() -> dict:
    """The onnxruntime-qnn release and the QNN SDK inside it: what a compiled context binary is tied to."""
    try:
        import onnxruntime_qnn
        from onnxruntime_qnn import build_and_package_info
    except ImportError:
        return {}
    return {"onnxruntime_qnn": onnxruntime_qnn.__version__, "qnn_sdk": build_and_package_info.qnn_version}


def qnn_context_mismatch(ctx: dict, qnn_options: dict | None) -> str | None:
    """Why a compiled QNN context cannot serve this session (None when it can), in one line: it was compiled for
    another SoC than the one asked for, or by another QNN SDK than the one installed. The Android engine says the
    same (FileChoice.kt)."""
    want = (qnn_options or {}).get("soc_model", ctx["soc_model"])
    if want != ctx["soc_model"]:
        soc = f"{ctx['soc']} (soc_model {ctx['soc_model']})"
        return f"it was compiled for {soc}, this session asks for soc_model {want}"
    sdk = qnn_versions().get("qnn_sdk")
    if ctx.get("qnn_sdk") and sdk and ctx["qnn_sdk"] != sdk:
        return f"it was compiled by QNN SDK {ctx['qnn_sdk']}, this machine has {sdk}"
    return None


class StaticSession:
    """The static graphs of one precision over an export folder, with the host-owned buffers.

    prefill(ids) -> logits of the last prompt token; decode(token) -> logits of the next; reset() empties the buffers.
    It also offers LatentSession's step interface, so that Generator runs either protocol: the cache it passes
    around is only a token for the buffers kept here (batch 1).
    provider: "cpu" (or "auto"), or "qnn": Qualcomm's HTP through onnxruntime-qnn, with CPU fallback disabled.
    An export with several capacities (manifest static.capacities) runs as STATIC_CAPACITY_RULE says: the smallest
    buffer that holds the sequence, moving up (one copy of the rows) when it fills and back down on reset. Each
    capacity's graphs load when first needed and stay loaded. capacity=N pins one of them (a benchmark's row).
    """

    def __init__(
        self,
        export_dir: str | Path,
        precision: str | None = None,
        provider: str = "auto",
        threads: int | None = None,
        qnn_options: dict | None = None,
        verify: bool | str = True,
        section: dict | None = None,
        capacity: int | None = None,
    ):
        """section: the manifest's static section, for a folder whose manifest is not written yet (the exporter's
        calibration runs the fp32 graphs this way)."""
        precision = precision or "fp32"
        if provider not in ("auto", "cpu", "qnn"):
            raise ManifestError(f"the static protocol runs on provider cpu or qnn, not {provider!r}")
        self.manifest = Manifest({"static": section}, Path(export_dir)) if section else Manifest.read(export_dir)
        st = self.manifest.data.get("static")
        if not st:
            raise ManifestError(f"{self.manifest.folder} has no static protocol: export it with --static-cache N")
        if precision not in st["files"]:
            raise ManifestError(
                f"precision {precision!r} has no static graphs in this export (has: {', '.join(st['files'])})"
            )
        self.top = st["capacity"]
        self.capacities = list(st.get("capacities", [self.top]))
        if capacity is not None:
            if capacity not in self.capacities:
                have = ", ".join(map(str, self.capacities))
                raise ManifestError(f"this export has static graphs for capacities {have}, not {capacity}")
            self.capacities = [capacity]
        self.precision, self.capacity, self.chunk = precision, self.capacities[-1], st["chunk"]
        self.max_context, self.provider = self.capacity, provider
        self.mask_value = float(st.get("mask_values", {}).get(precision, st["mask_value"]))
        self.graphs = st["graphs"]
        self.vocab_size = self.graphs["decode"]["outputs"][0]["shape"][-1]
        self.recorded: dict[str, list[dict]] | None = None  # set to {} to keep every feed (calibration)
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.notes: list[str] = []  # one line per graph that could not use its compiled QNN context
        self._files, self._threads, self._qnn, self._verify = st["files"][precision], threads, qnn_options, verify
        self.length, self.level = 0, self.capacities[0]
        self.buffers: dict[str, np.ndarray] = {}
        self.reset()

    def name(self, kind: str, level: int | None = None) -> str:
        """The manifest's name of the decode or prefill graph at a capacity (the current one by default)."""
        return static_graph_name(kind, level or self.level, self.top)

    def _open(self, level: int) -> None:
        """Both graphs of one capacity, loaded unless they are already."""
        from .session import physical_cores

        for kind in ("decode", "prefill"):
            name = self.name(kind, level)
            if name in self.sessions:
                continue
            entry = self._files[name]
            ctx = entry.get("qnn_context")
            why = qnn_context_mismatch(ctx, self._qnn) if self.provider == "qnn" and ctx else None
            use_ctx = self.provider == "qnn" and ctx and why is None
            if why:
                self.notes.append(f"not using the QNN context {ctx['path']}: {why}; compiling {entry['path']} instead")
                logging.getLogger("mla_edge").warning(self.notes[-1])
            path = self.manifest.verified_path(ctx if use_ctx else entry, self._verify)  # compiled once: no compile
            if self.provider == "qnn":  # HTP runs fp32 graphs in its fp16 mode; QDQ graphs as they are
                fp16 = QNN_HTP_FP16 if self.precision == "fp32" else {}
                so = qnn_session_options("htp", {**fp16, **(self._qnn or {})})
                kw = {}  # the provider is in the session options
            else:
                so = ort.SessionOptions()
                so.intra_op_num_threads = self._threads or physical_cores()
                so.log_severity_level = 3
                kw = {"providers": ["CPUExecutionProvider"]}
            try:
                with native_chatter():
                    self.sessions[name] = ort.InferenceSession(str(path), so, **kw)
            except Exception as e:  # onnxruntime's own error types
                raise ManifestError(f"onnxruntime cannot load {path.name}: {e}") from None

    def _buffers(self, level: int) -> dict[str, np.ndarray]:
        spec = self.graphs[self.name("decode", level)]["inputs"][len((INPUT_IDS, POSITION_IDS, ATTN_BIAS)) :]
        return {v["name"]: np.zeros(v["shape"], np.dtype(v["dtype"])) for v in spec}

    def _move(self, level: int) -> None:
        """To a larger capacity: its graphs, its buffers, and the filled slots copied over (STATIC_CAPACITY_RULE)."""
        self._open(level)
        buffers = self._buffers(level)
        for name, b in buffers.items():
            b[:, : self.length] = self.buffers[name][:, : self.length]
        self.level, self.buffers = level, buffers

    def reset(self) -> None:
        self.level = self.capacities[0]
        self._open(self.level)
        self.buffers = self._buffers(self.level)
        self.length = 0

    @property
    def cache_bytes(self) -> int:
        """Bytes of the buffers now held (what the device holds whatever the length, at this capacity)."""
        return sum(b.nbytes for b in self.buffers.values())

    def _run(self, kind: str, ids: list[int]) -> np.ndarray:
        """One graph call on up to seq tokens; returns the logits of the valid ones (valid, V)."""
        valid = len(ids)
        if self.length + valid > self.capacity:
            raise CapacityError(
                f"the static cache holds {self.capacity} tokens and is full (re-export with a larger --static-cache)"
            )
        if self.length + valid > self.level:
            self._move(next(c for c in self.capacities if c >= self.length + valid))
        graph, n = self.name(kind), self.level
        seq = self.graphs[graph]["seq"]
        feed = {
            INPUT_IDS: np.zeros((1, seq), np.int32),
            POSITION_IDS: np.zeros((1, seq), np.int32),
            ATTN_BIAS: static_bias(self.length, valid, seq, n, self.mask_value),
            **self.buffers,
        }
        feed[INPUT_IDS][0, :valid] = ids
        feed[POSITION_IDS][0] = np.minimum(self.length + np.arange(seq), n - 1)
        if self.recorded is not None:
            self.recorded.setdefault(graph, []).append({k: v.copy() for k, v in feed.items()})
        outs = self.sessions[graph].run(None, feed)
        for name, rows in zip(self.buffers, outs[1:]):  # the write rule: rows [0, valid) at [length, +valid)
            self.buffers[name][0, self.length : self.length + valid] = rows[0, :valid]
        self.length += valid
        return outs[0][0, :valid]

    def prefill(self, ids: list[int]) -> np.ndarray:
        if self.length + len(ids) + 1 > self.capacity:
            raise CapacityError(
                f"the prompt has {len(ids)} tokens; the static cache holds {self.capacity} "
                "(prompt + new tokens): re-export with a larger --static-cache"
            )
        last = None
        for s in range(0, len(ids), self.chunk):  # only the last token's logits are kept
            last = self._run("prefill", ids[s : s + self.chunk])
        assert last is not None
        return last[-1]

    def score(self, ids: list[int]) -> np.ndarray:
        """Logits (len(ids), V) of every token, fed in prefill chunks after what the buffers hold (the last chunk is
        padded at its end; only valid rows are written)."""
        if not ids:
            raise InputError("no tokens to feed")
        return np.concatenate([self._run("prefill", ids[s : s + self.chunk]) for s in range(0, len(ids), self.chunk)])

    def decode(self, token: int) -> np.ndarray:
        return self._run("decode", [token])[0]

    # ---- LatentSession's interface, for Generator ---------------------------------------------------------------
    def empty_cache(self, batch: int) -> dict:
        if batch != 1:
            raise CapacityError(f"the static protocol runs one sequence at a time, not a batch of {batch}")
        self.reset()
        return {"length": 0}

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: dict,
        logits_to_keep: int = 1,
    ) -> tuple[np.ndarray, dict]:
        """Logits of the last token only, whatever logits_to_keep says. The cache token is the buffer length:
        stepping from an older token rewinds (slots past it are masked and get overwritten), so a benchmark can
        decode several times from one prefill, as with the dynamic cache."""
        self.length = cache["length"]
        ids = [int(t) for t in np.asarray(input_ids)[0]]
        logits = self.decode(ids[0]) if len(ids) == 1 else self.prefill(ids)
        return logits[None, None], {"length": self.length}

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
        with native_chatter():
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


def compare(
    reference: StaticSession,
    candidate: StaticSession,
    prompts: list[list[int]],
    steps: int,
    text: list[int],
    window: int,
) -> dict:
    """The candidate (say, HTP) against the reference (say, fp32 on the CPU), both static: free-running greedy text
    from each prompt (top-1 agreement, first divergence), teacher-forced max |Δlogit| along the reference's tokens, and
    perplexity of both on `text` in windows of `window` tokens, each a fresh prefill."""
    import time

    from .sampling import perplexity

    runs = []
    for ids in prompts:
        reference.reset()
        candidate.reset()
        a, b = reference.prefill(ids), candidate.prefill(ids)
        diff, ours, theirs = [float(np.abs(a - b).max())], [], []
        for _ in range(steps):
            ours.append(int(b.argmax()))
            theirs.append(int(a.argmax()))
            a, b = reference.decode(theirs[-1]), candidate.decode(theirs[-1])  # teacher-forced on the reference
            diff.append(float(np.abs(a - b).max()))
        free = _greedy(candidate, ids, steps)
        first = next((i for i, (x, y) in enumerate(zip(free, theirs)) if x != y), None)
        runs.append(
            {
                "prompt_tokens": len(ids),
                "top1_agreement": sum(x == y for x, y in zip(ours, theirs)) / steps,
                "greedy_divergence_step": first,
                "max_abs_logit_diff": max(diff),
            }
        )
    report: dict = {"steps": steps, "prompts": runs, "text_tokens": 0}
    if text:
        t0 = time.perf_counter()

        def scorer(sess: StaticSession) -> Callable[[np.ndarray], np.ndarray]:
            def score(x: np.ndarray) -> np.ndarray:  # each window a fresh prefill
                sess.reset()
                return sess.score(x[0].tolist())[None]

            return score

        ppl = {
            key: perplexity(scorer(sess), text, window)
            for key, sess in (("reference", reference), ("candidate", candidate))
        }
        report.update(
            {
                "text_tokens": len(text) - 1,
                "ppl_reference": ppl["reference"],
                "ppl_candidate": ppl["candidate"],
                "seconds": time.perf_counter() - t0,
            }
        )
        report["ppl_change"] = report["ppl_candidate"] / report["ppl_reference"] - 1
    return report


def _greedy(sess: StaticSession, ids: list[int], steps: int) -> list[int]:
    sess.reset()
    logits, out = sess.prefill(ids), []
    for _ in range(steps):
        out.append(int(logits.argmax()))
        logits = sess.decode(out[-1])
    return out


STATIC_PROMPTS = (
    "It was a dark and stormy night, and",
    "The old house stood at the end of the lane, and",
    '"I do not know," said Mr. Brown,',
)


def static_parity(
    manifest: Manifest,
    precisions: list[str] | None,
    provider: str,
    steps: int,
    text: str | None,
    text_tokens: int,
    say: Callable[[str], None],
) -> dict:
    """`mla-edge parity --static`: each static precision on `provider` against the fp32 static graphs on the CPU,
    over three prompts and the text's first `text_tokens` tokens; one line per precision goes to `say`."""
    from tokenizers import Tokenizer

    if manifest.tokenizer_path is None:
        raise ManifestError("--static parity reads text: this export has no tokenizer.json")
    tok = Tokenizer.from_file(str(manifest.tokenizer_path))
    prompts = [tok.encode(p).ids for p in STATIC_PROMPTS]
    ids = tok.encode(text).ids[:text_tokens] if text else []
    reference = StaticSession(manifest.folder, "fp32", "cpu")
    report: dict = {"export_dir": str(manifest.folder), "provider": provider}
    for precision in precisions or list(manifest.data.get("static", {}).get("files", {})):
        r = report[precision] = compare(
            reference,
            StaticSession(manifest.folder, precision, provider),
            prompts,
            steps,
            ids,
            window=min(256, reference.capacity - 1),
        )
        line = f"{precision:6s} on {provider}: " + "; ".join(
            f"prompt {i}: top-1 {p['top1_agreement']:.1%}, greedy diverges at "
            f"{'never' if p['greedy_divergence_step'] is None else p['greedy_divergence_step']}, "
            f"max|Δlogit| {p['max_abs_logit_diff']:.3f}"
            for i, p in enumerate(r["prompts"])
        )
        if r["text_tokens"]:
            line += (
                f"; ppl {r['ppl_candidate']:.3f} vs {r['ppl_reference']:.3f} fp32 CPU ({r['ppl_change']:+.2%}, "
                f"{r['text_tokens']} tokens, {r['seconds']:.0f} s)"
            )
        say(line)
    return report

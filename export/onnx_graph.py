"""PyTorch MLA decoder -> ONNX graphs with the latent cache as explicit inputs and outputs (the contract's protocols).

The dynamic graph (names and symbolic shapes from `mla_edge.contract.dynamic_graph`):
  inputs   input_ids [batch, seq] int64, attention_mask [batch, total_len] int64, position_ids [batch, seq] int64,
           past.{i}.c_kv [batch, past_len, R], past.{i}.k_pe [batch, past_len, Dr]
  outputs  logits [batch, seq, vocab], present.{i}.c_kv [batch, total_len, R], present.{i}.k_pe [batch, total_len, Dr]
Graphs always run the absorbed form, built with ModelOptions(graph_weights=True) so that W_UK / W_UV^T are plain
initializers the quantizers reach (left as in-graph reshapes of kv_b_proj they would stay fp32).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mla_edge.contract import (
    BATCH,
    LOGITS,
    LOGITS_TO_KEEP,
    PAST_LEN,
    SEQ,
    TOTAL_LEN,
    CacheContract,
    dynamic_graph,
    static_graph,
)
from mla_edge.models.mla import MLAForCausalLM

DEFAULT_OPSET = 21  # int4 (MatMulNBits/GatherBlockQuantized) needs 21
EXTERNAL_DATA_BYTES = 64 << 20  # past 64 MiB of weights, keep them beside the graph (see quantize.EXTERNAL_DATA_BYTES)


class OnnxDecoder(nn.Module):
    """Flat-argument view of MLAForCausalLM for tracing: (ids, mask, positions, *past) -> (logits, *present)."""

    model: MLAForCausalLM

    def __init__(self, model: MLAForCausalLM):
        super().__init__()
        self.model = model
        self.num_layers = model.cfg.num_hidden_layers
        self.per_layer = len(CacheContract.from_config(model.cfg, model.options.cache_dtype).kinds)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        n = self.per_layer
        cache = [tuple(past[n * i : n * (i + 1)]) for i in range(self.num_layers)]
        logits, new = self.model(input_ids, position_ids, attention_mask, cache)
        return (logits, *[t for entries in new for t in entries])


def example_inputs(cfg, batch: int = 2, seq: int = 3, past: int = 4, cache_dtype: str = "fp32"):
    """Sizes >= 2 and all different: torch.export specialises sizes 0 and 1 and merges equal ones."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = (torch.arange(seq) + past)[None].expand(batch, seq).contiguous()
    contract = CacheContract.from_config(cfg, cache_dtype)
    cache = []
    for _, kind in contract.entries():
        shape = (batch, past, contract.width(kind))
        if contract.element_type(kind) == "int8":
            cache.append(torch.randint(-127, 128, shape, generator=g, dtype=torch.int8))
        else:
            x = torch.rand(shape, generator=g) + (0.01 if kind.endswith("_scale") else -0.5)
            cache.append(x.half() if contract.element_type(kind) == "float16" else x)
    return (ids, mask, pos, *cache)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.onnx's and onnxruntime.quantization's chatter (their errors still raise)."""
    import onnxruntime as ort

    loggers = [logging.getLogger(n) for n in ("", "torch.onnx", "torch.export", "onnxruntime", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)  # the sessions onnxruntime.quantization builds inside (calibration)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default: warnings
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_onnx(model: MLAForCausalLM, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Trace the dynamic graph with torch.onnx.export(dynamo=True) and named dynamic dims. The model must be built
    with ModelOptions(graph_weights=True): the LM head is then untied, so it is MatMul(h, constant W^T), which the
    quantizers reach (tied, int8/int4 would dequantize and transpose the whole embedding every step)."""
    cfg, cache_dtype = model.cfg, model.options.cache_dtype
    dynamic_shapes = dynamic_dims(len(CacheContract.from_config(cfg, cache_dtype).entries()))
    spec = dynamic_graph(CacheContract.from_config(cfg, cache_dtype), cfg.vocab_size)
    _need_graph_weights(model)
    return trace(OnnxDecoder(model), example_inputs(cfg, cache_dtype=cache_dtype), spec, path, opset, dynamic_shapes)


def dynamic_dims(n_cache: int) -> tuple:
    """The dynamic graph's named dims: (input_ids, attention_mask, position_ids, cache entries)."""
    from torch.export import Dim

    batch, seq, past, total = Dim(BATCH, min=1), Dim(SEQ, min=1), Dim(PAST_LEN, min=0), Dim(TOTAL_LEN, min=1)
    return (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple({0: batch, 1: past} for _ in range(n_cache)),
    )


def _need_graph_weights(model: MLAForCausalLM) -> None:
    if not model.options.graph_weights:
        raise ValueError("export needs a model built with ModelOptions(graph_weights=True)")


class StaticDecoder(nn.Module):
    """Flat-argument view of MLAForCausalLM.forward_static for tracing: (ids int32, positions int32, attn_bias,
    *buffers) -> (logits, *new rows). RoPE rows are a Gather on constant cos/sin tables of `capacity` positions."""

    model: MLAForCausalLM
    cos_table: torch.Tensor
    sin_table: torch.Tensor

    def __init__(self, model: MLAForCausalLM, capacity: int):
        super().__init__()
        from mla_edge.models.rope import cos_sin

        self.model = model
        cos, sin = cos_sin(model.inv_freq, model.rope_factor, torch.arange(capacity)[None])
        self.register_buffer("cos_table", cos[0].contiguous())  # (N, Dr/2)
        self.register_buffer("sin_table", sin[0].contiguous())

    def forward(self, input_ids, position_ids, attn_bias, *buffers):
        cache = [tuple(buffers[2 * i : 2 * i + 2]) for i in range(len(buffers) // 2)]
        cos = nn.functional.embedding(position_ids, self.cos_table)  # (1,S,Dr/2): a Gather on a constant table
        sin = nn.functional.embedding(position_ids, self.sin_table)
        logits, rows = self.model.forward_static(input_ids, cos, sin, attn_bias, cache)
        return (logits, *[t for pair in rows for t in pair])


def export_static(model: MLAForCausalLM, path: str | Path, capacity: int, seq: int, opset: int = DEFAULT_OPSET) -> Path:
    """One graph of the static protocol: S = seq new tokens over a buffer of `capacity` slots, every dim fixed."""
    cfg = model.cfg
    contract = CacheContract.from_config(cfg)
    spec = static_graph(contract, cfg.vocab_size, capacity, seq)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=g, dtype=torch.int32)
    pos = torch.arange(seq, dtype=torch.int32)[None]
    bias = torch.zeros(1, seq, capacity + seq)
    buffers = [torch.randn(1, capacity, contract.width(k), generator=g) for _, k in contract.entries()]
    _need_graph_weights(model)
    return trace(StaticDecoder(model, capacity), (ids, pos, bias, *buffers), spec, path, opset, None)


def trace(module: nn.Module, inputs: tuple, spec: dict, path: str | Path, opset: int, dynamic_shapes: Any) -> Path:
    """torch.onnx.export(dynamo=True) with the spec's I/O names, external data past 64 MiB, every dim named as the
    spec says, and onnx's full checker."""
    import onnx

    path = Path(path)
    in_names, out_names = [v["name"] for v in spec["inputs"]], [v["name"] for v in spec["outputs"]]
    n_bytes = sum(p.numel() * 4 for p in module.parameters())
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as log:
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=in_names,
                output_names=out_names,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        except Exception as e:
            raise RuntimeError(f"torch.onnx.export failed: {e}\n{log.getvalue()[-2000:]}") from e
    assert program is not None  # dynamo=True always returns a program
    program.save(str(path), external_data=n_bytes > EXTERNAL_DATA_BYTES)
    # The program's graph outlives this call (something in torch.onnx keeps it) and its initializers wrap the
    # module's parameters: cut them loose, or the PyTorch weights stay in memory after the caller drops the model.
    for value in program.model.graph.initializers.values():
        value.const_value = None
    program.exported_program = None
    del program
    proto = onnx.load(str(path), load_external_data=False)  # the graph only; external weights stay where they are
    name_dims(proto, spec)
    if "optional_inputs" in spec:
        keep_last_logits(proto)
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def model_files(path: Path) -> list[str]:
    """The graph file first, then any external-data files it references."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    extra = {
        e.value
        for t in _get_all_tensors(proto)
        if uses_external_data(t)
        for e in t.external_data
        if e.key == "location"
    }
    return [path.name, *sorted(extra)]


SHARED_MIN_BYTES = 1024  # smaller initializers stay in their graph


def share_weights(paths: list[Path], data: Path) -> None:
    """Several graphs of the same weights (the static protocol's capacities) made to read one external-data file:
    every initializer of at least SHARED_MIN_BYTES is stored once in `data` (by content), each graph points at it,
    and the graphs' own data files (written beside them in the same folder) are removed."""
    import hashlib

    import onnx
    from onnx.external_data_helper import _get_all_tensors, set_external_data

    seen: dict[bytes, tuple[int, int]] = {}
    own: set[str] = set()
    protos = []
    with open(data, "wb") as out:
        for path in paths:
            own.update(model_files(path)[1:])
            proto = onnx.load(str(path))  # with its weights
            for t in _get_all_tensors(proto):
                raw = t.raw_data
                if len(raw) < SHARED_MIN_BYTES:
                    continue
                key = hashlib.sha256(raw).digest() + f"{t.data_type} {list(t.dims)}".encode()
                if key not in seen:
                    align = 4096 if len(raw) >= 1 << 16 else 64  # big ones page-aligned: onnxruntime may map them
                    out.write(b"\0" * (-out.tell() % align))
                    seen[key] = (out.tell(), len(raw))
                    out.write(raw)
                offset, length = seen[key]
                set_external_data(t, data.name, offset, length)
                t.ClearField("raw_data")
            protos.append(proto)
    for path, proto in zip(paths, protos):
        onnx.save_model(proto, str(path))
    for name in own - {data.name}:
        (data.parent / name).unlink(missing_ok=True)


def name_dims(proto, specs: dict) -> None:
    """Check the graph's I/O names against the contract and give every dynamic dim its contract name (torch names
    the present length 'past_len + seq')."""
    for values, spec in ((proto.graph.input, specs["inputs"]), (proto.graph.output, specs["outputs"])):
        if [v.name for v in values] != [s["name"] for s in spec]:
            raise RuntimeError(
                f"exported graph names {[v.name for v in values]} differ from the contract {[s['name'] for s in spec]}"
            )
        for v, s in zip(values, spec):
            for dim, want in zip(v.type.tensor_type.shape.dim, s["shape"]):
                if isinstance(want, str):
                    dim.ClearField("dim_value")
                    dim.dim_param = want


def keep_last_logits(proto) -> None:
    """The contract's optional logits_to_keep: Slice the LM head's input to its last k positions (starts = -k; k = 0,
    the default, keeps all). An input that is also an initializer is one a caller may override or leave alone, so
    callers that never heard of it (onnxruntime-genai, older runtimes) still get every position."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    head = next((n for n in g.node if LOGITS in n.output), None)
    weights = {t.name for t in g.initializer}
    if head is None or head.op_type != "MatMul" or head.input[0] in weights or head.input[1] not in weights:
        raise RuntimeError(f"the LM head is not MatMul(hidden, weight): {head and head.op_type}")
    x, kept = head.input[0], "lm_head_input_kept"
    g.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    g.initializer.extend(
        [
            numpy_helper.from_array(np.zeros(1, np.int64), LOGITS_TO_KEEP),
            numpy_helper.from_array(np.asarray([np.iinfo(np.int64).max], np.int64), "logits_to_keep_end"),
            numpy_helper.from_array(np.ones(1, np.int64), "logits_to_keep_axis"),
        ]
    )
    nodes = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], ["logits_to_keep_start"], name="logits_to_keep_neg"),
        helper.make_node(
            "Slice",
            [x, "logits_to_keep_start", "logits_to_keep_end", "logits_to_keep_axis"],
            [kept],
            name="logits_to_keep_slice",
        ),
    ]
    at = list(g.node).index(head)
    for k, node in enumerate(nodes):
        g.node.insert(at + k, node)
    head.input[0] = kept


def save_ort_format(src: Path, dst: Path) -> bool:
    """onnxruntime's own format with every graph optimization applied for this machine (the 'Fixed' style of
    onnxruntime.tools.convert_onnx_models_to_ort): it loads with less memory and nothing left to optimize.
    Returns False (and writes nothing) where the format cannot hold the model: int4 Gather weights, today, and
    models past 1.9 GB (a FlatBuffer holds 2 GiB at most)."""
    import onnxruntime as ort

    from .quantize import model_bytes

    if model_bytes(src) > 1.9e9:
        return False

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    try:
        check = ort.SessionOptions()
        check.log_severity_level = 4
        ort.InferenceSession(str(dst), check, providers=["CPUExecutionProvider"])
        return True
    except Exception:  # onnxruntime's own error types
        dst.unlink(missing_ok=True)
        return False

"""Quantize an exported fp32 graph with onnxruntime.quantization (the successor of onnxruntime-tools).

int8      dynamic, per-channel int8 weights on MatMul and Gather (the embedding); activations quantized at run time.
int4      4-bit weights by blocks (MatMulNBits, symmetric, configurable block size) with int8 activations quantized per
          block at run time (accuracy_level 4, as int8-block and onnxruntime-genai's CPU int4: 1.7x faster than fp32
          activations on SmolLM2 here, same perplexity); the LM head and the embedding stay 8-bit, as in llama.cpp's
          4-bit files.
int8-qdq  static QDQ calibrated on prefill and decode steps of a text: the format NPU execution providers want.
w8a32     weight-only int8 by blocks (MatMulNBits bits=8), fp32 activations: int8's size without quantizing
          activations, which real LLMs' outlier activations do not survive (see the README's convert section).
int8-block  int8 weights by blocks and int8 activations quantized per block of K at run time (MatMulNBits bits=8,
          accuracy_level 4, the form onnxruntime-genai uses on CPUs): an outlier spoils only its own block of 32, so
          real LLMs keep their quality, at dynamic int8's speed. The embedding Gather is per-row int8 (w8a32 too).
MoE experts (com.microsoft MoE nodes) become QMoE nodes, int8 or int4 by blocks (see INT8_EXPERT_BLOCKS).
Every writer keeps weights in an external data file past EXTERNAL_DATA_BYTES (64 MiB).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mla_edge.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    STATIC_ROPE_TABLES,
    CacheContract,
    InputError,
)

# The ops we quantize. Always passed explicitly: the default list reaches ops that break attention.
OP_TYPES = ["MatMul", "Gather"]
# Weights past 64 MiB go to <file>.data beside the graph (protobuf caps a file at 2 GiB; the runtime loads graphs past
# 64 MiB from the .onnx, not the .ort). onnxruntime then reads each tensor straight from the data file instead of
# holding the parsed protobuf and its tensors at once: SmolLM2's int8-block loaded at 286 instead of 416 MiB peak RSS
# and in ~0.55 instead of ~1.0 s (2026-12-07, 2 runs each; page-aligned offsets, which allow mmap, changed neither).
EXTERNAL_DATA_BYTES = 64 << 20
STREAMING_BYTES = 256 << 20  # fp32 graphs past 256 MiB are quantized tensor by tensor (quantize_int8_streaming)
# int8 experts are quantized by blocks of K, the first of these that divides both widths: onnxruntime's CPU QMoE (1.32)
# then runs them on MatMulNBits' int8 kernels (activations quantized per block at run time); with one scale per row it
# dequantizes each chosen expert to fp32 and runs an SGEMM. DeepSeek-V2-Lite dimensions, 2 layers, decode at past 128:
# 44 ms per row, 25 ms by blocks of 32, 64 or 128 alike; 128 packs fastest (load 1.6 vs 2.1 s) and holds least (peak RSS
# 1,146 vs 1,296 MiB). 2026-12-07, this 2-core machine, onnxruntime 1.32.0.
INT8_EXPERT_BLOCKS = (128, 64, 32)


def model_bytes(path: Path) -> int:
    """A graph file plus the external data files beside it."""
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def save_model(model, path: Path, external: bool | None = None) -> None:
    """onnx.save_model, with the weights in `<name>.data` beside the graph when `external`, which by default is
    whether they pass EXTERNAL_DATA_BYTES."""
    import onnx

    if external is None:
        external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    Path(str(path) + ".data").unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
        Path(str(path) + ".data").chmod(path.stat().st_mode & 0o777)  # onnx writes it 0600; the graph is the umask's
    else:
        onnx.save_model(model, str(path))


def batched_weight_matmuls(path: Path) -> list[str]:
    """MatMul nodes whose constant weight is 3-D: the absorbed W_UK / W_UV^T, one matrix per head."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(ranks.get(i, 2) > 2 for i in n.input)]


def rope_table_gathers(path: Path) -> list[str]:
    """Gather nodes on the static graphs' RoPE tables (contract.STATIC_ROPE_TABLES): they stay float."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in STATIC_ROPE_TABLES]


def quantize_int8(src: Path, dst: Path) -> None:
    """Per-channel int8 for 2-D weights; the 3-D per-head weights get one scale per tensor in a second pass,
    since onnxruntime's MatMulInteger takes per-channel parameters for 2-D weights only; MoE experts become QMoE.
    Graphs past STREAMING_BYTES take quantize_int8_streaming, which writes the same bytes with far less memory."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if model_bytes(src) > STREAMING_BYTES:
        quantize_int8_streaming(src, dst)
        return
    batched = batched_weight_matmuls(src)
    tables = rope_table_gathers(src)
    pre = dst.with_name(".pre-" + dst.name) if has_experts(src) else dst
    for kw in (
        {"src": src, "per_channel": True, "nodes_to_exclude": batched + tables, "op_types_to_quantize": OP_TYPES},
        {"src": pre, "per_channel": False, "nodes_to_quantize": batched, "op_types_to_quantize": ["MatMul"]},
    ):
        if kw.get("nodes_to_quantize") == []:
            continue
        quantize_dynamic(
            str(kw.pop("src")),
            str(pre),
            weight_type=QuantType.QInt8,
            use_external_data_format=model_bytes(src) > EXTERNAL_DATA_BYTES,
            extra_options={"MatMulConstBOnly": True},
            **kw,
        )
    if pre != dst:
        quantize_experts(pre, dst, bits=8, block_sizes=INT8_EXPERT_BLOCKS)
        for f in pre.parent.glob(pre.name + "*"):
            f.unlink()


def _plain_gemm(node) -> str | None:
    """'transB' or 'plain' for a Gemm that is a MatMul (+ bias): alpha = beta = 1, A not transposed."""
    from onnx import helper

    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
        return None
    return "transB" if a.get("transB", 0) else "plain"


class _Weights:
    """The initializers of a graph, read one at a time: external ones memory-mapped from their data file, so a
    graph of any size is never held in memory whole."""

    def __init__(self, path: Path):
        import onnx

        self.folder = path.parent
        self.proto = onnx.load(str(path), load_external_data=False)
        self.tensors = {t.name: t for t in self.proto.graph.initializer}

    def array(self, name: str) -> np.ndarray:
        from onnx import helper, numpy_helper
        from onnx.external_data_helper import uses_external_data

        t = self.tensors[name]
        if not uses_external_data(t):
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        return np.memmap(
            self.folder / info["location"], dtype, "r", int(info.get("offset", 0)), tuple(t.dims) or (1,)
        ).reshape(tuple(t.dims))

    def is_float(self, name: str, ranks: tuple[int, ...]) -> bool:
        from onnx import TensorProto

        t = self.tensors.get(name)
        return t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) in ranks


class _DataFile:
    """Appends tensors to one external data file and returns initializers that point into it."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        self.f = open(path, "wb")  # noqa: SIM115  # closed by close()

    def tensor(self, name: str, arr: np.ndarray):
        from onnx import TensorProto, helper

        pad = -self.offset % 64
        self.f.write(b"\0" * pad)
        self.offset += pad
        rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim else arr.reshape(1, 1)
        for start in range(0, rows.shape[0], 4096):  # copied in slices, never whole
            self.f.write(np.ascontiguousarray(rows[start : start + 4096]).tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self.offset), ("length", arr.nbytes)):
            t.external_data.add(key=key, value=str(value))
        self.offset += arr.nbytes
        return t

    def close(self) -> None:
        self.f.close()


# A node converter for _rewrite: (node, weights, data file, new initializers) -> replacement nodes, or None to keep
Convert = Callable[[Any, _Weights, _DataFile, list], "list | None"]


def _rewrite(src: Path, dst: Path, convert: Convert) -> None:
    """Stream src into dst node by node: `convert` may replace a node and add initializers; the initializers the
    new graph still uses are copied across in slices. Every large tensor goes to <dst>.data; src may not be dst."""
    import onnx

    w = _Weights(src)
    graph = w.proto.graph
    out = _DataFile(dst.with_name(dst.name + ".data"))
    inits: list = []
    nodes: list = []
    try:
        for node in graph.node:
            replaced = convert(node, w, out, inits)
            nodes.extend([node] if replaced is None else replaced)
        used = {i for n in nodes for i in n.input}
        for t in graph.initializer:
            if t.name in used:
                big = len(t.raw_data) == 0 and t.data_location == 1
                inits.append(out.tensor(t.name, w.array(t.name)) if big else t)
    finally:
        out.close()
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    onnx.save_model(w.proto, str(dst))


def _qmoe(
    node,
    w: _Weights,
    out: _DataFile,
    inits: list,
    bits: int,
    block_sizes: tuple[int, ...] = (),
    accuracy_level: int = 0,
) -> list | None:
    """A com.microsoft MoE node -> QMoE with the same routing input and attributes, the experts quantized one at a
    time by quantize_rows (by blocks of the first of block_sizes that divides the hidden and expert widths, else one
    scale per row); accuracy_level as MatMulNBits' (4: int8 activations by blocks)."""
    from onnx import helper, numpy_helper

    if node.op_type != "MoE" or node.domain != "com.microsoft":
        return None
    hidden, width = w.tensors[node.input[4]].dims[1:]
    block = next((b for b in block_sizes if width % b == 0 and hidden % b == 0), 0)
    names = []
    for k in (2, 4):
        arr = w.array(node.input[k])
        parts = [quantize_rows(np.asarray(arr[e : e + 1], np.float32), bits, block) for e in range(arr.shape[0])]
        codes, scale = np.concatenate([c for c, _ in parts]), np.concatenate([s for _, s in parts])
        del parts
        inits += [
            out.tensor(f"{node.input[k]}_q{bits}", codes),
            numpy_helper.from_array(scale, f"{node.input[k]}_scale"),
        ]
        names += [f"{node.input[k]}_q{bits}", f"{node.input[k]}_scale", ""]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs.update(expert_weight_bits=bits, weights_prepacked=0, **({"block_size": block} if block else {}))
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    return [
        helper.make_node("QMoE", [*node.input[:2], *names[:-1]], node.output, node.name, "", "com.microsoft", **attrs)
    ]


def has_experts(path: Path) -> bool:
    import onnx

    return any(n.op_type == "MoE" for n in onnx.load(str(path), load_external_data=False).graph.node)


def quantize_experts(
    src: Path, dst: Path, bits: int, block_sizes: tuple[int, ...] = (), accuracy_level: int = 0
) -> None:
    """Every MoE node of src -> QMoE (see _qmoe), written to dst; everything else unchanged."""
    _rewrite(src, dst, lambda node, w, out, inits: _qmoe(node, w, out, inits, bits, block_sizes, accuracy_level))


def quantize_int8_streaming(src: Path, dst: Path) -> None:
    """quantize_int8's recipe written tensor by tensor, for graphs too big for onnxruntime's quantizer (which holds
    about 3x the fp32 weights): the same nodes quantize_dynamic writes (DynamicQuantizeLinear -> MatMulInteger ->
    Cast -> Mul, with Gemm as MatMul(A, B^T); Gather of a uint8 table -> DequantizeLinear; QMoE for experts) and
    the same numbers, from onnxruntime.quantization's own quantize_data, per output column for 2-D weights and
    per tensor for 3-D ones. Peak memory is about one weight tensor; the output's weights go to <dst>.data."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.quant_utils import quantize_data

    small = numpy_helper.from_array
    activations: dict[str, tuple[str, str, str]] = {}
    done: set[str] = set()

    def per_tensor(arr: np.ndarray, qtype: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        zp, scale, q = quantize_data(np.asarray(arr, np.float32).reshape(-1), qtype, symmetric)
        return q.reshape(arr.shape), np.asarray(scale, np.float32), np.asarray(zp)

    def convert(node, w: _Weights, out: _DataFile, inits: list) -> list | None:
        gemm = node.op_type == "Gemm" and w.is_float(node.input[1], (2,)) and _plain_gemm(node)
        if gemm or (node.op_type == "MatMul" and w.is_float(node.input[1], (2, 3))):
            name = node.input[1]
            arr = w.array(name)
            if gemm == "transB":  # as onnxruntime does: Gemm -> MatMul(A, B^T) (+ C)
                name, arr = name + "_Transposed", arr.T
            if name not in done:
                if arr.ndim == 2:  # per output column, symmetric int8
                    cols = np.ascontiguousarray(np.asarray(arr, np.float32).T)  # (N, K): one column per row
                    q = np.empty(cols.shape, np.int8)
                    scale = np.empty(cols.shape[0], np.float32)
                    for j in range(cols.shape[0]):
                        q[j], scale[j], _ = per_tensor(cols[j], TensorProto.INT8, True)
                    q, zp = q.T, np.zeros(cols.shape[0], np.int8)
                    del cols
                else:
                    q, scale, zp = per_tensor(arr, TensorProto.INT8, True)
                    zp = zp.astype(np.int8)
                inits += [out.tensor(name + "_quantized", q), small(scale, name + "_scale")]
                inits.append(small(zp, name + "_zero_point"))
                done.add(name)
            nodes = []
            a = node.input[0]
            if a not in activations:
                activations[a] = (a + "_quantized", a + "_scale", a + "_zero_point")
                nodes.append(
                    helper.make_node("DynamicQuantizeLinear", [a], list(activations[a]), a + "_QuantizeLinear")
                )
            aq, ascale, azp = activations[a]
            y = node.output[0]
            if gemm and len(node.input) > 2 and node.input[2]:
                nodes.append(helper.make_node("Add", [y + "_nobias", node.input[2]], [y]))
                y += "_nobias"
            return nodes + [
                helper.make_node("MatMulInteger", [aq, name + "_quantized", azp, name + "_zero_point"], [y + "_q"]),
                helper.make_node("Cast", [y + "_q"], [y + "_cast"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [ascale, name + "_scale"], [y + "_scales"]),
                helper.make_node("Mul", [y + "_cast", y + "_scales"], [y], node.name),
            ]
        if node.op_type == "Gather" and w.is_float(node.input[0], (2,)) and node.input[0] not in STATIC_ROPE_TABLES:
            name, y = node.input[0], node.output[0]
            q, scale, zp = per_tensor(w.array(name), TensorProto.UINT8, False)
            inits += [out.tensor(name + "_quantized", q.astype(np.uint8)), small(scale, name + "_scale")]
            inits.append(small(zp.astype(np.uint8), name + "_zero_point"))
            return [
                helper.make_node("Gather", [name + "_quantized", node.input[1]], [y + "_quantized"], axis=0),
                helper.make_node("DequantizeLinear", [y + "_quantized", name + "_scale", name + "_zero_point"], [y]),
            ]
        return _qmoe(node, w, out, inits, 8, INT8_EXPERT_BLOCKS)

    _rewrite(src, dst, convert)


def quantize_int4(
    src: Path, dst: Path, block_size: int = 32, external: bool | None = None, bits: int = 4, accuracy_level: int = 0
) -> None:
    """MatMulNBits through onnxruntime's MatMulNBitsQuantizer (bits=8: w8a32, int8 weights by blocks with fp32
    activations; accuracy_level 4: int8 activations by blocks), the embedding Gather per-row int8. MoE experts are
    turned into QMoE first, streaming, so that the quantizer (which holds the graph in memory) never sees them in
    fp32. With 4 bits the LM head and the embedding take 8, as llama.cpp's 4-bit files keep them
    (SmolLM2-135M-Instruct.Q4_1.gguf: token_embd Q8_0): on the converted SmolLM2 an all-4-bit graph cost +111%
    perplexity."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"int4 block size must be a power of two >= 16, got {block_size}")
    pre = dst.with_name(".pre-" + dst.name)
    if has_experts(src):
        quantize_experts(src, pre, bits=bits, block_sizes=(block_size,), accuracy_level=accuracy_level)
        src = pre
    model = onnx.load(str(src))
    heads = [n.name for n in model.graph.node if n.op_type == "MatMul" and LOGITS in n.output] if bits == 4 else []
    passes = [(bits, {"nodes_to_exclude": heads})] + ([(8, {"nodes_to_include": heads})] if heads else [])
    for b, nodes in passes:
        q = MatMulNBitsQuantizer(
            model,
            bits=b,
            block_size=block_size,
            is_symmetric=True,  # asymmetric (Q4_1's form) measured no better: +79% against +85% on SmolLM2
            accuracy_level=accuracy_level or None,
            op_types_to_quantize=("MatMul",),  # its Gather takes 4 bits only: the embedding is per-row int8 below
            quant_axes=(("MatMul", 0),),
            **nodes,
        )
        q.process()
        model = q.model.model
    weights = {t.name for t in model.graph.initializer}
    gathers = any(n.op_type == "Gather" and n.input[0] in weights for n in model.graph.node)
    mid = dst.with_name(".mid-" + dst.name) if gathers else dst
    save_model(model, mid, external)
    del model, q
    if gathers:  # the embedding as per-row int8 (measured on SmolLM2 int8-block: 292 -> 208 MB, peak RSS -110 MiB,
        # perplexity +0.09%)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        big = model_bytes(mid) > EXTERNAL_DATA_BYTES if external is None else external
        quantize_dynamic(mid, dst, op_types_to_quantize=["Gather"], per_channel=True, weight_type=QuantType.QInt8,
                         use_external_data_format=big)  # fmt: skip
    for f in [*pre.parent.glob(pre.name + "*"), *mid.parent.glob(".mid-" + dst.name + "*")]:
        f.unlink()


def quantize_rows(w: np.ndarray, bits: int, block_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weight-only quantization of w (E, N, K) along K for QMoE's raw layout (weights_prepacked=0):
    uint8 codes offset by 2^(bits-1) (the op's default zero point), two int4 codes per byte, low nibble first;
    scales (E, N), or (E, N, K / block_size) with blocks."""
    E, N, K = w.shape
    top = (1 << (bits - 1)) - 1
    blocks = w.reshape(E, N, K // block_size, block_size) if block_size else w[..., None, :]
    scale = np.maximum(np.abs(blocks).max(-1), 1e-12) / top
    codes = np.clip(np.rint(blocks / scale[..., None]), -top - 1, top) + (top + 1)
    codes = codes.reshape(E, N, K).astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, (scale if block_size else scale[..., 0]).astype(np.float32)


def calibration_feeds(
    fp32_path: Path,
    tokenizer_path: Path,
    text: str,
    contract: CacheContract,
    windows: int = 6,
    prefill: int = 48,
    decode: int = 12,
) -> list[dict]:
    """Feeds for prefill and decode steps: each window is prefilled, then decoded token by token with the
    fp32 graph's own present cache fed back, so that cache inputs see realistic values and lengths."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_path)).encode(text).ids
    need = prefill + decode
    if len(ids) < need:
        raise InputError(f"calibration text is too short: {len(ids)} tokens, need at least {need}")
    so = ort.SessionOptions()
    so.log_severity_level = 3  # no warnings about the graph's optional inputs on the user's terminal
    sess = ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
    starts = np.linspace(0, len(ids) - need, num=windows).astype(int)
    feeds = []
    for s in starts:
        window = np.asarray(ids[s : s + need], dtype=np.int64)[None]
        past = {
            n: np.zeros((1, 0, contract.width(k)), np.dtype(contract.element_type(k)))
            for n, (_, k) in zip(contract.past_names(), contract.entries())
        }
        for t0, t1 in [(0, prefill)] + [(t, t + 1) for t in range(prefill, need)]:
            feed = {
                INPUT_IDS: window[:, t0:t1],
                ATTENTION_MASK: np.ones((1, t1), np.int64),
                POSITION_IDS: np.arange(t0, t1, dtype=np.int64)[None],
                **past,
            }
            feeds.append(feed)
            outs = sess.run(None, feed)
            past = dict(zip(contract.past_names(), outs[1:]))
    return feeds


def quantize_int8_qdq(src: Path, dst: Path, feeds: list[dict]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=OP_TYPES,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )


# Activation and weight types of the QDQ graphs made for Qualcomm's HTP (onnxruntime's own QNN tooling).
QNN_QDQ = {"w8a16": ("QUInt16", "QUInt8"), "w4a16": ("QUInt16", "QInt4"), "w8a8": ("QUInt8", "QUInt8")}


def quantize_qnn(src: Path, dst: Path, feeds: list[dict], precision: str = "w8a16") -> None:
    """A QDQ graph for the QNN HTP backend with onnxruntime.quantization.execution_providers.qnn: the graph is
    preprocessed for QNN, then calibrated (MinMax) on `feeds` and quantized with QNN's op rules (per-tensor MatMul
    weights: QNN has no per-channel MatMul)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    act, weight = (getattr(QuantType, t) for t in QNN_QDQ[precision])
    pre = dst.with_name(dst.stem + ".pre.onnx")
    model = pre if qnn_preprocess_model(str(src), str(pre)) else src
    try:
        config = get_qnn_qdq_config(str(model), Reader(), activation_type=act, weight_type=weight)
        quantize(str(model), str(dst), config)
    finally:
        pre.unlink(missing_ok=True)

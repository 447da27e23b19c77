"""Quantize an exported fp32 graph with onnxruntime.quantization (the successor of onnxruntime-tools).

int8      dynamic, per-channel int8 weights on MatMul and Gather (the embedding); activations quantized at run time.
int4      weight-only MatMulNBits (and GatherBlockQuantized for the embedding), symmetric, configurable block size.
int8-qdq  static QDQ calibrated on prefill and decode steps of a text: the format NPU execution providers want.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mla_edge.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, CacheContract, InputError

# The ops we quantize. Always passed explicitly: the default list reaches ops that break attention.
OP_TYPES = ["MatMul", "Gather"]


def batched_weight_matmuls(path: Path) -> list[str]:
    """MatMul nodes whose constant weight is 3-D: the absorbed W_UK / W_UV^T, one matrix per head."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(ranks.get(i, 2) > 2 for i in n.input)]


def quantize_int8(src: Path, dst: Path) -> None:
    """Per-channel int8 for 2-D weights; the 3-D per-head weights get one scale per tensor in a second pass,
    since onnxruntime's MatMulInteger takes per-channel parameters for 2-D weights only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    batched = batched_weight_matmuls(src)
    quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=OP_TYPES,
        per_channel=True,
        nodes_to_exclude=batched,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    if batched:
        quantize_dynamic(
            str(dst),
            str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=False,
            nodes_to_quantize=batched,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )


def quantize_int4(src: Path, dst: Path, block_size: int = 32) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"int4 block size must be a power of two >= 16, got {block_size}")
    model = onnx.load(str(src))
    q = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=block_size,
        is_symmetric=True,
        op_types_to_quantize=tuple(OP_TYPES),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    q.process()
    onnx.save_model(q.model.model, str(dst))


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
    sess = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
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
QNN_QDQ = {"w8a16": ("QUInt16", "QUInt8"), "w8a8": ("QUInt8", "QUInt8")}


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

"""The one contract, torch-free: cache kinds, graph I/O names of every protocol, precisions, and the manifest schema.

Imported by the model, the exporter, the runtime and the tests; the Android app reads the same facts from the
manifest (`mla_edge.json`), which is written from here. Nobody re-types a name like "past.3.c_kv".

The latent cache (per layer, MLA's latent only; DeepSeek's kv_cache / pe_cache):
  c_kv  [batch, len, kv_lora_rank]      after kv_a_layernorm
  k_pe  [batch, len, qk_rope_head_dim]  after RoPE, rotary dims in half-rotation layout
For interleaved-RoPE models (DeepSeek-V2/V3) the pairs (x0,x1),(x2,x3),... are rotated and then stored
de-interleaved as [x0', x2', ..., x1', x3', ...], exactly what transformers' DeepseekV3 cache holds. Layers are
ordered 0..L-1 with c_kv before k_pe. With cache dtype "int8" each latent is int8 with one float32 scale per token
(symmetric, max|x| / 127): c_kv, c_kv_scale [batch, len, 1], k_pe, k_pe_scale.

Two graph protocols share that cache:
  dynamic  cache in, cache out: past.{i}.{kind} [batch, past_len, w] -> present.{i}.{kind} [batch, total_len, w];
           the graph concatenates. For laptops and desktops (any batch, any length). An optional input,
           logits_to_keep [1] int64 (default 0 = every position), keeps logits only for the last k positions:
           a prompt's prefill needs one row of [vocab], not seq of them; parity and perplexity keep them all.
  static   every dim fixed, batch 1 (NPUs and mobile providers): a host-owned buffer cache.{i}.{kind} [1, N, w] of
           capacity N goes in whole, with an additive mask over its valid slots; only the S new rows come out
           (new.{i}.{kind} [1, S, w]) and the host writes them at the write index. No concatenation, no copy of the
           past in the graph, no Shape/Range/Cos/Sin/Where: RoPE rows come from a Gather on a constant table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class InputError(ValueError):
    """Bad input that a user can fix (a path, a flag, a file, an argument, a prompt). Every mla-edge error type
    derives from it; the CLI prints it as one line with exit status 2. Any other exception is a bug and keeps its
    traceback."""


def read_user_text(path: Any, what: str) -> str:
    """A text file a user names (calibration or held-out text): it exists, is UTF-8 and holds some text, or one
    line says which of these fails (`what` names the flag)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder, not a text file") from None
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x})") from None
    if not text.strip():
        raise InputError(f"{what} {path} is empty")
    return text


# ---- one vocabulary for precision and dtype ------------------------------------------------------------------------
# weight precisions of an export (one graph file each)
PRECISIONS = ("fp32", "int8", "int4", "int8-qdq", "w8a32", "int8-block")
CACHE_DTYPES = ("fp32", "fp16", "int8")  # how the latent cache is stored (fp16: computed in fp32)
PLAN_DTYPES = ("fp32", "fp16", "int8")  # what the budget planner compares, for weights and cache alike
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
# The element type of each name, as numpy/ONNX spell it (graph specs in the manifest use these).
ELEMENT_TYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8"}
SCALE_DTYPE = "fp32"

# ---- cache kinds and names -----------------------------------------------------------------------------------------
CACHE_FORMAT = "mla-latent-v1"
KINDS = ("c_kv", "k_pe")
INT8_KINDS = ("c_kv", "c_kv_scale", "k_pe", "k_pe_scale")
BATCH, PAST_LEN, SEQ, TOTAL_LEN = "batch", "past_len", "seq", "total_len"
KEPT = "kept"  # the logits' positions: seq, or logits_to_keep of them

# dynamic protocol
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
DYNAMIC_INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)  # then the past names
DYNAMIC_OUTPUTS = (LOGITS,)  # then the present names
LOGITS_TO_KEEP = "logits_to_keep"  # optional: an overridable initializer of the graph, default 0 (all positions)
PAST, PRESENT = "past.{layer}.{kind}", "present.{layer}.{kind}"

# static protocol
ATTN_BIAS = "attn_bias"
STATIC_INPUTS = (INPUT_IDS, POSITION_IDS, ATTN_BIAS)  # then the cache buffers
STATIC_OUTPUTS = (LOGITS,)  # then the new rows
CACHE_BUFFER, NEW_ROWS = "cache.{layer}.{kind}", "new.{layer}.{kind}"
STATIC_GRAPHS = ("decode", "prefill")  # seq 1, and seq = the prefill chunk
# The static graphs' RoPE rows: Gathers on constant tables of each graph's capacity. They stay float in int8 graphs
# (quantized per column they would round differently at each capacity, and moving up would change the tokens).
STATIC_ROPE_TABLES = ("cos_table", "sin_table")
# The static graphs' precisions: fp32 (CPU, NNAPI, CoreML; Qualcomm's HTP runs it in its fp16 mode), int8 (dynamic
# int8 for the CPU), and QDQ made for Qualcomm's HTP: w8a16 (8-bit weights, 16-bit activations), w4a16 (4-bit
# weights, for phone RAM) and w8a8.
STATIC_PRECISIONS = ("fp32", "int8", "w8a16", "w4a16", "w8a8")
# Masked slots get an additive bias per static precision. Float activations (fp32 on the CPU, NNAPI, CoreML and in
# HTP's fp16 mode; dynamic int8 quantizes weights only): -1e4, exact in fp16 and past any score, so that a stale or
# empty slot never leaks (at -50, slots holding rows 10x the usual size moved the demo's fp32 logits by 1.9). QDQ
# graphs: -50, small enough for 16-bit (and 8-bit) quantized activations to keep the unmasked scores' resolution,
# large enough that exp(-50) ~ 2e-22 removes them. The manifest records them as static.mask_values; its mask_value
# (the QDQ one, what readers before mask_values used for every precision) stays for them.
STATIC_MASK_VALUES = {"fp32": -1e4, "int8": -1e4, "w8a16": -50.0, "w4a16": -50.0, "w8a8": -50.0}
STATIC_MASK_VALUE = STATIC_MASK_VALUES["w8a16"]
STATIC_WRITE_RULE = (
    "length = tokens already in the buffer. A step feeds S = seq tokens (the last prefill chunk is padded at its end); "
    "attn_bias[0, q, j] = 0 where j < length (a filled slot) or N <= j <= N + q and j - N < valid (itself and earlier "
    "new tokens), else mask_values[precision]. Then rows [0, valid) of each new.{i}.{kind} are written to slots "
    "[length, length + valid) of cache.{i}.{kind}, and length += valid. length + valid must stay <= N (the padded "
    "rows past valid are never written); position_ids[0, q] = min(length + q, N - 1)."
)

STATIC_CAPACITY_RULE = (
    "capacities lists the buffer sizes N whose graphs the export holds, ascending; the last is capacity. A host runs "
    "the graphs of the smallest N that holds length + valid, starting from the smallest: when a step needs more, it "
    "makes the next N's buffers, copies slots [0, length) of every buffer into them (the rest stay 0) and goes on "
    "there; reset returns to the smallest. A step then costs what N costs, not what the largest capacity does."
)

# ---- the export folder's manifest ------------------------------------------------------------------------------------
MANIFEST = "mla_edge.json"
FORMAT = "mla-edge-export"
FORMAT_VERSION = 2
MODEL_FILE = {p: "model.onnx" if p == "fp32" else f"model.{p}.onnx" for p in PRECISIONS}


def static_graph_name(graph: str, capacity: int, top: int) -> str:
    """A static graph's name in the manifest: "decode" / "prefill" at the largest capacity (what readers written
    before capacities use), "decode-256" / "prefill-256" at a smaller one."""
    return graph if capacity == top else f"{graph}-{capacity}"


def static_file(graph: str, precision: str) -> str:
    """The file of one static graph: static-decode.onnx, static-prefill.onnx (fp32), static-decode.<precision>.onnx."""
    return f"static-{graph}.onnx" if precision == "fp32" else f"static-{graph}.{precision}.onnx"


def ort_name(onnx_name: str) -> str:
    """The ORT-format companion of an .onnx file name."""
    return onnx_name[: -len(".onnx")] + ".ort"


def past_name(layer: int, kind: str) -> str:
    return PAST.format(layer=layer, kind=kind)


def present_name(layer: int, kind: str) -> str:
    return PRESENT.format(layer=layer, kind=kind)


class HasCacheDims(Protocol):
    @property
    def num_hidden_layers(self) -> int: ...
    @property
    def kv_lora_rank(self) -> int: ...
    @property
    def qk_rope_head_dim(self) -> int: ...


Spec = tuple[str, list[Any], str]  # (name, shape with symbolic dims, element type)


@dataclass(frozen=True)
class CacheContract:
    num_layers: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in CACHE_DTYPES:
            raise InputError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.dtype!r}")

    @classmethod
    def from_config(cls, cfg: HasCacheDims, dtype: str = "fp32") -> CacheContract:
        return cls(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype)

    @property
    def kinds(self) -> tuple[str, ...]:
        return INT8_KINDS if self.dtype == "int8" else KINDS

    def width(self, kind: str) -> int:
        return {"c_kv": self.kv_lora_rank, "k_pe": self.qk_rope_head_dim}.get(kind, 1)

    def element_type(self, kind: str) -> str:
        return ELEMENT_TYPE[SCALE_DTYPE if kind.endswith("_scale") else self.dtype]

    def entries(self) -> list[tuple[int, str]]:
        """(layer, kind) in the one flat order: layer 0 c_kv, layer 0 k_pe, layer 1 c_kv, ... (int8: each latent
        followed by its scale)."""
        return [(i, k) for i in range(self.num_layers) for k in self.kinds]

    def names(self, template: str) -> list[str]:
        return [template.format(layer=i, kind=k) for i, k in self.entries()]

    def past_names(self) -> list[str]:
        return self.names(PAST)

    def present_names(self) -> list[str]:
        return self.names(PRESENT)

    def specs(self, template: str, batch: int | str, length: int | str) -> list[Spec]:
        return [
            (template.format(layer=i, kind=k), [batch, length, self.width(k)], self.element_type(k))
            for i, k in self.entries()
        ]

    def past_specs(self) -> list[Spec]:
        return self.specs(PAST, BATCH, PAST_LEN)

    def present_specs(self) -> list[Spec]:
        return self.specs(PRESENT, BATCH, TOTAL_LEN)

    @property
    def elements_per_token_per_layer(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * sum(
            self.width(k) * DTYPE_BYTES[SCALE_DTYPE if k.endswith("_scale") else self.dtype] for k in self.kinds
        )

    def to_manifest(self) -> dict:
        return {
            "format": CACHE_FORMAT,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "bytes_per_token": self.bytes_per_token,
        }


def io_specs(names: list[tuple[str, list[Any], str]]) -> list[dict]:
    return [{"name": n, "shape": s, "dtype": t} for n, s, t in names]


def dynamic_graph(contract: CacheContract, vocab_size: int) -> dict:
    """The dynamic protocol's inputs and outputs with symbolic shapes, as the manifest records them."""
    ids: list[Any] = [BATCH, SEQ]
    inputs = [(INPUT_IDS, ids, "int64"), (ATTENTION_MASK, [BATCH, TOTAL_LEN], "int64"), (POSITION_IDS, ids, "int64")]
    outputs = [(LOGITS, [BATCH, KEPT, vocab_size], "float32")]
    return {
        "inputs": io_specs(inputs + contract.past_specs()),
        "outputs": io_specs(outputs + contract.present_specs()),
        "optional_inputs": [{"name": LOGITS_TO_KEEP, "shape": [1], "dtype": "int64", "default": [0]}],
    }


def static_graph(contract: CacheContract, vocab_size: int, capacity: int, seq: int) -> dict:
    """The static protocol's inputs and outputs for one graph (seq new tokens), every dim fixed."""
    inputs = [
        (INPUT_IDS, [1, seq], "int32"),
        (POSITION_IDS, [1, seq], "int32"),
        (ATTN_BIAS, [1, seq, capacity + seq], "float32"),
    ]
    outputs = [(LOGITS, [1, seq, vocab_size], "float32")]
    return {
        "seq": seq,
        "inputs": io_specs(inputs + contract.specs(CACHE_BUFFER, 1, capacity)),
        "outputs": io_specs(outputs + contract.specs(NEW_ROWS, 1, seq)),
    }


# ---- cache cost of the same model as MLA, MHA and GQA -------------------------------------------------------------
def kv_elements(kv_heads: int, k_head_dim: int, v_head_dim: int) -> int:
    """Elements per token per layer of a per-head K/V cache (MHA: kv_heads = heads; GQA: fewer)."""
    return kv_heads * (k_head_dim + v_head_dim)


def gqa_kv_heads(num_attention_heads: int, num_key_value_heads: int | None = None) -> int:
    """KV heads for the GQA comparison: the config's num_key_value_heads when it is a real grouping,
    else a quarter of the query heads (a common GQA ratio)."""
    kv = num_key_value_heads
    if kv and kv < num_attention_heads and num_attention_heads % kv == 0:
        return kv
    return max(1, num_attention_heads // 4)


def comparison(cfg: Any, dtype: str = "fp32", gqa_heads: int | None = None) -> dict:
    """Cache elements and bytes per token for this model as MLA, and as the same attention would cost with a
    decompressed per-head cache (MHA: every head keeps K of qk_head_dim and V of v_head_dim) and with a grouped cache
    (GQA). An int8 cache also stores a float32 scale per token for every stored vector (MLA: c_kv and k_pe; MHA/GQA:
    K and V of every KV head). cfg: anything with the config's field names (MLAConfig, or the manifest's model)."""
    if dtype not in DTYPE_BYTES:
        raise InputError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    size = DTYPE_BYTES[dtype]
    scale = DTYPE_BYTES[SCALE_DTYPE] if dtype == "int8" else 0
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    k_dim, v_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    g = gqa_heads or gqa_kv_heads(H, getattr(cfg, "num_key_value_heads", None))
    mha = kv_elements(H, k_dim, v_dim)
    rows: dict[str, dict] = {
        "mla": {"elements_per_token_per_layer": cfg.kv_lora_rank + cfg.qk_rope_head_dim, "vectors": 2},
        "mha": {"elements_per_token_per_layer": mha, "kv_heads": H, "vectors": 2 * H},
        "gqa": {"elements_per_token_per_layer": kv_elements(g, k_dim, v_dim), "kv_heads": g, "vectors": 2 * g},
    }
    for r in rows.values():
        r["bytes_per_token"] = L * (r["elements_per_token_per_layer"] * size + r.pop("vectors") * scale)
        r["ratio_vs_mha"] = r["elements_per_token_per_layer"] / mha
    return {"dtype": dtype, "num_layers": L, **rows}


# ---- positions ------------------------------------------------------------------------------------------------------
def positions_from_mask(attention_mask: Any, seq: int) -> Any:
    """RoPE positions for the last `seq` tokens of a left-padded batch: real tokens count from 0, pads get 0.
    attention_mask (B, T) of 1/0, a numpy array or a torch tensor (the same rule on both sides of the graph)."""
    return (attention_mask.cumsum(-1) - 1).clip(0, None)[:, -seq:]

"""The export manifest's one typed schema (`mla_edge.json`, format_version 2), as JSON Schema (draft 2020-12 subset:
type, const, enum, required, properties, additionalProperties, items, minimum). Torch-free.

Every writer (the exporter, the phone files, the GGUF and genai writers) checks what it writes against it, the runtime
checks what it reads, and `python -m mla_edge.manifest_schema > FILE` writes it as the JSON other engines read (the
Android engine's tests: android_demo/app/src/test/resources/manifest_schema.json, kept in sync by a test).
"""

from __future__ import annotations

import json
import re
from typing import Any

from mla_edge.contract import CACHE_DTYPES, CACHE_FORMAT, FORMAT, FORMAT_VERSION, PRECISIONS, STATIC_PRECISIONS

TWIN_CACHE_FORMATS = ("mha-per-head-kv", "gqa-per-head-kv")  # the comparison twins' caches, never shipped
INT = {"type": "integer", "minimum": 0}
STR = {"type": "string"}
SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
FILE_FIELDS: dict[str, Any] = {"path": STR, "bytes": INT, "sha256": SHA256}
FILE = {"type": "object", "required": ["path", "bytes", "sha256"], "properties": FILE_FIELDS}  # one file, hashed
TENSOR = {
    "type": "object",
    "required": ["name", "shape", "dtype"],
    "properties": {"name": STR, "shape": {"type": "array", "items": {"type": ["integer", "string"]}}, "dtype": STR},
}
GRAPH_FILE = {  # a graph: its main file first, then any external-data files; optional ORT-format / QNN copies
    "type": "object",
    "required": ["precision", "path", "bytes", "files"],
    "properties": {
        "precision": STR,
        "path": STR,
        "bytes": INT,
        "files": {"type": "array", "items": FILE},
        "ort": {**FILE, "properties": {**FILE_FIELDS, "onnxruntime": STR}},  # and the release that wrote it
        "qnn_context": {
            "type": "object",
            "required": ["path", "files", "soc", "soc_model"],
            "properties": {
                "path": STR,
                "files": {"type": "array", "items": FILE},
                "soc": STR,
                "soc_model": STR,
                "onnxruntime_qnn": STR,  # the releases that compiled it: a context binary is tied to its QNN SDK
                "qnn_sdk": STR,
            },
        },
        "block_size": INT,
    },
}
COMPANION = {"type": "object", "required": ["path", "bytes", "sha256"], "properties": FILE["properties"]}
STATIC_GRAPH = {
    "type": "object",
    "required": ["seq", "inputs", "outputs"],
    "properties": {
        "seq": INT,
        "inputs": {"type": "array", "items": TENSOR},
        "outputs": {"type": "array", "items": TENSOR},
    },
}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mla-edge export manifest",
    "type": "object",
    "required": ["format", "format_version", "model", "max_context", "cache", "graph", "tokens", "tokenizer", "files"],
    "properties": {
        "format": {"const": FORMAT},
        "format_version": {"const": FORMAT_VERSION},
        "created_by": STR,
        "source": {"type": "object"},
        "model": {  # the model's config (transformers' key names)
            "type": "object",
            "required": [
                "model_type",
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "kv_lora_rank",
                "qk_rope_head_dim",
            ],  # fmt: skip
        },
        "max_context": INT,
        "cache": {  # the latent (or, for the measured MHA/GQA twins of models/recipes/twins.py, per-head K/V)
            "type": "object",
            "required": ["format", "dtype", "num_layers", "bytes_per_token"],
            "properties": {
                "format": {"enum": [CACHE_FORMAT, *TWIN_CACHE_FORMATS]},
                "dtype": {"enum": list(CACHE_DTYPES)},
                "num_layers": INT,
                "kv_lora_rank": INT,
                "qk_rope_head_dim": INT,
                "bytes_per_token": INT,
            },
        },
        "graph": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                "attention": STR,
                "opset": INT,
                "experts": {"type": ["string", "null"]},
                "inputs": {"type": "array", "items": TENSOR},
                "outputs": {"type": "array", "items": TENSOR},
                "optional_inputs": {"type": "array", "items": TENSOR},
            },
        },
        "tokens": {
            "type": "object",
            "required": ["bos", "eos", "pad"],
            "properties": {
                "bos": {"type": ["integer", "null"]},
                "eos": {"type": ["integer", "array", "null"], "items": {"type": "integer"}},
                "pad": {"type": ["integer", "null"]},
            },
        },
        "tokenizer": {"type": ["string", "null"]},
        "chat": {
            "type": ["object", "null"],
            "required": ["template", "files"],
            "properties": {"template": STR, "files": {"type": "array", "items": STR}},
        },
        "files": {
            "type": "object",
            "propertyNames": {"enum": list(PRECISIONS)},
            "additionalProperties": GRAPH_FILE,
        },
        "static": {
            "type": "object",
            "required": ["protocol", "capacity", "chunk", "mask_value", "write_rule", "graphs", "files"],
            "properties": {
                "protocol": {"const": "static"},
                "capacity": INT,
                "capacities": {"type": "array", "items": INT},
                "capacity_rule": STR,
                "chunk": INT,
                "mask_value": {"type": "number"},
                "mask_values": {"type": "object", "additionalProperties": {"type": "number"}},
                "write_rule": STR,
                "graphs": {
                    "type": "object",
                    "required": ["decode", "prefill"],
                    "properties": {"decode": STATIC_GRAPH, "prefill": STATIC_GRAPH},
                },
                "files": {
                    "type": "object",
                    "propertyNames": {"enum": list(STATIC_PRECISIONS)},
                    "additionalProperties": {
                        "type": "object",
                        "required": ["decode", "prefill"],
                        "properties": {"decode": GRAPH_FILE, "prefill": GRAPH_FILE},
                    },
                },
                "required_operators": STR,
                "tokenizer_graphs": {
                    "type": "object",
                    "required": ["tokenizer", "custom_ops"],
                    "properties": {"tokenizer": FILE, "detokenizer": FILE, "custom_ops": STR},
                    "additionalProperties": False,
                },
            },
        },
        "gguf": {"type": "object", "additionalProperties": COMPANION},
        "genai": {"type": "object", "additionalProperties": COMPANION},
        "smoothing": {"type": "object"},
        "export_seconds": {"type": "object", "additionalProperties": {"type": "number"}},
        "export_peak_rss_bytes": {"type": "object", "additionalProperties": {"type": ["integer", "null"]}},
    },
    "additionalProperties": False,
}

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def problems(value: Any, schema: dict = MANIFEST_SCHEMA, where: str = "") -> list[str]:
    """Every place where `value` breaks `schema`, as 'field.path: what is wrong' (empty: it conforms)."""
    name = f"'{where}'" if where else "the manifest"
    if "const" in schema and value != schema["const"]:
        return [f"{name} is {value!r}, not {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{name} is {value!r}, not one of {', '.join(map(str, schema['enum']))}"]
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_TYPES[k](value) for k in kinds):
            return [f"{name} must be {' or '.join(kinds)}, not {type(value).__name__}"]
    out: list[str] = []
    if isinstance(value, int) and not isinstance(value, bool) and value < schema.get("minimum", value):
        out.append(f"{name} must be >= {schema['minimum']}, not {value}")
    if isinstance(value, str) and "pattern" in schema and not re.fullmatch(schema["pattern"], value):
        out.append(f"{name} {value!r} is not a {schema['pattern']!r}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += problems(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"'{(where + '.') if where else ''}{key}' is missing")
        props = schema.get("properties", {})
        for key, item in value.items():
            at = f"{where}.{key}" if where else key
            if "propertyNames" in schema:
                out += problems(key, schema["propertyNames"], f"{at} (a key)")
            if key in props:
                out += problems(item, props[key], at)
            elif isinstance(schema.get("additionalProperties"), dict):
                out += problems(item, schema["additionalProperties"], at)
            elif schema.get("additionalProperties") is False:
                out.append(f"'{at}' is not a field of format_version {FORMAT_VERSION}")
    return out


def to_json() -> str:
    return json.dumps(MANIFEST_SCHEMA, indent=2) + "\n"


if __name__ == "__main__":
    print(to_json(), end="")

"""An onnxruntime-genai view of an mla-edge export: `genai_config.json` plus one graph per precision whose cache
inputs and outputs have the names and 4-D shapes genai's own KV-cache loop expects, so that genai (its tokenizer,
its search, its loop) runs our latent cache unchanged.

The latent of a layer, [c_kv | k_pe] (kv_lora_rank + rope elements per token), is presented as one KV head whose
"key" is its first half and "value" its second half: past_key_values.N.key / .value of shape (batch, 1, len, W/2).
A few nodes around the original graph join the halves and split them back; genai concatenates nothing itself
(past_present_share_buffer false: each step's present is the next step's past), so the cache stays the latent.
"""

from __future__ import annotations

import json
from pathlib import Path

from mla_edge.contract import MODEL_FILE, InputError

KEY, VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


def genai_file(precision: str) -> str:
    return MODEL_FILE[precision].replace(".onnx", ".genai.onnx")


def wrap_graph(src: Path, dst: Path, layers: int, rank: int, rope: int) -> None:
    """Rewrite the cache I/O of `src` (past.N.c_kv (B, S, R), past.N.k_pe (B, S, D)) into genai's form."""
    import onnx
    from onnx import TensorProto, helper

    width = rank + rope
    half = width // 2
    m = onnx.load(str(src))
    g = m.graph
    const = [
        helper.make_tensor("mla_axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("mla_split_latent", TensorProto.INT64, [2], [rank, rope]),
        helper.make_tensor("mla_split_halves", TensorProto.INT64, [2], [half, width - half]),
    ]
    g.initializer.extend(const)
    inputs = [i for i in g.input if not i.name.startswith("past.")]
    outputs = [o for o in g.output if not o.name.startswith("present.")]
    before, after = [], []
    for n in range(layers):
        key, value = KEY % n, VALUE % n
        for name, size in ((key, half), (value, width - half)):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 1, "past_len", size]))
        before += [
            helper.make_node("Concat", [key, value], [f"mla_past{n}_4d"], axis=-1),
            helper.make_node("Squeeze", [f"mla_past{n}_4d", "mla_axis1"], [f"mla_past{n}"]),
            helper.make_node(
                "Split", [f"mla_past{n}", "mla_split_latent"], [f"past.{n}.c_kv", f"past.{n}.k_pe"], axis=-1
            ),
        ]
        after += [
            helper.make_node("Concat", [f"present.{n}.c_kv", f"present.{n}.k_pe"], [f"mla_present{n}"], axis=-1),
            helper.make_node("Unsqueeze", [f"mla_present{n}", "mla_axis1"], [f"mla_present{n}_4d"]),
            helper.make_node(
                "Split", [f"mla_present{n}_4d", "mla_split_halves"], [PRESENT_KEY % n, PRESENT_VALUE % n], axis=-1
            ),
        ]
        for name, size in ((PRESENT_KEY % n, half), (PRESENT_VALUE % n, width - half)):
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 1, "total_len", size]))
    nodes = [*before, *g.node, *after]
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(outputs)
    onnx.save_model(m, str(dst))


def write_genai(out_dir: str | Path, precision: str = "fp32", force: bool = False) -> dict:
    """Add `genai_config.json` and the wrapped graph of `precision` to an export folder; returns the config."""
    from mla_edge.runtime.manifest import Manifest, record_file

    out_dir = Path(out_dir)
    man = Manifest.read(out_dir)
    if precision not in man.precisions:
        raise InputError(f"precision {precision!r} is not in {out_dir} (it has {', '.join(man.precisions)})")
    cache, model = man.data["cache"], man.data["model"]
    if cache["dtype"] != "fp32":
        raise InputError("onnxruntime-genai keeps a float cache: export with --cache-dtype fp32 for --format genai")
    if not man.data.get("tokenizer"):
        raise InputError("--format genai needs an export with a tokenizer.json (genai tokenizes itself)")
    config_path, dst = out_dir / "genai_config.json", out_dir / genai_file(precision)
    if dst.exists() and not force:
        raise InputError(f"{dst} already exists; pass --force to replace it")
    if config_path.exists() and not force:
        raise InputError(f"{config_path} already exists; pass --force to replace it")
    layers, rank, rope = cache["num_layers"], cache["kv_lora_rank"], cache["qk_rope_head_dim"]
    tmp = dst.with_name("." + dst.name + ".partial")
    try:
        wrap_graph(out_dir / MODEL_FILE[precision], tmp, layers, rank, rope)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    tokens = man.data["tokens"]
    eos = tokens["eos"] if isinstance(tokens["eos"], list) else [tokens["eos"]]
    config = {
        "model": {
            "bos_token_id": tokens["bos"],
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": tokens["pad"] if tokens["pad"] is not None else eos[0],
            "context_length": man.data["max_context"],
            "vocab_size": model["vocab_size"],
            "type": "llama",  # genai's plain decoder-with-KV-cache loop
            "decoder": {
                "filename": dst.name,
                "session_options": {"log_id": "mla-edge", "provider_options": []},
                "head_size": (rank + rope) // 2,
                "hidden_size": model["hidden_size"],
                "num_attention_heads": model["num_attention_heads"],
                "num_hidden_layers": layers,
                "num_key_value_heads": 1,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": KEY,
                    "past_value_names": VALUE,
                },
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
            },
        },
        "search": {
            "do_sample": False,
            "max_length": man.data["max_context"],
            "num_beams": 1,
            "past_present_share_buffer": False,  # the graph concatenates the latent itself
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    tc = out_dir / "tokenizer_config.json"
    if not tc.exists():  # genai's tokenizer reads one; ours prepends bos to a plain prompt, so genai's must too
        vocab = {v: k for k, v in json.loads((out_dir / man.data["tokenizer"]).read_text())["model"]["vocab"].items()}
        names = {"bos": vocab.get(tokens["bos"]), "eos": vocab.get(eos[0])}
        tc.write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": tokens["bos"] is not None,
            **{f"{k}_token": v for k, v in names.items() if v is not None},
        }, indent=2) + "\n")  # fmt: skip
    record_file(out_dir, "genai", precision, dst, config="genai_config.json")
    return config

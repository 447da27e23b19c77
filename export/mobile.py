"""The phone's files of a static export: ORT-format copies and required operators, QNN context binaries, and the
tokenizer as ONNX graphs (onnxruntime-extensions), so an Android app needs nothing but onnxruntime's own packages."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mla_edge.contract import ort_name
from mla_edge.runtime.manifest import file_entry

REQUIRED_OPERATORS = "required_operators.config"  # for a reduced-operator onnxruntime build on the phone
TOKENIZER_GRAPH, DETOKENIZER_GRAPH = "tokenizer.onnx", "detokenizer.onnx"


def mobile_ort_files(tmp: Path, section: dict) -> str:
    """The phone's copies: every static graph in onnxruntime's ORT format with runtime optimizations saved (the
    style onnxruntime recommends for NNAPI/CoreML/QNN: each provider still sees the original nodes), for ARM, plus the
    `required_operators.config` from which a reduced-operator onnxruntime can be built. Returns the config's name."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from mla_edge.runtime.static import native_chatter

    entries = [e for graphs in section["files"].values() for e in graphs.values()]
    with tempfile.TemporaryDirectory(dir=tmp) as work:
        src, out = Path(work) / "src", Path(work) / "out"
        src.mkdir()
        for name in {f["path"] for e in entries for f in e["files"]}:  # graphs and their external data
            shutil.copyfile(tmp / name, src / name)
        with native_chatter():  # its INFO log lines and prints
            convert_onnx_models_to_ort(src, out, optimization_styles=[OptimizationStyle.Runtime], target_platform="arm")
        for e in entries:
            name = ort_name(e["path"])
            os.replace(out / (e["path"][: -len(".onnx")] + ".with_runtime_opt.ort"), tmp / name)
            e["ort"] = {
                **file_entry(tmp, e["precision"], [name])["files"][0],
                "onnxruntime": ort.__version__,
                "platform": "arm (mobile)",
                "optimization": "runtime",
            }
        os.replace(out / "required_operators.with_runtime_opt.config", tmp / REQUIRED_OPERATORS)
    return REQUIRED_OPERATORS


def qnn_context_files(tmp: Path, section: dict, soc: str) -> None:
    """Compile every static graph that Qualcomm's HTP runs (fp32 in its fp16 mode, and the QDQ ones) once, for one
    SoC, into an EPContext model (a small .onnx naming a QNN context binary): a phone loads it without compiling."""
    import onnxruntime as ort

    from mla_edge.runtime.static import QNN_HTP_FP16, native_chatter, qnn_session_options, qnn_target, qnn_versions

    target = qnn_target(soc)
    from .quantize import QNN_QDQ

    for precision in [p for p in ("fp32", *QNN_QDQ) if p in section["files"]]:
        for entry in section["files"][precision].values():
            name = entry["path"][: -len(".onnx")] + f".qnn-{soc.lower()}.onnx"
            so = qnn_session_options("htp", {**(QNN_HTP_FP16 if precision == "fp32" else {}), **target})
            so.add_session_config_entry("ep.context_enable", "1")
            so.add_session_config_entry("ep.context_file_path", str(tmp / name))
            so.add_session_config_entry("ep.context_embed_mode", "0")
            with native_chatter():
                ort.InferenceSession(str(tmp / entry["path"]), so)
            binaries = sorted(p.name for p in tmp.glob(name[: -len(".onnx")] + "*.bin"))
            entry["qnn_context"] = {
                **file_entry(tmp, precision, [name, *binaries]),
                "soc": soc.lower(),
                **target,
                **qnn_versions(),
            }


def tokenizer_graphs(tokenizer_json: Path, tmp: Path) -> dict:
    """tokenizer.json as two ONNX graphs of onnxruntime-extensions' custom ops: HfJsonTokenizer (text -> ids, the
    tokenizer.json engine that onnxruntime-genai uses too) and, for byte-level BPE, BpeDecoder (ids -> text). The
    Android app runs them with onnxruntime-extensions' Android package: no hand-written BPE."""
    import onnx
    from onnxruntime_extensions import make_onnx_model
    from onnxruntime_extensions._cuops import SingleOpGraph

    text = tokenizer_json.read_text(encoding="utf-8")
    config = json.dumps(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
    )
    graph = SingleOpGraph.build_graph("HfJsonTokenizer", tokenizer_vocab=text, tokenizer_config=config)
    onnx.save(make_onnx_model(graph), str(tmp / TOKENIZER_GRAPH))
    out = {"tokenizer": file_entry(tmp, "text", [TOKENIZER_GRAPH])["files"][0], "custom_ops": "onnxruntime-extensions"}
    spec = json.loads(text)
    if (spec.get("decoder") or {}).get("type") == "ByteLevel":
        vocab = dict(spec["model"]["vocab"])
        added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
        vocab.update({c: i for i, c in added.items()})
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        graph = SingleOpGraph.build_graph(
            "BpeDecoder",
            id_vocab="\n".join(t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])),
            byte_decoder="\n".join(f"{ord(c)}\t{b}" for c, b in byte_decoder.items()),
            added_tokens="\n".join(f"{i}\t{c}" for i, c in added.items()),
            all_special_ids="\n".join(map(str, added)),
            skip_special_tokens=1,
        )
        onnx.save(make_onnx_model(graph), str(tmp / DETOKENIZER_GRAPH))
        out["detokenizer"] = file_entry(tmp, "text", [DETOKENIZER_GRAPH])["files"][0]
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table): printable Latin-1 bytes stand for
    themselves, the rest map to code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(rest)}}

"""Bad input, table-driven: every case gives one line naming the problem (exit status 2, or mla-edge's own error
type from the Python API), no traceback, and leaves every file it did not create untouched."""

import json
import math
import shutil
from pathlib import Path

import pytest

from mla_edge.cli import main
from mla_edge.contract import MANIFEST, CacheContract, InputError, comparison
from mla_edge.export.pipeline import ExportOptions, export_folder

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def world(tmp_path_factory, text_export):
    """A copy of the shared tiny model and export, and variants of both broken in one way each."""
    root = tmp_path_factory.mktemp("bad")
    hf, out = shutil.copytree(text_export[0], root / "hf"), shutil.copytree(text_export[1], root / "out")
    w = {"hf": hf, "out": out, "root": root}

    def variant(name, src, edit):
        dst = root / name
        shutil.copytree(src, dst)
        edit(dst)
        w[name] = dst

    def config(**change):
        def edit(d):
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(change)
            (d / "config.json").write_text(json.dumps(cfg))

        return edit

    def manifest(**change):
        def edit(d):
            m = json.loads((d / MANIFEST).read_text())
            for k, v in change.items():
                if v is None:
                    m.pop(k)
                else:
                    m[k] = v
            (d / MANIFEST).write_text(json.dumps(m))

        return edit

    variant("llama", hf, config(model_type="llama"))
    variant("moe", hf, config(n_routed_experts=4, first_k_dense_replace=0))
    variant("gelu", hf, config(hidden_act="gelu"))
    variant("longrope", hf, config(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}))
    variant("neg", hf, config(hidden_size=-4))
    variant(
        "nofield",
        hf,
        lambda d: (d / "config.json").write_text(
            json.dumps({k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "kv_lora_rank"})
        ),
    )
    variant("badjson", hf, lambda d: (d / "config.json").write_text("{not json"))
    variant("listjson", hf, lambda d: (d / "config.json").write_text("[1, 2]"))
    variant("noweights", hf, lambda d: (d / "model.safetensors").unlink())
    variant("notok", hf, lambda d: (d / "tokenizer.json").unlink())
    variant("badtok", hf, lambda d: (d / "tokenizer.json").write_text("{broken"))
    variant("tampered", root / "out", lambda d: (d / "model.int8.onnx").write_bytes(b"not a model"))
    variant("nomanifest", root / "out", lambda d: (d / MANIFEST).unlink())
    variant("badmanifest", root / "out", lambda d: (d / MANIFEST).write_text("{"))
    variant("oldmanifest", root / "out", manifest(format_version=1))
    variant("nograph", root / "out", manifest(graph=None))
    variant("notformat", root / "out", manifest(format="something-else"))
    variant("badexporttok", root / "out", lambda d: (d / "tokenizer.json").write_text("{broken"))
    (root / "thesis").mkdir()
    (root / "thesis" / "chapter1.tex").write_text("my thesis")
    (root / "afile").write_text("a file")
    (root / "empty.txt").write_text("\n  \n")
    (root / "binary.txt").write_bytes(b"text then \xff\xfe")
    return w


def snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


# (id, argv with {name} placeholders for world paths, a piece of the expected message)
CLI = [
    ("info-missing", ["info", "{root}/nope"], "no config.json"),
    ("info-file", ["info", "{root}/afile"], "is a file: pass the model folder"),
    ("info-badjson", ["info", "{badjson}"], "not valid JSON"),
    ("info-listjson", ["info", "{listjson}"], "JSON object"),
    ("info-llama", ["info", "{llama}"], "not an MLA model"),
    ("info-moe", ["info", "{moe}"], "n_routed_experts=4"),
    ("info-gelu", ["info", "{gelu}"], "hidden_act"),
    ("info-longrope", ["info", "{longrope}"], "longrope"),
    ("info-neg", ["info", "{neg}"], "positive integer"),
    ("info-nofield", ["info", "{nofield}"], "kv_lora_rank"),
    ("info-dtype", ["info", "{hf}", "--dtype", "fp64"], "--dtype"),
    ("export-missing", ["export", "{root}/nope", "-o", "{root}/x1"], "no config.json"),
    ("export-exists", ["export", "{hf}", "-o", "{out}"], "already exists"),
    ("export-force-thesis", ["export", "{hf}", "-o", "{root}/thesis", "--force"], "not an mla-edge export"),
    ("export-under-file", ["export", "{hf}", "-o", "{root}/afile/out"], "not writable"),
    ("export-onto-file", ["export", "{hf}", "-o", "{root}/afile"], "not a folder"),
    ("export-proc", ["export", "{hf}", "-o", "/proc/mla-edge-x"], "not writable"),
    ("export-quant", ["export", "{hf}", "-o", "{root}/x2", "--quantize", "int3"], "--quantize"),
    ("export-qdq-nocal", ["export", "{hf}", "-o", "{root}/x3", "--quantize", "int8-qdq"], "calibration"),
    (
        "export-cal-missing",
        ["export", "{hf}", "-o", "{root}/x4", "--quantize", "int8-qdq", "--calibration-text", "{root}/nope.txt"],
        "not found",
    ),
    ("export-cache", ["export", "{hf}", "-o", "{root}/x5", "--cache-dtype", "int4"], "--cache-dtype"),
    ("export-static0", ["export", "{hf}", "-o", "{root}/x6", "--static-cache", "0"], "--static-cache"),
    ("export-static-big", ["export", "{hf}", "-o", "{root}/x7", "--static-cache", "100000"], "--static-cache"),
    (
        "export-chunk0",
        ["export", "{hf}", "-o", "{root}/x8", "--static-cache", "64", "--static-chunk", "0"],
        "--static-chunk",
    ),
    (
        "export-chunk-big",
        ["export", "{hf}", "-o", "{root}/x9", "--static-cache", "64", "--static-chunk", "64"],
        "--static-chunk",
    ),
    ("export-sq-alone", ["export", "{hf}", "-o", "{root}/x10", "--static-quantize", "int8"], "--static-cache"),
    (
        "export-sq-bad",
        ["export", "{hf}", "-o", "{root}/x11", "--static-cache", "64", "--static-quantize", "w4a4"],
        "--static-quantize",
    ),
    (
        "export-w8a16-nocal",
        ["export", "{hf}", "-o", "{root}/x12", "--static-cache", "64", "--static-quantize", "w8a16"],
        "calibration",
    ),
    (
        "export-soc",
        ["export", "{hf}", "-o", "{root}/x13", "--static-cache", "64", "--qnn-context", "sm9999"],
        "unknown Snapdragon SoC",
    ),
    ("export-soc-alone", ["export", "{hf}", "-o", "{root}/x14", "--qnn-context", "sm8650"], "--static-cache"),
    (
        "export-static-int8cache",
        ["export", "{hf}", "-o", "{root}/x15", "--static-cache", "64", "--cache-dtype", "int8"],
        "fp32 cache",
    ),
    (
        "export-int4-block",
        ["export", "{hf}", "-o", "{root}/x16", "--quantize", "int4", "--int4-block-size", "7"],
        "--int4-block-size",
    ),
    ("export-notok", ["export", "{notok}", "-o", "{root}/x17"], "no tokenizer.json"),
    ("export-badtok", ["export", "{badtok}", "-o", "{root}/x18"], "not a readable tokenizer"),
    ("export-noweights", ["export", "{noweights}", "-o", "{root}/x19"], "safetensors"),
    ("export-moe", ["export", "{moe}", "-o", "{root}/x20"], "n_routed_experts=4"),
    ("export-llama", ["export", "{llama}", "-o", "{root}/x21"], "not an MLA model"),
    ("gen-missing", ["generate", "{root}/nope", "hi"], "not an mla-edge export folder"),
    ("gen-noprompt", ["generate", "{out}"], "prompt is missing"),
    ("gen-empty", ["generate", "{out}", ""], "prompt is empty"),
    ("gen-blank", ["generate", "{out}", "   "], "prompt is empty"),
    ("gen-three", ["generate", "{out}", "a", "b"], "at most"),
    ("gen-precision", ["generate", "{out}", "hi", "--precision", "int4"], "not in this export"),
    ("gen-precision-bad", ["generate", "{out}", "hi", "--precision", "int3"], "--precision"),
    ("gen-w8a16", ["generate", "{out}", "hi", "--precision", "w8a16"], "not in this export"),
    ("gen-provider", ["generate", "{out}", "hi", "--provider", "tpu"], "unknown provider"),
    ("gen-coreml", ["generate", "{out}", "hi", "--provider", "coreml"], "not in this onnxruntime build"),
    ("gen-qnn-dynamic", ["generate", "{out}", "hi", "--provider", "qnn", "--protocol", "dynamic"], "--protocol static"),
    ("gen-qnn-nostatic", ["generate", "{out}", "hi", "--provider", "qnn"], "has no static protocol"),
    ("gen-temp-neg", ["generate", "{out}", "hi", "--temperature", "-1"], "temperature"),
    ("gen-temp-inf", ["generate", "{out}", "hi", "--temperature", "inf"], "temperature"),
    ("gen-temp-nan", ["generate", "{out}", "hi", "--temperature", "nan"], "temperature"),
    ("gen-temp-word", ["generate", "{out}", "hi", "--temperature", "hot"], "--temperature"),
    ("gen-topp0", ["generate", "{out}", "hi", "--top-p", "0"], "top_p"),
    ("gen-topp-big", ["generate", "{out}", "hi", "--top-p", "1.5"], "top_p"),
    ("gen-topk-neg", ["generate", "{out}", "hi", "--top-k", "-1"], "--top-k"),
    ("gen-topk-float", ["generate", "{out}", "hi", "--top-k", "2.5"], "--top-k"),
    ("gen-rep0", ["generate", "{out}", "hi", "--repetition-penalty", "0"], "repetition_penalty"),
    ("gen-seed", ["generate", "{out}", "hi", "--seed", "-1"], "--seed"),
    ("gen-threads-neg", ["generate", "{out}", "hi", "--threads", "-2"], "--threads"),
    ("gen-threads0", ["generate", "{out}", "hi", "--threads", "0"], "--threads"),
    ("gen-maxnew0", ["generate", "{out}", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("gen-chunk0", ["generate", "{out}", "hi", "--prefill-chunk", "0"], "--prefill-chunk"),
    ("gen-memlimit", ["generate", "{out}", "hi", "--memory-limit", "banana"], "not a size"),
    ("gen-memlimit0", ["generate", "{out}", "hi", "--memory-limit", "0MB"], "more than 0"),
    ("gen-optcache-file", ["generate", "{out}", "hi", "--optimized-cache", "{root}/afile"], "is a file"),
    ("gen-static-missing", ["generate", "{out}", "hi", "--protocol", "static"], "has no static protocol"),
    ("gen-protocol", ["generate", "{out}", "hi", "--protocol", "warp"], "--protocol"),
    ("gen-optlevel", ["generate", "{out}", "hi", "--opt-level", "max"], "--opt-level"),
    ("gen-long", ["generate", "{out}", "word " * 200], "context holds 96"),
    ("gen-utf8", ["generate", "{out}", "caf\udce9"], "not valid UTF-8"),
    ("gen-tampered", ["generate", "{tampered}", "hi"], "does not match its sha256"),
    ("gen-nomanifest", ["generate", "{nomanifest}", "hi"], "mla_edge.json is missing"),
    ("gen-badmanifest", ["generate", "{badmanifest}", "hi"], "not valid JSON"),
    ("gen-oldmanifest", ["generate", "{oldmanifest}", "hi"], "export the model again"),
    ("gen-nograph", ["generate", "{nograph}", "hi"], "'graph' is missing"),
    ("gen-notformat", ["generate", "{notformat}", "hi"], "not an mla-edge manifest"),
    ("gen-badtok", ["generate", "{badexporttok}", "hi"], "not a readable tokenizer"),
    ("gen-unknown-flag", ["generate", "{out}", "hi", "--bogus"], "--bogus"),
    ("parity-missing", ["parity", "{root}/nope"], "not an mla-edge export folder"),
    ("parity-three", ["parity", "{hf}", "{out}", "{out}"], "at most two"),
    ("parity-steps0", ["parity", "{out}", "--steps", "0"], "--steps"),
    ("parity-ppl0", ["parity", "{out}", "--ppl-tokens", "0"], "--ppl-tokens"),
    ("parity-text", ["parity", "{out}", "--text", "{root}/nope.txt"], "not found"),
    ("parity-text-empty", ["parity", "{out}", "--text", "{root}/empty.txt"], "empty.txt is empty"),
    ("parity-text-binary", ["parity", "{out}", "--text", "{root}/binary.txt"], "not UTF-8"),
    ("export-empty-out", ["export", "{hf}", "-o", ""], "-o/--out is empty"),
    ("convert-empty-out", ["convert", "{llama}", "-o", " ", "--calibration-text", "{root}/afile"], "-o/--out is empty"),
    (
        "export-genai-int4-unmade",
        ["export", "{hf}", "-o", "{root}/g4", "--format", "genai", "--genai-precision", "int4"],
        "add --quantize int4",
    ),
    (
        "export-genai-int4-existing",
        ["export", "-o", "{out}", "--format", "genai", "--genai-precision", "int4"],
        "again with that precision",
    ),
    ("parity-qnn-dynamic", ["parity", "{out}", "--provider", "qnn"], "--provider qnn needs --static"),
    ("parity-precision", ["parity", "{out}", "--precision", "int3"], "--precision"),
    ("parity-static", ["parity", "{out}", "--static"], "has no static protocol"),
    ("parity-model", ["parity", "{root}/nope", "{out}"], "no config.json"),
    ("parity-provider", ["parity", "{out}", "--static", "--provider", "nnapi"], "--provider"),
    ("bench-missing", ["bench", "{root}/nope"], "not an mla-edge export folder"),
    ("bench-precision", ["bench", "{out}", "--precision", "int3"], "--precision"),
    ("bench-absent", ["bench", "{out}", "--precision", "int4"], "not in this export"),
    ("bench-repeats0", ["bench", "{out}", "--repeats", "0"], "--repeats"),
    ("bench-rounds0", ["bench", "{out}", "--rounds", "0"], "--rounds"),
    ("bench-threads", ["bench", "{out}", "--threads", "-1"], "--threads"),
    ("bench-tampered", ["bench", "{tampered}", "--precision", "int8"], "does not match its sha256"),
    ("bench-context", ["bench", "{out}", "--precision", "fp32"], "context holds 96"),
    ("bench-vs-unknown", ["bench", "{out}", "--vs", "vllm={out}"], "unknown peer 'vllm'"),
    ("bench-pasts", ["bench", "{out}", "--pasts", "128,x"], "--pasts expects positive integers"),
    ("bench-prompt-lens0", ["bench", "{out}", "--prompt-lens", "0"], "--prompt-lens expects positive integers"),
    ("bench-vs-nogguf", ["bench", "{out}", "--vs", "llama.cpp"], "has no llama.cpp copy of the model"),
    ("bench-vs-nocopy", ["bench", "{out}", "--vs", "genai"], "has no genai copy of the model: run `mla-edge export"),
    ("bench-vs-missing", ["bench", "{out}", "--vs", "llama.cpp={root}/nope.gguf"], "nope.gguf not found"),
    ("bench-vs-notgenai", ["bench", "{out}", "--vs", "genai={out}"], "no genai_config.json"),
    ("budget-banana", ["budget", "--memory", "banana"], "not a size"),
    ("budget-zero", ["budget", "--memory", "0MB"], "more than 0"),
    ("budget-neg", ["budget", "--memory=-5MB"], "more than 0"),
    ("budget-neg-spaced", ["budget", "--memory", "-5MB"], "more than 0"),
    ("budget-bare-number", ["budget", "--memory", "512"], "no unit"),
    ("gen-memlimit-neg", ["generate", "{out}", "hi", "--memory-limit", "-1GB"], "more than 0"),
    ("budget-unit", ["budget", "--memory", "5 parsecs"], "not a size"),
    ("budget-tiny", ["budget", "--memory", "1KB"], "cannot even hold"),
    ("budget-missing", ["budget", "{root}/nope", "--memory", "1GB"], "no config.json"),
    ("budget-calibrate-hf", ["budget", "{hf}", "--memory", "1GB", "--calibrate"], "needs an export folder"),
    ("budget-batch0", ["budget", "--memory", "1GB", "--batch", "0"], "--batch"),
    ("budget-plot-dir", ["budget", "--memory", "1GB", "--plot", "{root}/nope/plot.png"], "--plot"),
    ("budget-plot-onto-dir", ["budget", "--memory", "1GB", "--plot", "{root}/thesis"], "--plot"),
    ("budget-plot-txt", ["budget", "--memory", "1GB", "--plot", "{root}/plot.txt"], ".png, .svg or .pdf"),
    ("info-a-file", ["info", "{hf}/model.safetensors"], "is a file: pass the model folder"),
    ("export-a-file", ["export", "{hf}/model.safetensors", "-o", "{root}/x"], "is a file: pass the model folder"),
    ("budget-plot-weights", ["budget", "--memory", "1GB", "--plot-weights", "fp16"], "--plot-weights"),
    ("budget-nomemory", ["budget"], "--memory"),
    ("budget-badmanifest", ["budget", "{badmanifest}", "--memory", "1GB"], "not valid JSON"),
    ("demo-maxnew", ["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("demo-flag", ["demo", "--bogus"], "--bogus"),
    ("unknown-command", ["fly"], "invalid choice"),
    ("unknown-global", ["--bogus"], "--bogus"),
]


@pytest.mark.parametrize("argv,expect", [pytest.param(a, e, id=i) for i, a, e in CLI])
def test_cli_bad_input_is_one_line_exit_2_and_changes_nothing(world, capsys, argv, expect):
    before = snapshot(world["root"])
    argv = [a.format(**{k: str(v) for k, v in world.items()}) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mla-edge") and "error:" in lines[0], lines[0]
    assert expect in lines[0], lines[0]
    assert snapshot(world["root"]) == before, "a file that mla-edge did not create was changed"


def api_cases(w):
    """(id, callable, error type) for the Python API; each must raise exactly an mla-edge error type."""
    from mla_edge.models.checkpoint import load_model, save_model
    from mla_edge.models.config import ConfigError, MLAConfig
    from mla_edge.models.mla import ModelOptions
    from mla_edge.runtime.budget import BudgetError, parse_memory, plan
    from mla_edge.runtime.generate import Generator, PromptError
    from mla_edge.runtime.manifest import Manifest, ManifestError
    from mla_edge.runtime.sampling import SamplingOptions
    from mla_edge.runtime.session import ProviderError
    from mla_edge.runtime.static import StaticSession, static_bias

    gen = Generator(w["out"], "fp32", provider="cpu")
    base = json.loads((w["hf"] / "config.json").read_text())
    cases = [
        ("gen-missing", lambda: Generator(w["root"] / "nope"), ManifestError),
        ("gen-precision", lambda: Generator(w["out"], "int3"), ManifestError),
        ("gen-provider", lambda: Generator(w["out"], provider="tpu"), ProviderError),
        ("gen-protocol", lambda: Generator(w["out"], protocol="warp"), PromptError),
        ("gen-chunk", lambda: Generator(w["out"], prefill_chunk=0), PromptError),
        ("gen-optlevel", lambda: Generator(w["out"], opt_level="max"), InputError),
        ("gen-badtok", lambda: Generator(w["badexporttok"]), ManifestError),
        ("gen-tampered", lambda: Generator(w["tampered"]), ManifestError),
        ("prompt-empty", lambda: gen.generate(""), PromptError),
        ("prompt-none", lambda: gen.generate(None), PromptError),
        ("prompt-int", lambda: gen.generate(123), PromptError),
        ("prompt-bytes", lambda: gen.generate(b"hi"), PromptError),
        ("prompt-surrogate", lambda: gen.generate("caf\udce9"), PromptError),
        ("prompt-long", lambda: gen.generate("word " * 200), PromptError),
        ("batch-str", lambda: gen.generate_batch("Hello"), PromptError),
        ("batch-empty", lambda: gen.generate_batch([]), PromptError),
        ("stream-empty", lambda: list(gen.stream("")), PromptError),
        ("ids-empty", lambda: gen.generate_ids([]), PromptError),
        ("ids-flat", lambda: gen.generate_ids([1, 2, 3]), PromptError),
        ("ids-str", lambda: gen.generate_ids("123"), PromptError),
        ("ids-row-empty", lambda: gen.generate_ids([[]]), PromptError),
        ("ids-vocab", lambda: gen.generate_ids([[99999]]), PromptError),
        ("ids-negative", lambda: gen.generate_ids([[-1]]), PromptError),
        ("ids-words", lambda: gen.generate_ids([["a"]]), PromptError),
        ("maxnew-0", lambda: gen.generate("hi", max_new_tokens=0), PromptError),
        ("maxnew-float", lambda: gen.generate("hi", max_new_tokens=2.5), PromptError),
        ("sampling-dict", lambda: gen.generate("hi", sampling={"temperature": 1}), PromptError),
        ("stop-int", lambda: gen.generate("hi", stop=[1]), PromptError),
        ("temp-neg", lambda: SamplingOptions(temperature=-1), InputError),
        ("temp-inf", lambda: SamplingOptions(temperature=math.inf), InputError),
        ("temp-nan", lambda: SamplingOptions(temperature=math.nan), InputError),
        ("temp-str", lambda: SamplingOptions(temperature="hot"), InputError),
        ("topk-float", lambda: SamplingOptions(top_k=2.5), InputError),
        ("topk-neg", lambda: SamplingOptions(top_k=-1), InputError),
        ("topk-bool", lambda: SamplingOptions(top_k=True), InputError),
        ("topp-0", lambda: SamplingOptions(top_p=0), InputError),
        ("topp-big", lambda: SamplingOptions(top_p=1.5), InputError),
        ("topp-nan", lambda: SamplingOptions(top_p=math.nan), InputError),
        ("rep-0", lambda: SamplingOptions(repetition_penalty=0), InputError),
        ("rep-neg", lambda: SamplingOptions(repetition_penalty=-1), InputError),
        ("seed-neg", lambda: SamplingOptions(seed=-1), InputError),
        ("seed-float", lambda: SamplingOptions(seed=1.5), InputError),
        ("opt-attention", lambda: ModelOptions(attention="flash"), InputError),
        ("opt-cache", lambda: ModelOptions(cache_dtype="int4"), InputError),
        ("opt-graph-naive", lambda: ModelOptions(attention="naive", graph_weights=True), InputError),
        ("contract-dtype", lambda: CacheContract(2, 16, 8, "int4"), InputError),
        ("comparison-dtype", lambda: comparison(MLAConfig.from_dict(base), "int3"), InputError),
        ("cfg-empty", lambda: MLAConfig.from_dict({}), ConfigError),
        ("cfg-type", lambda: MLAConfig.from_dict({**base, "model_type": "gpt2"}), ConfigError),
        ("cfg-zero", lambda: MLAConfig.from_dict({**base, "num_hidden_layers": 0}), ConfigError),
        ("cfg-str", lambda: MLAConfig.from_dict({**base, "hidden_size": "32"}), ConfigError),
        ("cfg-bool", lambda: MLAConfig.from_dict({**base, "hidden_size": True}), ConfigError),
        ("cfg-oddrope", lambda: MLAConfig.from_dict({**base, "qk_rope_head_dim": 7}), ConfigError),
        ("cfg-qlora", lambda: MLAConfig.from_dict({**base, "q_lora_rank": -3}), ConfigError),
        ("cfg-yarn", lambda: MLAConfig.from_dict({**base, "rope_parameters": {"rope_type": "yarn"}}), ConfigError),
        ("cfg-rope-list", lambda: MLAConfig.from_dict({**base, "rope_scaling": [1]}), ConfigError),
        (
            "cfg-moe",
            lambda: MLAConfig.from_dict({**base, "n_routed_experts": 8, "first_k_dense_replace": 0}),
            ConfigError,
        ),
        ("load-missing", lambda: load_model(w["root"] / "nope"), ConfigError),
        ("load-noweights", lambda: load_model(w["noweights"]), InputError),
        ("save-dtype", lambda: save_model(load_model(w["hf"]), w["root"] / "s", dtype="fp64"), InputError),
        ("mem-banana", lambda: parse_memory("banana"), BudgetError),
        ("mem-zero", lambda: parse_memory("0"), BudgetError),
        ("mem-unit", lambda: parse_memory("5 parsecs"), BudgetError),
        ("mem-neg", lambda: parse_memory("-1GB"), BudgetError),
        ("mem-empty", lambda: parse_memory(""), BudgetError),
        ("plan-batch", lambda: plan(w["hf"], 2**30, batch=0), BudgetError),
        ("plan-tiny", lambda: plan(w["hf"], 1000), BudgetError),
        ("manifest-missing", lambda: Manifest.read(w["nomanifest"]), ManifestError),
        ("manifest-json", lambda: Manifest.read(w["badmanifest"]), ManifestError),
        ("manifest-version", lambda: Manifest.read(w["oldmanifest"]), ManifestError),
        ("manifest-field", lambda: Manifest.read(w["nograph"]), ManifestError),
        ("manifest-format", lambda: Manifest.read(w["notformat"]), ManifestError),
        ("manifest-precision", lambda: Manifest.read(w["out"]).model_path("int4"), ManifestError),
        ("static-none", lambda: StaticSession(w["out"]), ManifestError),
        ("static-provider", lambda: StaticSession(w["out"], provider="nnapi"), ManifestError),
        (
            "export-force-thesis",
            lambda: export_folder(w["hf"], w["root"] / "thesis", ExportOptions(force=True)),
            InputError,
        ),
        ("export-exists", lambda: export_folder(w["hf"], w["out"]), InputError),
        (
            "export-quant",
            lambda: export_folder(w["hf"], w["root"] / "e1", ExportOptions(quantize=("int3",))),
            InputError,
        ),
        (
            "export-block",
            lambda: export_folder(w["hf"], w["root"] / "e2", ExportOptions(quantize=("int4",), int4_block_size=24)),
            InputError,
        ),
        ("export-notok", lambda: export_folder(w["notok"], w["root"] / "e3"), InputError),
        ("export-badtok", lambda: export_folder(w["badtok"], w["root"] / "e4"), InputError),
        (
            "export-cache",
            lambda: export_folder(w["hf"], w["root"] / "e5", ExportOptions(cache_dtype="fp8")),
            InputError,
        ),
    ]
    assert static_bias(0, 1, 1, 2, -50.0).shape == (1, 1, 3)
    return cases


def test_api_bad_input_raises_mla_edge_errors_only(world):
    """Every API case raises its documented mla-edge error type (an InputError), never a bare exception."""
    before = snapshot(world["root"])
    failures = []
    cases = api_cases(world)
    for name, call, kind in cases:
        try:
            call()
            failures.append(f"{name}: no error")
        except InputError as e:
            if not isinstance(e, kind):
                failures.append(f"{name}: {type(e).__name__} is not a {kind.__name__}")
            if "\n" in str(e).strip() or not str(e):
                failures.append(f"{name}: message is not one line: {e!r}")
        except Exception as e:  # noqa: BLE001 - anything else is the failure this test looks for
            failures.append(f"{name}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)
    assert snapshot(world["root"]) == before
    assert len(cases) + len(CLI) >= 150


@pytest.mark.slow
def test_force_replaces_only_an_earlier_export_and_leaves_no_temp_folders(world, tmp_path):
    out = tmp_path / "again"
    export_folder(world["hf"], out, ExportOptions(quantize=(), progress=False, ort_format=False))
    (tmp_path / f".{out.name}.tmp-999999").mkdir()  # what a killed export leaves behind (its pid is gone)
    export_folder(world["hf"], out, ExportOptions(quantize=(), progress=False, ort_format=False, force=True))
    assert (out / MANIFEST).is_file() and not list(tmp_path.glob(".again.*"))


def test_a_folder_that_appears_during_an_export_is_never_replaced(world, tmp_path, monkeypatch, capsys):
    """The user makes the output folder (with a notes.txt) while an export runs, without --force: the export fails
    in one line, exit 2, and the user's folder and file are untouched (it used to be deleted)."""
    import mla_edge.export.pipeline as pipeline
    from mla_edge.cli import main

    out = tmp_path / "racy"
    real = pipeline._build

    def build_then_user_writes(*a, **kw):
        manifest = real(*a, **kw)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return manifest

    monkeypatch.setattr(pipeline, "_build", build_then_user_writes)
    capsys.readouterr()
    assert main(["export", str(world["hf"]), "-o", str(out), "--quantize", "none", "--no-tokenizer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "left untouched" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".racy.*"))


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"  \n\t", "is empty"), (b"ok \xff\xfe", "not UTF-8")])
def test_bad_calibration_text_is_one_line_before_any_work(world, tmp_path, monkeypatch, capsys, content, match):
    """Empty or non-UTF-8 calibration text fails at once (it was a UnicodeDecodeError traceback after minutes of
    export work), and nothing is written."""
    import mla_edge.export.pipeline as pipeline
    from mla_edge.cli import main

    monkeypatch.setattr(pipeline, "_build", lambda *a, **kw: pytest.fail("export work started"))
    (tmp_path / "calib.txt").write_bytes(content)
    argv = ["export", str(world["hf"]), "-o", str(tmp_path / "out"), "--quantize", "int8-qdq"]
    capsys.readouterr()
    assert main([*argv, "--calibration-text", str(tmp_path / "calib.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "out").exists()


def test_atomic_folder_replaces_only_what_was_there_when_it_began(tmp_path):
    """--force replaces the folder found on entry; one swapped in meanwhile (even reusing its inode number), or one
    made by a second run that finished first, is left as it is and the later run fails."""
    import shutil

    from mla_edge.models.checkpoint import FolderRaceError, atomic_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("o")
    with atomic_folder(out) as t:
        (t / "new").write_text("n")
    assert [p.name for p in out.iterdir()] == ["new"]
    with pytest.raises(FolderRaceError), atomic_folder(out) as t:
        (t / "newer").write_text("n")
        shutil.rmtree(out)
        out.mkdir()
        (out / "user").write_text("u")
    assert [p.name for p in out.iterdir()] == ["user"]
    with pytest.raises(FolderRaceError), atomic_folder(tmp_path / "two") as first:  # two runs, one path
        (first / "a").write_text("1")
        with atomic_folder(tmp_path / "two") as second:
            (second / "b").write_text("2")
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "two"]


def test_base_install_without_torch_says_which_extra(world):
    """export, parity and demo on the base install (no torch): one line naming the extra to install."""
    import subprocess
    import sys

    for argv in (
        ["export", str(world["hf"]), "-o", str(world["root"] / "nt")],
        ["parity", str(world["out"])],
        ["demo"],
    ):
        code = (
            "import sys\nfor m in ('torch', 'onnx', 'onnxscript', 'safetensors'):\n    sys.modules[m] = None\n"
            f"from mla_edge.cli import main\nsys.exit(main({argv!r}))\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().count("\n") == 0 and "pip install 'mla-edge[export]'" in r.stderr, r.stderr
    assert not (world["root"] / "nt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_or_sigterm_during_export_is_one_line_and_leaves_nothing(world, tmp_path, sig, code, word):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "interrupted"
    p = subprocess.Popen(
        [sys.executable, "-m", "mla_edge.cli", "export", str(world["hf"]), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a shell without job control starts background jobs (a CI launched with `&`) with SIGINT
        # ignored, which children inherit and Python then leaves ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while not list(tmp_path.glob(".interrupted.tmp*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)  # wait until the export has started writing
    time.sleep(0.5)
    assert list(tmp_path.glob(".interrupted.tmp*")), "the export never started writing"
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == code and err.strip() == f"mla-edge export: {word}", (p.returncode, err[-2000:])
    assert not out.exists() and not list(tmp_path.glob(".interrupted*"))


def test_a_full_disk_is_one_line_and_replaces_nothing(tmp_path, monkeypatch, capsys):
    """ENOSPC while an export writes: one line, exit 2, and the earlier export is still there."""
    import errno

    from mla_edge.cli import main
    from mla_edge.export import pipeline

    out = tmp_path / "out"
    assert main(["export", "-o", str(out), "--quantize", "none"]) == 0
    before = sorted(p.name for p in out.iterdir())

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.onnx"))

    monkeypatch.setattr(pipeline, "_build", full)
    assert main(["export", "-o", str(out), "--quantize", "none", "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device writing" in err[0]
    assert sorted(p.name for p in out.iterdir()) == before


def test_chat_on_the_demo_says_it_is_a_story_model(world, monkeypatch, capsys):
    """`mla-edge chat` with no folder runs on the demo export, which has no chat format: one line that says what to
    chat with instead (a folder that was named keeps the plain 'no chat_template' line)."""
    from mla_edge import cli

    assert (
        not (world["out"] / "tokenizer_config.json").is_file()
        or "chat_template" not in (world["out"] / "tokenizer_config.json").read_text()
    )
    monkeypatch.setattr(cli, "export_dir_or_demo", lambda given: Path(given) if given else world["out"])
    assert cli.main(["chat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "story model with no chat format" in err[0] and "--model smollm2" in err[0], err
    assert cli.main(["chat", str(world["out"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat_template" in err[0] or "chat template" in err[0], err


def test_a_calibrated_export_prints_no_onnxruntime_warnings(world, tmp_path, capfd):
    """onnxruntime's C++ warnings (e.g. graph.cc's 'Initializer logits_to_keep appears in graph inputs', from the
    sessions that calibration builds) reach the terminal at fd level; an export prints none of them."""
    from mla_edge.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("the old house stood at the end of the lane and the rain came down " * 40)
    argv = ["export", str(world["hf"]), "-o", str(tmp_path / "o"), "--quantize", "int8-qdq"]
    assert main([*argv, "--calibration-text", str(text)]) == 0
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "[W:" not in err, err[-2000:]

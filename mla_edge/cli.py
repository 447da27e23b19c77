"""The `mla-edge` command: one parser, thin subcommands over importable functions, one-line errors (exit 2).

Each command imports what it drives only when it runs, so that `mla-edge generate` never imports torch. Every
command that takes a model defaults to the embedded demo model; generate and bench default to its cached export.
`--json` prints one JSON object on stdout instead of the human report (which then goes to stderr, or nowhere).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from mla_edge import __version__
from mla_edge.contract import CACHE_DTYPES, MANIFEST, PLAN_DTYPES, PRECISIONS, STATIC_PRECISIONS, InputError
from mla_edge.models import DEMO_DIR

EXTRA_MODULES = {"torch", "onnx", "onnxscript", "safetensors", "tqdm"}  # what `[export]` installs


class UserError(InputError):
    """Bad command-line input; printed as one clear line, exit status 2."""


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))


def model_dir_or_demo(given: str | None) -> Path:
    if given:
        return Path(given)
    if not (DEMO_DIR / "config.json").is_file():
        raise UserError(f"no MODEL_DIR given and the embedded demo model is missing from {DEMO_DIR}")
    return DEMO_DIR


def export_dir_or_demo(given: str | None) -> Path:
    from mla_edge.runtime.manifest import demo_export_dir

    if given:
        return Path(given)
    d = demo_export_dir()
    if not (d / MANIFEST).is_file():
        raise UserError(f"no OUT_DIR given and the demo has no export yet ({d}): run `mla-edge demo` first")
    return d


# ---- define: info ---------------------------------------------------------------------------------------------------
def cmd_info(a: argparse.Namespace) -> int:
    from mla_edge.contract import CacheContract, comparison
    from mla_edge.models.config import MLAConfig

    model_dir = model_dir_or_demo(a.model_dir)
    cfg = MLAConfig.from_pretrained(model_dir)
    shown = (
        "model_type vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads q_lora_rank "
        "kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim rope_parameters rope_interleave "
        "max_position_embeddings tie_word_embeddings bos_token_id eos_token_id n_routed_experts "
        "num_experts_per_tok n_shared_experts first_k_dense_replace topk_method"
    ).split()
    contract = CacheContract.from_config(cfg, a.dtype if a.dtype in CACHE_DTYPES else "fp32")
    info: dict[str, Any] = {
        "model_dir": str(model_dir),
        "config": {k: v for k, v in cfg.to_dict().items() if k in shown},
        "cache": comparison(cfg, a.dtype),
        "cache_names": {"past": contract.past_names()[:2], "present": contract.present_names()[:2]},
    }
    if a.json:
        _print_json(info)
        return 0
    print(f"model: {info['model_dir']}")
    for k, v in info["config"].items():
        print(f"  {k:26s} {v}")
    c = info["cache"]
    print(f"\ncache per token ({c['dtype']}, {c['num_layers']} layers):")
    print(f"  {'form':20s} {'elements/token/layer':>22s} {'bytes/token':>12s} {'vs MHA':>8s}")
    for form in ("mla", "gqa", "mha"):
        r = c[form]
        label = form.upper() + (f" ({r['kv_heads']} kv heads)" if form == "gqa" else "")
        print(
            f"  {label:20s} {r['elements_per_token_per_layer']:>22,d} {r['bytes_per_token']:>12,d} "
            f"{r['ratio_vs_mha']:>7.1%}"
        )
    return 0


# ---- convert: export, parity, demo ----------------------------------------------------------------------------------
def cmd_export(a: argparse.Namespace) -> int:
    from mla_edge.export.pipeline import ExportOptions, export_folder

    model_dir = model_dir_or_demo(a.model_dir)
    out = Path(a.out) if a.out else Path.cwd() / f"{model_dir.resolve().name}-onnx"
    calib = a.calibration_text
    if calib is None and (model_dir / "calibration.txt").is_file():
        calib = model_dir / "calibration.txt"
    opts = ExportOptions(
        quantize=tuple(a.quantize),
        int4_block_size=a.int4_block_size,
        calibration_text=calib,
        force=a.force,
        progress=sys.stderr.isatty(),
        cache_dtype=a.cache_dtype,
        static_cache=a.static_cache,
        static_chunk=a.static_chunk,
        static_quantize=tuple(
            a.static_quantize
            if a.static_quantize is not None
            else (("int8", "w8a16") if calib else ("int8",))
            if a.static_cache
            else ()
        ),
        qnn_context=a.qnn_context,
        require_tokenizer=not a.no_tokenizer,
    )
    manifest = export_folder(model_dir, out, opts)
    if a.json:
        _print_json(manifest)
        return 0
    print(f"exported {model_dir} -> {out}")
    for prec, entry in manifest["files"].items():
        print(
            f"  {prec:9s} {entry['path']:22s} {entry['bytes'] / 1e6:9.2f} MB  sha256 {entry['files'][0]['sha256'][:12]}"
        )
    c = manifest["cache"]
    scales = " + 2 float32 scales" if c["dtype"] == "int8" else ""
    print(
        f"  latent cache: {c['bytes_per_token']} bytes/token ({c['num_layers']} layers x ({c['kv_lora_rank']} + "
        f"{c['qk_rope_head_dim']}) x {c['dtype']}{scales})"
    )
    return 0


def cmd_parity(a: argparse.Namespace) -> int:
    from mla_edge.export.parity import format_table, run_parity
    from mla_edge.runtime.manifest import Manifest

    if len(a.dirs) > 2:
        raise UserError("give at most two folders: [MODEL_DIR] OUT_DIR")
    out_dir = Path(a.dirs[-1])
    manifest = Manifest.read(out_dir)
    model_dir = Path(a.dirs[0]) if len(a.dirs) == 2 else Path(manifest.data["source"]["model_dir"])
    text_path = a.text or (model_dir / "heldout.txt" if (model_dir / "heldout.txt").is_file() else None)
    if text_path is not None and not Path(text_path).is_file():
        raise UserError(f"--text {text_path} not found")
    text = Path(text_path).read_text(encoding="utf-8") if text_path else None
    if a.static:
        return _static_parity(a, manifest, text, str(text_path))
    report = run_parity(
        model_dir, out_dir, text, a.steps, a.ppl_tokens, precisions=a.precision, progress=sys.stderr.isatty()
    )
    report["text"] = str(text_path) if text_path else None
    _print_json(report) if a.json else print(format_table(report))
    return 0


def _static_parity(a: argparse.Namespace, manifest: Any, text: str | None, text_path: str) -> int:
    """Static graphs on a provider (say, Qualcomm's HTP) against the fp32 static graphs on the CPU. Torch-free."""
    from mla_edge.runtime.static import static_parity

    report = static_parity(
        manifest,
        a.precision,
        a.provider,
        a.steps,
        text,
        a.ppl_tokens,
        say=lambda line: print(line, file=sys.stderr if a.json else sys.stdout, flush=True),
    )
    report["text"] = text_path
    if a.json:
        _print_json(report)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from mla_edge.export.demo import run_demo

    report = run_demo(a.prompt, a.max_new_tokens, a.refresh, out=sys.stderr if a.json else sys.stdout)
    if a.json:
        _print_json(report)
    return 0


# ---- run: generate --------------------------------------------------------------------------------------------------
def _limited_generate(a: argparse.Namespace, argv: list[str]) -> int:
    """The same generate command in a child process under the memory limit."""
    from mla_edge.runtime.budget import parse_memory
    from mla_edge.runtime.memory import rerun_limited

    return rerun_limited(argv, "--memory-limit", parse_memory(a.memory_limit))


def _generator(a: argparse.Namespace, out_dir: Path):  # -> Generator (imported lazily: no torch, no onnxruntime yet)
    from mla_edge.runtime.generate import Generator

    static = a.protocol == "static" or (a.protocol == "auto" and a.provider == "qnn")
    dynamic = (
        {}
        if static
        else {"opt_level": getattr(a, "opt_level", "all"), "optimized_cache": getattr(a, "optimized_cache", None)}
    )
    return Generator(
        out_dir,
        a.precision,
        a.provider,
        threads=a.threads,
        iobinding=not getattr(a, "no_iobinding", False),
        prefill_chunk=getattr(a, "prefill_chunk", 64),
        protocol=a.protocol,
        **dynamic,
    )


def _generation_options(a: argparse.Namespace) -> dict:
    from mla_edge.runtime.sampling import SamplingOptions

    sampling = SamplingOptions(a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.seed)
    return {"sampling": sampling, "max_new_tokens": a.max_new_tokens, "stop": tuple(getattr(a, "stop", ()))}


def _stats_line(r) -> str:  # r: GenerationResult
    s = r.stats
    return (
        f"[{r.finish_reason}] {s['precision']} | prompt {s['prompt_tokens']} tok | "
        f"prefill {s['prefill_tok_s']:,.0f} tok/s | decode {s['decode_tok_s']:,.1f} tok/s | "
        f"latent cache {s['cache_bytes'] / 1024:,.1f} KiB for {s['cache_tokens']} tokens "
        f"(MHA would hold {s['mha_cache_bytes'] / 1024:,.1f} KiB) | peak RSS {s['peak_rss_bytes'] / 2**20:,.0f} MiB"
    )


def cmd_generate(a: argparse.Namespace) -> int:
    if a.memory_limit:
        return _limited_generate(a, a.argv)
    if len(a.args) > 2:
        raise UserError('give at most [OUT_DIR] and one PROMPT (quote the prompt: "...")')
    if len(a.args) == 1 and (Path(a.args[0]) / MANIFEST).is_file():
        raise UserError(f'the prompt is missing: {a.args[0]} is an export folder (mla-edge generate OUT_DIR "prompt")')
    out_dir = export_dir_or_demo(a.args[0] if len(a.args) == 2 else None)
    prompt = a.args[-1]
    kw = _generation_options(a)
    gen = _generator(a, out_dir)
    # a bad prompt (or a missing chat template) fails here, before anything is printed
    ids = gen.chat_prompt([{"role": "user", "content": prompt}]) if a.chat else gen.encode(prompt)
    if a.json:
        r = gen.generate_ids([ids], **kw)[0]
        _print_json(
            {
                "prompt": prompt,
                "chat": a.chat,
                "text": r.text,
                "finish_reason": r.finish_reason,
                "token_ids": r.token_ids,
                "stats": r.stats,
                "export_dir": str(out_dir),
            }
        )
        return 0
    if not a.chat:
        sys.stdout.write(prompt)
    for piece in gen.stream(ids, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(_stats_line(gen.last_result), file=sys.stderr)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    """A conversation on the terminal with the model's own chat template; /exit or end of input stops."""
    from mla_edge.runtime.chat import chat_loop

    gen = _generator(a, export_dir_or_demo(a.out_dir))
    kw = _generation_options(a)
    gen.chat_prompt([{"role": "user", "content": "hi"}])  # no template, or a broken one: one line, now
    interactive = sys.stdin.isatty()

    def read() -> str | None:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        return None if line == "" else line

    transcript: list[dict] = []

    def reply(messages: list[dict]) -> str:
        pieces = []
        for piece in gen.stream(gen.chat_prompt(messages), **kw):
            if not a.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
            pieces.append(piece)
        if not a.json:
            sys.stdout.write("\n")
        print(_stats_line(gen.last_result), file=sys.stderr)
        transcript[:] = [*messages, {"role": "assistant", "content": "".join(pieces)}]
        return "".join(pieces)

    chat_loop(reply, read, a.system)
    if a.json:  # the whole conversation, once it ends
        _print_json({"messages": transcript})
    return 0


# ---- measure: bench, budget -----------------------------------------------------------------------------------------
def cmd_bench(a: argparse.Namespace) -> int:
    from mla_edge.runtime.bench import format_report, run_bench

    out_dir = export_dir_or_demo(a.out_dir)
    rep = run_bench(
        out_dir,
        a.precision,
        a.repeats,
        a.threads,
        not a.no_torch,
        rounds=a.rounds,
        progress=lambda name: print(f"[bench] {name}", file=sys.stderr, flush=True),
    )
    _print_json(rep) if a.json else print(format_report(rep))
    return 0


def cmd_bench_worker(a: argparse.Namespace) -> int:
    """One backend of `mla-edge bench` in its own process: torch (from MODEL_DIR) or an ORT precision (no torch)."""
    import time

    from mla_edge.runtime.bench import emit, measure, measure_ort
    from mla_edge.runtime.session import physical_cores

    if a.backend != "torch":
        measure_ort(a.folder, a.backend, a.repeats, a.threads, a.prompt_lens, a.pasts, not a.no_iobinding)
        return 0
    from mla_edge.export.parity import torch_backend

    t = time.perf_counter()
    step, empty, vocab = torch_backend(a.folder, a.threads or physical_cores())
    load = time.perf_counter() - t
    emit(
        {
            "backend": "torch-eager-fp32",
            "load_s": load,
            **measure(step, empty, vocab, a.repeats, prompt_lens=a.prompt_lens, pasts=a.pasts),
        }
    )
    return 0


def cmd_budget(a: argparse.Namespace) -> int:
    from mla_edge.runtime.budget import calibrate, format_plan, parse_memory, plan, plot

    memory = parse_memory(a.memory)
    folder = model_dir_or_demo(a.folder)
    if a.plot:  # an unwritable plot path fails now, not after a calibration run
        target = Path(a.plot)
        if target.is_dir() or not target.parent.is_dir():
            raise UserError(f"--plot {a.plot}: {'is a folder' if target.is_dir() else 'its folder does not exist'}")
    cal = None
    if a.calibrate:
        if not (folder / MANIFEST).is_file():
            raise UserError(f"--calibrate needs an export folder (with {MANIFEST}); {folder} is not one")
        cal = calibrate(folder)
    p = plan(folder, memory, a.batch, cal)
    if a.plot:
        p["plot"] = str(plot(p, folder, a.plot, a.plot_weights, a.plot_cache))
    if a.json:
        _print_json(p)
    else:
        print(format_plan(p) + (f"\nplot: {p['plot']}" if a.plot else ""))
    return 0


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


def _lengths(text: str) -> tuple[int, ...]:  # the hidden bench worker's lengths, written by `bench` itself
    return tuple(int(x) for x in text.split(","))


HELP = {  # the flags several commands share, and the long help texts
    "model_dir": "Hugging Face model folder: config.json + *.safetensors (default: the embedded demo model)",
    "out_dir": "export folder (default: the demo model's cached export, written by `mla-edge demo`)",
    "quantize": "precisions besides fp32: none, int8 (dynamic), int4 (MatMulNBits), int8-qdq (static, calibrated)",
    "calibration": "text for int8-qdq calibration (default for the demo model: its calibration.txt)",
    "cache_dtype": "latent cache storage: fp32, or int8 with a per-token scale (quantized in the graph)",
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


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming it (the usage block is for --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
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

    p = command("demo", cmd_demo, "run the whole pipeline on the embedded demo model: export, int8, parity, generate")
    p.add_argument("--prompt", default="It was a dark and stormy night, and", help="prompt for the generation step")
    count(p, "--max-new-tokens", 80)
    p.add_argument("--refresh", action="store_true", help="export again even if a cached export exists")

    p = command("info", cmd_info, "print a model's config and its cache size per token (MLA vs MHA vs GQA)")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help=HELP["model_dir"])
    p.add_argument("--dtype", default="fp32", choices=PLAN_DTYPES, help="cache dtype for the byte counts")

    p = command("export", cmd_export, "export a model to ONNX with an explicit latent cache, and quantize it")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help=HELP["model_dir"])
    p.add_argument("-o", "--out", metavar="OUT_DIR", help="export folder to create (default: ./<model name>-onnx)")
    p.add_argument("--quantize", nargs="+", default=["int8"], choices=["none", *PRECISIONS[1:]], help=HELP["quantize"])
    p.add_argument("--int4-block-size", type=int, default=32, help="int4 block size (a power of two >= 16)")
    p.add_argument("--calibration-text", type=Path, help=HELP["calibration"])
    p.add_argument("--cache-dtype", default="fp32", choices=CACHE_DTYPES, help=HELP["cache_dtype"])
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an earlier mla-edge export")
    p.add_argument("--no-tokenizer", action="store_true", help="export a model folder that has no tokenizer.json")
    count(p, "--static-cache", None, "also write the static device graphs, for a latent buffer of N tokens")
    count(p, "--static-chunk", 16, "tokens per static prefill chunk")
    p.add_argument(
        "--static-quantize",
        nargs="+",
        default=None,
        choices=STATIC_PRECISIONS[1:],
        help="static precisions besides fp32: int8 (CPU), w8a16 / w8a8 (QDQ for Qualcomm's HTP); default: int8, "
        "plus w8a16 when there is calibration text",
    )
    p.add_argument("--qnn-context", metavar="SOC", help=HELP["qnn_context"])

    p = command("generate", cmd_generate, "generate text from an export folder with onnxruntime (no torch)")
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
    p.add_argument("--no-iobinding", action="store_true", help="copy the cache through numpy each step (to compare)")
    p.add_argument("--memory-limit", metavar="SIZE", help=HELP["memory_limit"])
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the model's chat template")
    count(p, "--prefill-chunk", 64, HELP["prefill_chunk"])

    p = command("chat", cmd_chat, "talk with a chat model on the terminal, in its own chat template (no torch)")
    p.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help=HELP["out_dir"])
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--precision", choices=sorted({*PRECISIONS, *STATIC_PRECISIONS}))
    p.add_argument("--provider", default="auto", help=HELP["provider"])
    p.add_argument("--protocol", default="auto", choices=["auto", "dynamic", "static"], help=HELP["protocol"])
    count(p, "--threads", None, "intra-op threads (default: physical cores)")
    count(p, "--max-new-tokens", 256)
    p.add_argument("--temperature", type=float, default=0.7)
    count(p, "--top-k", 0, "0 = off", zero=True)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    count(p, "--seed", None, "makes sampling reproducible", zero=True)

    p = command("parity", cmd_parity, "compare PyTorch and each ONNX precision: logits, greedy tokens, perplexity")
    p.add_argument("dirs", nargs="+", metavar="[MODEL_DIR] OUT_DIR", help=HELP["parity_dirs"])
    p.add_argument("--text", type=Path, help="text for perplexity (default: MODEL_DIR/heldout.txt when present)")
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

    p = command("bench", cmd_bench, "measure PyTorch eager vs onnxruntime fp32/int8/int4 side by side (speed, RSS)")
    p.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help=HELP["out_dir"])
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, help="default: fp32, int8 and int4 where present")
    count(p, "--repeats", 5, "timed repeats per measurement")
    count(p, "--rounds", 3, "interleaved rounds over all backends")
    count(p, "--threads", None, "threads for every backend (default: physical cores)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager baseline")

    p = command("budget", cmd_budget, "largest context that fits a memory budget, as MLA vs MHA/GQA, by precision")
    p.add_argument("folder", nargs="?", metavar="MODEL_DIR|OUT_DIR", help="HF model or export folder (default: demo)")
    p.add_argument("--memory", required=True, help="the memory budget, e.g. 512MB, 1.5GB, 300MiB")
    count(p, "--batch", 1)
    p.add_argument("--calibrate", action="store_true", help=HELP["calibrate"])
    p.add_argument("--plot", metavar="FILE.png", help="draw memory against context for MHA, GQA and MLA (matplotlib)")
    p.add_argument("--plot-weights", default="int8", choices=["fp32", "int8", "int4"])
    p.add_argument("--plot-cache", default="fp32", choices=CACHE_DTYPES)

    p = command("_bench-worker", cmd_bench_worker, None)  # hidden: one backend of `bench`, in its own process
    p.add_argument("folder")
    p.add_argument("backend", help="torch, or an onnxruntime precision")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--prompt-lens", type=_lengths, default=(128, 512))
    p.add_argument("--pasts", type=_lengths, default=(128, 1024))
    p.add_argument("--no-iobinding", action="store_true")
    return parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"mla-edge: note: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _warning_line
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one line (usage + error), or --help
        return int(e.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    args.argv = argv
    try:
        return args._run(args) or 0
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:  # the temp folder is already gone; a second Ctrl-C must not interrupt the exit
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"mla-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in EXTRA_MODULES:
            print(
                f"mla-edge {args.command}: error: this command needs {e.name.split('.')[0]}, which the base install "
                "leaves out: pip install 'mla-edge[export]'",
                file=sys.stderr,
            )
            return 2
        raise
    except (InputError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if args.debug:
            raise
        print(f"mla-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    # anything else is a bug in mla-edge: its traceback shows (please report it)


if __name__ == "__main__":
    sys.exit(main())

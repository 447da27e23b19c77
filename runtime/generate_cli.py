"""`mla-edge generate [OUT_DIR] "prompt"`: stream text to stdout, stats to stderr (or everything as --json)."""
from __future__ import annotations

import json
import subprocess
import sys


def add_arguments(p) -> None:
    p.add_argument("args", nargs="+", metavar="[OUT_DIR] PROMPT",
                   help="export folder (default: the demo model's cached export) and the prompt")
    p.add_argument("--precision", help="fp32, int8, int4, int8-qdq (default: int8 when present)")
    p.add_argument("--provider", default="auto", help="auto, cpu, xnnpack, coreml, nnapi, qnn (default auto)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: physical cores)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--opt-level", default="all", choices=["none", "basic", "extended", "all"], help="onnxruntime graph optimization level")
    p.add_argument("--optimized-cache", metavar="DIR", help="save onnxruntime's optimized graph here and reuse it on later runs")
    p.add_argument("--no-iobinding", action="store_true", help="copy the cache through numpy each step (for comparison)")
    p.add_argument("--memory-limit", metavar="SIZE", help="run under an enforced memory limit, e.g. 300MB (a cgroup where "
                   "writable, else RLIMIT_AS); exceeding it is a clear error")
    p.add_argument("--prefill-chunk", type=int, default=64, help="prefill long prompts in chunks of this many tokens "
                   "(smaller: less attention scratch memory; default 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")


def _child_argv(args) -> list[str]:
    """The same generate command, minus --memory-limit, for the limited child process."""
    argv = ["generate", *args.args, "--provider", args.provider, "--max-new-tokens", str(args.max_new_tokens),
            "--temperature", str(args.temperature), "--top-k", str(args.top_k), "--top-p", str(args.top_p),
            "--repetition-penalty", str(args.repetition_penalty), "--opt-level", args.opt_level,
            "--prefill-chunk", str(args.prefill_chunk)]
    for flag, value in (("--precision", args.precision), ("--threads", args.threads), ("--seed", args.seed),
                        ("--optimized-cache", args.optimized_cache)):
        if value is not None:
            argv += [flag, str(value)]
    for s in args.stop:
        argv += ["--stop", s]
    return argv + (["--no-iobinding"] if args.no_iobinding else []) + (["--json"] if args.json else [])


def run_with_limit(args) -> int:
    from .budget import parse_memory
    from .cli import UserError
    from .memlimit import MemoryLimitExceeded, run_limited

    limit = parse_memory(args.memory_limit)
    cmd = [sys.executable, "-m", "mla_edge.runtime.cli", *_child_argv(args)]
    try:
        proc, info = run_limited(cmd, limit, stderr=subprocess.PIPE, text=True)
    except MemoryLimitExceeded as e:
        raise UserError(str(e)) from None
    sys.stderr.write(proc.stderr)
    peak = f", peak {info['peak_bytes'] / 2**20:.1f} MiB" if info["peak_bytes"] else ""
    print(f"[memory limit] {info['limit_bytes'] / 2**20:.1f} MiB enforced by {info['mechanism']}{peak}", file=sys.stderr)
    return proc.returncode


def run(args) -> int:
    if args.memory_limit:
        return run_with_limit(args)
    from .demo_export import default_export_dir
    from .generate import Generator
    from .sampling import SamplingOptions

    if len(args.args) > 2:
        raise ValueError('give at most [OUT_DIR] and one PROMPT (quote the prompt: "...")')
    out_dir = default_export_dir(args.args[0] if len(args.args) == 2 else None)
    prompt = args.args[-1]
    sampling = SamplingOptions(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    gen = Generator(out_dir, args.precision, args.provider, args.threads, iobinding=not args.no_iobinding,
                    opt_level=args.opt_level, optimized_cache=args.optimized_cache, prefill_chunk=args.prefill_chunk)
    gen.encode(prompt)  # a bad prompt fails here, before anything is printed
    kw = dict(sampling=sampling, max_new_tokens=args.max_new_tokens, stop=tuple(args.stop))
    if args.json:
        r = gen.generate(prompt, **kw)
        print(json.dumps({"prompt": prompt, "text": r.text, "finish_reason": r.finish_reason, "token_ids": r.token_ids,
                          "stats": r.stats, "export_dir": str(out_dir)}, indent=2))
        return 0
    sys.stdout.write(prompt)
    for piece in gen.stream(prompt, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = gen.last_result.stats
    print(f"[{gen.last_result.finish_reason}] {s['precision']} | prompt {s['prompt_tokens']} tok | "
          f"prefill {s['prefill_tok_s']:,.0f} tok/s | decode {s['decode_tok_s']:,.1f} tok/s | "
          f"latent cache {s['cache_bytes'] / 1024:,.1f} KiB for {s['cache_tokens']} tokens "
          f"(MHA would hold {s['mha_cache_bytes'] / 1024:,.1f} KiB) | peak RSS {s['peak_rss_bytes'] / 2**20:,.0f} MiB",
          file=sys.stderr)
    return 0

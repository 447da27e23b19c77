"""`mla-edge`: one console command, thin subcommands over importable functions.

Each subcommand lives beside the code it drives and is imported only when it runs, so that
`mla-edge generate` never imports torch. A module named here provides add_arguments(parser) and run(args).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("mla_edge.export.demo", "run the whole pipeline on the embedded demo model: export, int8, parity, generate"),
    "info": ("mla_edge.models.info", "print a model's config and its cache size per token (MLA vs MHA vs GQA)"),
    "export": ("mla_edge.export.cli", "export a model to ONNX with an explicit latent cache, and quantize it"),
    "generate": ("mla_edge.runtime.generate_cli", "generate text from an export folder with onnxruntime (no torch)"),
    "budget": ("mla_edge.runtime.budget_cli", "largest context that fits a memory budget, as MLA vs MHA/GQA, by precision"),
    "bench": ("mla_edge.runtime.bench_cli", "measure PyTorch eager vs onnxruntime fp32/int8/int4 side by side (speed, RSS)"),
    "parity": ("mla_edge.export.parity_cli", "compare PyTorch and each ONNX precision: logits, greedy tokens, perplexity"),
}


class UserError(Exception):
    """Bad input the user can fix; printed as one clear line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-edge", description="MLA language models on the edge: export, run, measure.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"mla-edge: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _warning_line
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return importlib.import_module(args._module).run(args) or 0
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except (UserError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"mla-edge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

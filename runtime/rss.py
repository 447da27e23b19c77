"""Peak resident memory of this process. Torch-free."""
from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """VmHWM on Linux: it belongs to the process image, so a child started from a big parent (a test runner that
    imported torch, say) reports its own peak. ru_maxrss survives fork+exec on Linux and would report the parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def generate_stats(out_dir, prompt: str, precision: str, max_new_tokens: int, threads: int | None = None) -> dict:
    """Run `mla-edge generate --json` in a fresh process (so its peak RSS is its own) and return its stats."""
    import json
    import subprocess

    cmd = [sys.executable, "-m", "mla_edge.runtime.cli", "generate", str(out_dir), prompt, "--json", "--provider", "cpu",
           "--precision", precision, "--max-new-tokens", str(max_new_tokens)] + (["--threads", str(threads)] if threads else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"generate failed: {r.stderr.strip()[-1500:]}")
    return json.loads(r.stdout)["stats"]

"""Process memory: peak RSS, `mla-edge generate` in a fresh process, and enforced limits with a clear error.

Limit mechanisms, best first:
  cgroup-v2  a child cgroup with memory.max (and memory.swap.max = 0) under /sys/fs/cgroup (needs write access)
  cgroup-v1  a child of the memory controller with memory.limit_in_bytes (and memsw where present)
  rlimit-as  RLIMIT_AS on the child: limits *virtual* address space, which onnxruntime and numpy reserve
             generously (a process with 86 MiB resident maps ~300 MiB), so the same number is far stricter
A cgroup limit counts resident memory (and page cache), as a phone's low-memory killer does.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from mla_edge.contract import InputError

V2 = Path("/sys/fs/cgroup")
V1 = Path("/sys/fs/cgroup/memory")


class MemoryLimitExceeded(InputError):
    """The limited command was killed by its limit, or failed to allocate under it."""


def _status_bytes(key: str) -> int | None:
    """A size field of /proc/self/status (VmHWM, VmRSS) in bytes; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")), None)
    except OSError:
        return None


def peak_rss_bytes() -> int:
    """VmHWM on Linux: it belongs to the process image, so a child started from a big parent (a test runner that
    imported torch, say) reports its own peak. ru_maxrss survives fork+exec on Linux and would report the parent's."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def rss_bytes() -> int:
    """This process's resident set now (VmRSS; 0 where /proc is missing)."""
    return _status_bytes("VmRSS") or 0


def cli_command(*args: str) -> list[str]:
    """The `mla-edge` command line with this interpreter, for a fresh process."""
    return [sys.executable, "-m", "mla_edge.cli", *args]


def run_generate(
    out_dir: str | Path, prompt: str, precision: str, max_new_tokens: int, threads: int | None = None
) -> dict:
    """Run `mla-edge generate --json` in a fresh process (so its peak RSS is its own) and return its stats."""
    cmd = cli_command(
        "generate",
        str(out_dir),
        prompt,
        "--json",
        "--provider",
        "cpu",
        "--precision",
        precision,
        "--max-new-tokens",
        str(max_new_tokens),
        *(["--threads", str(threads)] if threads else []),
    )
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"generate failed: {r.stderr.strip()[-1500:]}")
    return json.loads(r.stdout)["stats"]


def _writable(p: Path) -> bool:
    return p.is_dir() and os.access(p, os.W_OK)


def mechanism() -> str:
    if (V2 / "cgroup.controllers").is_file() and "memory" in (V2 / "cgroup.controllers").read_text() and _writable(V2):
        return "cgroup-v2"
    if _writable(V1) and (V1 / "memory.limit_in_bytes").exists():
        return "cgroup-v1"
    return "rlimit-as"


class _Cgroup:
    def __init__(self, kind: str, limit: int):
        self.kind = kind
        self.path = (V2 if kind == "cgroup-v2" else V1) / f"mla-edge-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        if kind == "cgroup-v2":
            (self.path / "memory.max").write_text(str(limit))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(limit))

    def enter(self) -> None:  # runs in the child between fork and exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        f = self.path / ("memory.peak" if self.kind == "cgroup-v2" else "memory.max_usage_in_bytes")
        try:
            return int(f.read_text().split()[0])
        except (OSError, ValueError):
            return None

    def oom_killed(self) -> bool:
        f = self.path / ("memory.events" if self.kind == "cgroup-v2" else "memory.oom_control")
        try:
            for line in f.read_text().splitlines():
                key, _, val = line.partition(" ")
                if key in ("oom_kill", "oom") and int(val) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def run_limited(cmd: list[str], limit: int, **popen) -> tuple[subprocess.CompletedProcess, dict]:
    """Run cmd with its memory capped at `limit` bytes; returns (the finished process, info). Raises MemoryLimitExceeded
    when the child was killed by the limit or failed to allocate under it."""
    kind = mechanism()
    group = _Cgroup(kind, limit) if kind.startswith("cgroup") else None

    def preexec():
        if group:
            group.enter()
        else:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        proc = subprocess.run(cmd, preexec_fn=preexec, **popen)
        info: dict[str, Any] = {"mechanism": kind, "limit_bytes": limit, "peak_bytes": group.peak() if group else None}
        oom = proc.returncode == -signal.SIGKILL or (group is not None and group.oom_killed())
        if not oom and proc.returncode and isinstance(proc.stderr, str):  # rlimit: allocations fail instead
            oom = any(s in proc.stderr for s in ("MemoryError", "bad_alloc", "Failed to allocate", "Cannot allocate"))
        if oom:
            raise MemoryLimitExceeded(
                f"the run needed more than the {limit / 2**20:.1f} MiB memory limit ({kind}) and was stopped"
                + (f"; peak {info['peak_bytes'] / 2**20:.1f} MiB" if info["peak_bytes"] else "")
            )
        return proc, info
    finally:
        if group:
            group.remove()


def rerun_limited(argv: list[str], flag: str, limit: int) -> int:
    """Run this `mla-edge` command line again, without `flag` and its value, in a child under `limit` bytes; its
    stderr passes through with one line saying how the limit was enforced. Exceeding it raises MemoryLimitExceeded."""
    child = [x for i, x in enumerate(argv) if x != flag and (i == 0 or argv[i - 1] != flag)]
    child = [x for x in child if not x.startswith(flag + "=")]
    proc, info = run_limited(cli_command(*child), limit, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr)
    peak = f", peak {info['peak_bytes'] / 2**20:.1f} MiB" if info["peak_bytes"] else ""
    print(
        f"[memory limit] {info['limit_bytes'] / 2**20:.1f} MiB enforced by {info['mechanism']}{peak}", file=sys.stderr
    )
    return proc.returncode

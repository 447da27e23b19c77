"""Export: fp32 ONNX == PyTorch == transformers, the graph matches its manifest, quantized files are reported,
ORT format works, and bad input fails cleanly with nothing half-written."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import hf_model, save_hf

from mla_edge.contract import MANIFEST, CacheContract
from mla_edge.export.parity import greedy, run_parity, teacher_forced
from mla_edge.export.pipeline import ExportError, ExportOptions, export_folder
from mla_edge.models.checkpoint import load_model
from mla_edge.models.config import ConfigError
from mla_edge.models.mla import ModelOptions
from mla_edge.runtime.manifest import Manifest
from mla_edge.runtime.session import LatentSession


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny DeepseekV3 (q LoRA, YaRN, interleaved RoPE) saved by transformers and exported with int8 + int4."""
    root = tmp_path_factory.mktemp("export")
    ref = hf_model(q_lora_rank=12, yarn=True, rope_interleave=True)
    save_hf(ref, root / "hf")
    export_folder(
        root / "hf",
        root / "out",
        ExportOptions(require_tokenizer=False, quantize=("int8", "int4"), progress=False, cache_dtype="fp32"),
    )
    return ref, root / "hf", root / "out"


def rows(n_rows, lengths, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 97, size=n + steps).tolist() for n in lengths[:n_rows]], lengths[:n_rows]


@pytest.mark.parametrize("file", ["model.ort", "model.onnx"])  # the CPU loads the first; other providers the second
@pytest.mark.parametrize("case", ["batch1", "batch1_chunked", "batch2_left_padded"])
def test_fp32_onnx_matches_pytorch_over_32_steps(exported, case, file):
    _, hf_dir, out = exported
    model, sess = load_model(hf_dir), LatentSession(out, "fp32", "cpu", ort_format=file == "model.ort")
    assert sess.ort_format == (file == "model.ort")
    r, lens = rows(2 if "batch2" in case else 1, [11, 6], 32)
    rep = teacher_forced(model, sess, r, lens, 32, chunk=4 if "chunked" in case else None)
    assert len(rep["max_abs_logit_diff_per_step"]) == (3 if "chunked" in case else 1) + 32
    assert rep["max_abs_logit_diff"] <= 1e-4
    assert rep["top1_agreement"] == 1.0


def test_fp32_greedy_tokens_identical(exported):
    _, hf_dir, out = exported
    prompt = rows(1, [9], 0)[0][0]
    assert greedy(load_model(hf_dir), prompt, 32) == greedy(LatentSession(out, "fp32"), prompt, 32)


def test_fp32_onnx_matches_transformers_end_to_end(exported):
    ref, _, out = exported
    sess = LatentSession(out, "fp32")
    ids = np.random.default_rng(5).integers(3, 97, size=(2, 20))
    with torch.no_grad():
        want = ref(input_ids=torch.as_tensor(ids)).logits.numpy()
    got, cache = sess.step(ids, np.ones_like(ids), np.tile(np.arange(20), (2, 1)), sess.empty_cache(2))
    assert np.abs(got - want).max() <= 1e-4
    # and a decode step with past > 0 against transformers' own cached decode
    with torch.no_grad():
        full = ref(input_ids=torch.as_tensor(np.concatenate([ids, ids[:, :1]], 1))).logits.numpy()[:, -1:]
    step, _ = sess.step(ids[:, :1], np.ones((2, 21), np.int64), np.full((2, 1), 20), cache)
    assert np.abs(step - full).max() <= 1e-4


def test_graph_matches_manifest(exported):
    _, _, out = exported
    man = json.loads((out / MANIFEST).read_text())
    contract = CacheContract(2, 16, 8)
    assert man["cache"]["bytes_per_token"] == contract.bytes_per_token
    for prec, entry in man["files"].items():
        graph = onnx.load(str(out / entry["path"]), load_external_data=False).graph

        def spec(values):
            return [
                {"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values
            ]

        inputs, outputs = spec(graph.input), spec(graph.output)
        optional = [{k: i[k] for k in ("name", "shape")} for i in man["graph"]["optional_inputs"]]
        assert optional == [{"name": "logits_to_keep", "shape": [1]}] and inputs[-1:] == optional, prec
        inputs = inputs[:-1]  # the optional input comes last in the graph: an initializer a caller may override
        assert {t.name for t in graph.initializer} >= {"logits_to_keep"}, prec
        assert inputs == [{k: i[k] for k in ("name", "shape")} for i in man["graph"]["inputs"]], prec
        assert outputs == [{k: o[k] for k in ("name", "shape")} for o in man["graph"]["outputs"]], prec
        assert inputs[3:] == [{"name": n, "shape": s} for n, s, _ in contract.past_specs()]
        assert outputs[1:] == [{"name": n, "shape": s} for n, s, _ in contract.present_specs()]
    assert man["tokens"] == {"bos": 1, "eos": [2], "pad": None}


def test_manifest_hashes_and_checker(exported):
    _, _, out = exported
    m = Manifest.read(out)
    assert set(m.precisions) == {"fp32", "int8", "int4"}
    for prec in m.precisions:
        onnx.checker.check_model(str(m.model_path(prec, verify=True)))


def test_absorbed_weights_are_quantized(exported):
    _, _, out = exported
    g = onnx.load(str(out / "model.int8.onnx")).graph
    names = {i.name: i.data_type for i in g.initializer}
    uk = [n for n in names if "w_uk" in n]
    assert uk and all(names[n] != onnx.TensorProto.FLOAT for n in uk if n.endswith("_quantized"))
    assert any(n.endswith("w_uk_quantized") for n in uk), uk


def test_parity_reports_quantized_precisions(exported):
    _, hf_dir, out = exported
    rep = run_parity(hf_dir, out, text=None, steps=8)
    assert set(rep["precisions"]) == {"fp32", "int8", "int4"}
    assert rep["precisions"]["fp32"]["max_abs_logit_diff"] <= 1e-4
    for prec in ("int8", "int4"):  # random weights: reported, not judged
        e = rep["precisions"][prec]
        assert e["max_abs_logit_diff"] > 0  # quantized: never bit-identical
        on_disk = sum((out / f["path"]).stat().st_size for f in Manifest.read(out).data["files"][prec]["files"])
        assert e["file_bytes"] == on_disk > 0


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_shipped_ort_file_gives_the_onnx_files_logits(exported, precision):
    """The .ort companions the export ships (not a fresh conversion) against the .onnx files beside them."""
    import onnxruntime as ort

    _, _, out = exported
    entry = Manifest.read(out).data["files"][precision]
    onnx_file, ort_file = out / entry["path"], out / entry["ort"]["path"]
    ids = np.random.default_rng(1).integers(3, 97, size=(1, 9))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(9)[None]}
    feed.update({n: np.zeros((1, 0, w), np.float32) for n, w in zip(CacheContract(2, 16, 8).past_names(), [16, 8] * 2)})
    a = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    b = ort.InferenceSession(str(ort_file), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    assert np.abs(a - b).max() <= (1e-5 if precision == "fp32" else 1e-3)  # int8: fused kernels round differently


# ---- bad input: a clear error and nothing half-written -------------------------------------------------


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        export_folder(tmp_path, tmp_path / "out", ExportOptions(require_tokenizer=False, progress=False))
    assert not (tmp_path / "out").exists()


def test_moe_config_over_dense_weights_is_refused(tmp_path):
    from mla_edge.models.checkpoint import CheckpointError

    save_hf(hf_model(), tmp_path / "m")
    d = json.loads((tmp_path / "m" / "config.json").read_text())
    d.update(
        first_k_dense_replace=1,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
    )
    (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"missing tensors .*layers\.1\.mlp\.gate\.weight"):
        export_folder(tmp_path / "m", tmp_path / "out", ExportOptions(require_tokenizer=False, progress=False))
    assert not (tmp_path / "out").exists()


def test_existing_out_dir_needs_force(exported, tmp_path):
    _, hf_dir, _ = exported
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_folder(hf_dir, tmp_path / "out", ExportOptions(require_tokenizer=False, progress=False))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_out_dir(exported, tmp_path, where):
    _, hf_dir, _ = exported
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out" if where == "under_a_file" else __import__("pathlib").Path("/proc/mla-edge-out")
    with pytest.raises(ExportError, match="out"):
        export_folder(hf_dir, out, ExportOptions(require_tokenizer=False, progress=False))


def test_failure_halfway_leaves_nothing(exported, tmp_path, monkeypatch):
    _, hf_dir, _ = exported
    import mla_edge.export.quantize as q

    def boom(src, dst):
        dst.write_bytes(b"partial")
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(q, "quantize_int8", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export_folder(hf_dir, tmp_path / "out", ExportOptions(require_tokenizer=False, progress=False))
    assert list(tmp_path.iterdir()) == [], "no output folder and no temp folder may remain"


def test_failure_during_force_keeps_old_export(exported, tmp_path, monkeypatch):
    _, hf_dir, out = exported
    import shutil

    import mla_edge.export.quantize as q

    target = tmp_path / "out"
    shutil.copytree(out, target)
    before = (target / MANIFEST).read_text()
    monkeypatch.setattr(q, "quantize_int8", lambda s, d: (_ for _ in ()).throw(RuntimeError("killed (simulated)")))
    with pytest.raises(RuntimeError):
        export_folder(hf_dir, target, ExportOptions(require_tokenizer=False, force=True, progress=False))
    assert (target / MANIFEST).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_errors_exit_2(tmp_path, capsys):
    from mla_edge.cli import main

    assert main(["export", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_int8_latent_cache_export(exported, tmp_path):
    """--cache-dtype int8: int8 latents + per-token scales in the graph, the manifest and the runtime."""
    from mla_edge.runtime.generate import Generator

    _, hf_dir, _ = exported
    out = tmp_path / "q8cache"
    man = export_folder(
        hf_dir, out, ExportOptions(require_tokenizer=False, quantize=(), cache_dtype="int8", progress=False)
    )
    cache = man["cache"]
    assert cache["dtype"] == "int8" and cache["bytes_per_token"] == 2 * (16 + 8 + 2 * 4)
    assert [p["name"] for p in man["graph"]["inputs"][3:7]] == [
        "past.0.c_kv",
        "past.0.c_kv_scale",
        "past.0.k_pe",
        "past.0.k_pe_scale",
    ]
    graph = onnx.load(str(out / "model.onnx")).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    assert types["past.1.c_kv"] == onnx.TensorProto.INT8 and types["past.1.c_kv_scale"] == onnx.TensorProto.FLOAT
    model = load_model(hf_dir, ModelOptions(cache_dtype="int8"))
    sess = LatentSession(out, "fp32")
    r, lens = rows(2, [11, 6], 16)
    rep = teacher_forced(model, sess, r, lens, 16, chunk=4)
    assert rep["max_abs_logit_diff"] <= 2e-2 and rep["top1_agreement"] == 1.0  # int8 rounding edges may differ
    prompt = rows(1, [9], 0)[0][0]
    assert Generator(out, "fp32").generate_ids([prompt], max_new_tokens=20, eos=False)[0].token_ids == greedy(
        model, prompt, 20
    )
    # The quantizer itself, against the latent it is given (PyTorch and ONNX share the quantizer, so comparing them
    # cannot see it round wrongly): scale = max|x| / 127 per token, codes = round(x / scale), |error| <= scale / 2.
    from mla_edge.models.mla import quantize_per_token

    given: dict[tuple[int, str], np.ndarray] = {}

    def recording(x, layer, kind):
        given[(layer, kind)] = x.detach().numpy().copy()
        return quantize_per_token(x, layer, kind)

    rec = load_model(hf_dir, ModelOptions(cache_dtype="int8", cache_quantizer=recording))
    ids = np.asarray([prompt])
    with torch.no_grad():
        rec(torch.from_numpy(ids))
    _, present = sess.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], sess.empty_cache(1))
    assert len(given) == 2 * rec.cfg.num_hidden_layers
    for (layer, kind), x in given.items():
        codes, scale = present[f"past.{layer}.{kind}"], present[f"past.{layer}.{kind}_scale"]
        assert codes.dtype == np.int8 and scale.shape == x.shape[:-1] + (1,)
        np.testing.assert_allclose(scale, np.abs(x).max(-1, keepdims=True) / 127, rtol=1e-5)
        exact = x / scale
        assert np.abs(codes - exact).max() <= 0.5 + 1e-3, (layer, kind, float(np.abs(codes - exact).max()))
        off = codes != np.round(exact)  # only where x / scale sits on a .5 edge (fp32 arithmetic may differ)
        assert np.all(np.abs(np.abs(exact[off] - np.trunc(exact[off])) - 0.5) < 1e-3), (layer, kind)
        assert np.all(np.abs(codes * scale - x) <= scale / 2 * (1 + 1e-3))


def test_fp16_cache_is_the_default_matches_pytorch_and_halves_the_bytes(exported, tmp_path):
    """The default cache: the latent stored in half precision (as llama.cpp stores it by default) and attended in
    fp32; the graph's cache I/O is float16, the manifest says half the bytes, and ONNX = PyTorch with the same
    rounding, through padding, chunked prefill and greedy generation."""
    from mla_edge.runtime.generate import Generator

    _, hf_dir, _ = exported
    out = tmp_path / "f16cache"
    man = export_folder(hf_dir, out, ExportOptions(require_tokenizer=False, quantize=("int8",), progress=False))
    assert man["cache"]["dtype"] == "fp16" and man["cache"]["bytes_per_token"] == 2 * (16 + 8) * 2
    graph = onnx.load(str(out / "model.onnx")).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert types["past.1.c_kv"] == types["present.1.k_pe"] == onnx.TensorProto.FLOAT16
    model = load_model(hf_dir, ModelOptions(cache_dtype="fp16"))
    sess = LatentSession(out, "fp32")
    assert sess.empty_cache(1)["past.0.c_kv"].dtype == np.float16
    r, lens = rows(2, [11, 6], 16)
    rep = teacher_forced(model, sess, r, lens, 16, chunk=4)
    assert rep["max_abs_logit_diff"] <= 1e-4 and rep["top1_agreement"] == 1.0
    fp32 = teacher_forced(load_model(hf_dir), sess_fp32 := LatentSession(exported[2], "fp32"), r, lens, 16, chunk=4)
    assert fp32["max_abs_logit_diff"] <= 1e-4 and sess_fp32.past_specs[0][2] == np.float32
    prompt = rows(1, [9], 0)[0][0]
    assert Generator(out, "fp32").generate_ids([prompt], max_new_tokens=20, eos=False)[0].token_ids == greedy(
        model, prompt, 20
    )
    assert Generator(out, "int8").generate_ids([prompt], max_new_tokens=4, eos=False)[0].token_ids  # int8 runs too


def test_logits_to_keep_gives_the_last_rows_and_old_exports_still_run(exported, tmp_path):
    """The graph's optional logits_to_keep: k = 1 is the last row of the full logits (what a prompt needs), k = 0 or
    no feed at all gives every row (what genai and parity see), the cache is the same either way; PyTorch's forward
    takes the same argument. An export whose graph lacks the input (older exports) gets the same rows by slicing."""
    ref, hf_dir, out = exported
    sess = LatentSession(out, "fp32", "cpu")
    assert sess.keeps_logits and [i.name for i in sess.session.get_overridable_initializers()] == ["logits_to_keep"]
    ids = np.random.default_rng(1).integers(3, 97, (2, 7))
    mask, pos = np.ones((2, 7), np.int64), np.arange(7)[None].repeat(2, 0)
    full, c_full = sess.step(ids, mask, pos, sess.empty_cache(2))
    one, c_one = sess.step(ids, mask, pos, sess.empty_cache(2), logits_to_keep=1)
    three, _ = sess.step(ids, mask, pos, sess.empty_cache(2), logits_to_keep=3)
    assert full.shape == (2, 7, 97) and one.shape == (2, 1, 97) and three.shape == (2, 3, 97)
    assert np.array_equal(one, full[:, -1:]) and np.array_equal(three, full[:, -3:])
    assert all(np.array_equal(c_full[k], c_one[k]) for k in c_full)
    raw = sess.session.run(["logits"], {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                        **sess.empty_cache(2), "logits_to_keep": np.asarray([1])})[0]  # fmt: skip
    assert raw.shape == (2, 1, 97)  # the graph itself computed one row, not the wrapper's slice
    model = load_model(hf_dir)
    with torch.no_grad():
        t_one = model(torch.as_tensor(ids), logits_to_keep=1)[0].numpy()
    assert np.abs(t_one - one).max() <= 1e-4
    sess.keeps_logits = False  # an export from before the input: the same rows, sliced after the run
    assert np.array_equal(sess.step(ids, mask, pos, sess.empty_cache(2), logits_to_keep=1)[0], one)

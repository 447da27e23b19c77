"""Runtime: torch-free generation that equals PyTorch token for token, lossless streaming, clear errors."""

import json
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import TOKENIZER_TEXT

from mla_edge.cli import main
from mla_edge.runtime.generate import Generator, PromptError
from mla_edge.runtime.manifest import ManifestError
from mla_edge.runtime.sampling import SamplingOptions
from mla_edge.runtime.session import ProviderError
from mla_edge.runtime.textstream import TextStream

CTX = 96


def torch_greedy(hf_dir, prompt, steps):
    from mla_edge.export.parity import greedy
    from mla_edge.models.checkpoint import load_model

    return greedy(load_model(hf_dir), prompt, steps)


def test_default_precision_is_int8(text_export):
    assert Generator(text_export[1]).session.precision == "int8"


@pytest.mark.parametrize("iobinding", [True, False])
def test_greedy_equals_pytorch_batch1_and_batch2(text_export, iobinding):
    hf_dir, out = text_export
    gen = Generator(out, "fp32", iobinding=iobinding)
    rng = np.random.default_rng(3)
    p1, p2 = rng.integers(1, 320, 17).tolist(), rng.integers(1, 320, 6).tolist()
    want1, want2 = torch_greedy(hf_dir, p1, 64), torch_greedy(hf_dir, p2, 64)
    alone = gen.generate_ids([p1], max_new_tokens=64, eos=False)[0]
    both = gen.generate_ids([p1, p2], max_new_tokens=64, eos=False)
    assert alone.token_ids == want1 and len(want1) == 64
    assert both[0].token_ids == want1 and both[1].token_ids == want2
    assert {r.finish_reason for r in both} == {"length"}


def test_streaming_is_lossless(text_export):
    gen = Generator(text_export[1], "fp32")
    opts = dict(sampling=SamplingOptions(temperature=1.5, seed=7), max_new_tokens=60, eos=False)
    pieces = list(gen.stream("café 😀", **opts))
    whole = gen.generate("café 😀", **opts)
    assert gen.last_result.token_ids == whole.token_ids
    # lossless against the tokenizer itself, not against another stream
    assert "".join(pieces) == whole.text == gen.tokenizer.decode(whole.token_ids, skip_special_tokens=True)
    assert len(pieces) > 1


def test_text_stream_holds_back_split_characters(text_export):
    gen = Generator(text_export[1], "fp32")
    ids = gen.tokenizer.encode("a😀é日").ids
    assert len(ids) > 4, "the emoji and CJK character should span several byte tokens here"
    ts = TextStream(gen.tokenizer)
    pieces = [ts.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + ts.flush() == "a😀é日"
    assert "" in pieces  # something was held back until its character was whole


def test_stop_string_and_eos(text_export):
    gen = Generator(text_export[1], "fp32")
    free = gen.generate("The old", max_new_tokens=40, eos=False)
    stop = free.text[5:8]
    r = gen.generate("The old", max_new_tokens=40, eos=False, stop=[stop])
    assert r.finish_reason == "stop" and stop not in r.text and free.text.startswith(r.text)


def test_eos_stops_one_row_while_the_other_goes_on(text_export, tmp_path):
    """finish_reason "eos": a copy of the export whose eos is a token row 0 emits early; row 1 of the same batch
    carries on and its tokens stay exactly those it gets alone."""
    free = Generator(text_export[1], "fp32", "cpu").generate_ids([[5, 6, 7, 8], [40, 41]], max_new_tokens=12, eos=False)
    eos = next(t for t in free[0].token_ids[1:6] if t not in free[1].token_ids)
    copy = tmp_path / "eos"
    shutil.copytree(text_export[1], copy)
    man = json.loads((copy / "mla_edge.json").read_text())
    man["tokens"]["eos"] = [eos]
    (copy / "mla_edge.json").write_text(json.dumps(man))
    a, b = Generator(copy, "fp32", "cpu").generate_ids([[5, 6, 7, 8], [40, 41]], max_new_tokens=12)
    cut = free[0].token_ids.index(eos)
    assert a.finish_reason == "eos" and a.token_ids == free[0].token_ids[:cut]
    assert b.finish_reason == "length" and b.token_ids == free[1].token_ids


def test_context_limit_stops_with_length(text_export):
    gen = Generator(text_export[1], "fp32")
    prompt = list(range(1, 91))  # 90 of 96 positions
    r = gen.generate_ids([prompt], max_new_tokens=50, eos=False)[0]
    assert r.finish_reason == "length" and len(prompt) + len(r.token_ids) == CTX


def test_batch_stops_at_the_shared_cache_limit_not_each_rows_own(text_export):
    """A left-padded batch shares one cache as wide as its longest prompt: a short row may not run on to its own
    context limit (that crashed onnxruntime with a broadcast error at the padded width + steps)."""
    gen = Generator(text_export[1], "fp32")
    long, short = list(range(1, 81)), [5, 6, 7, 8]  # 80 and 4 of 96 positions
    res = gen.generate_ids([long, short], max_new_tokens=50, eos=False)
    assert [r.finish_reason for r in res] == ["length", "length"]
    assert [len(r.token_ids) for r in res] == [CTX - 80, CTX - 80]  # the padded width decides, for both rows
    assert res[0].stats["cache_tokens"] < CTX


def test_seed_makes_sampling_reproducible(text_export):
    gen = Generator(text_export[1], "int8")
    opts = dict(
        sampling=SamplingOptions(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=11),
        max_new_tokens=30,
        eos=False,
    )
    a, b = gen.generate("She looked", **opts), gen.generate("She looked", **opts)
    c = gen.generate("She looked", **{**opts, "sampling": SamplingOptions(temperature=1.0, seed=12)})
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda g: g.generate("   "), "prompt is empty"),
        (lambda g: g.generate(TOKENIZER_TEXT[:2000]), r"tokens; the model's context holds 96"),
        (lambda g: g.generate_ids([[5, 320]]), r"outside the vocabulary \[0, 320\)"),
        (lambda g: g.generate_ids([[5, -1]]), r"outside the vocabulary"),
        (lambda g: g.generate_batch([]), "no prompts"),
        (lambda g: g.generate("hi", max_new_tokens=0), "max_new_tokens must be >= 1"),
    ],
)
def test_bad_prompts(text_export, call, match):
    with pytest.raises(PromptError, match=match):
        call(Generator(text_export[1], "fp32"))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_options(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingOptions(**kw)


def test_unknown_and_missing_providers(text_export):
    with pytest.raises(ProviderError, match="unknown provider 'tpu'.*cpu, xnnpack"):
        Generator(text_export[1], provider="tpu")
    # refused whether or not onnxruntime-qnn's plugin is registered in this process (test_static registers it)
    with pytest.raises(ProviderError, match="'qnn' takes only the static graphs.*--protocol static"):
        Generator(text_export[1], provider="qnn", protocol="dynamic")
    with pytest.raises(ProviderError, match="'coreml' .*not in this onnxruntime build; available: .*CPUExecution"):
        Generator(text_export[1], provider="coreml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto on a laptop is the CPU, quietly: it is the API's and the CLI's default
        assert Generator(text_export[1], provider="auto").session.providers == ["CPUExecutionProvider"]
        assert Generator(text_export[1]).session.providers == ["CPUExecutionProvider"]


def test_ort_file_from_another_onnxruntime_falls_back_to_onnx(text_export, tmp_path):
    from mla_edge.contract import MANIFEST

    moved = tmp_path / "moved"
    shutil.copytree(text_export[1], moved)
    man = json.loads((moved / MANIFEST).read_text())
    assert man["files"]["int8"]["ort"]["onnxruntime"] and man["files"]["int8"]["ort"]["optimization"] == "all"
    assert Generator(moved, "int8", provider="cpu").session.ort_format  # made here: used
    man["files"]["int8"]["ort"]["onnxruntime"] = "0.0.1"
    (moved / MANIFEST).write_text(json.dumps(man))
    with pytest.warns(
        UserWarning, match=r"model.int8.ort was optimized for onnxruntime 0.0.1 \(here .*\); loading the .onnx"
    ):
        gen = Generator(moved, "int8", provider="cpu")
    assert not gen.session.ort_format and gen.generate_ids([[5, 6]], max_new_tokens=3)[0].token_ids


def test_tampered_model_file(text_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(text_export[1], bad)
    data = bytearray((bad / "model.int8.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.int8.onnx does not match its sha256"):
        Generator(bad)
    Generator(bad, "fp32")  # the untouched precision still loads
    ort_file = bad / "model.ort"  # the ORT-format file, which is what the CPU runtime loads
    ort_file.write_bytes(ort_file.read_bytes()[:-7] + b"garbage")
    with pytest.raises(ManifestError, match="model.ort does not match its sha256"):
        Generator(bad, "fp32")


@pytest.mark.parametrize(
    "field,value,why",
    [
        ("files.int8.path", "../other-export/model.int8.onnx", "'..'"),
        ("files.int8.files[0].path", "/etc/passwd", "absolute"),
        ("tokenizer", "../../tokenizer.json", "'..'"),
        ("files.int8.files[0].path", "link.onnx", "link that points out"),
    ],
)
def test_manifest_paths_must_stay_inside_the_folder(text_export, tmp_path, field, value, why, monkeypatch):
    """A manifest naming a file outside its folder is refused when read, before anything is opened or hashed."""
    import mla_edge.runtime.manifest as manifest

    bad = tmp_path / "bad"
    shutil.copytree(text_export[1], bad)
    (bad / "link.onnx").symlink_to(text_export[1] / "model.int8.onnx")  # a link out of the folder
    data = json.loads((bad / "mla_edge.json").read_text())
    if field == "tokenizer":
        data["tokenizer"] = value
    elif field == "files.int8.path":
        data["files"]["int8"]["path"] = value
    else:
        data["files"]["int8"]["files"][0]["path"] = value
    (bad / "mla_edge.json").write_text(json.dumps(data))
    monkeypatch.setattr(manifest, "sha256", lambda p: pytest.fail(f"hashed {p}"))
    with pytest.raises(ManifestError, match=f"field '{re.escape(field)}' is .*{why}.*must stay inside its folder") as e:
        Generator(bad, "fp32")
    assert "\n" not in str(e.value)


def test_a_verified_file_is_trusted_until_it_changes(text_export, tmp_path, monkeypatch):
    """Load time: a file hashed once is trusted while its size, mtime and inode stay; any change hashes it again, and
    verify="full" always hashes (`--verify`)."""
    from mla_edge.runtime import manifest as mf

    folder = tmp_path / "copy"
    shutil.copytree(text_export[1], folder)
    calls = []
    real = mf.sha256
    monkeypatch.setattr(mf, "sha256", lambda p: calls.append(p.name) or real(p))
    Generator(folder, "int8", provider="cpu")
    first = len(calls)
    assert first >= 1  # hashed in full the first time
    Generator(folder, "int8", provider="cpu")
    assert len(calls) == first  # trusted: unchanged size, mtime and inode
    Generator(folder, "int8", provider="cpu", verify="full")
    assert len(calls) == 2 * first  # --verify hashes again
    target = next(p for p in folder.iterdir() if p.name in calls)
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))  # a changed file has a new mtime: hashed again, and refused
    with pytest.raises(ManifestError, match="does not match its sha256"):
        Generator(folder, "int8", provider="cpu")


def test_cli_generate_and_errors(text_export, capsys):
    out = str(text_export[1])
    assert main(["generate", out, "The old house", "--max-new-tokens", "12", "--provider", "cpu"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("The old house") and "decode" in cap.err and "MHA would hold" in cap.err
    assert main(["generate", out, "The old", "--max-new-tokens", "5", "--json", "--provider", "cpu"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["stats"]["new_tokens"] <= 5 and rep["stats"]["cache_bytes"] < rep["stats"]["mha_cache_bytes"]
    for argv, msg in [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "2"], "top_p must be in"),
        (["--provider", "npu"], "unknown provider 'npu'"),
    ]:
        assert main(["generate", out, "hi", *argv]) == 2
        assert msg in capsys.readouterr().err
    assert main(["generate", out, ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err


BLOCK = (
    "import sys\nfor m in ('torch', 'onnx', 'transformers', 'safetensors', 'onnxscript'):\n    sys.modules[m] = None\n"
)


def test_runtime_needs_no_torch(text_export):
    """`import mla_edge.runtime` and a full `mla-edge generate` with torch (and onnx) made unimportable."""
    code = BLOCK + (
        "import mla_edge.runtime, mla_edge.runtime.generate, mla_edge.runtime.session\n"
        "from mla_edge.cli import main\n"
        f"rc = main(['generate', {str(text_export[1])!r}, 'The old house', '--max-new-tokens', '8', "
        "'--provider', 'cpu'])\n"
        "assert sys.modules['torch'] is None\n"
        "sys.exit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("The old house") and "decode" in r.stderr


def test_optimized_model_cache(text_export, tmp_path):
    a = Generator(text_export[1], "int8", optimized_cache=tmp_path / "opt")
    assert not a.session.loaded_from_cache and len(list((tmp_path / "opt").glob("*.opt.onnx"))) == 1
    b = Generator(text_export[1], "int8", optimized_cache=tmp_path / "opt")
    assert b.session.loaded_from_cache
    prompt = [[5, 6, 7, 8]]
    assert (
        a.generate_ids(prompt, max_new_tokens=10, eos=False)[0].token_ids
        == b.generate_ids(prompt, max_new_tokens=10, eos=False)[0].token_ids
    )


@pytest.mark.slow
def test_bench_runs_and_reports(text_export):
    """The benchmark's plumbing (no timing is asserted: numbers are only reported)."""
    from mla_edge.runtime.bench import format_report, run_bench

    rep = run_bench(text_export[1], ["fp32", "int8"], repeats=1, prompt_lens=(16, 32), pasts=(8, 40), rounds=2)
    names = [r["name"] for r in rep["rows"]]
    assert names == ["torch-eager-fp32", "ort-fp32", "ort-int8", "ort-int8 (iobinding)"]
    for r in rep["rows"]:
        assert r["decode_40_ms"] > 0 and r["prefill_32_tok_s"] > 0 and r["peak_rss_bytes"] > 0
        assert r["torch_imported"] == (r["name"] == "torch-eager-fp32") and r["rounds"] == 2
    assert "generate_int8" in rep and "int8_generate_peak_rss" in rep["targets"]
    assert "torch-eager-fp32" in format_report(rep) and "decode@40 ms" in format_report(rep)
    with pytest.raises(ValueError, match="needs 1040 positions but the model's context holds 96"):
        run_bench(text_export[1], ["int8"], repeats=1)


def test_bench_peer_that_is_not_installed_is_a_row_not_an_error(text_export, monkeypatch):
    from mla_edge.runtime import peers
    from mla_edge.runtime.bench import format_report, run_bench

    monkeypatch.setattr(peers, "missing", lambda name: f"not installed: {peers.PEERS[name][1]}")
    rep = run_bench(
        text_export[1],
        ["int8"],
        1,
        with_torch=False,
        prompt_lens=(16,),
        pasts=(8,),
        rounds=1,
        peers=[("llama-cpp-python", text_export[1] / "model.gguf")],
    )
    assert rep["rows"][-1] == {
        "name": "llama-cpp-python (model.gguf)",
        "note": f"not installed: {peers.PEERS['llama-cpp-python'][1]}",
    }
    assert "not installed: pip install llama-cpp-python" in format_report(rep)


def test_generate_memory_limit_errors(text_export, capsys):
    from mla_edge.runtime.memory import mechanism

    out = str(text_export[1])
    assert main(["generate", out, "hi", "--provider", "cpu", "--memory-limit", "banana"]) == 2
    assert "not a size" in capsys.readouterr().err
    if mechanism() == "rlimit-as":
        pytest.skip("no writable cgroup here")
    assert (
        main(["generate", out, "The old", "--provider", "cpu", "--max-new-tokens", "5", "--memory-limit", "1GB"]) == 0
    )
    assert "enforced by cgroup" in capsys.readouterr().err
    assert main(["generate", out, "The old", "--provider", "cpu", "--memory-limit", "8MB"]) == 2
    assert "needed more than the 7.6 MiB memory limit" in capsys.readouterr().err


def test_one_generator_shared_by_eight_threads(text_export):
    """A Generator runs one call at a time: 8 threads get exactly what 8 sequential calls get."""
    from concurrent.futures import ThreadPoolExecutor

    gen = Generator(text_export[1], "int8", provider="cpu")
    prompts = [[3 + i, 10 + i, 20 + i] for i in range(8)]
    opts = dict(sampling=SamplingOptions(temperature=0.9, top_k=20, seed=11), max_new_tokens=12, eos=False)
    want = [gen.generate_ids([p], **opts)[0].token_ids for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: gen.generate_ids([p], **opts)[0].token_ids, prompts))
    assert got == want

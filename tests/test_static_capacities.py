"""The static protocol with several capacities: the host runs the smallest buffer that holds the sequence and moves
up (one copy of the filled rows) with the tokens of the largest graphs alone; the weights are stored once. (Its own
file: pytest-xdist gives each file one worker, and test_static.py is already long.)"""

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from conftest import hf_model, save_hf

from mla_edge.cli import main
from mla_edge.contract import MANIFEST
from mla_edge.export.pipeline import ExportError, ExportOptions, export_folder
from mla_edge.runtime.manifest import ManifestError
from mla_edge.runtime.static import StaticSession

CHUNK = 8


def test_capacities_run_the_smallest_buffer_and_move_up_with_the_same_tokens(tmp_path, capsys):
    """An export for several capacities: the host starts on the smallest graphs, moves up (copying the filled rows)
    as the sequence grows and back down on reset, and its tokens and logits are those of the largest graphs alone;
    every capacity's graphs read one weights file per precision."""
    save_hf(hf_model(q_lora_rank=12, max_position_embeddings=256), tmp_path / "hf")
    opts = ExportOptions(
        require_tokenizer=False, quantize=(), progress=False, static_cache=(128, 16, 64), static_chunk=CHUNK
    )
    export_folder(tmp_path / "hf", tmp_path / "out", replace(opts, static_quantize=("int8",)))
    out = tmp_path / "out"
    st = json.loads((out / MANIFEST).read_text())["static"]
    assert st["capacity"] == 128 and st["capacities"] == [16, 64, 128]
    assert set(st["graphs"]) == {"decode", "prefill", "decode-16", "prefill-16", "decode-64", "prefill-64"}
    for precision, data in (("fp32", "static-weights.data"), ("int8", "static-weights.int8.data")):
        assert {f["path"] for e in st["files"][precision].values() for f in e["files"][1:]} == {data}
        one = onnx.load(str(out / st["files"][precision]["decode"]["path"]))  # with its weights
        weights = sum(len(t.raw_data) for t in one.graph.initializer)
        assert (out / data).stat().st_size < 1.5 * weights  # six graphs, the weights stored about once
    assert sorted(p.name for p in out.glob("*.data")) == ["static-weights.data", "static-weights.int8.data"]
    prompt = list(range(5, 15))
    for precision in ("fp32", "int8"):
        ladder, top = StaticSession(out, precision, "cpu"), StaticSession(out, precision, "cpu", capacity=128)
        assert (ladder.level, ladder.capacity, top.level) == (16, 128, 128)
        a, b = ladder.prefill(prompt), top.prefill(prompt)
        tokens, levels, diff = [], [ladder.level], float(np.abs(a - b).max())
        for _ in range(80):  # through 16 and 64
            tokens.append(int(b.argmax()))
            assert int(a.argmax()) == tokens[-1]
            a, b = ladder.decode(tokens[-1]), top.decode(tokens[-1])
            diff = max(diff, float(np.abs(a - b).max()))
            levels.append(ladder.level)
        assert diff < 1e-4, (precision, diff)
        assert levels[0] == 16 and 64 in levels and levels[-1] == 128 and levels == sorted(levels)
        assert ladder.cache_bytes == top.cache_bytes  # at the top now
        ladder.reset()
        assert ladder.level == 16 and ladder.cache_bytes * 8 == top.cache_bytes
    with pytest.raises(ManifestError, match="capacities 16, 64, 128, not 32"):
        StaticSession(out, "fp32", "cpu", capacity=32)
    with pytest.raises(ExportError, match="between 1 and the smallest --static-cache - 1 \\(15\\), got 16"):
        export_folder(tmp_path / "hf", tmp_path / "x", replace(opts, static_cache=(16, 64), static_chunk=16))
    assert main(["export", str(tmp_path / "hf"), "-o", str(tmp_path / "y"), "--static-cache", "16,x"]) == 2
    assert "--static-cache expects an integer, got 'x'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

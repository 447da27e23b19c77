"""The one cache contract: names, shapes, bytes; and `mla-edge info` reporting it."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mla_edge.cli import main
from mla_edge.contract import CacheContract, comparison, past_name, present_name
from mla_edge.models.config import MLAConfig

# DeepSeek-V2-Lite attention dims (27 layers, 16 heads, kv_lora_rank 512, rope 64, nope 128, v 128)
V2_LITE = dict(
    model_type="deepseek_v2",
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    num_hidden_layers=27,
    num_attention_heads=16,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    q_lora_rank=None,
    first_k_dense_replace=27,
)


def test_bytes_per_token_formula():
    cfg = MLAConfig.from_dict(V2_LITE)
    c = CacheContract.from_config(cfg)
    assert c.bytes_per_token == 27 * (512 + 64) * 4
    assert CacheContract.from_config(cfg, "fp16").bytes_per_token == 27 * 576 * 2
    cmp = comparison(cfg, "fp16")
    assert cmp["mla"]["elements_per_token_per_layer"] == 576
    assert cmp["mha"]["elements_per_token_per_layer"] == 16 * (128 + 64 + 128)
    assert cmp["gqa"]["kv_heads"] == 4 and cmp["gqa"]["elements_per_token_per_layer"] == 4 * 320
    assert cmp["mla"]["ratio_vs_mha"] == pytest.approx(576 / 5120)


def test_names_shapes_and_order():
    c = CacheContract(num_layers=2, kv_lora_rank=16, qk_rope_head_dim=8)
    assert c.past_names() == ["past.0.c_kv", "past.0.k_pe", "past.1.c_kv", "past.1.k_pe"]
    assert c.present_names()[3] == present_name(1, "k_pe") == "present.1.k_pe"
    assert c.past_specs()[0] == (past_name(0, "c_kv"), ["batch", "past_len", 16], "float32")
    assert c.present_specs()[1] == ("present.0.k_pe", ["batch", "total_len", 8], "float32")
    m = c.to_manifest()
    assert m["format"] == "mla-latent-v1" and m["bytes_per_token"] == 2 * 24 * 4


def test_contract_module_has_no_heavy_imports():
    src = Path(sys.modules[CacheContract.__module__].__file__).read_text()
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import)}
    imported |= {n.module.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"torch", "onnx", "onnxruntime", "numpy", "transformers"}


def test_info_prints_config_and_cache(tiny_ckpt, capsys):
    assert main(["info", str(tiny_ckpt)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["kv_lora_rank"][-1] == "16"
    # 2 layers x (16 + 8) x 4 bytes = 192 for MLA; MHA: 2 x 4 heads x (8+8+6) x 4 = 704; GQA (1 kv head): 176
    assert rows["MLA"][1:3] == ["24", "192"] and rows["MHA"][1:3] == ["88", "704"]
    assert rows["GQA"][-3:-1] == ["22", "176"]


def test_info_json_and_errors(tiny_ckpt, tmp_path, capsys):
    assert main(["info", str(tiny_ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cache"]["mla"]["bytes_per_token"] == 192 and info["config"]["q_lora_rank"] == 12
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_console_script_runs(tiny_ckpt):
    r = subprocess.run(["mla-edge", "info", str(tiny_ckpt), "--dtype", "fp16"], capture_output=True, text=True)
    assert r.returncode == 0 and "96" in r.stdout  # fp16 MLA: 2 x 24 x 2 bytes

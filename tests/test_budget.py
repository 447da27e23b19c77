"""The memory-budget planner: sizes, errors, MLA vs MHA ordering, and the parameter count from config alone."""

import pytest
from conftest import hf_model, save_hf

from mla_edge.cli import main
from mla_edge.runtime.budget import BudgetError, param_count, parse_memory, plan


@pytest.mark.parametrize(
    "text,bytes_", [("512MB", 512 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("300mib", 300 * 2**20), ("1000B", 1000)]
)
def test_parse_memory(text, bytes_):
    assert parse_memory(text) == bytes_


@pytest.mark.parametrize(
    "text,match",
    [
        ("0", "more than 0"),
        ("banana", "not a size"),
        ("-5MB", "more than 0"),
        ("12 parsecs", "not a size"),
        ("512", "no unit: write 512MB, 512MiB or 512B"),
    ],
)
def test_bad_memory(text, match):
    with pytest.raises(BudgetError, match=match):
        parse_memory(text)


@pytest.mark.parametrize("q_lora,tie", [(None, False), (12, True)])
def test_param_count_matches_the_checkpoint(tmp_path, q_lora, tie):
    from mla_edge.models.checkpoint import load_model

    save_hf(hf_model(q_lora_rank=q_lora, tie=tie), tmp_path / "m")
    m = load_model(tmp_path / "m")
    assert param_count(m.cfg) == sum(p.numel() for p in m.parameters())


def test_plan_orders_mla_gqa_mha(tiny_ckpt):
    p = plan(tiny_ckpt, parse_memory("200MB"), batch=2)
    rows = {(r["weights"], r["cache"], r["attention"]): r["max_context"] for r in p["rows"]}
    assert rows[("fp32", "fp32", "mla")] > rows[("fp32", "fp32", "mha")] > 0
    assert rows[("int8", "int8", "mla")] >= rows[("fp32", "fp32", "mla")]
    with pytest.raises(BudgetError, match="cannot even hold the smallest weights"):
        plan(tiny_ckpt, parse_memory("10MB"))


def test_budget_cli_errors(tiny_ckpt, capsys):
    assert main(["budget", str(tiny_ckpt), "--memory", "banana"]) == 2
    assert "not a size" in capsys.readouterr().err
    assert main(["budget", str(tiny_ckpt), "--memory", "0"]) == 2
    assert main(["budget", str(tiny_ckpt), "--memory", "1MB"]) == 2
    assert "cannot even hold" in capsys.readouterr().err
    assert main(["budget", str(tiny_ckpt), "--memory", "1GB"]) == 0
    assert "MLA max ctx" in capsys.readouterr().out


def test_plot_draws_a_png(tiny_ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    from mla_edge.runtime.budget import plot

    p = plan(tiny_ckpt, parse_memory("300MB"))
    out = plot(p, tiny_ckpt, tmp_path / "b.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000

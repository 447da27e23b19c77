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


def test_max_context_is_a_hand_computed_answer():
    """100 MB weights, a 50 MB base, 1,000 B/token of scratch and 500 B/token of cache, batch 2, in 200 MB:
    50 MB free / (2 x 1,500 B) = 16,666 tokens; the formula's own RSS at that context fits and one more does not."""
    from mla_edge.runtime.budget import max_context, predict_rss

    cal = {"base_bytes": 50_000_000, "per_token_bytes": 1_000.0}
    assert max_context(200_000_000, 100_000_000, 500, 2, cal) == 16_666
    assert max_context(200_000_000, 100_000_000, 500, 1, cal) == 33_333
    assert max_context(140_000_000, 100_000_000, 500, 1, cal) == 0  # the base does not fit
    assert predict_rss(100_000_000, 500, 16_666, 2, cal) <= 200_000_000 < predict_rss(100_000_000, 500, 16_667, 2, cal)


def test_plan_rows_are_the_hand_computed_answer(tiny_ckpt):
    """Every MLA row of plan() for a tiny model: (memory - weights - base) // (batch x (cache + scratch per token)),
    with the weights from the parameter count and the cache from the config, worked out here without the planner."""
    from mla_edge.models.config import MLAConfig
    from mla_edge.runtime.budget import graph_weight_count

    cfg = MLAConfig.from_pretrained(tiny_ckpt)
    n = graph_weight_count(cfg)
    cal = {"base_bytes": 7_000_000, "per_token_bytes": 300.0, "export": "hand", "precision": "int8"}
    memory, batch = 64_000_000, 3
    p = plan(tiny_ckpt, memory, batch, cal)
    latent = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    width = {"fp32": 4, "fp16": 2}
    checked = 0
    for r in p["rows"]:
        if r["attention"] != "mla" or r["cache"] not in width:
            continue
        ends = 2 * cfg.vocab_size * cfg.hidden_size  # int4's LM head (8-bit blocks of 32) and embedding (int8 rows)
        weights = {"fp32": 4 * n, "int8": n, "int4": int((n - ends) * 0.625 + ends * (1 + 4 / 32 + 1) / 2)}[
            r["weights"]
        ]
        want = (memory - weights - 7_000_000) // (batch * (latent * width[r["cache"]] + 300))
        assert r["max_context"] == want > 0, r
        assert "max_context_range" not in r  # a measured calibration gives one number
        checked += 1
    assert checked == 6


def test_borrowed_overhead_is_shown_as_a_range(tiny_ckpt, capsys):
    p = plan(tiny_ckpt, parse_memory("300MB"))
    assert p["calibration"]["borrowed"]
    for r in p["rows"]:
        lo, hi = r["max_context_range"]
        assert lo == r["max_context"] and hi > lo  # none at all: the cache alone
    assert main(["budget", str(tiny_ckpt), "--memory", "300MB"]) == 0
    out = capsys.readouterr().out
    assert "BORROWED" in out and "ranges: the borrowed overhead per token" in out


def test_calibration_is_kept_beside_the_export_and_reused(text_export, tmp_path, monkeypatch, capsys):
    """`budget OUT --calibrate` keeps its fit in OUT/.mla-edge-budget.json; a later `budget OUT` uses it (one number,
    'measured'); a re-export (a different manifest) does not."""
    import json
    import shutil

    from mla_edge.runtime import budget

    out = shutil.copytree(text_export[1], tmp_path / "out")
    runs = []

    def fake_generate(out_dir, precision, context, new_tokens=8):  # a real run takes minutes; the fit is the point
        runs.append(context)
        w = json.loads((out_dir / "mla_edge.json").read_text())["files"][precision]["bytes"]
        return {"cache_tokens": context, "peak_rss_bytes": w + 9_000_000 + 100 * context, "cache_bytes": 0}

    monkeypatch.setattr(budget, "measure_generate", fake_generate)
    assert main(["budget", str(out), "--memory", "300MB", "--calibrate", "--json"]) == 0
    cal = json.loads(capsys.readouterr().out)["calibration"]
    assert cal["base_bytes"] == 9_000_000 and abs(cal["per_token_bytes"] - 100) < 1e-6 and len(runs) == 3
    assert (out / ".mla-edge-budget.json").is_file()
    assert main(["budget", str(out), "--memory", "300MB"]) == 0
    text = capsys.readouterr().out
    assert "measured on" in text and "BORROWED" not in text and len(runs) == 3  # reused, not re-run
    man = json.loads((out / "mla_edge.json").read_text())
    (out / "mla_edge.json").write_text(json.dumps({**man, "note": "re-exported"}))
    assert budget.load_calibration(out) is None

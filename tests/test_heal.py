"""`mla-edge convert --heal-tokens`: healing trains only the new attention projections; a run interrupted (Ctrl-C,
kill -9) and resumed writes the same bytes as one that ran through; bad input and folders that are not ours are
refused in one line, exit 2, with nothing changed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_llama

from mla_edge.cli import main
from mla_edge.models import heal
from mla_edge.models.checkpoint import load_model

SMALL = ["--kv-lora-rank", "32", "--rope-dim", "8", "--windows", "4", "--window", "64"]
HEAL = [*SMALL, "--heal-seq", "32", "--heal-batch", "2", "--heldout-tokens", "256", "--checkpoint-minutes", "0"]


def _args(tmp_path, out, *extra):
    return ["convert", str(tmp_path / "llama"), "-o", str(out), "--calibration-text", str(tmp_path / "calib.txt"),
            *HEAL, *extra]  # fmt: skip


def _cli(args, **kw):
    """The command in a fresh process, with the default SIGINT (as a terminal gives it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mla_edge.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


def _step(state):
    for d in ("step", "step.old"):
        try:
            return json.loads((state / d / "progress.json").read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            continue
    return 0


def test_healing_trains_only_the_new_attention_and_scores_before_and_after(tmp_path, capsys):
    tiny_llama(tmp_path)
    assert main(["convert", str(tmp_path / "llama"), "-o", str(tmp_path / "free"), "--calibration-text",
                 str(tmp_path / "calib.txt"), *SMALL]) == 0  # fmt: skip
    capsys.readouterr()
    assert main([*_args(tmp_path, tmp_path / "healed", "--heal-tokens", "640", "--heal-lr", "1e-2"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    held = info["healed"]["heldout"]
    assert info["healed"]["heal_steps"] == 10 and held["tokens"] == 256
    assert held["converted_ppl"] > held["healed_ppl"] > 1 and held["original_ppl"] > 1
    curve = info["healed"]["curve"]["points"]  # tokens 0, 64, ..., 640: the held-out 256 tokens all fit the curve
    assert [p["tokens"] for p in curve] == list(range(0, 641, 64))
    assert curve[0]["ppl"] == held["converted_ppl"] and curve[-1]["ppl"] == held["healed_ppl"]
    assert json.loads((tmp_path / "healed" / ".mla-edge-convert").read_text())["healed"] == info["healed"]
    assert not (tmp_path / "healed.heal-state").exists()  # finished: the state folder is gone
    before, after = load_model(tmp_path / "free"), load_model(tmp_path / "healed")
    changed = {n for (n, p), q in zip(before.named_parameters(), after.parameters()) if not torch.equal(p, q)}
    assert changed and all(any(f".self_attn.{t}." in n for t in heal.TRAINED) for n in changed)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in changed} == set(heal.TRAINED)


@pytest.mark.parametrize("how", ["ctrl-c", "kill-9"])
def test_interrupted_and_resumed_healing_writes_the_same_checkpoint(tmp_path, how):
    tiny_llama(tmp_path)
    tokens = ["--heal-tokens", "12800"]  # 200 steps of 2 x 32 tokens
    whole = _cli(_args(tmp_path, tmp_path / "whole", *tokens))
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    out, state = tmp_path / "broken", tmp_path / "broken.heal-state"
    run = _cli(_args(tmp_path, out, *tokens))
    deadline = time.time() + 240
    while _step(state) < 5 and run.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert run.poll() is None, "the run ended before it could be interrupted"
    run.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    code = run.wait(timeout=120)
    err = run.stderr.read()
    stopped = _step(state)
    assert 5 <= stopped < 200 and not out.exists()
    if how == "ctrl-c":
        assert code == 130 and f"healing state saved at step {stopped} of 200" in err and "--resume" in err
    else:
        assert code == -signal.SIGKILL
    again = _cli(_args(tmp_path, out, *tokens))  # no --resume: refused, the state kept
    assert again.wait(timeout=120) == 2 and "pass --resume to continue it" in again.stderr.read()
    assert _step(state) == stopped
    resumed = _cli(_args(tmp_path, out, *tokens, "--resume"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not state.exists()


def _interrupted_state(tmp_path, monkeypatch):
    """A real interrupted run's state folder (stopped after its first checkpoint), made in this process."""
    tiny_llama(tmp_path)
    real = heal.HealState.save

    def save_then_stop(self, *a, **kw):
        real(self, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(heal.HealState, "save", save_then_stop)
    handler = signal.getsignal(signal.SIGINT)
    assert main(_args(tmp_path, tmp_path / "out", "--heal-tokens", "640")) == 130
    signal.signal(signal.SIGINT, handler)  # main ignores SIGINT after an interrupt (its exit must not be cut short)
    monkeypatch.setattr(heal.HealState, "save", real)
    state = tmp_path / "out.heal-state"
    assert _step(state) == 1
    return state


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--heal-tokens", "640"], "holds an interrupted healing run: pass --resume to continue it"),
        (["--heal-tokens", "640", "--resume", "--heal-lr", "3e-4"], "--resume: the interrupted run in"),
        (["--heal-tokens", "1280", "--resume"], '"tokens": 640'),
        (["--resume"], "are healing options: pass --heal-tokens N too"),
        (["--heal-tokens", "640", "--resume", "--heal-text", "missing.txt"], "text missing.txt not found"),
        (["--heal-tokens", "lots"], "--heal-tokens expects a token count"),
        (["--heal-tokens", "640", "--resume", "--checkpoint-minutes", "-1"], "--checkpoint-minutes expects"),
    ],
)
def test_bad_healing_input_is_named_and_the_state_is_kept(tmp_path, monkeypatch, capsys, extra, message):
    state = _interrupted_state(tmp_path, monkeypatch)
    capsys.readouterr()
    before = _listing(state)
    monkeypatch.chdir(tmp_path)
    assert main(_args(tmp_path, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert _listing(state) == before and not (tmp_path / "out").exists()


def test_a_state_folder_not_ours_or_in_use_is_left_alone(tmp_path, monkeypatch, capsys):
    state = _interrupted_state(tmp_path, monkeypatch)
    (state / "lock").write_text(str(os.getppid()))  # a live process holds it
    assert main(_args(tmp_path, tmp_path / "out", "--heal-tokens", "640", "--resume")) == 2
    assert f"another mla-edge convert (pid {os.getppid()}) is healing into" in capsys.readouterr().err
    (state / "lock").unlink()
    foreign = tmp_path / "mine.heal-state"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's own folder")
    assert main(_args(tmp_path, tmp_path / "mine", "--heal-tokens", "640", "--resume")) == 2
    assert "is not a healing state" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert main(_args(tmp_path, tmp_path / "out", "--heal-tokens", "640", "--resume")) == 0  # the real one resumes
    assert not state.exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_the_smollm2_demo_heals_once_then_uses_the_most_healed_model(tmp_path):
    """`demo --model smollm2 --heal-tokens N` heals the cached conversion (copied, not converted again) into
    MODEL-healedN; without --heal-tokens the cached healed model with the most healing is used."""
    from mla_edge.export.demo import _healed

    tiny_llama(tmp_path)
    src, model_dir, lines = tmp_path / "llama", tmp_path / "cache" / "m", []
    assert (
        main(["convert", str(src), "-o", str(model_dir), "--calibration-text", str(tmp_path / "calib.txt"), *SMALL])
        == 0
    )
    assert _healed(src, model_dir, 32, 8, tmp_path / "calib.txt", 0, False, lines.append) is None
    healed = _healed(src, model_dir, 32, 8, tmp_path / "calib.txt", 1024, False, lines.append)
    assert healed == tmp_path / "cache" / "m-healed1024" and "heal: 1,024 tokens" in lines[0]
    marker = json.loads((healed / ".mla-edge-convert").read_text())
    assert marker["healed"]["heal_tokens"] == 1024 and marker["cache_elements_per_token_per_layer"] == 40
    few = tmp_path / "cache" / "m-healed99"
    few.mkdir()
    (few / ".mla-edge-convert").write_text(json.dumps({"healed": {"heal_tokens": 99}}))
    lines.clear()
    assert _healed(src, model_dir, 32, 8, tmp_path / "calib.txt", 0, False, lines.append) == healed
    assert "m-healed1024 (1,024 tokens of healing)" in lines[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kv-lora-rank", "999"], "--kv-lora-rank must be between 1 and"),
        (["--window", "5000"], "calibration text is too short"),
        (["--heal-seq", "4000"], "--heal-seq 4000 needs more"),
    ],
)
def test_bad_conversion_input_with_healing_leaves_no_state_behind(tmp_path, capsys, extra, message):
    tiny_llama(tmp_path)
    capsys.readouterr()
    assert main([*_args(tmp_path, tmp_path / "out", "--heal-tokens", "640"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.heal-state").exists()

"""Healing: distil the original llama's next-token distributions (KL on the logits) into a converted MLA model's new
attention projections, on the CPU, resumable: an interrupted and resumed run writes the same bytes as one that ran
through (batches are drawn from (seed, step), the optimizer state is saved with the weights, every checkpoint is
exact fp32).

The run lives in a state folder beside the output, `OUT.heal-state/`: run.json (the options, so that `--resume`
refuses different ones), converted/ (the training-free conversion, so a resume does not redo it) and step/ (the
trained tensors, AdamW's moments and the progress), replaced atomically every `checkpoint_seconds` and when
Ctrl-C/SIGTERM arrives (the step in flight finishes first; a second Ctrl-C stops at once, keeping the last
checkpoint). The finished model is published to OUT in one rename; then the state folder is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mla_edge.runtime.manifest import sha256

from .checkpoint import _alive, signal_handlers
from .convert import (
    CONVERT_REVISION,
    ConvertError,
    Source,
    calibration_windows,
    check_ranks,
    convert_checkpoint,
    llama_shape,
    read_source,
)
from .recipes.train import lr_at

TRAINED = ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")
HEAL_REVISION = 1
RUN_FILE = "run.json"
CURVE_POINTS, CURVE_IDS = 10, 1025  # the recovery curve: held-out perplexity on the first 1,024 tokens, 10 times a run


@dataclass(frozen=True)
class HealOptions:
    """tokens: training tokens (steps = tokens / (seq x batch), rounded up); heldout_tokens: the held-out tokens
    scored before and after (the end of the healing text unless a held-out text is given)."""

    tokens: int
    seq: int = 256
    batch: int = 4
    lr: float = 1e-4
    seed: int = 0
    heldout_tokens: int = 4096
    checkpoint_seconds: float = 300.0  # how often the state is saved; not part of what a resume must match

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.seq * self.batch)))


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def state_folder(out: Path) -> Path:
    return out.with_name(out.name + ".heal-state")


def read_text(path: Path) -> str:
    """A .txt or .txt.xz file (the corpora under ../shared/data are xz), one InputError line when unreadable."""
    try:
        if path.suffix == ".xz":
            with lzma.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConvertError(f"text {path} not found") from None
    except IsADirectoryError:
        raise ConvertError(f"text {path} is a folder, not a text file") from None
    except (lzma.LZMAError, EOFError, UnicodeDecodeError) as e:
        raise ConvertError(f"text {path} is not readable UTF-8 text: {e}") from None


def _digest(path: Path) -> str:
    return sha256(path)[:16]


def _source_tag(src: Path) -> str:
    if src.is_file():
        return _digest(src)
    return hashlib.sha256(b"".join(_digest(p).encode() for p in sorted(src.glob("*.safetensors")))).hexdigest()[:16]


def split_texts(
    source: Source, heal_texts: list[Path], heldout_text: Path | None, opts: HealOptions
) -> tuple[np.ndarray, np.ndarray]:
    """Training ids (the healing texts, one after another) and held-out ids: the held-out text's first
    heldout_tokens, or, without one, the healing text's last heldout_tokens (never trained on; at most a tenth)."""
    train = np.concatenate([np.asarray(source.tokenizer.encode(read_text(p)).ids, np.int64) for p in heal_texts])
    if heldout_text is not None:
        text = read_text(heldout_text)  # only its start is scored: a prefix ample for heldout_tokens is tokenized
        held = np.asarray(source.tokenizer.encode(text[: 32 * (opts.heldout_tokens + 1)]).ids, np.int64)
        held = held[: opts.heldout_tokens + 1]
    else:
        n = min(opts.heldout_tokens + 1, len(train) // 10)
        train, held = train[: len(train) - n], train[len(train) - n :]
    if len(train) < opts.seq + 2:
        raise ConvertError(f"the healing text holds {len(train)} tokens to train on; --heal-seq {opts.seq} needs more")
    if len(held) < 2:
        raise ConvertError("the held-out text is empty after tokenizing")
    return train, held


def batch_at(train: np.ndarray, opts: HealOptions, step: int) -> torch.Tensor:
    """The batch of step `step`: a function of (seed, step) alone, so a resumed run draws what an unbroken one would."""
    rng = np.random.default_rng([opts.seed, step])
    starts = rng.integers(0, len(train) - opts.seq, size=opts.batch)
    return torch.from_numpy(np.stack([train[s : s + opts.seq] for s in starts]))


@torch.no_grad()
def perplexity(logits_of: Any, ids: np.ndarray, window: int) -> float:
    """The one perplexity function (mla_edge.runtime.sampling), for a torch model: logits_of(x (1, S)) -> (1, S, V)."""
    from mla_edge.runtime.sampling import perplexity as ppl

    return ppl(lambda x: logits_of(torch.from_numpy(x)), ids.tolist(), window)


class _Stop:
    """Ctrl-C / SIGTERM while training: noted, acted on between steps (the state is saved first). A second Ctrl-C
    raises at once. Signals already ignored (a background job's SIGINT) stay ignored."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        print(
            f"\nmla-edge convert: stopping after this step to save the healing state{again}",
            file=sys.stderr,
            flush=True,
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Stop]:
        with signal_handlers(lambda signum, previous: None if previous is signal.SIG_IGN else self):
            yield self
        if self.signum is not None:  # the state is saved and the handlers restored: the interrupt the caller expects
            signal.raise_signal(self.signum)


class HealState:
    """The state folder: run.json, converted/, step/ (replaced atomically: step.new -> step, the old one removed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.step_dir = folder / "step"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One process per state folder: a lock file naming our pid (a dead holder's lock is taken over)."""
        lock = self.folder / "lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                try:
                    pid = int(lock.read_text() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise ConvertError(f"another mla-edge convert (pid {pid}) is healing into {self.folder}") from None
                lock.unlink(missing_ok=True)
        else:
            raise ConvertError(f"cannot take the lock {lock}")
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def run(self) -> dict | None:
        try:
            return json.loads((self.folder / RUN_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def start(self, run: dict) -> None:
        try:
            self.folder.mkdir()  # exclusive: a second run racing us for the same folder fails here
        except FileExistsError:
            raise ConvertError(f"{self.folder} appeared meanwhile (another convert?); nothing was changed") from None
        tmp = self.folder / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(run, indent=2) + "\n")
        os.replace(tmp, self.folder / RUN_FILE)

    def save(self, trained: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer, progress: dict) -> None:
        from safetensors.torch import save_file

        new, old = self.folder / "step.new", self.folder / "step.old"
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
        save_file({k: v.detach().contiguous() for k, v in trained.items()}, str(new / "trained.safetensors"))
        torch.save(opt.state_dict(), new / "optimizer.pt")
        (new / "progress.json").write_text(json.dumps(progress) + "\n")
        if self.step_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.step_dir, old)
        os.replace(new, self.step_dir)
        shutil.rmtree(old, ignore_errors=True)

    def load(self) -> tuple[dict[str, torch.Tensor], dict, dict] | None:
        from safetensors.torch import load_file

        for d in (self.step_dir, self.folder / "step.old"):  # step.old: killed between the two renames
            if (d / "progress.json").is_file():
                progress = json.loads((d / "progress.json").read_text())
                opt = torch.load(d / "optimizer.pt", weights_only=True)
                return load_file(str(d / "trained.safetensors")), opt, progress
        return None


def _run_record(
    source: Source, kv_lora_rank: int, rope_dim: int, calibration: Path, windows: int, window: int,
    heal_texts: list[Path], heldout: Path | None, opts: HealOptions,
) -> dict:  # fmt: skip
    o = asdict(opts)
    o.pop("checkpoint_seconds")
    return {
        "heal_revision": HEAL_REVISION,
        "convert_revision": CONVERT_REVISION,
        "source": {"path": str(source.path), "sha256_16": _source_tag(source.path)},
        "kv_lora_rank": kv_lora_rank,
        "rope_dim": rope_dim,
        "calibration": {
            "path": str(calibration),
            "sha256_16": _digest(calibration),
            "windows": windows,
            "window": window,
        },
        "heal_texts": [{"path": str(p), "sha256_16": _digest(p)} for p in heal_texts],
        "heldout_text": None if heldout is None else {"path": str(heldout), "sha256_16": _digest(heldout)},
        "options": o,
    }


def _differs(saved: dict, now: dict) -> str | None:
    """The first setting a resume would change, named; paths may move, contents may not."""

    def strip(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k != "path"}
        if isinstance(d, list):
            return [strip(v) for v in d]
        return d

    for key in now:
        if strip(saved.get(key)) != strip(now[key]):
            return f"{key}: {json.dumps(strip(saved.get(key)))} then, {json.dumps(strip(now[key]))} now"
    return None


def heal_checkpoint(
    src: str | Path,
    out: str | Path,
    kv_lora_rank: int,
    rope_dim: int,
    calibration_text: str | Path,
    opts: HealOptions,
    heal_texts: list[Path] | None = None,
    heldout_text: Path | None = None,
    windows: int = 32,
    window: int = 512,
    resume: bool = False,
    progress: bool = True,
    converted: Path | None = None,
) -> dict:
    """convert_checkpoint, then healing; OUT is written once, at the end. Returns the summary (held-out perplexity
    of the original, the training-free conversion and the healed model, tokens, seconds). `converted`: a folder
    that convert_checkpoint already wrote with these same settings, copied instead of converting again."""
    out, calibration_text = Path(out), Path(calibration_text)
    heal_texts = [Path(p) for p in (heal_texts or [calibration_text])]
    for p in [calibration_text, *heal_texts, *([heldout_text] if heldout_text else [])]:
        if not Path(p).is_file():
            raise ConvertError(f"text {p} {'is not a file' if Path(p).exists() else 'not found'}")
    state = HealState(state_folder(out))
    saved_run = state.run()
    if state.folder.exists() and not resume:
        raise ConvertError(
            f"{state.folder} holds an interrupted healing run: pass --resume to continue it, or remove that folder "
            "to start again"
        )
    if state.folder.exists() and saved_run is None:
        raise ConvertError(f"{state.folder} exists but is not a healing state (no {RUN_FILE}); it was left alone")
    t0 = time.time()
    say = _say if progress else (lambda line: None)
    source = read_source(src)  # no progress line before the input is checked: bad input gets one line
    check_ranks(llama_shape(source.cfg), kv_lora_rank, rope_dim)  # before the state folder exists, as every check
    calibration_windows(source.tokenizer.encode(read_text(calibration_text)).ids, windows, window)
    run = _run_record(source, kv_lora_rank, rope_dim, calibration_text, windows, window, heal_texts, heldout_text, opts)
    if saved_run is not None:
        why = _differs(saved_run, run)
        if why:
            raise ConvertError(
                f"--resume: the interrupted run in {state.folder} used other settings ({why}); rerun with its "
                "settings, or remove that folder to start again"
            )
    train_ids, held_ids = split_texts(source, heal_texts, heldout_text, opts)
    if saved_run is None:
        if resume:
            say(f"--resume: no interrupted run in {state.folder}; starting one")
        state.start(run)
    with state.locked():
        result = _heal(state, source, run, train_ids, held_ids, out, opts, say, converted)
    shutil.rmtree(state.folder, ignore_errors=True)  # ours (run.json, our lock), finished: the state folder goes
    return {**result, "seconds": round(time.time() - t0, 1)}


def _heal(
    state: HealState, source: Source, run: dict, train_ids: np.ndarray, held_ids: np.ndarray, out: Path,
    opts: HealOptions, say: Any, reuse: Path | None,
) -> dict:  # fmt: skip
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .checkpoint import atomic_folder, load_model
    from .mla import ModelOptions

    converted = state.folder / "converted"
    calib = run["calibration"]
    if not (converted / "config.json").is_file() and reuse is not None:
        with atomic_folder(converted) as tmp:
            for f in reuse.iterdir():
                if f.is_file():
                    shutil.copyfile(f, tmp / f.name)
    if not (converted / "config.json").is_file():
        say(f"converting (training-free) into {converted}")
        convert_checkpoint(
            source, converted, run["kv_lora_rank"], run["rope_dim"], calib["path"], calib["windows"], calib["window"]
        )
    teacher = source.llama()
    teacher.config._attn_implementation = "sdpa"  # the same numbers as eager, faster over whole windows
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = load_model(converted, ModelOptions(attention="naive"))
    names = [n for n, _ in student.named_parameters() if any(f".self_attn.{t}." in n for t in TRAINED)]
    trained = dict(student.named_parameters())
    for n, p in trained.items():
        p.requires_grad_(n in names)
    trained = {n: trained[n] for n in names}
    opt = torch.optim.AdamW(list(trained.values()), lr=opts.lr, weight_decay=0.0)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return student(x)[0]

    loaded = state.load()
    if loaded is None:
        say(f"scoring {len(held_ids) - 1:,} held-out tokens with the original and the converted model")
        t = time.time()
        before = {
            "original": perplexity(lambda x: teacher(input_ids=x).logits, held_ids, opts.seq),
            "converted": perplexity(logits, held_ids, opts.seq),
            "seconds": time.time() - t,
        }
        step, seconds, kls, curve = (
            0,
            0.0,
            [],
            [{"tokens": 0, "ppl": perplexity(logits, held_ids[:CURVE_IDS], opts.seq)}],
        )
    else:
        tensors, opt_state, prog = loaded
        with torch.no_grad():
            for n, v in tensors.items():
                trained[n].copy_(v)
        opt.load_state_dict(opt_state)
        step, seconds, kls, before, curve = (prog[k] for k in ("step", "seconds", "kl", "before", "curve"))

    def save() -> None:
        state.save(trained, opt, {"step": step, "seconds": seconds, "kl": kls, "before": before, "curve": curve})

    steps = opts.steps
    student.train()
    last_save = time.time()
    with (
        _Stop().installed() as stop,
        tqdm(total=steps, initial=step, desc="heal", unit="step", disable=say is not _say, file=sys.stderr) as bar,
    ):
        while step < steps and stop.signum is None:
            t = time.time()
            x = batch_at(train_ids, opts, step)
            with torch.no_grad():
                target = F.log_softmax(teacher(input_ids=x).logits, -1)
            logp = F.log_softmax(student(x)[0], -1)
            loss = F.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, opts.lr, max(1, steps // 20))  # 5% warm-up, cosine to 10%
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(trained.values()), 1.0)
            opt.step()
            step += 1
            seconds += time.time() - t
            kls.append(round(loss.item(), 5))
            if step % max(1, steps // CURVE_POINTS) == 0 or step == steps:  # eval mode is the same model: no dropout
                curve.append(
                    {"tokens": step * opts.seq * opts.batch, "ppl": perplexity(logits, held_ids[:CURVE_IDS], opts.seq)}
                )
            bar.update(1)
            bar.set_postfix(kl=f"{kls[-1]:.3f}", tok_min=f"{step * opts.seq * opts.batch / seconds * 60:,.0f}")
            if time.time() - last_save >= opts.checkpoint_seconds:
                save()
                last_save = time.time()
        if stop.signum is not None:  # the signal may have come after the last save: save this step
            save()
            bar.close()
            if step < steps:
                print(
                    f"mla-edge convert: healing state saved at step {step} of {steps} in {state.folder}; "
                    "the same command with --resume continues it",
                    file=sys.stderr,
                )
            return {}  # the signal is raised again when the handlers are restored
    save()  # a kill during the last evaluation or the publishing loses no training
    say(f"scoring the healed model; writing {out}")
    student.eval()
    after = perplexity(logits, held_ids, opts.seq)
    cfg = source.cfg
    result = {
        "heal_tokens": steps * opts.seq * opts.batch,
        "heal_steps": steps,
        "heal_seconds": round(seconds, 1),
        "tokens_per_minute": round(steps * opts.seq * opts.batch / max(seconds, 1e-9) * 60),
        "heldout": {
            "text": run["heldout_text"]["path"] if run["heldout_text"] else "the end of the healing text",
            "tokens": len(held_ids) - 1,
            "original_ppl": before["original"],
            "converted_ppl": before["converted"],
            "healed_ppl": after,
        },
        "curve": {"heldout_tokens": len(held_ids[:CURVE_IDS]) - 1, "points": curve},
        "trained": list(TRAINED),
        "options": run["options"],
    }
    marker = json.loads((converted / ".mla-edge-convert").read_text())
    marker["healed"] = result
    sd = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    with atomic_folder(out) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), {"format": "pt"})
        for f in converted.iterdir():
            if f.is_file() and f.name not in ("model.safetensors", ".mla-edge-convert"):
                shutil.copyfile(f, tmp / f.name)
        (tmp / ".mla-edge-convert").write_text(json.dumps(marker) + "\n")
    return {"source": str(source.path), "out": str(out), **{k: v for k, v in marker.items() if k != "source"}}


def heal_line(h: dict) -> str:
    """The healing summary in one line (`mla-edge convert --heal-tokens` prints it)."""
    held = h["heldout"]
    return (
        f"healed on {h['heal_tokens']:,} tokens in {h['heal_seconds'] / 60:.1f} min ({h['tokens_per_minute']:,} "
        f"tokens/min); held-out perplexity ({held['tokens']:,} tokens of {held['text']}): original "
        f"{held['original_ppl']:.2f}, converted {held['converted_ppl']:.2f} "
        f"({held['converted_ppl'] / held['original_ppl'] - 1:+.1%}), healed {held['healed_ppl']:.2f} "
        f"({held['healed_ppl'] / held['original_ppl'] - 1:+.1%})"
    )

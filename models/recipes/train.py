"""Train an MLA decoder (or its MHA/GQA twin) from scratch on a text corpus, on the CPU by default.

python -m mla_edge.models.recipes.train --data ../shared/data/eltec-eng --out runs/demo            # the demo recipe
python -m mla_edge.models.recipes.train --data ../shared/data/eltec-eng --out runs/demo --resume   # carry on

The output folder is a Hugging Face-format checkpoint (config.json, model.safetensors, tokenizer.json)
that `mla_edge.models.checkpoint.load_model` reads, plus train_log.json with what was measured.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mla_edge.contract import InputError

from ..checkpoint import save_model
from ..config import MLAConfig
from ..mla import MLAForCausalLM, ModelOptions

EOT = "<|endoftext|>"

# The demo recipe: ~6M parameters, MLA cache 80 elements/token/layer (MHA twin: 640).
DEMO = dict(
    model_type="deepseek_v3",
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=8,
    q_lora_rank=None,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rope_interleave=False,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
    first_k_dense_replace=6,
)


class DataError(InputError):
    pass


def read_corpus(data_dir: Path, split: str) -> str:
    path = Path(data_dir) / f"{split}.txt.xz"
    if not path.is_file():
        raise DataError(f"corpus file {path} not found (expected {split}.txt.xz in {data_dir})")
    try:
        with lzma.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (lzma.LZMAError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"corpus file {path} is corrupt: {e}") from None
    if len(text) < 10_000:
        raise DataError(f"corpus file {path} holds only {len(text)} characters; too little to train on")
    return text


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE (tokenizers) with one special token, <|endoftext|> = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = text.split(f"\n{EOT}\n")
    tok.train_from_iterator((line for d in docs for line in d.split("\n")), trainer)
    return tok


def encode(tok, text: str) -> np.ndarray:
    """Whole corpus -> uint16 ids; novels joined by <|endoftext|>, paragraphs keep their newlines."""
    eot = tok.token_to_id(EOT)
    out: list[int] = []
    for doc in text.split(f"\n{EOT}\n"):
        paras = [p + "\n" for p in doc.split("\n")]
        for enc in tok.encode_batch(paras, add_special_tokens=False):
            out.extend(enc.ids)
        out.append(eot)
    return np.asarray(out, dtype=np.uint16)


def prepare_data(data_dir: Path, out: Path, vocab_size: int, log) -> tuple[np.ndarray, np.ndarray, Path]:
    from tokenizers import Tokenizer

    tok_path = out / "tokenizer.json"
    cache = out / "data"
    cache.mkdir(parents=True, exist_ok=True)
    if not tok_path.is_file():
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {data_dir}/train.txt.xz")
        tok = train_tokenizer(read_corpus(data_dir, "train"), vocab_size)
        tok.save(str(tok_path))
    tok = Tokenizer.from_file(str(tok_path))
    arrays = []
    for split in ("train", "valid"):
        npy = cache / f"{split}.npy"
        if not npy.is_file():
            log(f"tokenizing {split} split")
            ids = encode(tok, read_corpus(data_dir, split))
            np.save(cache / f"{split}.tmp.npy", ids)
            os.replace(cache / f"{split}.tmp.npy", npy)
        arrays.append(np.load(npy, mmap_mode="r"))
    return arrays[0], arrays[1], tok_path


def batch(data: np.ndarray, rng: np.random.Generator, bsz: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = rng.integers(0, len(data) - seq - 1, size=bsz)
    x = np.stack([data[s : s + seq + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(x)
    return t[:, :-1], t[:, 1:]


def build(cfg: MLAConfig, arch: str, seed: int):
    torch.manual_seed(seed)
    if arch == "mla":
        model = MLAForCausalLM(cfg, ModelOptions(attention="naive"))  # the cheaper form for full-sequence training
    else:
        from .twins import twin

        model = twin(cfg, arch)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            continue
        std = (
            0.02 / math.sqrt(2 * cfg.num_hidden_layers)
            if name.endswith(("o_proj.weight", "down_proj.weight"))
            else 0.02
        )
        torch.nn.init.normal_(p, 0.0, std)
    return model


@torch.no_grad()
def evaluate(model, data: np.ndarray, bsz: int, seq: int, batches: int) -> float:
    model.eval()
    rng = np.random.default_rng(1234)  # the same held-out windows every time
    total = 0.0
    for _ in range(batches):
        x, y = batch(data, rng, bsz, seq)
        logits, _ = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    model.train()
    return total / batches


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def save_state(out: Path, model, opt, step: int, log_data: dict) -> None:
    """Resumable state: weights in safetensors, optimizer moments via torch.save (loaded with weights_only=True)."""
    from safetensors.torch import save_file

    tmp = out / "train_state.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {
            k: v.contiguous()
            for k, v in model.state_dict().items()
            if k != "lm_head.weight" or not model.cfg.tie_word_embeddings
        },
        str(tmp / "model.safetensors"),
    )
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "log": log_data}))
    final = out / "train_state"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder with train.txt.xz and valid.txt.xz")
    ap.add_argument("--out", type=Path, required=True, help="output folder (HF checkpoint + tokenizer + train_state)")
    ap.add_argument("--config", type=Path, help="config.json overriding the demo recipe's architecture")
    ap.add_argument("--arch", default="mla", choices=["mla", "mha", "gqa"], help="attention: MLA, or an MHA/GQA twin")
    ap.add_argument("--tokens", type=float, default=7.5e6, help="training tokens in all")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--final-eval-batches", type=int, default=32, help="held-out batches for the final validation loss")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    ap.add_argument("--save-dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    args = ap.parse_args(argv)
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda m: tqdm.write(f"[train] {m}")  # noqa: E731
    arch_dict = json.loads(args.config.read_text()) if args.config else dict(DEMO)
    cfg = MLAConfig.from_dict(arch_dict)
    try:
        train, valid, tok_path = prepare_data(args.data, args.out, cfg.vocab_size, log)
    except DataError as e:
        raise SystemExit(f"train: error: {e}") from None
    model = build(cfg, args.arch, args.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=False,
    )
    per_step = args.batch * args.seq
    total_steps = int(args.tokens // per_step)
    history: dict[str, Any] = {"evals": [], "seconds": 0.0}
    step = 0
    state_dir = args.out / "train_state"
    if args.resume:
        from safetensors.torch import load_file

        if not (state_dir / "state.json").is_file():
            raise SystemExit(f"train: error: --resume given but {state_dir} holds no saved state")
        model.load_state_dict(load_file(state_dir / "model.safetensors"), strict=False)
        opt.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
        saved = json.loads((state_dir / "state.json").read_text())
        step, history = saved["step"], saved["log"]
        log(f"resumed at step {step}/{total_steps}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{args.arch} model: {n_params / 1e6:.2f}M parameters; {total_steps} steps of {per_step} tokens")
    model.train()
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    t0, tokens_this_run, prior_seconds = time.time(), 0, history["seconds"]
    while step < total_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps, args.lr, args.warmup)
        x, y = batch(train, np.random.default_rng([args.seed, step]), args.batch, args.seq)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_this_run += per_step
        rate = tokens_this_run / (time.time() - t0)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
        bar.update(1)
        if step % args.eval_every == 0 or step == total_steps:
            val = evaluate(
                model,
                valid,
                args.batch,
                args.seq,
                args.final_eval_batches if step == total_steps else args.eval_batches,
            )
            history["evals"].append(
                {
                    "step": step,
                    "tokens": step * per_step,
                    "train_loss": loss.item(),
                    "val_loss": val,
                    "val_ppl": math.exp(val),
                }
            )
            history["seconds"] = prior_seconds + time.time() - t0
            log(f"step {step}: train loss {loss.item():.3f}, val loss {val:.3f} (ppl {math.exp(val):.2f})")
            save_state(args.out, model, opt, step, history)
    bar.close()
    final = history["evals"][-1]
    if args.arch == "mla":  # the twins exist for the comparison table only
        save_model(model, args.out / "model", dtype=args.save_dtype, extra_files={"tokenizer.json": tok_path})
    report = {
        "arch": args.arch,
        "parameters": n_params,
        "tokens_seen": step * per_step,
        "steps": step,
        "batch": args.batch,
        "seq": args.seq,
        "lr": args.lr,
        "seed": args.seed,
        "train_seconds": round(history["seconds"], 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}",
        "corpus": str(args.data),
        "val_loss": final["val_loss"],
        "val_ppl": final["val_ppl"],
        "config": arch_dict,
        "evals": history["evals"],
    }
    (args.out / "train_log.json").write_text(json.dumps(report, indent=2))
    log(f"done: val ppl {final['val_ppl']:.2f} after {step * per_step:,} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Heal a converted MLA model: distil the original model's next-token distributions into the new attention
projections only (q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj), on the CPU, resumable.

python -m mla_edge.models.recipes.heal --teacher ORIG_HF_DIR --student MLA_DIR --data ../shared/data/eltec-eng \
    --out runs/heal [--tokens 2e5] [--resume]

The loss is KL(teacher || student) on every position of random train windows; everything but the new attention
projections stays frozen. Every --save-every steps the state is saved (resumable with --resume), and the log
records tokens seen and held-out loss. The healed model is written to OUT/model (DeepSeek-V3 format).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load_model, save_model
from ..mla import ModelOptions
from .train import batch, evaluate, lr_at, read_corpus, save_state

TRAINED = ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")


def main(argv: list[str] | None = None) -> int:
    import transformers as tf
    from tokenizers import Tokenizer
    from tqdm import tqdm

    ap = argparse.ArgumentParser(prog="python -m mla_edge.models.recipes.heal", description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, required=True, help="the original (GQA) llama: .gguf or HF folder")
    ap.add_argument("--student", type=Path, required=True, help="the converted MLA folder (mla-edge convert)")
    ap.add_argument("--data", type=Path, required=True, help="corpus folder with train.txt.xz and valid.txt.xz")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=float, default=2e5, help="training tokens")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(a.student / "tokenizer.json"))
    train = np.asarray(tok.encode(read_corpus(a.data, "train")[:4_000_000]).ids, np.int32)
    valid = np.asarray(tok.encode(read_corpus(a.data, "valid")[:200_000]).ids, np.int32)
    if a.teacher.suffix == ".gguf":  # dequantized once into OUT/teacher (a Hugging Face llama folder)
        from ..gguf_llama import write_hf_folder

        if not (a.out / "teacher" / "config.json").is_file():
            write_hf_folder(a.teacher, a.out / "teacher")
        a.teacher = a.out / "teacher"
    teacher = tf.LlamaForCausalLM.from_pretrained(a.teacher, attn_implementation="sdpa").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = load_model(a.student, ModelOptions(attention="naive"))
    names = [n for n, _ in student.named_parameters() if any(f".self_attn.{t}." in n for t in TRAINED)]
    for n, p in student.named_parameters():
        p.requires_grad_(n in names)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    a.out.mkdir(parents=True, exist_ok=True)
    steps = int(a.tokens // (a.seq * a.batch))
    step, log = 0, {"trained": list(TRAINED), "seq": a.seq, "batch": a.batch, "lr": a.lr, "points": []}
    state = a.out / "train_state"
    if a.resume and (state / "state.json").is_file():
        from safetensors.torch import load_file

        student.load_state_dict(load_file(str(state / "model.safetensors")), strict=False)
        opt.load_state_dict(torch.load(state / "optimizer.pt", weights_only=True))
        saved = json.loads((state / "state.json").read_text())
        step, log = saved["step"], saved["log"]

    rng = np.random.default_rng(step)
    student.train()
    t0 = time.time()
    with tqdm(total=steps, initial=step, desc="heal", unit="step") as bar:
        while step < steps:
            x, _ = batch(train, rng, a.batch, a.seq)
            with torch.no_grad():
                target = F.log_softmax(teacher(input_ids=x).logits.float(), -1)
            logp = F.log_softmax(student(x)[0].float(), -1)
            loss = F.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, a.lr, max(1, steps // 20))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(kl=f"{loss.item():.3f}")
            if step % a.save_every == 0 or step == steps:
                log["points"].append(
                    {
                        "step": step,
                        "tokens": step * a.seq * a.batch,
                        "kl": loss.item(),
                        "valid_ce": evaluate(student, valid, 2, a.seq, 4),
                        "seconds": time.time() - t0,
                    }
                )
                save_state(a.out, student, opt, step, log)
    student.eval()
    model_dir = a.out / "model"
    files = {n: a.student / n for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")}
    save_model(student, model_dir, extra_files={n: f for n, f in files.items() if f.is_file()})
    (a.out / "heal_log.json").write_text(json.dumps(log, indent=2) + "\n")
    shutil.copyfile(a.out / "heal_log.json", model_dir / "heal_log.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

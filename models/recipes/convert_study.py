"""The GQA -> MLA study: perplexity against cache size for the original model and its conversions, scored by one
function on the same tokens, and drawn as a curve (plus healing's recovery).

python -m mla_edge.models.recipes.convert_study score --out study.json --text eltec=valid.txt.xz \
    --model "original GQA=smol-hf:384:original" --model "R256 training-free=smollm2-mla:288:training-free" \
    --model "R256 healed int8=heal-onnx@w8a32:288:healed" [--tokens 8192] [--window 512]
python -m mla_edge.models.recipes.convert_study plot study.json --heal-log R256=smollm2-healed --out curve.png

A model is LABEL=PATH:CACHE_ELEMENTS:KIND: PATH a Hugging Face llama folder (transformers), an MLA folder (our
PyTorch model), or an export folder with @PRECISION (onnxruntime). Rows are appended to --out, so a long study can
be scored in parts; a row already there (same label and text) is skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def _scorer(path: str) -> Any:
    """logits(ids (1, n)) -> (1, n, vocab) numpy, for whichever kind of folder `path` is."""
    if "@" in path:
        from mla_edge.runtime.session import LatentSession

        folder, precision = path.rsplit("@", 1)
        sess = LatentSession(folder, precision, "cpu")

        def ort_logits(ids: np.ndarray) -> np.ndarray:
            n = ids.shape[1]
            return sess.step(ids, np.ones((1, n), np.int64), np.arange(n)[None], sess.empty_cache(1))[0]

        return ort_logits
    import torch

    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("model_type") == "llama":
        import transformers as tf

        model = tf.LlamaForCausalLM.from_pretrained(path).eval()

        def hf_logits(ids: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.as_tensor(ids)).logits.numpy()

        return hf_logits
    from ..checkpoint import load_model

    mla = load_model(path)

    def mla_logits(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return mla(torch.as_tensor(ids))[0].numpy()

    return mla_logits


def score(a: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from mla_edge.runtime.sampling import perplexity

    from ..heal import read_text

    rows = json.loads(a.out.read_text()) if a.out.is_file() else []
    tok = Tokenizer.from_file(str(a.tokenizer))
    texts = {}
    for spec in a.text:
        name, path = spec.split("=", 1)
        texts[name] = tok.encode(read_text(Path(path))[: a.tokens * 12]).ids[: a.tokens]
    for spec in a.model:
        label, rest = spec.split("=", 1)
        path, elements, kind = rest.rsplit(":", 2)
        todo = [t for t in texts if not any(r["label"] == label and r["text"] == t for r in rows)]
        if not todo:
            continue
        logits = _scorer(path)
        for name in todo:
            t = time.time()
            ppl = perplexity(logits, texts[name], a.window)
            row = {"label": label, "path": path, "cache_elements": int(elements), "kind": kind, "text": name}
            row.update(tokens=len(texts[name]), window=a.window, ppl=ppl, seconds=round(time.time() - t, 1))
            rows.append(row)
            print(f"{label:40s} {name:12s} {ppl:9.3f}", flush=True)
            a.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def plot(a: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(a.results.read_text())
    texts = sorted({r["text"] for r in rows})
    panels = len(texts) + (1 if a.heal_log else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    axes = np.atleast_1d(axes)
    colors = {"original": "k", "training-free": "tab:red", "healed": "tab:green"}
    markers = {"pytorch": "o", "fp32": "o", "int8": "v", "int8-block": "D", "w8a32": "s", "int4": "^"}
    for ax, text in zip(axes, texts):
        here = [r for r in rows if r["text"] == text]
        series: dict[tuple[str, str], list[dict]] = {}
        for r in here:
            precision = r["path"].rsplit("@", 1)[1] if "@" in r["path"] else "pytorch"
            series.setdefault((r["kind"], precision), []).append(r)
        for (kind, precision), rs in sorted(series.items()):
            rs.sort(key=lambda r: r["cache_elements"])
            xs, ys = [r["cache_elements"] for r in rs], [r["ppl"] for r in rs]
            hollow = precision not in ("pytorch", "fp32")
            label = f"{kind}, {'PyTorch' if precision == 'pytorch' else 'ONNX ' + precision}"
            ax.plot(xs, ys, ls="-" if len(rs) > 1 else "none", color=colors.get(kind, "tab:blue"), lw=1,
                    marker=markers.get(precision, "x"), ms=8 if hollow else 6, label=label,
                    markerfacecolor="none" if hollow else colors.get(kind, "tab:blue"))  # fmt: skip
        orig = next((r["ppl"] for r in here if r["kind"] == "original"), None)
        if orig:
            ax.axhline(orig * 1.05, color="grey", lw=0.8, ls="--")
            ax.text(150, orig * 1.05, "original +5%", fontsize=7, va="bottom", color="grey")
        ax.set_yscale("log")
        ax.set_xlabel("cache elements / token / layer (original GQA 384, MHA 1,152)")
        ax.set_ylabel(f"perplexity ({here[0]['tokens']:,} tokens, {here[0]['window']}-token windows)")
        ax.set_title(f"{text} (held out)", fontsize=10)
        ax.legend(fontsize=6, loc="upper right")
    if a.heal_log:
        ax = axes[-1]
        for spec, style in zip(a.heal_log, ("g.-", "c.-", "m.-", "y.-")):
            label, _, path = spec.rpartition("=")
            if Path(path).is_dir():  # a folder `mla-edge convert --heal-tokens` wrote: its marker holds the curve
                pts = json.loads((Path(path) / ".mla-edge-convert").read_text())["healed"]["curve"]["points"]
                xs, ys = [p["tokens"] / 1e6 for p in pts], [p["ppl"] for p in pts]
            else:  # the old recipe's heal_log.json
                pts = json.loads(Path(path).read_text())["points"]
                xs, ys = [p["tokens"] / 1e6 for p in pts], [float(np.exp(p["valid_ce"])) for p in pts]
            ax.plot(xs, ys, style, label=label or Path(path).name)
        ax.legend(fontsize=7)
        ax.set_xlabel("healing tokens (millions)")
        ax.set_ylabel("held-out perplexity (256-token windows)")
        ax.set_title("healing: recovery per token seen", fontsize=10)
    fig.suptitle("SmolLM2-135M-Instruct converted GQA -> MLA by mla-edge convert (hollow: quantized ONNX)", fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mla_edge.models.recipes.convert_study", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json shared by every model")
    s.add_argument("--text", action="append", required=True, metavar="NAME=FILE")
    s.add_argument("--model", action="append", required=True, metavar="LABEL=PATH:CACHE_ELEMENTS:KIND")
    s.add_argument("--tokens", type=int, default=8192)
    s.add_argument("--window", type=int, default=512)
    p = sub.add_parser("plot")
    p.add_argument("results", type=Path)
    p.add_argument("--heal-log", action="append", metavar="[LABEL=]PATH",
                   help="a healed model folder (mla-edge convert --heal-tokens) or an old heal_log.json")  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    return score(a) if a.cmd == "score" else plot(a)


if __name__ == "__main__":
    raise SystemExit(main())

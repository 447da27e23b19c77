"""`mla-edge parity`: PyTorch and every ONNX precision side by side on the same tokens.

Per precision: max |Δlogit| at the prefill and at each teacher-forced decode step, top-1 agreement, the first
step where free-running greedy decoding diverges from PyTorch, and perplexity on a text (so that the quality
cost of int8/int4 is one number). Also a left-padded batch of two prompts of different lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mla_edge.contract import positions_from_mask
from mla_edge.models.checkpoint import load_model
from mla_edge.models.mla import MLAForCausalLM, ModelOptions, empty_cache
from mla_edge.runtime.generate import left_pad
from mla_edge.runtime.sampling import perplexity
from mla_edge.runtime.session import LatentSession

DEFAULT_PROMPTS = ("The old house stood at the end of the lane, and", "She looked at him")


def _torch_step(
    model: MLAForCausalLM, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, cache: Any, logits_to_keep: int = 0
) -> tuple:
    with torch.inference_mode():
        logits, cache = model(torch.as_tensor(ids), torch.as_tensor(pos), torch.as_tensor(mask), cache, logits_to_keep)
    return logits.numpy(), cache


def torch_backend(model_dir: str | Path, threads: int) -> tuple[Callable, Callable, int]:
    """PyTorch eager fp32 (absorbed) as the benchmark's baseline: (step, empty_cache(batch), vocab size), where
    step(ids, mask, positions, cache) -> (numpy logits of the last position, cache), as the benchmark calls
    LatentSession.step."""
    torch.set_num_threads(threads)
    model = load_model(model_dir, ModelOptions(attention="absorbed"))
    return (
        lambda ids, mask, pos, cache: _torch_step(model, ids, mask, pos, cache, logits_to_keep=1),
        lambda batch: empty_cache(model.cfg, batch),
        model.cfg.vocab_size,
    )


def teacher_forced(
    model, sess: LatentSession, rows: list[list[int]], prompt_lens: list[int], steps: int, chunk: int | None = None
) -> dict:
    """Prefill each row's prompt (left-padded; optionally in chunks, so later chunks run with past > 0), then feed
    the true next tokens one at a time. Compares logits of real (unpadded) positions at every step."""
    width = max(prompt_lens)
    prompts, mask, _ = left_pad([r[:n] for r, n in zip(rows, prompt_lens)], pad_id=0)
    follow = np.asarray([r[n : n + steps] for r, n in zip(rows, prompt_lens)], np.int64)
    diffs, agree, total = [], 0, 0
    t_cache, o_cache = None, sess.empty_cache(len(rows))
    bounds = list(range(0, width, chunk or width)) + [width]
    for s0, s1 in zip(bounds[:-1], bounds[1:]):  # prefill, possibly chunked
        m = mask[:, :s1]
        pos = positions_from_mask(m, s1 - s0)
        t_logits, t_cache = _torch_step(model, prompts[:, s0:s1], m, pos, t_cache)
        o_logits, o_cache = sess.step(prompts[:, s0:s1], m, pos, o_cache)
        real = mask[:, s0:s1].astype(bool)
        d = np.abs(t_logits - o_logits)[real]
        diffs.append(float(d.max()) if d.size else 0.0)
        agree += int((t_logits.argmax(-1) == o_logits.argmax(-1))[real].sum())
        total += int(real.sum())
    for t in range(steps):
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], 1)
        pos = positions_from_mask(mask, 1)
        x = follow[:, t : t + 1]
        t_logits, t_cache = _torch_step(model, x, mask, pos, t_cache)
        o_logits, o_cache = sess.step(x, mask, pos, o_cache)
        diffs.append(float(np.abs(t_logits - o_logits).max()))
        agree += int((t_logits.argmax(-1) == o_logits.argmax(-1)).sum())
        total += len(rows)
    return {"max_abs_logit_diff_per_step": diffs, "max_abs_logit_diff": max(diffs), "top1_agreement": agree / total}


def greedy(model_or_sess, prompt: list[int], steps: int) -> list[int]:
    ids = np.asarray([prompt], np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(len(prompt), dtype=np.int64)[None]
    is_torch = isinstance(model_or_sess, torch.nn.Module)
    cache = None if is_torch else model_or_sess.empty_cache(1)
    out = []
    for _ in range(steps):
        if is_torch:
            logits, cache = _torch_step(model_or_sess, ids, mask, pos, cache)
        else:
            logits, cache = model_or_sess.step(ids, mask, pos, cache)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        ids = np.asarray([[nxt]], np.int64)
        pos = pos[:, -1:] + 1
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
    return out


def _graph_routes(graph: Path, session_feeds: list[dict]) -> list[np.ndarray]:
    """Run a copy of `graph` whose MoE/QMoE routing inputs are extra outputs (the copy sits in a temp folder beside
    hard links to the external data files, or else briefly beside the graph) on each feed; returns, per feed, the
    chosen experts (layers, tokens, E) as a bool array: the finite entries of log(weights)."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    from .onnx_graph import model_files

    proto = onnx.load(str(graph), load_external_data=False)
    routes = [n.input[1] for n in proto.graph.node if n.op_type in ("MoE", "QMoE")]
    proto.graph.output.extend(onnx.ValueInfoProto(name=r) for r in routes)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / graph.name
        try:  # hard links: onnxruntime refuses external data reached through a symlink out of the model's folder
            for name in model_files(graph)[1:]:
                os.link(graph.parent / name, Path(tmp) / name)
        except OSError:  # another filesystem: the copy sits beside the original for as long as it runs
            copy = graph.parent / f".router-check-{os.getpid()}.onnx"
        try:
            onnx.save_model(proto, str(copy))
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(copy), so, providers=["CPUExecutionProvider"])
        finally:
            if copy.parent == graph.parent:
                copy.unlink(missing_ok=True)
        out = []
        for feed in session_feeds:
            values = sess.run(routes, feed)
            out.append(np.stack([np.isfinite(v) for v in values]))
        return out


def router_agreement(model: MLAForCausalLM, sess: LatentSession, row: list[int], prompt_len: int, steps: int) -> dict:
    """Router fidelity: the experts each MoE layer chose in PyTorch and in the exported graph, on every token of a
    prefill and `steps` teacher-forced decode steps (both sides fed the same tokens and their own caches). Reports
    the tokens x layers that agree, and PyTorch's near-ties (k-th and k+1-th choice scores within 1e-6), where a
    different pick would be a tie-break, not an error."""
    from mla_edge.models.mla import MoE, Router

    chosen: list[torch.Tensor] = []
    margins: list[torch.Tensor] = []

    def record(module: Router, args: tuple, output: tuple) -> None:
        cfg = module.cfg
        mix, picks = output
        chosen.append(torch.zeros_like(mix, dtype=torch.bool).scatter(1, picks, True))
        logits = torch.nn.functional.linear(args[0].float(), module.weight.float())
        scores = (
            logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid() + module.e_score_correction_bias
        )
        top = scores.topk(min(cfg.num_experts_per_tok + 1, scores.shape[-1]), -1).values
        margins.append(top[:, -2] - top[:, -1])

    hooks = [m.gate.register_forward_hook(record) for m in model.modules() if isinstance(m, MoE)]
    if not hooks:
        return {}
    try:
        ids = np.asarray([row[: prompt_len + steps]], np.int64)
        feeds, cache, t_cache = [], sess.empty_cache(1), None
        spans = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, ids.shape[1])]
        for t0, t1 in spans:
            x, mask, pos = ids[:, t0:t1], np.ones((1, t1), np.int64), np.arange(t0, t1, dtype=np.int64)[None]
            feeds.append({"input_ids": x, "attention_mask": mask, "position_ids": pos, **cache})
            _, cache = sess.step(x, mask, pos, cache)
            _, t_cache = _torch_step(model, x, mask, pos, t_cache)
    finally:
        for h in hooks:
            h.remove()
    layers = len(hooks)
    want = torch.cat([torch.stack(chosen[i : i + layers]) for i in range(0, len(chosen), layers)], 1).numpy()
    margin = torch.cat([torch.stack(margins[i : i + layers]) for i in range(0, len(margins), layers)], 1).numpy()
    got = np.concatenate(
        _graph_routes(sess.manifest.model_path(sess.precision, verify=False), feeds), 1
    )  # (layers, tokens, E)
    same = (got == want).all(-1)
    k = model.cfg.num_experts_per_tok
    return {
        "layers": layers,
        "tokens": int(same.shape[1]),
        "agree": int(same.sum()),
        "total": int(same.size),
        "graph_picks_k": bool((got.sum(-1) == k).all()),
        "near_ties": int((margin <= 1e-6).sum()),
        "disagree_at_near_ties": int((~same & (margin <= 1e-6)).sum()),
    }


def run_parity(
    model_dir: str | Path,
    out_dir: str | Path,
    text: str | None = None,
    steps: int = 32,
    ppl_tokens: int = 4096,
    window: int = 256,
    precisions: list[str] | None = None,
    progress: bool = False,
) -> dict:
    """Compare PyTorch with every precision (or `precisions`) of the export; perplexity only when there is text and
    a tokenizer to read it (never on random ids)."""
    from tqdm import tqdm

    from mla_edge.runtime.manifest import Manifest

    manifest = Manifest.read(out_dir)
    sessions = {p: LatentSession(out_dir, p, "cpu") for p in (precisions or manifest.precisions)}
    # PyTorch keeps the same (possibly int8) cache as the export
    model = load_model(model_dir, ModelOptions(cache_dtype=manifest.data["cache"]["dtype"]))
    tok = None
    if manifest.tokenizer_path and manifest.tokenizer_path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(manifest.tokenizer_path))
    vocab = model.cfg.vocab_size
    rng = np.random.default_rng(0)
    if tok is None:
        text = None  # no tokenizer: ids are random, and a "text" perplexity of random ids would mean nothing
    if text and tok:
        stream = tok.encode(text).ids
    else:
        stream = rng.integers(0, vocab, size=max(ppl_tokens, 512)).tolist()
    if tok:
        prompts = [tok.encode(p).ids for p in DEFAULT_PROMPTS]
    else:
        prompts = [rng.integers(0, vocab, size=n).tolist() for n in (12, 5)]
    # teacher-forced continuations come from the text stream (or random ids) after each prompt
    rows = [p + stream[i * 97 : i * 97 + steps] for i, p in enumerate(prompts)]
    lens = [len(p) for p in prompts]
    ppl_ids = stream[:ppl_tokens]
    report: dict[str, Any] = {
        "model_dir": str(model_dir),
        "export_dir": str(out_dir),
        "steps": steps,
        "prompt_tokens": lens,
        "cache_dtype": model.options.cache_dtype,
        "text_tokens": len(ppl_ids) if text else 0,
        "precisions": {},
    }
    torch_greedy = greedy(model, prompts[0], steps)
    if text:
        report["torch_ppl"] = perplexity(
            lambda x: _torch_step(model, x, np.ones_like(x), np.arange(x.shape[1])[None], None)[0], ppl_ids, window
        )
    bar = tqdm(sessions.items(), desc="parity", disable=not progress, dynamic_ncols=True)
    for prec, sess in bar:
        bar.set_postfix_str(prec)
        one = teacher_forced(model, sess, rows[:1], lens[:1], steps)
        chunked = teacher_forced(model, sess, rows[:1], lens[:1], steps, chunk=max(2, lens[0] // 3))
        two = teacher_forced(model, sess, rows, lens, steps)
        ours = greedy(sess, prompts[0], steps)
        diverge = next((i for i, (a, b) in enumerate(zip(torch_greedy, ours)) if a != b), None)
        entry = {
            "batch1": one,
            "batch1_chunked_prefill": chunked,
            "batch2_left_padded": two,
            "max_abs_logit_diff": max(
                one["max_abs_logit_diff"], chunked["max_abs_logit_diff"], two["max_abs_logit_diff"]
            ),
            "top1_agreement": (one["top1_agreement"] + two["top1_agreement"]) / 2,
            "greedy_divergence_step": diverge,
            "greedy_identical": diverge is None,
            "file_bytes": manifest.data["files"][prec]["bytes"],
        }
        if model.cfg.is_moe:
            entry["router"] = router_agreement(model, sess, rows[0], lens[0], steps)
        if text:
            ppl = perplexity(
                lambda x: sess.step(x, np.ones_like(x), np.arange(x.shape[1])[None], sess.empty_cache(1))[0],
                ppl_ids,
                window,
            )
            entry["ppl"] = ppl
            entry["ppl_change_vs_torch"] = ppl / report["torch_ppl"] - 1
        report["precisions"][prec] = entry
    return report


def format_table(report: dict) -> str:
    lines = [f"parity: {report['model_dir']} vs {report['export_dir']} (prefill + {report['steps']} decode steps)"]
    head = f"  {'precision':9s} {'max|Δlogit|':>12s} {'top-1 agree':>12s} {'greedy diverges at':>19s} {'MB':>8s}"
    if "torch_ppl" in report:
        head += f" {'ppl':>9s} {'Δppl':>8s}"
        lines.append(
            f"  PyTorch fp32 ({report['cache_dtype']} cache) perplexity on {report['text_tokens']} text tokens: "
            f"{report['torch_ppl']:.3f}"
        )
    lines.append(head)
    for prec, e in report["precisions"].items():
        div = "never" if e["greedy_divergence_step"] is None else f"step {e['greedy_divergence_step']}"
        row = (
            f"  {prec:9s} {e['max_abs_logit_diff']:>12.2e} {e['top1_agreement']:>12.1%} {div:>19s} "
            f"{e['file_bytes'] / 1e6:>8.2f}"
        )
        if "ppl" in e:
            row += f" {e['ppl']:>9.3f} {e['ppl_change_vs_torch']:>+8.2%}"
        lines.append(row)
    for prec, e in report["precisions"].items():
        if r := e.get("router"):
            lines.append(
                f"  {prec} router: experts chosen as PyTorch chose on {r['agree']}/{r['total']} token-layers "
                f"({r['tokens']} tokens x {r['layers']} MoE layers); PyTorch near-ties {r['near_ties']}, "
                f"disagreements at them {r['disagree_at_near_ties']}"
            )
    return "\n".join(lines)

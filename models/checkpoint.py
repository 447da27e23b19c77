"""Hugging Face checkpoints: config.json + *.safetensors (single or sharded), HF DeepSeek tensor names.

Safetensors only, never pickle. Every error names the tensor or the config field.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mla_edge.contract import InputError

from .config import MLAConfig
from .mla import MLAForCausalLM, ModelOptions

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(InputError):
    """A checkpoint that does not match its config or cannot be read; the message names the tensor."""


def tensor_table(cfg: MLAConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The one name table: HF tensor name -> (shape, the config fields that set it)."""
    C, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    R, Dr, I = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.intermediate_size
    t = {"model.embed_tokens.weight": ((V, C), "vocab_size, hidden_size"), "model.norm.weight": ((C,), "hidden_size")}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = ((V, C), "vocab_size, hidden_size")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = ((C,), "hidden_size")
        t[p + "post_attention_layernorm.weight"] = ((C,), "hidden_size")
        a = p + "self_attn."
        if cfg.q_lora_rank is None:
            t[a + "q_proj.weight"] = (
                (H * cfg.qk_head_dim, C),
                "q_lora_rank=null, num_attention_heads, qk_nope_head_dim, qk_rope_head_dim",
            )
        else:
            Q = cfg.q_lora_rank
            t[a + "q_a_proj.weight"] = ((Q, C), "q_lora_rank, hidden_size")
            t[a + "q_a_layernorm.weight"] = ((Q,), "q_lora_rank")
            t[a + "q_b_proj.weight"] = (
                (H * cfg.qk_head_dim, Q),
                "num_attention_heads, qk_nope_head_dim, qk_rope_head_dim, q_lora_rank",
            )
            if cfg.attention_bias:
                t[a + "q_a_proj.bias"] = ((Q,), "attention_bias, q_lora_rank")
        t[a + "kv_a_proj_with_mqa.weight"] = ((R + Dr, C), "kv_lora_rank, qk_rope_head_dim, hidden_size")
        t[a + "kv_a_layernorm.weight"] = ((R,), "kv_lora_rank")
        t[a + "kv_b_proj.weight"] = (
            (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), R),
            "num_attention_heads, qk_nope_head_dim, v_head_dim, kv_lora_rank",
        )
        t[a + "o_proj.weight"] = ((C, H * cfg.v_head_dim), "hidden_size, num_attention_heads, v_head_dim")
        if cfg.attention_bias:
            t[a + "kv_a_proj_with_mqa.bias"] = ((R + Dr,), "attention_bias, kv_lora_rank, qk_rope_head_dim")
            t[a + "o_proj.bias"] = ((C,), "attention_bias, hidden_size")
        m = p + "mlp."
        if not cfg.moe_layer(i):
            t.update(_mlp_tensors(m, I, C, "intermediate_size"))
            continue
        E, M = cfg.n_routed_experts, cfg.moe_intermediate_size
        t[m + "gate.weight"] = ((E, C), "n_routed_experts, hidden_size")
        if cfg.topk_method == "noaux_tc":
            t[m + "gate.e_score_correction_bias"] = ((E,), "n_routed_experts, topk_method=noaux_tc")
        if cfg.post_mlp_norm:
            t[p + "post_mlp_layernorm.weight"] = ((C,), "hidden_size, model_type=axk1")
        for j in range(E):
            t.update(_mlp_tensors(f"{m}experts.{j}.", M, C, "moe_intermediate_size"))
        if cfg.n_shared_experts:
            t.update(
                _mlp_tensors(
                    m + "shared_experts.", M * cfg.n_shared_experts, C, "moe_intermediate_size x n_shared_experts"
                )
            )
    return t


def _mlp_tensors(prefix: str, inter: int, C: int, field: str) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        prefix + "gate_proj.weight": ((inter, C), f"{field}, hidden_size"),
        prefix + "up_proj.weight": ((inter, C), f"{field}, hidden_size"),
        prefix + "down_proj.weight": ((C, inter), f"hidden_size, {field}"),
    }


def _ignorable(name: str, cfg: MLAConfig) -> bool:
    """Tensors a real checkpoint may carry that the dense decoder does not use."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if cfg.post_mlp_norm and name.endswith(".post_mlp_layernorm.weight"):
        layer = name.split(".")[2]  # A.X-K1's released checkpoints hold it for the dense layers too, unused
        return layer.isdigit() and int(layer) < cfg.num_hidden_layers and not cfg.moe_layer(int(layer))
    if ".mlp.shared_experts." in name and cfg.is_moe and not cfg.n_shared_experts:
        return True  # transformers writes empty shared experts when n_shared_experts is 0
    if name.startswith("model.layers.") and cfg.extra.get("num_nextn_predict_layers"):
        idx = name.split(".")[2]
        return idx.isdigit() and int(idx) >= cfg.num_hidden_layers  # DeepSeek-V3 multi-token-prediction layers
    return False


def _stacked_experts(files: dict[str, Path], cfg: MLAConfig) -> dict[str, str]:
    """transformers 5 writes some types' experts stacked (Mistral 4: mlp.experts.gate_up_proj (E, 2I, C) with gate
    rows first, mlp.experts.down_proj (E, C, I)): per-expert name -> the stacked tensor that holds it."""
    out = {}
    for i in range(cfg.num_hidden_layers):
        m = f"model.layers.{i}.mlp.experts."
        if cfg.moe_layer(i) and m + "gate_up_proj" in files and m + "down_proj" in files:
            for j in range(cfg.n_routed_experts):
                out[f"{m}{j}.gate_proj.weight"] = out[f"{m}{j}.up_proj.weight"] = m + "gate_up_proj"
                out[f"{m}{j}.down_proj.weight"] = m + "down_proj"
    return out


def _expert_slice(whole: torch.Tensor, name: str, src: str) -> torch.Tensor:
    j = int(name.split(".")[-3])
    if j >= whole.shape[0]:
        raise CheckpointError(f"tensor {src!r} holds {whole.shape[0]} experts; the config asks for more")
    if src.endswith("down_proj"):
        return whole[j]
    half = whole.shape[1] // 2
    return whole[j, :half] if name.endswith("gate_proj.weight") else whole[j, half:]


def _shard_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index (sharded) or the single file's header."""
    from safetensors import safe_open

    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = {n: model_dir / f for n, f in weight_map.items()}
        for n, f in files.items():
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} (holding tensor {n!r}) listed in {INDEX_FILE} is missing")
        return files
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = (
            f" (found {', '.join(pickles)}: pickle checkpoints are never loaded; convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True))"
            if pickles
            else ""
        )
        raise CheckpointError(f"no *.safetensors weights in {model_dir}{hint}")
    files = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                files.update({n: shard for n in f.keys()})
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{shard} is not a readable safetensors file: {e}") from None
    return files


def read_state_dict(
    model_dir: str | Path, cfg: MLAConfig, dtype: torch.dtype | None = torch.float32
) -> dict[str, torch.Tensor]:
    """Read and validate every tensor the config implies (memory-mapped by safetensors, each tensor read once and
    converted as it is read; dtype None keeps the stored dtype); errors name the tensor and the config fields."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    table = tensor_table(cfg)
    files = _shard_files(model_dir)
    stacked = _stacked_experts(files, cfg)
    present = {n for n in files if not _ignorable(n, cfg)} - set(stacked.values()) | set(stacked)
    missing = [n for n in table if n not in present]
    unexpected = sorted(present - set(table))
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # some exporters write the tied copy too
    if missing or unexpected:
        hints = []
        if cfg.q_lora_rank is None and any(".q_a_proj." in n for n in unexpected):
            hints.append(
                "config says q_lora_rank=null but the weights have q_a_proj/q_b_proj: config contradicts weights"
            )
        if cfg.q_lora_rank is not None and any(".q_proj." in n for n in unexpected):
            hints.append(
                f"config says q_lora_rank={cfg.q_lora_rank} but the weights have q_proj: config contradicts weights"
            )
        if "lm_head.weight" in missing:
            hints.append("lm_head.weight is missing: should tie_word_embeddings be true?")
        if any(".mlp.experts." in n or ".mlp.gate." in n for n in unexpected):
            hints.append("the weights hold MoE experts but the config is dense")
        parts = []
        if missing:
            parts.append(
                f"missing tensors ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )
        if unexpected:
            parts.append(
                f"unexpected tensors ({len(unexpected)}): "
                f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
            )
        raise CheckpointError(f"checkpoint {model_dir} does not match its config: " + "; ".join(parts + hints))

    by_file: dict[Path, list[str]] = {}
    for n in table:
        by_file.setdefault(files[stacked.get(n, n)], []).append(n)
    state = {}
    for path, names in by_file.items():
        try:
            with _interrupts_kept() as interrupted, safe_open(str(path), framework="pt") as f:
                whole: dict[str, torch.Tensor] = {}  # stacked expert tensors, read once per file
                for n in names:
                    if n in stacked:
                        src = stacked[n]
                        if src not in whole:
                            whole[src] = f.get_tensor(src)
                        t = _expert_slice(whole[src], n, src)
                    else:
                        t = f.get_tensor(n)
                    shape, fields = table[n]
                    if tuple(t.shape) != shape:
                        raise CheckpointError(
                            f"tensor {n!r} has shape {tuple(t.shape)} but the config ({fields}) implies {shape}: "
                            "config contradicts weights"
                        )
                    if not t.is_floating_point():
                        raise CheckpointError(f"tensor {n!r} has dtype {t.dtype}; expected a float tensor")
                    state[n] = t if dtype is None else t.to(dtype)
            if interrupted:  # a signal whose exception torch's C code swallowed outright: raise it now (its handler
                interrupted[0]()  # has already run once, so the export would otherwise go on with SIGTERM ignored)
        except CheckpointError:
            raise
        except Exception as e:
            if interrupted:  # torch's C code turned the KeyboardInterrupt into an error of its own: raise it again
                interrupted[0]()
            raise CheckpointError(f"cannot read {path.name}: {e}") from None
    return state


@contextlib.contextmanager
def signal_handlers(make: Callable[[signal.Signals, Any], Any]) -> Iterator[None]:
    """SIGINT and SIGTERM handled by make(signum, previous handler) while the block runs (None: left as they are),
    in the main thread only (elsewhere Python allows no handlers); the previous handlers are restored after."""
    saved: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(signum)
            handler = make(signum, previous)
            if handler is not None:
                saved[signum] = previous
                signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


@contextlib.contextmanager
def _interrupts_kept() -> Iterator[list[Callable[[], None]]]:
    """Ctrl-C or SIGTERM while torch reads a tensor: its handler's exception may surface inside torch's C code as a
    TypeError about storages. This notes the signal, so the reader can raise the interrupt instead of a read error."""
    seen: list[Callable[[], None]] = []

    def noting(signum: signal.Signals, previous: Any) -> Any:
        if not callable(previous):
            return None

        def note(n: int, frame: Any) -> None:
            seen.append(lambda: previous(n, None))
            previous(n, frame)

        return note

    with signal_handlers(noting):
        yield seen


def load_model(
    model_dir: str | Path, options: ModelOptions = ModelOptions(), dtype: torch.dtype | None = torch.float32
) -> MLAForCausalLM:
    """config.json + safetensors -> MLAForCausalLM in eval mode, computing as `options` say.

    The model is built on the meta device and the tensors read from the checkpoint become its parameters
    (assign): the weights are in memory once, never as a state dict plus a model. dtype None keeps the checkpoint's
    dtype (bf16 stays bf16); export asks for fp32, converted tensor by tensor as it is read."""
    cfg = MLAConfig.from_pretrained(model_dir)
    state = read_state_dict(model_dir, cfg, dtype)
    with torch.device("meta"):
        model = MLAForCausalLM(cfg, options)
    model.init_rope()  # not in checkpoints: computed on the CPU
    if cfg.tie_word_embeddings and not options.graph_weights:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings and not options.graph_weights:
        model.lm_head.weight = model.model.embed_tokens.weight  # tied again: assign bound two Parameters
    del state
    if options.moe_op:
        model.stack_experts()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint {model_dir} left tensors unset: {', '.join(left[:8])}")
    return model.eval()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderRaceError(InputError):
    """The output folder changed under a run (another process made or replaced it): nothing of it was touched."""


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux's renameat2 (atomic no-replace / exchange); False where this system has no such call."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # no renameat2, or a filesystem without these flags
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which folder this is: device, inode, and change time (an inode number is reused by a folder made after
    another was deleted; the change time also moves when anything is added to or removed from it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _raced(out_dir: Path) -> FolderRaceError:
    return FolderRaceError(
        f"{out_dir} was created or replaced by someone else while this run wrote it: left untouched, nothing written"
    )


def _publish(tmp: Path, out_dir: Path, found: tuple[int, int, int] | None) -> None:
    """Move tmp to out_dir, replacing only the folder that was there when the run began (`found`, its identity):
    never one that appeared, or was swapped in, meanwhile. Atomic where the system has renameat2."""
    if found is None:  # nothing to replace: a folder that appears meanwhile is someone else's
        try:
            if _renameat2(tmp, out_dir, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            raise _raced(out_dir) from None
        if out_dir.exists():
            raise _raced(out_dir)
        os.rename(tmp, out_dir)
        return
    if _identity(out_dir) != found:
        raise _raced(out_dir)
    if _renameat2(tmp, out_dir, _RENAME_EXCHANGE):  # tmp now holds what was at out_dir
        moved = _identity(tmp)  # a rename moves the change time: compare device and inode only
        if moved is None or moved[:2] != found[:2]:  # swapped in between the check and the exchange: put it back
            _renameat2(tmp, out_dir, _RENAME_EXCHANGE)
            raise _raced(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside out_dir; when the block succeeds it becomes out_dir in one rename, and when
    it fails nothing of it is left. Callers decide, before entering, whether an existing out_dir may be replaced: only
    that folder (the one there on entry) is; a folder that appears at out_dir while the block runs, or replaces the
    one that was there, is never touched, and the run fails with one line (FolderRaceError). Temp and backup folders
    that a killed run left behind (their process is gone) are removed first."""
    # one name per run, even two runs of one process (threads): .NAME.tmpXXXXXX-PID
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{secrets.token_hex(3)}-{os.getpid()}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise PermissionError(f"cannot write beside {out_dir}: {e.strerror}") from None
    for stale in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        kind, _, pid = stale.name[len(out_dir.name) + 2 :].rpartition("-")
        if kind.startswith(("tmp", "old")) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    found = _identity(out_dir)
    try:
        yield tmp
        _publish(tmp, out_dir, found)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(
    model: MLAForCausalLM,
    out_dir: str | Path,
    dtype: str = "fp32",
    max_shard_bytes: int | None = None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write config.json + safetensors (sharded with an index past max_shard_bytes) atomically (see atomic_folder)."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    table = tensor_table(model.cfg)
    sd = model.state_dict()
    tensors = {n: sd[n].detach().to(DTYPES[dtype]).contiguous() for n in table}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for n, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][n] = t
        size += nbytes
    with atomic_folder(out_dir) as tmp:
        cfg_dict = model.cfg.to_dict()
        cfg_dict["torch_dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX_FILE).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return out_dir

"""Loading and saving real HF-format checkpoints, and the errors that name what is wrong."""

import json

import pytest
import torch
from conftest import hf_model, save_hf
from safetensors.torch import load_file, save_file

from mla_edge.models.checkpoint import DTYPES, CheckpointError, load_model, save_model
from mla_edge.models.config import ConfigError, MLAConfig

IDS = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS)[0]


def test_sharded_checkpoint_loads(tmp_path):
    ref = hf_model(q_lora_rank=12)
    save_hf(ref, tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
    assert (logits(load_model(tmp_path / "sharded")) - want).abs().max() <= 1e-4


def test_tied_embeddings(tmp_path):
    save_hf(hf_model(tie=True), tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    m = load_model(tmp_path / "tied")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_bf16_stays_bf16_and_weights_are_held_once(tmp_path, tiny_ckpt):
    """dtype=None keeps the stored dtype; the parameters are the tensors read from the file (assigned, not copied
    into a second set), and nothing is left on the meta device."""
    out = save_model(load_model(tiny_ckpt), tmp_path / "bf16", dtype="bf16")
    kept = load_model(out, dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert not any(t.is_meta for t in [*kept.parameters(), *kept.buffers()])
    assert {p.dtype for p in load_model(out).parameters()} == {torch.float32}
    m = load_model(tiny_ckpt)
    ptrs = [p.data_ptr() for p in m.parameters()]
    assert len(set(ptrs)) == len(ptrs)  # every parameter its own tensor (tied ones are one parameter)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_save_roundtrip_in_each_dtype(tmp_path, tiny_ckpt, dtype):
    m = load_model(tiny_ckpt)
    out = save_model(m, tmp_path / f"out-{dtype}", dtype=dtype)
    stored = load_file(out / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {DTYPES[dtype]}
    back = load_model(out)
    assert back.cfg == m.cfg
    tol = 1e-6 if dtype == "fp32" else 0.1  # half precision weights, fp32 compute
    assert (logits(back) - logits(m)).abs().max() <= tol
    assert not list(tmp_path.glob(".out-*")), "temp dir left behind"


def test_save_sharded_roundtrip(tmp_path, tiny_ckpt):
    m = load_model(tiny_ckpt)
    out = save_model(m, tmp_path / "sh", max_shard_bytes=30_000)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert (logits(load_model(out)) - logits(m)).abs().max() == 0


def test_transformers_reads_what_we_save(tmp_path, tiny_ckpt):
    import transformers as tf

    m = load_model(tiny_ckpt)
    out = save_model(m, tmp_path / "ours")
    ref = tf.DeepseekV3ForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    with torch.no_grad():
        assert (ref(input_ids=IDS).logits - logits(m)).abs().max() <= 1e-4


def _rewrite(ckpt, edit):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(tiny_ckpt):
    _rewrite(tiny_ckpt, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        load_model(tiny_ckpt)


def test_unexpected_tensor_is_named(tiny_ckpt):
    _rewrite(tiny_ckpt, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*model\.layers\.0\.mlp\.extra\.weight"):
        load_model(tiny_ckpt)


def test_shape_mismatch_names_tensor_and_fields(tiny_ckpt):
    cfg_path = tiny_ckpt / "config.json"
    d = json.loads(cfg_path.read_text())
    d["kv_lora_rank"] = 24
    cfg_path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"kv_a_proj_with_mqa\.weight.*kv_lora_rank.*contradicts"):
        load_model(tiny_ckpt)


def test_q_lora_contradiction_is_explained(tiny_ckpt):
    cfg_path = tiny_ckpt / "config.json"
    d = json.loads(cfg_path.read_text())
    d["q_lora_rank"] = None
    cfg_path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"q_lora_rank=null but the weights have q_a_proj"):
        load_model(tiny_ckpt)


def test_corrupt_safetensors(tiny_ckpt):
    (tiny_ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        load_model(tiny_ckpt)


def test_pickle_only_folder_is_refused(tmp_path, tiny_ckpt):
    (tiny_ckpt / "model.safetensors").unlink()
    (tiny_ckpt / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin: pickle checkpoints are never loaded.*safe_serialization=True"
    ):
        load_model(tiny_ckpt)


def test_missing_shard_is_named(tmp_path):
    save_hf(hf_model(), tmp_path / "sh", max_shard_size="20KB")
    victim = sorted((tmp_path / "sh").glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(tmp_path / "sh")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.pop("kv_lora_rank"), r"'kv_lora_rank' is missing"),
        (lambda d: d.update(hidden_size=-3), r"'hidden_size' must be a positive integer"),
        (lambda d: d.update(model_type="llama"), r"model_type 'llama' is not an MLA model"),
        (
            lambda d: d.update(first_k_dense_replace=1, n_routed_experts=8, topk_method="sparse", n_group=1),
            r"'topk_method' is 'sparse'",
        ),
        (lambda d: d.update(hidden_act="gelu"), r"'hidden_act'"),
        (
            lambda d: d.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
            r"longrope\) needs original_max_position_embeddings",
        ),
        (
            lambda d: d.update(
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "original_max_position_embeddings": 16,
                    "long_factor": [1, 2],
                }
            ),
            r"longrope\) field 'short_factor' must list 4 positive numbers",
        ),
        (lambda d: d.update(qk_rope_head_dim=7), r"'qk_rope_head_dim' must be even"),
    ],
)
def test_bad_config_names_the_field(tiny_ckpt, edit, match):
    d = json.loads((tiny_ckpt / "config.json").read_text())
    edit(d)
    (tiny_ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match):
        MLAConfig.from_pretrained(tiny_ckpt)


def test_no_config_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        MLAConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MLAConfig.from_pretrained(tmp_path)


def test_legacy_rope_scaling_fields_map():
    """Real DeepSeek-V2/V3 config.json files use top-level rope_theta and rope_scaling with 'type'."""
    base = json.loads(
        json.dumps(
            dict(
                model_type="deepseek_v2",
                vocab_size=10,
                hidden_size=8,
                intermediate_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
                kv_lora_rank=4,
                qk_nope_head_dim=2,
                qk_rope_head_dim=2,
                v_head_dim=2,
                first_k_dense_replace=1,
                n_routed_experts=64,
            )
        )
    )
    cfg = MLAConfig.from_dict(
        {
            **base,
            "rope_theta": 5e4,
            "rope_scaling": {
                "type": "yarn",
                "factor": 40,
                "original_max_position_embeddings": 4096,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        }
    )
    assert cfg.rope_theta == 5e4 and cfg.rope_scaling.factor == 40 and cfg.rope_scaling.mscale_all_dim == 0.707
    assert cfg.softmax_scale == pytest.approx(4**-0.5 * (0.1 * 0.707 * __import__("math").log(40) + 1) ** 2)
    assert MLAConfig.from_dict(cfg.to_dict()) == cfg


def test_ctrl_c_while_a_tensor_is_read_stays_an_interrupt(tiny_ckpt, monkeypatch):
    """Ctrl-C during a read can surface inside torch's C code as a TypeError about storages (seen on SmolLM2's
    safetensors: `mla-edge export` then said "cannot read model.safetensors", exit 2); it must stay an interrupt."""
    import os
    import signal
    import time

    import safetensors

    real = safetensors.safe_open

    class Swallowing:  # what torch did: the handler's KeyboardInterrupt caught in C, another error raised
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                raise TypeError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
            raise AssertionError("no SIGINT arrived")

    monkeypatch.setattr(safetensors, "safe_open", Swallowing)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Python starts
    try:
        with pytest.raises(KeyboardInterrupt):
            load_model(tiny_ckpt)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the reader's handler is gone again
    finally:
        signal.signal(signal.SIGINT, handler)

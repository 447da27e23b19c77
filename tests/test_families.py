"""The MLA family: every model type in transformers with `kv_lora_rank` is supported (and exact) or refused in one
line, and the table that says which is complete.

Every supported type is checked against transformers' own class on a tiny seeded checkpoint with rms_norm_eps 1e-5
and a small latent (the regime where the latent norms' eps shows), MoE where the type has it: our PyTorch model in
both attention forms and our fp32 ONNX graph over a prefill plus 16 cached decode steps, and the static graphs'
greedy tokens against the dynamic graph's."""

from __future__ import annotations

import json
import subprocess
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY, family_model, save_hf

from mla_edge.models.checkpoint import CheckpointError, load_model
from mla_edge.models.config import ConfigError, MLAConfig
from mla_edge.models.families import FAMILIES, SUPPORTED_MODEL_TYPES, markdown_table
from mla_edge.models.mla import ModelOptions

PREFILL, DECODE = 12, 16


def mla_types_in_transformers() -> set[str]:
    """Every model type whose transformers config (or its text config) has kv_lora_rank."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    transformers.logging.set_verbosity_error()
    found = set()
    for mt in CONFIG_MAPPING.keys():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = CONFIG_MAPPING[mt]()
        except Exception:  # a config class that needs arguments cannot be an MLA text model we would miss:
            continue  # every MLA config in transformers builds with its defaults (checked by the count below)
        for c in (cfg, getattr(cfg, "text_config", None)):
            if c is not None and "kv_lora_rank" in c.to_dict():
                found.add(mt)
    return found


def reference_logits(ref, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(input_ids=ids).logits


def cached_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Our PyTorch model: a prefill of PREFILL tokens, then one token at a time through the latent cache."""
    with torch.no_grad():
        out, cache = model(ids[:, :PREFILL])
        rows = [out]
        for t in range(PREFILL, ids.shape[1]):
            step, cache = model(ids[:, t : t + 1], cache=cache)
            rows.append(step)
    return torch.cat(rows, dim=1)


def session_logits(sess, ids: np.ndarray) -> np.ndarray:
    """Our ONNX graph, the same way."""
    cache = sess.empty_cache(ids.shape[0])
    rows = []
    for start, stop in [(0, PREFILL), *((t, t + 1) for t in range(PREFILL, ids.shape[1]))]:
        mask = np.ones((ids.shape[0], stop), np.int64)
        pos = np.broadcast_to(np.arange(start, stop), (ids.shape[0], stop - start))
        out, cache = sess.step(ids[:, start:stop], mask, pos, cache)
        rows.append(out)
    return np.concatenate(rows, axis=1)


def test_every_mla_type_in_transformers_is_supported_or_refused():
    """A transformers release with a new MLA type fails this until families.py says what we do with it."""
    found = mla_types_in_transformers()
    assert len(found) >= 18, sorted(found)  # transformers 5.25 has 24 (wrappers and their text configs included)
    missing = sorted(found - set(FAMILIES))
    assert not missing, f"MLA model types in transformers that families.py does not name: {missing}"
    stale = sorted(set(FAMILIES) - found)
    assert not stale, f"families.py names types transformers does not have: {stale}"
    for mt, fam in FAMILIES.items():
        assert fam.note and fam.example and "\n" not in fam.note
        if not fam.supported:
            with pytest.raises(ConfigError) as e:
                MLAConfig.from_dict({"model_type": mt})
            assert fam.note in str(e.value) and "\n" not in str(e.value)


def test_refused_type_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kimi_linear", "kv_lora_rank": 512}))
    r = subprocess.run(["mla-edge", "info", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "linear-attention" in r.stderr, r.stderr


@pytest.mark.parametrize("kind", SUPPORTED_MODEL_TYPES)
def test_defaults_are_transformers_class_defaults(kind):
    """A config.json that leaves a field out means transformers' class default for that type."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    ref = tf.AutoConfig.for_model(kind, num_hidden_layers=4)
    for k, v in FAMILIES[kind].defaults.items():
        if k == "rope_parameters":
            got = {key: ref.rope_parameters.get(key) for key in v}
            assert got == v, (kind, k)
        else:
            assert getattr(ref, k) == v, (kind, k, getattr(ref, k), v)


@pytest.mark.parametrize("kind", SUPPORTED_MODEL_TYPES)
def test_config_round_trips_and_transformers_reads_what_we_write(tmp_path, kind):
    import transformers as tf

    save_hf(family_model(kind), tmp_path / "m")
    cfg = MLAConfig.from_pretrained(tmp_path / "m")
    assert MLAConfig.from_dict(cfg.to_dict()) == cfg
    back = tf.AutoConfig.for_model(kind, **{k: v for k, v in cfg.to_dict().items() if k != "model_type"})
    assert MLAConfig.from_dict(back.to_dict()) == cfg


def test_readme_model_table_is_the_generated_one():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "README's model table is stale: python -m mla_edge.models.families --markdown"


@pytest.mark.parametrize("kind", SUPPORTED_MODEL_TYPES)
def test_family_equals_transformers(tmp_path, kind):
    """transformers' class = our PyTorch model (naive and absorbed) = our fp32 ONNX, over a prefill and 16 cached
    decode steps, with rms_norm_eps 1e-5 and a small latent; the static graphs give the dynamic graph's tokens."""
    from mla_edge.export.pipeline import ExportOptions, export_folder
    from mla_edge.runtime.generate import Generator
    from mla_edge.runtime.session import LatentSession

    ref = family_model(kind)
    save_hf(ref, tmp_path / "m")
    ids = torch.randint(3, TINY["vocab_size"], (2, PREFILL + DECODE), generator=torch.Generator().manual_seed(1))
    want = reference_logits(ref, ids)
    assert want.abs().max() > 0.5, "reference logits too small for the comparison to mean anything"
    for attention in ("naive", "absorbed"):
        ours = load_model(tmp_path / "m", ModelOptions(attention=attention))
        assert ours.cfg.model_type == kind and ours.cfg.rms_norm_eps == 1e-5
        diff = (cached_logits(ours, ids) - want).abs().max().item()
        assert diff <= 1e-4, (kind, attention, diff)
    static = 16 if kind == "mistral4" else 48  # mistral4: the static graphs stop where its query scaling steps up
    opts = ExportOptions(
        quantize=("int8", "int4"),
        progress=False,
        require_tokenizer=False,
        cache_dtype="fp32",
        static_cache=static,
        static_chunk=4,
        ort_format=False,
    )
    export_folder(tmp_path / "m", tmp_path / "out", opts)
    got = session_logits(LatentSession(tmp_path / "out", "fp32", "cpu"), ids.numpy())
    assert np.abs(got - want.numpy()).max() <= 1e-4, kind
    for precision in ("int8", "int4"):  # random weights: quantized logits are reported by `parity`, not judged here
        q = session_logits(LatentSession(tmp_path / "out", precision, "cpu"), ids.numpy())
        assert np.isfinite(q).all() and (q.argmax(-1) == want.numpy().argmax(-1)).mean() > 0.5, (kind, precision)
    info = subprocess.run(["mla-edge", "info", str(tmp_path / "m"), "--json"], capture_output=True, text=True)
    assert json.loads(info.stdout)["config"]["model_type"] == kind, info.stderr
    budget = subprocess.run(
        ["mla-edge", "budget", str(tmp_path / "out"), "--memory", "512MB", "--json"], capture_output=True, text=True
    )
    assert budget.returncode == 0 and json.loads(budget.stdout), budget.stderr
    prompt = ids[0, :5].tolist()
    tokens = [
        Generator(tmp_path / "out", "fp32", "cpu", protocol=p).generate_ids([prompt], max_new_tokens=10, eos=False)[0]
        for p in ("dynamic", "static")
    ]
    assert tokens[0].token_ids == tokens[1].token_ids and len(tokens[0].token_ids) == 10


@pytest.mark.parametrize("kind", ["deepseek_v3", "glm4_moe_lite", "minicpm3"])
def test_latent_norms_use_eps_1e6_whatever_rms_norm_eps_says(tmp_path, kind):
    """The fidelity bug: with rms_norm_eps 1e-5 and a small latent, using rms_norm_eps in q_a/kv_a norms is far from
    transformers (which builds them with eps 1e-6); our model must not be."""
    ref = family_model(kind, latent_scale=0.01)
    save_hf(ref, tmp_path / "m")
    ids = torch.randint(3, TINY["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(2))
    want = reference_logits(ref, ids)
    ours = load_model(tmp_path / "m")
    with torch.no_grad():
        assert (ours(ids)[0] - want).abs().max().item() <= 1e-4
        for m in ours.modules():  # the old semantics, for contrast: visibly wrong here
            if m.__class__.__name__ == "MLAttention":
                m.kv_a_layernorm.eps = 1e-5
                if hasattr(m, "q_a_layernorm"):
                    m.q_a_layernorm.eps = 1e-5
        assert (ours(ids)[0] - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("kind", [k for k in SUPPORTED_MODEL_TYPES if k not in ("deepseek_v2", "deepseek_v3")])
def test_config_that_contradicts_its_tensors_is_one_line(tmp_path, kind):
    save_hf(family_model(kind), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["kv_lora_rank"] = 20
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="kv_a_proj_with_mqa.*config contradicts weights") as e:
        load_model(tmp_path / "m")
    assert "\n" not in str(e.value)
    r = subprocess.run(
        ["mla-edge", "export", str(tmp_path / "m"), "-o", str(tmp_path / "out"), "--no-tokenizer"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "kv_lora_rank" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_type_specific_semantics_are_what_the_checkpoint_says(tmp_path):
    """A.X-K1's post-MoE norm, GLM's per-layer MoE list and Mistral 4's query scaling all change the logits: planting
    each one away breaks parity (so the parity tests above cannot pass without them)."""
    for kind, plant in [
        ("axk1", lambda m: [delattr(layer, "post_mlp_layernorm") for layer in m.model.layers[1:]]),
        ("mistral4", lambda m: object.__setattr__(m.cfg, "attn_scale_beta", None)),
        ("mistral4", lambda m: object.__setattr__(m.cfg, "norm_topk_prob", False)),
        ("deepseek_v2", lambda m: object.__setattr__(m.cfg, "norm_topk_prob", True)),
    ]:
        ref = family_model(kind)
        save_hf(ref, tmp_path / kind)
        ids = torch.randint(3, TINY["vocab_size"], (1, 28), generator=torch.Generator().manual_seed(3))
        want = reference_logits(ref, ids)
        ours = load_model(tmp_path / kind)
        with torch.no_grad():
            assert (ours(ids)[0] - want).abs().max().item() <= 1e-4, kind
            plant(ours)
            assert (ours(ids)[0] - want).abs().max().item() > 1e-3, kind
    glm = json.loads((tmp_path / "axk1" / "config.json").read_text())
    assert glm["mlp_layer_types"] == ["dense", "sparse"]
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        MLAConfig.from_dict({**glm, "mlp_layer_types": ["dense", "moe"]})


def test_mistral4_static_export_past_its_query_scaling_step_is_refused(tmp_path):
    from mla_edge.export.pipeline import ExportError, ExportOptions, export_folder

    save_hf(family_model("mistral4"), tmp_path / "m")
    opts = ExportOptions(quantize=(), progress=False, require_tokenizer=False, static_cache=32, static_chunk=4)
    with pytest.raises(ExportError, match="query scaling step at 16 tokens"):
        export_folder(tmp_path / "m", tmp_path / "out", opts)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", SUPPORTED_MODEL_TYPES)
def test_gguf_is_written_where_llama_cpp_has_the_architecture_and_refused_where_not(tmp_path, capsys, kind):
    """--format gguf: llama.cpp's deepseek2 for the types it runs that way, one line and exit 2 (no output folder)
    for the rest. The latent rows are scaled so that llama.cpp's rms_norm_eps (1e-5 here) acts as our 1e-6."""
    import gguf
    from conftest import make_tokenizer
    from safetensors.torch import load_file

    from mla_edge.cli import main

    over = dict(topk_method="greedy", n_group=1) if kind == "deepseek_v2" else {}  # llama.cpp: no max-score groups
    save_hf(family_model(kind, vocab_size=320, **over), tmp_path / "m")
    make_tokenizer(tmp_path / "m" / "tokenizer.json", 320)
    argv = ["export", str(tmp_path / "m"), "-o", str(tmp_path / "out"), "--quantize", "none"]
    capsys.readouterr()  # save_pretrained's progress bar
    if not FAMILIES[kind].gguf:  # the GGUF alone (the CLI's --format gguf also exports ONNX: slow, tested elsewhere)
        from mla_edge.export.gguf_file import write_gguf

        (tmp_path / "out").mkdir()
        write_gguf(tmp_path / "m", tmp_path / "out" / "model.f32.gguf", "f32")
        code = 0
    else:
        code = main([*argv, "--format", "gguf", "--gguf-type", "f32"])
    if FAMILIES[kind].gguf:
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and not (tmp_path / "out").exists() and len(err) == 1 and FAMILIES[kind].gguf in err[0]
        return
    assert code == 0
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model.f32.gguf"))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "deepseek2"
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    kv_a = state["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].numpy()
    R = TINY["kv_lora_rank"]
    np.testing.assert_allclose(tensors["blk.0.attn_kv_a_mqa.weight"][:R], kv_a[:R] * np.sqrt(10), rtol=1e-6)

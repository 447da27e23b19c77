"""The training script: resumable to the same weights, clear errors for a bad corpus, a loadable HF checkpoint."""

import json
import lzma

import pytest
import torch
from conftest import TOKENIZER_TEXT
from safetensors.torch import load_file

from mla_edge.models.checkpoint import load_model
from mla_edge.models.recipes.train import main as train

TINY_ARCH = {
    "model_type": "deepseek_v3",
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "rope_interleave": False,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "first_k_dense_replace": 2,
}


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for split, n in (("train", 12), ("valid", 6)):
        with lzma.open(d / f"{split}.txt.xz", "wt", encoding="utf-8") as f:
            f.write("\n<|endoftext|>\n".join([TOKENIZER_TEXT] * n))
    cfg = tmp_path / "arch.json"
    cfg.write_text(json.dumps(TINY_ARCH))
    return d, cfg


def run(corpus, out, tokens, *extra):
    d, cfg = corpus
    return train(
        [
            "--data",
            str(d),
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--tokens",
            str(tokens),
            "--batch",
            "4",
            "--seq",
            "32",
            "--eval-every",
            "4",
            "--eval-batches",
            "1",
            "--final-eval-batches",
            "2",
            "--threads",
            "1",
            "--save-dtype",
            "fp32",
            *extra,
        ]
    )


def test_resume_gives_the_same_weights_as_one_run(corpus, tmp_path):
    assert run(corpus, tmp_path / "straight", 8 * 128) == 0
    assert run(corpus, tmp_path / "resumed", 4 * 128) == 0  # 4 steps, then stop
    state = json.loads((tmp_path / "resumed" / "train_state" / "state.json").read_text())
    assert state["step"] == 4
    assert run(corpus, tmp_path / "resumed", 8 * 128, "--resume") == 0  # carry on to 8
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((tmp_path / "resumed" / "train_log.json").read_text())
    assert log["tokens_seen"] == 8 * 128 and log["val_ppl"] > 1 and [e["step"] for e in log["evals"]] == [4, 8]


def test_output_is_a_loadable_checkpoint_with_tokenizer(corpus, tmp_path):
    run(corpus, tmp_path / "o", 2 * 128)
    model_dir = tmp_path / "o" / "model"
    assert (model_dir / "tokenizer.json").is_file()
    m = load_model(model_dir)
    logits, cache = m(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 300) and cache[0][0].shape == (1, 3, 16)


def test_missing_corpus(tmp_path, corpus):
    with pytest.raises(SystemExit, match=r"corpus file .*nowhere/train\.txt\.xz not found"):
        train(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--config", str(corpus[1])])


def test_corrupt_corpus(tmp_path, corpus):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.txt.xz").write_bytes(b"this is not xz data at all")
    with pytest.raises(SystemExit, match=r"train\.txt\.xz is corrupt"):
        train(["--data", str(bad), "--out", str(tmp_path / "o"), "--config", str(corpus[1])])


def test_resume_without_state(tmp_path, corpus):
    with pytest.raises(SystemExit, match="holds no saved state"):
        run(corpus, tmp_path / "fresh", 256, "--resume")

"""Chat: the model's own template rendered as transformers renders it, carried by the export, used by the CLI."""

import json
import shutil
import subprocess
import sys

import pytest

from mla_edge.contract import InputError
from mla_edge.runtime.chat import ChatTemplate

# DeepSeek-V2-Chat's style: bos, "User: ... / Assistant: ...", eos after each answer
DEEPSEEK = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# MiniCPM3's style: ChatML with a default system turn
MINICPM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Who wrote Middlemarch?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "  Hello  "},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "café 😀?"},
    ],
]


def tokenizer_folder(tmp_path, template, **special):
    from conftest import make_tokenizer

    make_tokenizer(tmp_path / "tokenizer.json")
    cfg = {
        "chat_template": template,
        "bos_token": "<|endoftext|>",
        "eos_token": {"content": "<|endoftext|>"},
        **special,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("template", [DEEPSEEK, MINICPM], ids=["deepseek", "minicpm3"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn"])
def test_rendered_prompt_equals_transformers(tmp_path, template, messages):
    from transformers import PreTrainedTokenizerFast

    folder = tokenizer_folder(tmp_path, template)
    ref = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        chat_template=template,
    )
    want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.from_folder(folder).render(messages) == want


def test_broken_or_missing_template_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="the chat_template in .* is broken"):
        ChatTemplate.from_folder(tokenizer_folder(tmp_path, "{% for m in messages %}{{ m['content'] }"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "x"}))
    with pytest.raises(InputError, match="has no chat_template"):
        ChatTemplate.from_folder(tmp_path)
    with pytest.raises(InputError, match="failed on these messages: boom"):
        ChatTemplate("{{ raise_exception('boom') }}", {}).render([{"role": "user", "content": "x"}])


def test_export_carries_the_template_and_chat_runs(text_export, tmp_path):
    """A model folder with tokenizer_config.json and generation_config.json: the export copies both, takes the
    end-of-turn ids into the manifest, and `generate --chat` / `chat` use the template (no torch needed)."""
    from mla_edge.export.pipeline import ExportOptions, export_folder
    from mla_edge.runtime.generate import Generator

    hf = shutil.copytree(text_export[0], tmp_path / "hf")
    (hf / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": DEEPSEEK, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    )
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    man = export_folder(hf, tmp_path / "out", ExportOptions(quantize=(), progress=False, ort_format=False))
    assert man["tokens"]["eos"] == [0, 7] and man["chat"]["files"] == [
        "tokenizer_config.json",
        "generation_config.json",
    ]
    gen = Generator(tmp_path / "out", "fp32", "cpu")
    messages = [{"role": "user", "content": "Hello"}]
    ids = gen.chat_prompt(messages)
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    assert gen.tokenizer.decode(ids, skip_special_tokens=False) == ChatTemplate(DEEPSEEK, special).render(messages)
    assert gen.chat(messages, max_new_tokens=5).finish_reason in ("eos", "length")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mla_edge.cli",
            "chat",
            str(tmp_path / "out"),
            "--max-new-tokens",
            "4",
            "--json",
            "--provider",
            "cpu",
        ],
        input="Hello\nAnd again\n/exit\n",
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    transcript = json.loads(r.stdout)["messages"]
    assert [m["role"] for m in transcript] == ["user", "assistant", "user", "assistant"]
    r = subprocess.run(
        [sys.executable, "-m", "mla_edge.cli", "generate", str(text_export[1]), "Hi", "--chat"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no tokenizer_config.json" in r.stderr and r.stderr.count("\n") == 1


def test_broken_template_is_refused_at_export(text_export, tmp_path):
    from mla_edge.export.pipeline import ExportOptions, export_folder

    hf = shutil.copytree(text_export[0], tmp_path / "hf")
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(InputError, match="chat_template .* is broken"):
        export_folder(hf, tmp_path / "out", ExportOptions(quantize=(), progress=False))
    assert not (tmp_path / "out").exists()

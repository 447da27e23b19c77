"""Chat: the model's own chat template (tokenizer_config.json's `chat_template`), rendered with jinja2 the way
transformers' `apply_chat_template` renders it, and the conversation loop of `mla-edge chat`. Torch-free."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from mla_edge.contract import InputError

TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatError(InputError):
    """No chat template, or one that cannot be rendered; the message says which."""


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken-like {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """Renders conversations; `render(messages, add_generation_prompt=True)` -> the prompt text (special tokens
    included, so it is tokenized without adding any)."""

    def __init__(self, template: str, special_tokens: dict[str, str], source: str = TOKENIZER_CONFIG):
        try:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ChatError("chat templates need jinja2: pip install jinja2") from None

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(
            x: object,
            ensure_ascii: bool = False,
            indent: int | None = None,
            separators: tuple | None = None,
            sort_keys: bool = False,
        ) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        # the environment transformers renders templates in: sandboxed, trimmed blocks, loop controls
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ChatError(f"the chat_template in {source} is broken: {e}") from None
        self.special_tokens, self.source, self._errors = special_tokens, source, jinja2.TemplateError

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ChatError("messages must be a list of {'role': ..., 'content': ...} dicts")
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except self._errors as e:
            raise ChatError(f"the chat_template in {self.source} failed on these messages: {e}") from None

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate:
        path = folder / TOKENIZER_CONFIG
        if not path.is_file():
            raise ChatError(f"{folder} has no {TOKENIZER_CONFIG}, so there is no chat template: use a plain prompt")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatError(f"{path} is not valid JSON: {e}") from None
        template = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(template, list):  # named templates: take "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str) or not template.strip():
            raise ChatError(f"{path} has no chat_template: this model has no chat format, use a plain prompt")
        tokens = {k: t for k in SPECIAL_TOKENS if (t := _token_text(cfg.get(k))) is not None}
        return cls(template, tokens, str(path))


def eos_ids(folder: Path) -> list[int]:
    """End-of-turn ids a chat model stops on, from generation_config.json (one id or a list), if the folder has it."""
    path = folder / GENERATION_CONFIG
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ChatError(f"{path} is not a valid generation config") from None
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def chat_loop(reply: Callable[[list[dict]], str], read: Callable[[], str | None], system: str | None = None) -> int:
    """`mla-edge chat`: read a user turn, stream the model's reply (reply() prints it and returns its text), keep the
    conversation; an empty read (EOF) or /exit ends. Returns the number of turns."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    turns = 0
    while (line := read()) is not None:
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": reply(messages)})
        turns += 1
    return turns

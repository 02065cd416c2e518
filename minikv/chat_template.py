"""Chat prompts: a model's Jinja `chat_template`, rendered as transformers does, or a built-in fallback.

Templates come from model files, i.e. from strangers, so they run in Jinja's immutable
sandbox. The environment mirrors transformers' (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, a non-escaping `tojson`) so prompts are byte-identical to what the
model was trained on.
"""
from __future__ import annotations

import json
from collections.abc import Container
from datetime import datetime
from functools import lru_cache
from typing import Any

from minikv.errors import MinikvError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2 / Mistral: the system prompt is folded into the first user turn.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('conversation roles must alternate user/assistant/user/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def builtin_template(vocab: Container[str]) -> str:
    """The fallback for a model without a template, recognised by its special tokens."""
    if "<|im_start|>" in vocab:
        return CHATML
    if "<|start_header_id|>" in vocab:
        return LLAMA3
    return LLAMA2


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise MinikvError(f"the model's chat template does not parse: {e}") from None


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
           **variables: Any) -> str:
    """Render `messages` ([{"role": ..., "content": ...}]); `variables` are e.g. bos_token, eos_token."""
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **variables)
    except TemplateError as e:
        raise MinikvError(f"the chat template rejected the conversation: {e}") from None

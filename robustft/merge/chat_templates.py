"""The chat templates mergekit 0.1.5 ships by name (``chat_template: chatml`` in a recipe), copied verbatim
from its ``mergekit/_data/chat_templates/*.jinja`` (tests/merge/test_chat_templates.py checks them equal).
"""

from __future__ import annotations

__all__ = ["CHAT_TEMPLATES", "chat_template_text"]

CHAT_TEMPLATES: dict[str, str] = {
    "alpaca": "{{ (messages|selectattr('role', 'equalto', 'system')|list|last).content|trim if (messages|selectattr('role', 'equalto', 'system')|list) else '' }}\n\n{% for message in messages %}\n{% if message['role'] == 'user' %}\n### Instruction:\n{{ message['content']|trim -}}\n{% if not loop.last %}\n\n\n{% endif %}\n{% elif message['role'] == 'assistant' %}\n### Response:\n{{ message['content']|trim -}}\n{% if not loop.last %}\n\n\n{% endif %}\n{% elif message['role'] == 'user_context' %}\n### Input:\n{{ message['content']|trim -}}\n{% if not loop.last %}\n\n\n{% endif %}\n{% endif %}\n{% endfor %}\n{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}\n### Response:\n{% endif %}\n",  # noqa: E501
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n",  # noqa: E501
    "exaone": "{% for message in messages %}\n    {% if loop.first and message['role'] != 'system' %}\n        {{ '[|system|][|endofturn|]\\n' }}\n    {% endif %}\n    {{ '[|' + message['role'] + '|]' + message['content'] }}\n    {% if message['role'] == 'user' %}\n        {{ '\\n' }}\n    {% else %}\n        {{ '[|endofturn|]\\n' }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n    {{ '[|assistant|]' }}\n{% endif %}\n",  # noqa: E501
    "llama3": "{% set loop_messages = messages %}\n{% for message in loop_messages %}\n{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}\n{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\n{{ content }}\n{% endfor %}\n{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}\n",  # noqa: E501
    "mistral": "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n",  # noqa: E501
}


def chat_template_text(value: str) -> str | None:
    """The Jinja text of a recipe's ``chat_template`` as mergekit 0.1.5 reads it: a template name above, or
    a Jinja string (20+ characters with a ``{``); None for ``auto`` (the inputs' most common template)."""
    if value == "auto":
        return None
    if len(value) < 256 and "\n" not in value and "{" not in value and value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise ValueError(
            f"chat_template: {value!r} is neither a template name "
            f"({', '.join(sorted(CHAT_TEMPLATES))}, auto) "
            "nor a Jinja template (mergekit's rule: 20 characters or more, with a '{')"
        )
    return value

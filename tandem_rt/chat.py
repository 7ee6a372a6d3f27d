"""Chat templates: find a checkpoint's template and render a conversation into a prompt string.

A template is looked up, in order, in the checkpoint directory's ``chat_template.jinja``, the
``chat_template`` field of its ``tokenizer_config.json`` (Hugging Face layout), and the
``tokenizer.chat_template`` metadata of the GGUF file its ``primary_source`` references. It is
rendered with Jinja2 in a sandbox, as Hugging Face's ``apply_chat_template`` does, with
``messages``, ``add_generation_prompt=True``, ``bos_token`` and ``eos_token``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

ROLES = ("system", "user", "assistant", "tool")


def load_chat_template(checkpoint_dir) -> Optional[str]:
    """The chat template of the checkpoint at ``checkpoint_dir``, or None when it has none."""
    d = Path(checkpoint_dir)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        tpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(tpl, str):
            return tpl
    try:
        conf = json.loads((d / "tandem_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ref = conf.get("primary_source")
    if not isinstance(ref, dict) or ref.get("kind") != "gguf":
        return None
    from tandem_rt.primary_source import resolve_reference

    from tandem_rt.gguf_index import read_index

    try:
        fields = read_index(resolve_reference(ref, d)).fields
    except Exception:  # the source is missing or unreadable: no template
        return None
    field = fields.get("tokenizer.chat_template")
    return field.value if field is not None and isinstance(field.value, str) else None


def check_messages(messages) -> list:
    """Validate an OpenAI-style ``messages`` list -> list of ``{"role", "content"}`` dicts.
    Raises ValueError naming the bad entry."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):      # content parts: text only
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}] must be a text part {{type: text, text: ...}}")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def render_chat(template: str, messages: list, bos_token: str = "", eos_token: str = "") -> str:
    """Render ``messages`` (see :func:`check_messages`) with ``template`` -> the prompt string,
    ending with the assistant's turn opened (``add_generation_prompt``)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise TemplateError(message)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                bos_token=bos_token, eos_token=eos_token)
    except TemplateError as exc:
        raise ValueError(f"the chat template refused the messages: {exc}") from None

"""OpenAI-style messages -> the prompt text, through the checkpoint's own chat template (or the one
--chat-template gives: `read_chat_template`).

Content given as a list of parts is flattened to a string first (the model's template takes strings):
text parts are joined, and each media part becomes the placeholder its processor expands later.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from glimpse.errors import InvalidRequestError

MediaHook = Callable[[dict[str, Any]], str]  # a media content part -> its placeholder text
ROLES = ("system", "user", "assistant", "tool", "developer")


def read_chat_template(template: str) -> str:
    """`--chat-template`'s value as template text: a file's contents, or the value itself when it is Jinja
    text (it has `{`); anything else is a ValueError naming it, so a mistyped path is never a template."""
    path = Path(template).expanduser()
    if path.is_file():
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the chat template {str(path)!r}: {e}") from None
    if "{" in template:
        return template
    raise ValueError(f"the chat template {template!r} is neither a readable file nor Jinja text")


def _flatten(content: Any, on_media: MediaHook | None, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where}.content must be a string or a list of content parts", param=where)
    out: list[str] = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or "type" not in part:
            raise InvalidRequestError(f"{where}.content[{i}] must be an object with a 'type'", param=where)
        kind = part["type"]
        if kind in ("text", "input_text"):
            out.append(str(part.get("text", "")))
        elif on_media is not None:
            out.append(on_media(part))
        else:
            raise InvalidRequestError(
                f"{where}.content[{i}] has type {kind!r}, but this model reads text only", param=where
            )
    return "\n".join(out)  # as vLLM joins parts


def normalise_messages(
    messages: list[dict[str, Any]], on_media: MediaHook | None = None
) -> list[dict[str, Any]]:
    """Check roles and flatten content; `developer` is OpenAI's newer name for `system`."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidRequestError(f"{where}.role must be one of {list(ROLES)}", param=where)
        msg = dict(m)
        msg["role"] = "system" if m["role"] == "developer" else m["role"]
        msg["content"] = _flatten(m.get("content"), on_media, where)
        out.append(msg)
    return out


def render_chat(
    tokenizer,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    on_media: MediaHook | None = None,
) -> str:
    """The prompt text for `messages`: through `chat_template` (Jinja source) when given, else the
    tokenizer's own template; `chat_template_kwargs` are extra variables for the template."""
    msgs = normalise_messages(messages, on_media)
    kwargs = dict(chat_template_kwargs or {})
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    try:
        text = tokenizer.apply_chat_template(
            msgs, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )
    except Exception as e:  # a template error is the request's fault (odd messages), not the server's
        raise InvalidRequestError(f"the chat template could not render these messages: {e}") from None
    if not isinstance(text, str):  # chat_template_kwargs may ask apply_chat_template for something else
        raise InvalidRequestError("the chat template did not render to text", param="chat_template_kwargs")
    return text

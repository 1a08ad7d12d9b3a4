"""Dataset formats: what a record may hold, and which of its text is trained on (docs/DATA.md).

- `text`: a text field of a JSONL record (or a plain text line); every token is trained on.
- `prompt_completion`: `{"prompt": str, "completion": str}`; by default only the completion is.
- `chat`: OpenAI's fine-tuning format, `{"messages": [{"role", "content", "weight"?}]}`, rendered with
  the tokenizer's chat template (or DEFAULT_CHAT_TEMPLATE); by default only the assistant turns whose
  weight is not 0 are trained on.

Pure Python (no torch, no tokenizer): the API checks records with this module at submission and
upload; `trainer.data` turns the segments below into tokens and labels.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

Format = Literal["text", "prompt_completion", "chat"]
FORMATS: tuple[Format, ...] = ("text", "prompt_completion", "chat")
ROLES = ("system", "user", "assistant")
UNSUPPORTED_ROLES = ("tool", "function", "developer", "ipython")
MESSAGE_KEYS = {"role", "content", "weight", "name"}
UNSUPPORTED_KEYS = {"tool_calls", "function_call", "tools", "functions", "tool_call_id"}

# For tokenizers without a chat template of their own (the presets, most base models). Each turn is
# a role tag line and its content; an assistant turn ends with EOS, so a model trained with it stops
# after its answer. Saved with the exported model's tokenizer, so inference formats prompts the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# (text, trained) pieces of one example, in order.
Segments = list[tuple[str, bool]]
# Renders messages with the chat template: (messages, add_generation_prompt) -> text.
Render = Callable[[list[dict[str, str]], bool], str]


class RecordError(ValueError):
    """A record that does not fit its format; the caller adds the file and the line."""


class TemplateError(ValueError):
    """A chat template that cannot be used for loss masking."""


def resolve_format(declared: str, first: Any, *, plain_text: bool) -> Format:
    """The format of a dataset: as declared, or detected from its first record."""
    if declared == "jsonl":
        return "text"
    if declared in FORMATS:
        return declared  # type: ignore[return-value]
    if plain_text or not isinstance(first, dict):
        return "text"
    if "messages" in first:
        return "chat"
    if "prompt" in first and "completion" in first:
        return "prompt_completion"
    return "text"


def trains_all(fmt: Format, train_on: str | None) -> bool:
    """Whether every token of an example is trained on: always for text, by `train_on` for the others
    (left out: completions only)."""
    return fmt == "text" or train_on == "all"


def check_record(obj: Any, fmt: Format, text_field: str) -> None:
    """Raise RecordError saying what is wrong with one JSONL record of format `fmt`."""
    if not isinstance(obj, dict):
        raise RecordError(f"is a JSON {type(obj).__name__}, not an object")
    if fmt == "text":
        if text_field not in obj:
            raise RecordError(
                f"has no text field {text_field!r} (set text_field to the field that holds the text"
                + ("; this record looks like chat data: set format to 'chat'" if "messages" in obj else "")
                + ")"
            )
        if not isinstance(obj[text_field], str):
            raise RecordError(f"field {text_field!r} is not a string")
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in obj:
                raise RecordError(f"has no {key!r} field (prompt_completion records need 'prompt' and 'completion')")
            if not isinstance(obj[key], str):
                raise RecordError(f"field {key!r} is not a string")
        if not obj["completion"]:
            raise RecordError("has an empty 'completion'")
    else:
        _check_chat(obj)


def _check_chat(obj: dict[str, Any]) -> None:
    bad = sorted(UNSUPPORTED_KEYS & obj.keys())
    if bad:
        raise RecordError(f"uses {', '.join(bad)}: tools and function calls are not supported yet")
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise RecordError('has no \'messages\' list (chat records are {"messages": [{"role", "content"}, ...]})')
    if not messages:
        raise RecordError("has an empty 'messages' list")
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise RecordError(f"{where} is not an object")
        role = m.get("role")
        if role in UNSUPPORTED_ROLES:
            raise RecordError(f"{where} has role {role!r}: only system, user and assistant are supported yet")
        if role not in ROLES:
            raise RecordError(f"{where} has role {role!r}; roles are system, user and assistant")
        bad = sorted(UNSUPPORTED_KEYS & m.keys())
        if bad:
            raise RecordError(f"{where} uses {', '.join(bad)}: tools and function calls are not supported yet")
        unknown = sorted(m.keys() - MESSAGE_KEYS)
        if unknown:
            raise RecordError(f"{where} has unknown keys {unknown}; a message has role, content, weight and name")
        content = m.get("content")
        if not isinstance(content, str):
            raise RecordError(f"{where} ({role}) has no string 'content'")
        if not content:
            raise RecordError(f"{where} ({role}) has empty content")
        if "weight" in m:
            if role != "assistant":
                raise RecordError(f"{where} ({role}) has a weight; only assistant messages take one")
            w = m["weight"]
            if isinstance(w, bool) or w not in (0, 1):
                raise RecordError(f"{where} has weight {json.dumps(w)}; a weight is 0 or 1")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("has no assistant message: there is nothing to train on")


def record_text(obj: Any, fmt: Format, text_field: str) -> Any:
    """The part of a record `segments` needs (plain text lines are their own record)."""
    if isinstance(obj, str):
        return obj
    if fmt == "text":
        return obj[text_field]
    if fmt == "prompt_completion":
        return {"prompt": obj["prompt"], "completion": obj["completion"]}
    return obj["messages"]


def segments(item: Any, fmt: Format, *, train_all: bool, render: Render | None) -> Segments:
    """An example as (text, trained) pieces; the caller appends EOS (trained when the end is)."""
    if fmt == "text":
        return [(item, True)]
    if fmt == "prompt_completion":
        return [(item["prompt"], train_all), (item["completion"], True)]
    assert render is not None, "chat data needs a chat template"
    return chat_segments(item, render, train_all=train_all)


def chat_segments(messages: list[dict[str, Any]], render: Render, *, train_all: bool = False) -> Segments:
    """The rendered conversation cut at each assistant turn: what the template puts after the generation
    prompt up to the next message (the content and the turn's end, e.g. EOS) is trained on, the rest
    (system and user turns, role tags) is context. Works with any template that renders a
    conversation's prefix as a prefix of the whole."""
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = render(clean, False)
    spans: list[tuple[int, int, bool]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(clean[:i], True)
        upto = render(clean[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError(
                "the chat template does not render a conversation's beginning as the beginning of the "
                "whole conversation, so assistant turns cannot be located for loss masking"
            )
        spans.append((len(before), len(upto), m.get("weight", 1) != 0))
    out: Segments = []
    pos = 0
    for start, end, trained in spans:
        if start > pos:
            out.append((full[pos:start], train_all))
        out.append((full[start:end], trained or train_all))
        pos = max(pos, end)
    if pos < len(full):
        out.append((full[pos:], train_all))
    return out

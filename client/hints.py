"""What the CLI adds to the server's 422 about a spec: "did you mean" for a misspelt field, and where
to go for a dataset the server does not have.

The field names come from trainer.spec.JobSpec (pure pydantic, shared with the server); the server's
422 names the field (`loc`) and says `extra_forbidden`. Without the trainer package the messages are
the server's alone.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any

from client.sdk import format_detail

UNKNOWN_DS_KEY = re.compile(r"unknown DeepSpeed key '([^']+)'; allowed keys: (.+)$")
MISSING_FILE = re.compile(r"file '([^']+)' not found under the data root")


def _models_in(annotation: Any) -> list[type]:
    """The pydantic model classes an annotation names (through Optional, unions and Annotated)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def spec_fields(loc: list[Any]) -> list[str]:
    """The field names a spec allows at `loc` (a path of field names from the spec's top); [] if unknown."""
    try:
        from trainer.spec import JobSpec
    except ImportError:
        return []
    models: list[type] = [JobSpec]
    for part in loc:
        models = [
            m for model in models if part in model.model_fields for m in _models_in(model.model_fields[part].annotation)
        ]
        if not models:
            return []
    names: list[str] = []
    for model in models:
        names += [
            field.alias or name for name, field in model.model_fields.items() if (field.alias or name) not in names
        ]
    return names


def did_you_mean(word: str, choices: list[str]) -> str | None:
    """The closest choice to a misspelt word, if one is close enough."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:  # `lr_rate` -> `lr`: a choice the word starts with or contains
        close = [c for c in choices if len(c) >= 3 and (word.startswith(c) or c in word)][:1]
    return close[0] if close else None


def _loc(item: dict[str, Any]) -> list[Any]:
    loc = list(item.get("loc") or [])
    return loc[1:] if loc[:1] == ["body"] else loc


def hint(item: dict[str, Any]) -> str | None:
    """A hint for one item of a 422 about a spec, or None."""
    loc, msg, kind = _loc(item), str(item.get("msg", "")), item.get("type")
    if kind == "extra_forbidden" and loc and isinstance(loc[-1], str):
        choices = spec_fields(loc[:-1])
        guess = did_you_mean(loc[-1], choices)
        if guess:
            return f"did you mean {guess!r}?"
        return f"known fields here: {', '.join(choices)}" if choices else None
    if m := UNKNOWN_DS_KEY.search(msg):
        guess = did_you_mean(m[1], [k.strip() for k in m[2].split(",")])
        return f"did you mean {guess!r}?" if guess else None
    if m := MISSING_FILE.search(msg):
        return (
            f"the path is on the server, under its data root; to send a file from this machine: "
            f"`trainbox datasets upload {m[1]}`, then name it in the spec as {{id: <the id it prints>}}"
        )
    return None


def explain_422(detail: Any) -> str:
    """The 422's problems as one line, each with its hint."""
    return format_detail(detail, hint)

"""Turning recovered token ids back into the private part of a text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def strip_template(text: str, template: str | None) -> str:
    """Remove a public prompt template's head and tail around ``{text}``."""
    t = text.strip()
    if not template:
        return t
    head, tail = template.split("{text}", 1)
    h, tl = head.strip(), tail.strip()
    if h and t.startswith(h):
        t = t[len(h) :]
    if tl:
        k = t.find(tl)
        if k >= 0:
            t = t[:k]
    return t.strip()


def decode_private(tokenizer: Any, ids: Sequence[int], template: str | None = None) -> str:
    """Decode ``ids`` (special tokens dropped) and strip the public template."""
    return strip_template(str(tokenizer.decode(list(ids), skip_special_tokens=True)), template)

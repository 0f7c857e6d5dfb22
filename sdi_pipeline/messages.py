"""Phrases that error messages share: shortened lists and "did you mean" hints."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


def shortened(items: Iterable[object], limit: int = 10) -> str:
    """``a, b, c ... (N in all)``: the first ``limit`` items and the count if there are more."""
    listed = [str(i) for i in items]
    shown = ", ".join(listed[:limit])
    return shown + (f" ... ({len(listed)} in all)" if len(listed) > limit else "")


def did_you_mean(word: str, choices: Sequence[str], n: int = 2) -> str:
    """`` Did you mean X or Y?`` for the choices close to ``word``; empty if none is."""
    near = difflib.get_close_matches(word, list(choices), n=n)
    return f" Did you mean {' or '.join(near)}?" if near else ""

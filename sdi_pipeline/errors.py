"""The one exception type for user mistakes: bad input, configuration or files."""

from __future__ import annotations


class SDIError(Exception):
    """A problem the user can fix. The message names what is wrong and how to fix it."""

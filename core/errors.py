"""One error type for everything a user can get wrong.

`cli.main` catches `PivotfuseError` and prints its message as a single line, so a bad
recipe, a missing file or a mismatching store never ends in a traceback from deep inside
torch. Code raises it with a message that names the file/field/model at fault.
"""

from __future__ import annotations


class PivotfuseError(Exception):
    """A user-facing error: the message is one line naming what is wrong and where."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line

"""Compatibility levels, and which earlier versions a new schema is checked against.

BACKWARD: the new schema reads data written with the previous one; FORWARD: the
previous one reads data written with the new one; FULL: both. The ``_TRANSITIVE``
levels check against every live (not deleted) version of the subject, the others
against the latest only; NONE checks nothing. Each format's own rules decide what
"reads" means (``ParsedSchema.incompatibilities``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from streambus.schemas.errors import InvalidCompatibilityLevelError
from streambus.schemas.formats import ParsedSchema


class Level(enum.Enum):
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"
    NONE = "NONE"

    @classmethod
    def of(cls, text: object) -> Level:
        try:
            if not isinstance(text, str):
                raise ValueError(text)
            return cls(text.upper())
        except ValueError:
            raise InvalidCompatibilityLevelError(
                f"Invalid compatibility level. Valid values are none, backward, forward, full, "
                f"backward_transitive, forward_transitive, and full_transitive; got {text!r}"
            ) from None

    @property
    def transitive(self) -> bool:
        return self.name.endswith("_TRANSITIVE")

    @property
    def backward(self) -> bool:
        return self.name.startswith(("BACKWARD", "FULL"))

    @property
    def forward(self) -> bool:
        return self.name.startswith(("FORWARD", "FULL"))


DEFAULT_LEVEL = Level.BACKWARD


def check(level: Level, new: ParsedSchema, earlier: Sequence[ParsedSchema]) -> list[str]:
    """Why ``new`` breaks ``level`` against ``earlier`` (oldest first); empty: compatible."""
    if level is Level.NONE or not earlier:
        return []
    targets = earlier if level.transitive else earlier[-1:]
    messages: list[str] = []
    for old in reversed(targets):  # newest first: the likeliest to be reported first
        if level.backward:
            messages.extend(f"backward: {m}" for m in new.incompatibilities(old))
        if level.forward:
            messages.extend(f"forward: {m}" for m in old.incompatibilities(new))
    return messages

"""Text a caller hands in, checked before it is stored or looked up.

Control characters have no place in an id, a name, a URL or a secret. They would also
store differently per database: PostgreSQL's text columns refuse the NUL character
outright, so without this check the same request would succeed on SQLite and fail on
PostgreSQL. Requests that carry them are refused with a sentence naming the field.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "has_control_characters",
    "has_direction_controls",
    "is_invisible",
    "one_line",
    "printable",
]

# C0 and C1 control characters and DEL (Unicode category Cc).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Marks, embeddings, overrides and isolates that reorder how the text around them shows:
# "\u202eexe.txt" displays as "txt.exe".
_DIRECTION = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a control character (NUL, a line break, a tab, ESC, ...)."""
    return _CONTROL.search(text) is not None


# Default-ignorable code points outside category Cf (the Hangul fillers, variation
# selectors, the combining grapheme joiner, ...) and the braille blank.
_BLANK = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f\uffa0"
    "\U000e0100-\U000e01ef]"
)


def has_direction_controls(text: str) -> bool:
    """Whether ``text`` holds a bidirectional formatting character (U+202E and the like)."""
    return _DIRECTION.search(text) is not None


def is_invisible(text: str) -> bool:
    """Whether ``text`` shows nothing: only spaces, format characters (U+200B, ...) and the
    other code points Unicode calls default-ignorable, or that render as a blank."""
    return all(
        c.isspace() or unicodedata.category(c) == "Cf" or _BLANK.match(c) is not None for c in text
    )


def printable(text: str) -> str:
    """``text`` with each NUL replaced by U+FFFD, for storing text that others wrote (a
    receiver's answer) on a database that cannot hold NUL."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


#: The longest one-line text ``one_line`` keeps.
MAX_LINE_CHARS = 500
# Runs of white space, control characters and direction controls.
_BREAKS = re.compile("[\\s\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]+")


# Lone surrogates: how undecodable bytes of a header come out of aiohttp. No database and
# no UTF-8 writer takes them.
_SURROGATES = re.compile("[\ud800-\udfff]")


def one_line(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """``text`` on one line for a log and an error field: each run of white space and
    control characters becomes one space, each lone surrogate U+FFFD, and the rest is cut to
    ``limit`` characters.

    Errors quote what others sent (a receiver's bad status line or header bytes); each must
    stay one record in a line-based log, where no receiver may start a line of its own.
    """
    flat = _BREAKS.sub(" ", _SURROGATES.sub("\ufffd", text)).strip()
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "\u2026"

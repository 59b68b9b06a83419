"""What text the Serve app accepts in a string field: Unicode scalar values only (no lone
surrogates: `"\\ud800"` is valid JSON but not text, and fails UTF-8 encoding later, in
the journal or the tokenizer) and no control characters other than tab, newline and
carriage return (NUL, ESC, DEL, C1 controls: nothing a review or a question needs, and
terminal escapes or NULs in the journal and logs). Refused with a 422 naming the field.

Chat-template special-token strings (`<|im_start|>`, `<|endoftext|>`) are accepted:
they are ordinary text to a client, and both the policy (policy/batching.py) and the
local targets (backends/text.py) tokenize a query's characters as text, never as
control tokens. Free of Ray, like schemas.py.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated

from pydantic import AfterValidator

_ALLOWED_CONTROLS = frozenset("\t\n\r")


def text_problem(value: str) -> str | None:
    """Why `value` is not acceptable text (the first offending character), or None."""
    for i, ch in enumerate(value):
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            return (f"contains a lone UTF-16 surrogate U+{code:04X} at character {i}: "
                    "not a Unicode character")
        if ch not in _ALLOWED_CONTROLS and unicodedata.category(ch) == "Cc":
            return (f"contains the control character U+{code:04X} at character {i}; only "
                    "tab, newline and carriage return are accepted")
    return None


def _checked(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


# A string field whose value passed text_problem (pydantic reports the field by name).
CleanText = AfterValidator(_checked)


def clean(kind):
    """`Annotated[kind, CleanText]`: the text policy on top of a field's own type."""
    return Annotated[kind, CleanText]

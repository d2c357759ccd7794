"""Structure of untrusted JSON bytes without decoding them: nesting depth, and the top-level
elements of an array whose elements may be broken.

Both run only on the slow path (a message the typed decoder refused, or one with more
brackets than the depth limit), so they favour C-level scanning (`re`, `bytes.translate`)
over per-byte Python, and never recurse: a hostile message cannot exhaust the stack here.
"""

from __future__ import annotations

import re
from itertools import accumulate

# A JSON string (any bytes, escapes skipped pairwise) or one structural character.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},"]', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def nesting_depth(raw: bytes) -> int:
    """Deepest nesting of arrays and objects, brackets inside strings not counted."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def array_elements(raw: bytes) -> list[bytes] | None:
    """The raw top-level elements of a JSON array, each judged later on its own; None when
    the array itself is unreadable (unbalanced, unterminated string, text after it).

    Strings are not decoded, so an element holding invalid UTF-8 or a lone surrogate escape
    is still cut out whole and fails alone, instead of sinking its neighbours."""
    text = raw.strip()
    if text[:1] != b"[" or text[-1:] != b"]":
        return None
    out: list[bytes] = []
    depth = 0
    start = 1
    for m in _TOKEN.finditer(text):
        tok = m.group()
        c = tok[:1]
        if c == b'"':
            if len(tok) == 1:  # a quote the string pattern could not close
                return None
            continue
        if c in b"[{":
            depth += 1
        elif c in b"]}":
            depth -= 1
            if depth < 0:
                return None
            if depth == 0:
                if m.end() != len(text):
                    return None
                last = text[start : m.start()].strip()
                if last:
                    out.append(last)
                elif out:  # "[1,]"
                    return None
        elif depth == 1:  # a comma between top-level elements
            el = text[start : m.start()].strip()
            if not el:
                return None
            out.append(el)
            start = m.end()
    return out if depth == 0 else None

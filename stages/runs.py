"""Long whitespace runs: cut them where the tokens provably do not change, so tiktoken's regex can take them.

tiktoken's pre-tokenizer (fancy-regex) fails on a whitespace run of about a million characters (`Max stack
size exceeded for backtracking`): ``\\s+(?!\\S)`` backtracks over the whole run. A text holding a run longer
than ``MAX_RUN`` is encoded in pieces, cut inside its runs where the result is provably the whole text's.

Why a cut is exact, for GPT-2's pattern (``'s|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``):

- Pre-tokens. No alternative takes whitespace after a non-space character, so a pre-token starts at the
  run's first character; there ``\\s+(?!\\S)`` takes the whole run, less its last character when a
  non-space follows (that character then starts the next pre-token: `` x`` or itself). So cutting the
  text at ``c``, inside the run and with at least 2 of its characters after ``c`` (1 at the end of the
  text), cuts that one pre-token in two and changes no other.
- BPE. A piece's parts only ever merge into tokens of the vocabulary, lowest rank first. If no token
  holds the byte before ``c`` and the byte after it side by side, no merge crosses ``c``, and each side
  merges exactly as it would alone: the tokens of the two sides are the tokens of the whole.
"""

from __future__ import annotations

import functools
import re

import tiktoken

# Unicode White_Space, the regex's \s (Python's own \s also takes U+001C..U+001F, which tiktoken's does not)
WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
MAX_RUN = 100_000  # characters; tiktoken's regex fails near 1,000,000 (700,000 spaces still pass): 10x under it
_SPACES = frozenset(re.findall(f"[{WHITESPACE}]", "".join(map(chr, range(0x3001)))))
_SPACE_CHARS = "".join(sorted(_SPACES))


@functools.cache
def _long_run(max_run: int) -> re.Pattern:
    return re.compile(f"(?<![{WHITESPACE}])[{WHITESPACE}]{{{max_run + 1},}}")  # tried at runs' starts only: linear


GPT2_PATTERN = frozenset({"gpt2", "r50k_base", "p50k_base", "p50k_edit"})  # tiktoken's encodings with that pattern


class UncuttableRun(ValueError):
    """A whitespace run longer than ``MAX_RUN`` with no provably exact cut, at character ``index`` of ``text``."""

    def __init__(self, text: str, index: int, length: int):
        super().__init__(f"a run of {length:,} whitespace characters at character {index:,}")
        self.text, self.index, self.length = text, index, length


def has_long_run(text: str, max_run: int = MAX_RUN) -> bool:
    """Whether ``text`` holds a whitespace run longer than ``max_run`` characters.

    Such a run covers two multiples of ``step = (max_run + 1) // 2`` and all between: only where a stretch
    like that is whitespace is the text searched, so the check costs about two lookups per ``step`` characters.
    """
    step = (max_run + 1) // 2
    starts = range(0, len(text) - step, step)
    if not any(text[i] in _SPACES and not text[i : i + step + 1].strip(_SPACE_CHARS) for i in starts):
        return False
    return _long_run(max_run).search(text) is not None


def cut_long_runs(text: str, encoding: tiktoken.Encoding, max_run: int = MAX_RUN) -> list[str]:
    """``text`` in pieces whose runs are at most ``max_run`` long and whose tokens, joined, are the text's.

    Raises ``UncuttableRun`` for a run with no exact cut within ``max_run`` characters (a run of newlines in
    GPT-2: ``\\n\\n`` is a token), or any long run in an encoding whose pattern is not GPT-2's.
    """
    if not has_long_run(text, max_run):
        return [text]
    pieces, start = [], 0
    for run in _long_run(max_run).finditer(text):
        a, b = run.span()
        if encoding.name not in GPT2_PATTERN:
            raise UncuttableRun(text, a, b - a)
        last = b - (2 if b < len(text) else 1)  # the last cut that leaves the run's final pre-token as it is
        cut = a
        while last - cut > max_run:
            cut = next((c for c in range(cut + max_run, cut, -1) if _safe(text, c, encoding)), None)
            if cut is None:
                raise UncuttableRun(text, a, b - a)
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return pieces


_ADJACENT: dict[str, frozenset[bytes]] = {}  # by encoding name: every pair of bytes side by side in a token


def _safe(text: str, c: int, encoding: tiktoken.Encoding) -> bool:
    """Whether no token of ``encoding`` holds the bytes on both sides of ``c`` side by side."""
    if encoding.name not in _ADJACENT:
        tokens = encoding.token_byte_values()
        _ADJACENT[encoding.name] = frozenset(token[i : i + 2] for token in tokens for i in range(len(token) - 1))
    return text[c - 1].encode()[-1:] + text[c].encode()[:1] not in _ADJACENT[encoding.name]

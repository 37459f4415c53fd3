"""Checks on a generated caption: each answers "" (use it) or the reason to fall back to the original."""
from __future__ import annotations

import re
from collections import Counter

EMPTY = "empty"
NON_PRINTABLE = "non_printable"
PROMPT_ECHO = "prompt_echo"
REPETITION = "repetition"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# One unit of 1-8 characters repeated 6+ times in a row ("@@@@@@", "a b a b a b ...").
_REPEATED_RUN = re.compile(r"(.{1,8}?)\1{5,}", re.DOTALL)


def first_sentence(text: str) -> str:
    """The short caption: the text up to its first sentence end (all of it when there is none)."""
    text = text.strip()
    return _SENTENCE_END.split(text, maxsplit=1)[0] if text else ""


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def is_empty(text: str) -> bool:
    return not re.search(r"\w", text)


def is_non_printable(text: str) -> bool:
    # U+FFFD is what a byte-level tokenizer decodes a broken UTF-8 sequence to.
    return any(not (c.isprintable() or c in "\n\t") or c == "\ufffd" for c in text)


def echoes_prompt(text: str, prompt: str) -> bool:
    """The prompt (or the chat roles around it) came back instead of a description."""
    words, asked = " ".join(_words(text)), " ".join(_words(prompt))
    return bool(asked) and asked in words or bool(re.match(r"\s*(USER|ASSISTANT)\s*:", text))


def is_degenerate(text: str, ngram: int = 3, max_share: float = 0.5) -> bool:
    """A word n-gram (n <= ngram) seen 3+ times covers more than max_share of the words, or a short
    unit repeats 6+ times in a row."""
    if _REPEATED_RUN.search(text):
        return True
    words = _words(text)
    for n in range(1, ngram + 1):
        if len(words) < 3 * n:
            break
        top = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)).most_common(1)[0][1]
        if top >= 3 and top * n / len(words) > max_share:
            return True
    return False


def check(text: str, prompt: str, ngram: int = 3, max_share: float = 0.5) -> str:
    """"" when the caption is usable, else the first reason it is not."""
    if is_empty(text):
        return EMPTY
    if is_non_printable(text):
        return NON_PRINTABLE
    if echoes_prompt(text, prompt):
        return PROMPT_ECHO
    if is_degenerate(text, ngram, max_share):
        return REPETITION
    return ""

"""Caption cleaning before the text encoder, as LlamaGen's checkpoints were trained with it.

LlamaGen lower-cases every caption and strips web debris from it (URLs, markup, handles, file
names, product codes, shop phrases, stray punctuation) before FLAN-T5, and does so twice. FLAN-T5's
tokenizer is case-sensitive, so features of raw captions are not those the released generators
learnt from. `clean("llamagen", text)` gives the text those models expect; `clean("none", text)`
leaves it as it is (the demo's tiny encoder and models trained on raw captions).

The rules are applied in order; each is a regular expression and what replaces its matches.
"""
from __future__ import annotations

import html
import re
import urllib.parse
from collections.abc import Callable
from html.parser import HTMLParser

import ftfy

CLEANERS = ("none", "llamagen")

_FILE_TYPES = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
_DOMAIN = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_DASHES = "".join(chr(c) for c in (0x2D, 0x58A, 0x5BE, 0x1400, 0x1806, 0x2E17, 0x2E1A, 0x2E3A, 0x2E3B, 0x2E40,
                                  0x301C, 0x3030, 0x30A0, 0xFE31, 0xFE32, 0xFE58, 0xFE63, 0xFF0D))
_DASH_RANGE = "\u2010-\u2015"
_JUNK_PUNCTUATION = "#®•©™&@·º½¾¿¡§~)(][}{|\\/*"


def _rules(*pairs: tuple[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


# Before the markup is stripped.
_WEB = _rules(
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + r"))", ""),  # links with a scheme, or bare domains
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + r"))", ""),
)
# Between markup stripping and the text repair.
_DEBRIS = _rules(
    (r"@[\w\d]+\b", ""),  # @handles
    (r"[\u31c0-\u9fff]+", ""),  # CJK strokes, letters, compatibility forms and ideographs
    ("[" + re.escape(_DASHES) + _DASH_RANGE + "]+", "-"),  # every dash is a hyphen
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # a trailing time stamp
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),  # long numbers: ids
    (r"[\S]+\.(?:" + _FILE_TYPES + ")", ""),  # file names
    (r"[\"']{2,}", '"'),
    (r"[\.]{2,}", " "),
    ("[" + re.escape(_JUNK_PUNCTUATION) + "]+", " "),
    (r"\s+\.\s+", " "),
)
_SEPARATORS = re.compile(r"(?:\-|\_)")
# After the text repair.
_PRODUCT_TALK = _rules(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # part numbers such as ab1234
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:" + _FILE_TYPES + r")(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # letters and digits interleaved
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes such as 30x40 (Latin x, Cyrillic х, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),  # the whole caption quoted
    (r"^['\_,\-\:;]", ""),
    (r"['\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
)


class _TextOnly(HTMLParser):
    """The text of a fragment of HTML: tags, comments and the code inside script, style and
    template elements dropped, character references decoded."""

    CODE = ("script", "style", "template")

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.in_code = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        self.in_code += tag in self.CODE

    def handle_endtag(self, tag: str) -> None:
        if tag in self.CODE and self.in_code:
            self.in_code -= 1

    def handle_data(self, data: str) -> None:
        if not self.in_code:
            self.parts.append(data)


def _strip_markup(text: str) -> str:
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def _apply(rules: list[tuple[re.Pattern, str]], text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def clean_once(caption: str) -> str:
    """One pass of LlamaGen's caption cleaning."""
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _apply(_WEB, text)
    text = _strip_markup(text)
    text = _apply(_DEBRIS, text)
    if len(_SEPARATORS.findall(text)) > 3:  # words-joined-by-hyphens or_underscores
        text = _SEPARATORS.sub(" ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _apply(_PRODUCT_TALK, text).strip()


def llamagen_clean(caption: str) -> str:
    """LlamaGen's preprocessing: the cleaning pass, twice."""
    return clean_once(clean_once(caption))


_CLEANERS: dict[str, Callable[[str], str]] = {"none": lambda text: text, "llamagen": llamagen_clean}


def cleaner(name: str) -> Callable[[str], str]:
    if name not in _CLEANERS:
        raise ValueError(f"unknown caption cleaning {name!r}; known: {', '.join(CLEANERS)}")
    return _CLEANERS[name]

"""Tessera's caption cleaning against LlamaGen's own, caption by caption.

LlamaGen's `T5Embedder` (language/t5.py) is imported from a checkout outside this repository
(it needs ftfy and beautifulsoup4); both clean the same captions: web-style captions assembled
from fragments that exercise every rule (links, markup, entities, handles, CJK, dashes, quotes,
ids, file names, sizes, shop phrases) plus any caption files given. Prints the share of captions
cleaned identically, the time per caption on each side, and the first differences.

    python -m bench.caption_clean_vs_llamagen --llamagen-src ../LlamaGen [--n 20000] [--captions FILE ...]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

from tessera.models.caption_clean import llamagen_clean

FRAGMENTS = [
    "A Photo of a RED fox in the snow", "Two dogs playing on the beach at sunset", "close-up of a cup of coffee",
    "https://www.example.com/img/123.jpg", "www.shop-site.net/item?id=7", "visit example.co for more",
    "<b>Bold</b> text", "<a href='x'>link</a>", "&amp; more", "&quot;quoted&quot;", "fish &amp chips",
    "@john_doe", "#12", "#123456", "1234567", "IMG_2034.JPG", "photo.png", "file name.pdf",
    "東京タワー", "㈱会社", "em—dash – en-dash ― bar", "“smart quotes”", "‘single’", "«guillemets»",
    "192.168.0.1", "12:30 ", "line\\nbreak", "*** SALE ***", "[draft] {tag} (note) | a / b \\ c",
    "this-is-my-cute-cat", "snake_case_words_here_now", "jc6640", "ab12cd", "12ab34", "j2d1a2a",
    "30x40 cm", "1.5×2.5", "10х20", "free shipping", "worldwide free shipping", "free download free",
    "click on here", "click for details", "png images", "page 12", "a : b", "one,two.three/four",
    "'quoted caption'", "\"double quoted\"", "-leading dash", "trailing plus+", ".hidden", "Caf\u00e9 crème",
    "mojibake: cafÃ©", "%20encoded%2Fpath", "plus+signs+here", "<person> walking a dog", "   spaced   out   ",
    "ÄÖÜ umlauts", "price 19.99$", "100% cotton", "tags: #summer #beach", "... and more ...", "\"\"\"triple\"\"\"",
    "<!-- a comment -->", "<script>var x = 1</script>", "a < b and c > d", "&lt;tag&gt;", "<br/>new line",
    "5 &gt 3", "<p>unclosed", "&#39;apostrophe&#39;", "&nbsp;space", "<img src=a.jpg alt='cat'>",
]


def assembled(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = rng.sample(FRAGMENTS, rng.randint(1, 5))
        out.append(rng.choice([" ", ", ", " - ", ". ", " | "]).join(parts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamagen-src", default=os.environ.get("LLAMAGEN_SRC"))
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--captions", nargs="*", default=[], help="text files, one caption a line")
    parser.add_argument("--show", type=int, default=5)
    args = parser.parse_args()
    if not args.llamagen_src:
        raise SystemExit("give --llamagen-src or set LLAMAGEN_SRC to a LlamaGen checkout")
    sys.path.insert(0, os.path.abspath(args.llamagen_src))
    from language.t5 import T5Embedder

    def theirs(text: str) -> str:  # their text_preprocessing, without building the T5 model
        return T5Embedder.clean_caption(T5Embedder, T5Embedder.clean_caption(T5Embedder, text))

    captions = FRAGMENTS + assembled(args.n)
    for path in args.captions:
        with open(path, encoding="utf-8") as f:
            captions += [line.rstrip("\n") for line in f if line.strip()]
    start = time.perf_counter()
    expected = [theirs(c) for c in captions]
    t_theirs = time.perf_counter() - start
    start = time.perf_counter()
    got = [llamagen_clean(c) for c in captions]
    t_ours = time.perf_counter() - start
    differ = [(c, e, g) for c, e, g in zip(captions, expected, got) if e != g]
    print(f"{len(captions)} captions: {len(captions) - len(differ)} cleaned identically "
          f"({100 * (1 - len(differ) / len(captions)):.2f}%)")
    print(f"  per caption: LlamaGen {1e6 * t_theirs / len(captions):.0f} us, Tessera {1e6 * t_ours / len(captions):.0f} us, "
          f"ratio {t_theirs / t_ours:.2f}x")
    for c, e, g in differ[:args.show]:
        print(f"  differs: {c!r}\n    LlamaGen {e!r}\n    Tessera  {g!r}")


if __name__ == "__main__":
    main()

"""The demo's world: pictures whose truth is known, with planted defects.

Every picture is a coloured shape on a plain background, and its caption says which: "a red
circle on the left on a blue background"; the shape's size and offset vary from picture to
picture. Image `index` of a world (`seed`) is a pure function of the two, so the loopback
server, the source parquet, the truth file and the models' training sets all agree without
sharing state. A share of the pictures carries one planted defect:

  mismatched_caption  the caption describes a different picture (shape, colour and background)
  watermark           a text or logo overlay of varying size and opacity
  low_aesthetic       heavy noise, heavy blur, or a near-blank image
  nsfw                flagged unsafe in the metadata (`punsafe`), the picture itself is clean
  near_duplicate      a re-encoded, resized or slightly cropped copy of an earlier clean picture,
                      far enough back to sit in another shard

Some (shape, shape colour, background colour) combinations never occur at all: they are the
held-out prompts on which the generator's prompt-following is measured.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ["circle", "square", "triangle", "cross"]
PLACES = ["in the center", "on the left", "on the right", "at the top", "at the bottom"]

# (shape, shape colour, background colour) never drawn and never captioned: every shape, colour
# and background still occurs in other combinations.
HELD_OUT = (
    ("circle", "red", "blue"), ("square", "green", "yellow"), ("triangle", "orange", "purple"),
    ("cross", "white", "black"), ("circle", "yellow", "green"), ("square", "purple", "orange"),
    ("triangle", "blue", "white"), ("cross", "black", "red"),
)

CLEAN = ""
MISMATCHED_CAPTION = "mismatched_caption"
WATERMARK = "watermark"
LOW_AESTHETIC = "low_aesthetic"
NSFW = "nsfw"
NEAR_DUPLICATE = "near_duplicate"
# Share of the pictures per planted defect; the rest are clean.
DEFECT_RATES = {MISMATCHED_CAPTION: 0.08, WATERMARK: 0.08, LOW_AESTHETIC: 0.08, NSFW: 0.05, NEAR_DUPLICATE: 0.08}
DETAILS = {WATERMARK: ("text", "logo"), LOW_AESTHETIC: ("noise", "blur", "blank"),
           NEAR_DUPLICATE: ("reencoded", "resized", "cropped")}
# A near-duplicate copies a picture at least this many indices back (another shard at <= 150 per shard).
DUPLICATE_GAP = 150
WATERMARK_TEXTS = ("© stockpix", "SAMPLE", "shutterpix.com", "© photo 2024", "PREVIEW", "getpix")


@dataclass(frozen=True)
class Picture:
    shape: str
    color: str
    background: str
    place: str
    width: int
    height: int
    # Per-picture variation, so that two pictures of one description are not copies of each other:
    # the shape's half-size as a share of the short side, and its offset from the place's anchor
    # as shares of the width and height.
    size: float = 0.25
    shift: tuple[float, float] = (0.0, 0.0)

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} {self.place} on a {self.background} background"


def held_out_combos() -> list[tuple[str, str, str]]:
    """The (shape, shape colour, background colour) combinations that no picture or caption shows."""
    return list(HELD_OUT)


def random_picture(rng: random.Random, allow_held_out: bool = False) -> Picture:
    while True:
        color, background = rng.sample(sorted(COLORS), 2)
        shape = rng.choice(SHAPES)
        if allow_held_out or (shape, color, background) not in HELD_OUT:
            break
    # Most images are large enough for 512px training, some only for 256px.
    short = rng.choice([288, 320, 400, 512, 560, 640])
    long = int(short * rng.uniform(1.0, 1.5))
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    size = rng.uniform(0.15, 0.29)
    shift = (rng.uniform(-0.09, 0.09), rng.uniform(-0.09, 0.09))
    return Picture(shape, color, background, rng.choice(PLACES), width, height, size, shift)


def picture(index: int, seed: int) -> Picture:
    """The picture drawn at `index` of world `seed` (before any defect)."""
    return random_picture(random.Random(seed * 1_000_003 + index))


def draw(p: Picture) -> Image.Image:
    img = Image.new("RGB", (p.width, p.height), COLORS[p.background])
    d = ImageDraw.Draw(img)
    r = round(min(p.width, p.height) * p.size)
    ax, ay = {"in the center": (0.5, 0.5), "on the left": (0.25, 0.5), "on the right": (0.75, 0.5),
              "at the top": (0.5, 0.25), "at the bottom": (0.5, 0.75)}[p.place]
    cx, cy = round(p.width * (ax + p.shift[0])), round(p.height * (ay + p.shift[1]))
    fill = COLORS[p.color]
    if p.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif p.shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif p.shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        d.rectangle([cx - r, cy - r // 3, cx + r, cy + r // 3], fill=fill)
        d.rectangle([cx - r // 3, cy - r, cx + r // 3, cy + r], fill=fill)
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# Defects -------------------------------------------------------------------------------------
def add_watermark(img: Image.Image, rng: random.Random, detail: str) -> Image.Image:
    """A text or logo overlay: 12-30% of the short side high, 40-90% opaque, anywhere."""
    w, h = img.size
    size = int(min(w, h) * rng.uniform(0.12, 0.3))
    opacity = int(255 * rng.uniform(0.4, 0.9))
    ink = (255, 255, 255) if sum(img.getpixel((w // 2, h // 2))) < 380 else (0, 0, 0)
    ink = ink if rng.random() < 0.7 else tuple(rng.randrange(256) for _ in range(3))
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=max(10, int(size * 0.8)))
    text = rng.choice(WATERMARK_TEXTS)
    tw, th = d.textbbox((0, 0), text, font=font)[2:]
    if detail == "logo":
        box = (size + tw + size // 3, size)
    else:
        box = (tw, th)
    x = rng.randrange(0, max(1, w - box[0]))
    y = rng.randrange(0, max(1, h - box[1]))
    if detail == "logo":
        d.ellipse([x, y, x + size, y + size], outline=ink + (opacity,), width=max(2, size // 8))
        d.text((x + size // 4, y + size // 5), text[0].upper() if text[0].isalpha() else "P",
               font=font, fill=ink + (opacity,))
        d.text((x + size + size // 3, y + (size - th) // 2), text, font=font, fill=ink + (opacity,))
    else:
        d.text((x, y), text, font=font, fill=ink + (opacity,))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def degrade(img: Image.Image, rng: random.Random, detail: str) -> Image.Image:
    """A low-aesthetic version: heavy noise, heavy blur, or near-blank."""
    w, h = img.size
    nrng = np.random.default_rng(rng.getrandbits(32))
    if detail == "noise":
        # Grain about 1/60 of the short side: coarse enough to survive a resize to a model's input.
        grain = max(1, min(w, h) // 60)
        noise = nrng.normal(0, rng.uniform(70, 110), (h // grain + 1, w // grain + 1, 3))
        noise = noise.repeat(grain, 0).repeat(grain, 1)[:h, :w]
        return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))
    if detail == "blur":
        return img.filter(ImageFilter.GaussianBlur(min(w, h) * rng.uniform(0.08, 0.14)))
    base = np.array(rng.choice(list(COLORS.values())), np.float32)
    arr = base + nrng.normal(0, 3, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def copy_variant(img: Image.Image, rng: random.Random, detail: str) -> tuple[Image.Image, int]:
    """A near-duplicate of `img` and the JPEG quality to serve it at."""
    w, h = img.size
    if detail == "resized":
        scale = rng.uniform(max(0.7, 290 / min(w, h)), 0.95) if min(w, h) > 300 else rng.uniform(1.1, 1.3)
        return img.resize((round(w * scale), round(h * scale)), Image.BICUBIC), 90
    if detail == "cropped":
        dx, dy = int(w * rng.uniform(0.01, 0.04)), int(h * rng.uniform(0.01, 0.04))
        return img.crop((dx, dy, w - dx, h - dy)), 90
    return img, rng.randrange(35, 60)


@dataclass(frozen=True)
class WorldSample:
    """Image `index` as served: what it shows, its planted defect (if any) and its caption."""

    index: int
    picture: Picture            # what the image shows, before the defect
    defect: str                 # CLEAN or a defect kind
    detail: str                 # the defect's variant (text/logo, noise/blur/blank, ...)
    caption: str                # the caption the source carries
    punsafe: float
    duplicate_of: int | None = None


def defect_of(index: int, seed: int) -> tuple[str, str]:
    rng = random.Random((seed * 1_000_003 + index) * 7 + 1)
    u, edge = rng.random(), 0.0
    for kind, rate in DEFECT_RATES.items():
        edge += rate
        if u < edge:
            if kind == NEAR_DUPLICATE and index < DUPLICATE_GAP + 10:
                return CLEAN, ""
            return kind, rng.choice(DETAILS.get(kind, ("",)))
    return CLEAN, ""


def world_sample(index: int, seed: int, defects: bool = True) -> WorldSample:
    rng = random.Random((seed * 1_000_003 + index) * 7 + 2)
    pic = picture(index, seed)
    kind, detail = defect_of(index, seed) if defects else (CLEAN, "")
    punsafe = rng.betavariate(1, 80)
    if kind == MISMATCHED_CAPTION:
        other = random_picture(rng)
        while other.shape == pic.shape or other.color == pic.color or other.background == pic.background:
            other = random_picture(rng)
        return WorldSample(index, pic, kind, detail, other.caption, punsafe)
    if kind == NSFW:
        punsafe = rng.uniform(0.3, 0.99)
    if kind == NEAR_DUPLICATE:
        while True:
            j = rng.randrange(0, index - DUPLICATE_GAP)
            if defect_of(j, seed)[0] == CLEAN:
                break
        return WorldSample(index, picture(j, seed), kind, detail, picture(j, seed).caption, punsafe, j)
    return WorldSample(index, pic, kind, detail, pic.caption, punsafe)


def render(s: WorldSample, seed: int) -> Image.Image:
    """The image of a world sample (before its encoding)."""
    return render_with_quality(s, seed)[0]


def render_with_quality(s: WorldSample, seed: int) -> tuple[Image.Image, int]:
    rng = random.Random((seed * 1_000_003 + s.index) * 7 + 3)
    img = draw(s.picture)
    if s.defect == WATERMARK:
        return add_watermark(img, rng, s.detail), 92
    if s.defect == LOW_AESTHETIC:
        return degrade(img, rng, s.detail), 92
    if s.defect == NEAR_DUPLICATE:
        return copy_variant(img, rng, s.detail)
    return img, 92


def image_bytes(index: int, seed: int, defects: bool = True) -> bytes:
    """The JPEG the loopback server answers for /img/{index}.jpg."""
    img, quality = render_with_quality(world_sample(index, seed, defects), seed)
    return encode(img, "JPEG", quality=quality)


# Held-out prompts ------------------------------------------------------------------------------
def held_out_prompts() -> list[dict]:
    """One prompt per held-out combination, in the captions' grammar, with its truth columns."""
    rows = []
    for i, (shape, color, background) in enumerate(HELD_OUT):
        place = PLACES[i % len(PLACES)]
        p = Picture(shape, color, background, place, 512, 512)
        rows.append({"prompt": p.caption, "shape": shape, "color": color, "background": background,
                     "place": place, "color_rgb": list(COLORS[color]), "background_rgb": list(COLORS[background])})
    return rows


def write_prompts(path: str) -> str:
    """The held-out prompts as a parquet file: prompt, shape, color, background, place, and the RGB values."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    pq.write_table(pa.Table.from_pylist(held_out_prompts()), tmp)
    os.replace(tmp, path)
    return path

"""The embedded default: a synthetic LAION-COCO-like set served from a loopback HTTP server.

Images are the pictures of `world`: coloured shapes on plain backgrounds with captions that
describe them, a share of them with a planted defect (with `defects`). With `bad_records`, the
set also holds one record of every kind of trouble a web crawl brings (dead links, slow servers,
corrupt and odd images, odd captions, non-http schemes). The parquet has LAION-COCO's column
names and types. Beside it go the truth file (`truth_path`: what every row really is, for the
truth metrics; no stage reads it) and the held-out prompts (`prompts_path`, `write_prompts`).

The server answers only on 127.0.0.1. Its port is stored in the parquet's metadata so that a
rerun serves the same URLs again.
"""
from __future__ import annotations

import io
import json
import os
import random
import struct
import threading
import time
import zlib
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tessera.config.download import SyntheticConfig
from tessera.demo.world import (COLORS, PLACES, SHAPES, Picture, WorldSample, draw, encode,  # noqa: F401
                                     held_out_combos, image_bytes, picture, world_sample,
                                     write_prompts)

PORT_KEY = b"tessera.synthetic.port"
CLEAN_KIND = "clean"


def png_bomb(side: int = 30_000) -> bytes:
    """A small PNG that claims side x side pixels: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _odd_images() -> dict[str, tuple[str, bytes]]:
    """Path -> (content type, body) for every odd-but-real and broken image kind."""
    base = draw(Picture("circle", "red", "blue", "in the center", 600, 520))
    jpeg = encode(base, "JPEG", quality=90)
    rotated = draw(Picture("triangle", "yellow", "purple", "at the top", 520, 640)).rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    frames = [draw(Picture("square", c, "white", "in the center", 520, 520)) for c in ("red", "green")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    gray16 = Image.fromarray((np.linspace(0, 65535, 520 * 600).reshape(520, 600)).astype(np.uint16))
    rgba = draw(Picture("cross", "green", "black", "in the center", 560, 520)).convert("RGBA")
    rgba.putalpha(180)
    return {
        "/odd/cmyk.jpg": ("image/jpeg", encode(base.convert("CMYK"), "JPEG")),
        "/odd/16bit.png": ("image/png", encode(gray16, "PNG")),
        "/odd/palette.png": ("image/png", encode(base.convert("P", palette=Image.ADAPTIVE), "PNG")),
        "/odd/alpha.png": ("image/png", encode(rgba, "PNG")),
        "/odd/animated.gif": ("image/gif", gif.getvalue()),
        "/odd/exif-rotated.jpg": ("image/jpeg", encode(rotated, "JPEG", exif=exif.tobytes())),
        "/bad/tiny.jpg": ("image/jpeg", encode(base.resize((20, 20)), "JPEG")),
        "/bad/wide.jpg": ("image/jpeg", encode(base.resize((2000, 200)), "JPEG")),
        "/bad/truncated.jpg": ("image/jpeg", jpeg[: len(jpeg) // 3]),
        "/bad/empty.jpg": ("image/jpeg", b""),
        "/bad/html.jpg": ("text/html", b"<html><body><h1>Not an image</h1></body></html>"),
        "/bad/bomb.png": ("image/png", png_bomb()),
    }


# (path, what should become of it) for the bad records that the server answers.
SERVED_BAD = {
    "/status/404": "http_404",
    "/status/500": "http_500",
    "/slow": "timeout",
    "/loop": "redirect_loop",
    "/bad/html.jpg": "not_an_image",
    "/bad/truncated.jpg": "corrupt_image",
    "/bad/empty.jpg": "empty_image",
    "/bad/bomb.png": "decompression_bomb",
    "/bad/tiny.jpg": "image_too_small",
    "/bad/wide.jpg": "aspect_ratio",
}
# Odd but real images: they must download and come out as RGB.
SERVED_ODD = ["/odd/cmyk.jpg", "/odd/16bit.png", "/odd/palette.png", "/odd/alpha.png",
              "/odd/animated.gif", "/odd/exif-rotated.jpg"]
# URLs the URL check refuses before any request.
UNFETCHABLE = {
    "file:///etc/passwd": "bad_scheme",
    "data:image/png;base64,iVBORw0KGgo=": "bad_scheme",
    "javascript:alert(1)": "bad_scheme",
    "ftp://127.0.0.1/image.jpg": "bad_scheme",
    "http://exa mple.com/a.jpg": "malformed_url",
    "": "empty_url",
}


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if path.startswith("/img/"):
            index = int(path[5:].split(".")[0])
            return self._send(200, "image/jpeg", self.server.image(index))
        if path.startswith("/status/"):
            return self._send(int(path[8:]), "text/plain", b"status")
        if path == "/slow":
            time.sleep(float(query.get("s", ["30"])[0]))
            return self._send(200, "image/jpeg", self.server.image(0))
        if path == "/loop":
            return self._redirect(self.path)
        if path == "/redirect":
            return self._redirect(query["to"][0])
        if path in self.server.odd:
            kind, body = self.server.odd[path]
            return self._send(200, kind, body)
        self._send(404, "text/plain", b"not found")

    def _redirect(self, to: str):
        self.send_response(302)
        self.send_header("Location", to)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, code: int, kind: str, body: bytes):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, seed: int, defects: bool):
        super().__init__(addr, _Handler)
        self.seed = seed
        self.odd = _odd_images()
        self.image = lru_cache(maxsize=4096)(lambda i: image_bytes(i, seed, defects))


class SyntheticServer:
    """The loopback image server, as a context manager: `with SyntheticServer(seed) as s: s.base`."""

    def __init__(self, seed: int = 0, port: int = 0, host: str = "127.0.0.1", defects: bool = True):
        self._server = _Server((host, port), seed, defects)
        self.port = self._server.server_address[1]
        self.base = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "SyntheticServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def make_rows(cfg: SyntheticConfig, base: str, slow_seconds: float = 30.0) -> list[dict]:
    """The rows of the synthetic set, pictures first, then every bad kind (when enabled)."""
    return [row for row, _ in rows_with_truth(cfg, base, slow_seconds)]


def rows_with_truth(cfg: SyntheticConfig, base: str, slow_seconds: float = 30.0) -> list[tuple[dict, dict]]:
    """(source row, truth row) pairs; the truth row says what the source row really is."""
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.num_images):
        s = world_sample(i, cfg.seed, cfg.defects)
        row = laion_row(rng, f"{base}/img/{i}.jpg", s.caption, s.picture.width, s.picture.height)
        row["punsafe"] = s.punsafe
        out.append((row, picture_truth(s, base)))
    if not cfg.bad_records:
        return out

    def other(row: dict, kind: str, detail: str = "", **kw) -> tuple[dict, dict]:
        return row, {"kind": kind, "detail": detail, **kw}

    for path in list(SERVED_BAD) + SERVED_ODD:
        url = f"{base}{path}" + (f"?s={slow_seconds:g}" if path == "/slow" else "")
        row = laion_row(rng, url, f"an image served at {path}", 600, 520)
        out.append(other(row, "crawl_fault", SERVED_BAD[path]) if path in SERVED_BAD else other(row, "odd_image", path))
    for url, reason in UNFETCHABLE.items():
        out.append(other(laion_row(rng, url, "an address that must never be fetched", 600, 520), "crawl_fault", reason))
    first = out[0][0]
    out.append(other(laion_row(rng, first["URL"], first["top_caption"], 600, 520), "crawl_fault", "duplicate_url"))
    # Caption trouble on good images: the image must still download.
    n = cfg.num_images
    for j, (caption, detail) in enumerate([("", "caption_empty"), ("a very long caption " * 300, "caption_too_long"),
                                           (b"caf\xe9 \xff\xfe not utf-8", "caption_undecodable")]):
        s = world_sample(n + j, cfg.seed, cfg.defects)
        truth = {**picture_truth(s, base), "kind": "caption_trouble", "detail": detail}
        row = laion_row(rng, f"{base}/img/{n + j}.jpg", caption, 600, 520)
        row["punsafe"] = s.punsafe
        out.append((row, truth))
    return out


def picture_truth(s: WorldSample, base: str) -> dict:
    p = s.picture
    return {"kind": s.defect or CLEAN_KIND, "detail": s.detail, "shape": p.shape, "color": p.color,
            "background": p.background, "place": p.place, "true_caption": p.caption,
            "duplicate_of": None if s.duplicate_of is None else f"{base}/img/{s.duplicate_of}.jpg"}


def laion_row(rng: random.Random, url: str, caption, width: int, height: int) -> dict:
    caps = [caption if isinstance(caption, str) else "undecodable caption"] * 5
    return {
        "URL": url,
        "TEXT": caption,
        "top_caption": caps[0],
        "all_captions": caps,
        "all_similarities": [round(rng.uniform(0.2, 0.4), 4) for _ in caps],
        "WIDTH": float(width),
        "HEIGHT": float(height),
        "similarity": rng.uniform(0.22, 0.42),
        "hash": rng.getrandbits(63),
        "pwatermark": rng.betavariate(1, 8),
        "punsafe": rng.betavariate(1, 30),
    }


def _text_column(values: list) -> pa.Array:
    """A string column that may hold invalid UTF-8, as crawled captions sometimes do."""
    raw = [v if isinstance(v, bytes) else v.encode() for v in values]
    return pa.array(raw, type=pa.binary()).view(pa.string())


def write_parquet(rows: list[dict], path: str, port: int) -> None:
    table = pa.table({
        "URL": pa.array([r["URL"] for r in rows], pa.string()),
        "TEXT": _text_column([r["TEXT"] for r in rows]),
        "top_caption": pa.array([r["top_caption"] for r in rows], pa.string()),
        "all_captions": pa.array([r["all_captions"] for r in rows], pa.list_(pa.string())),
        "all_similarities": pa.array([r["all_similarities"] for r in rows], pa.list_(pa.float64())),
        "WIDTH": pa.array([r["WIDTH"] for r in rows], pa.float64()),
        "HEIGHT": pa.array([r["HEIGHT"] for r in rows], pa.float64()),
        "similarity": pa.array([r["similarity"] for r in rows], pa.float64()),
        "hash": pa.array([r["hash"] for r in rows], pa.int64()),
        "pwatermark": pa.array([r["pwatermark"] for r in rows], pa.float32()),
        "punsafe": pa.array([r["punsafe"] for r in rows], pa.float32()),
    })
    table = table.replace_schema_metadata({PORT_KEY: str(port).encode()})
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


TRUTH_FIELDS = {"kind": pa.string(), "detail": pa.string(), "shape": pa.string(), "color": pa.string(),
                "background": pa.string(), "place": pa.string(), "true_caption": pa.string(),
                "duplicate_of": pa.string()}


def truth_path(source_path: str) -> str:
    """Where the truth of a synthetic source lives: beside it, never read by any stage."""
    return os.path.splitext(source_path)[0] + ".truth.parquet"


def prompts_path(source_path: str) -> str:
    """Where the held-out prompts of a synthetic source are written (`write_prompts`)."""
    return os.path.join(os.path.dirname(source_path), "held-out-prompts.parquet")


def write_truth(pairs: list[tuple[dict, dict]], path: str) -> None:
    """One truth row per source row, in source order: row_index, url, the caption it carries,
    `kind` (clean, a planted defect, crawl_fault, odd_image, caption_trouble), `detail`, and
    for pictures what they show (shape, color, background, place, true_caption, duplicate_of)."""
    columns: dict[str, list] = {"row_index": [], "url": [], "caption": [], "punsafe": []}
    columns.update({k: [] for k in TRUTH_FIELDS})
    for i, (row, truth) in enumerate(pairs):
        columns["row_index"].append(i)
        columns["url"].append(row["URL"])
        columns["caption"].append(row["top_caption"])
        columns["punsafe"].append(row["punsafe"])
        for k in TRUTH_FIELDS:
            columns[k].append(truth.get(k))
    schema = pa.schema([("row_index", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
                        ("punsafe", pa.float32()), *TRUTH_FIELDS.items()])
    tmp = f"{path}.tmp"
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), tmp)
    os.replace(tmp, path)


def recorded_port(path: str) -> int | None:
    """The server port a previously generated set was made for, if any."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    return int(meta[PORT_KEY]) if PORT_KEY in meta else None


def expected_outcomes() -> dict[str, str]:
    """URL path or URL -> the reason it must end with (for tests and the demo's self-check)."""
    return {**SERVED_BAD, **UNFETCHABLE}


def describe(cfg: SyntheticConfig) -> str:
    return json.dumps({"num_images": cfg.num_images, "seed": cfg.seed, "bad_records": cfg.bad_records,
                       "defects": cfg.defects})


class SyntheticSource:
    """Generate the synthetic set at `path` (once) and serve its images while in use.

    `with SyntheticSource(cfg, path, timeout): ...` - `timeout` is the downloader's, so the
    slow record is slower than it.
    """

    def __init__(self, cfg: SyntheticConfig, path: str, download_timeout: float):
        self.cfg, self.path, self.timeout = cfg, path, download_timeout
        self.server: SyntheticServer | None = None

    def __enter__(self) -> SyntheticServer:
        port = recorded_port(self.path) if os.path.exists(self.path) else None
        self.server = SyntheticServer(self.cfg.seed, port=port or 0, defects=self.cfg.defects).__enter__()
        if port is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            pairs = rows_with_truth(self.cfg, self.server.base, slow_seconds=self.timeout + 3)
            write_truth(pairs, truth_path(self.path))
            write_prompts(prompts_path(self.path))
            # The source last: its presence says the set (with its truth) is complete.
            write_parquet([row for row, _ in pairs], self.path, self.server.port)
        return self.server

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.__exit__(*exc)

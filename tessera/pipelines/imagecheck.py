"""Image decoding that web images can't break, in front of img2dataset's resizer.

img2dataset decodes with OpenCV, which ignores EXIF orientation, keeps 16-bit and palette
data as they are, cannot read GIFs, and would decode a decompression bomb in full. Here the
header is read first (cheap), bombs are refused before any pixel is decoded, and anything
that is not plain 8-bit RGB or grey is normalised to RGB (EXIF rotation applied, first frame of
an animation, alpha composited on white) before the resizer sees it.
"""
from __future__ import annotations

import io
import os
import warnings

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (under img2dataset) asks the network
from img2dataset.resizer import Resizer  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError

# Result tuple of img2dataset's Resizer: img, width, height, original_width, original_height, err
_FAIL = (None, None, None, None, None)


class SafeResizer(Resizer):
    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        data = img_stream.read()
        if not data:
            return (*_FAIL, "empty image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
            width, height = img.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return (*_FAIL, "decompression bomb")
        except UnidentifiedImageError:
            return (*_FAIL, "not an image")
        except Exception as e:  # noqa: BLE001 - any header failure is this sample's problem
            return (*_FAIL, f"corrupt image: {e}")
        if width * height > self.max_image_area:
            return (*_FAIL, "decompression bomb")
        plain = (img.format == "JPEG" and img.mode in ("RGB", "L")
                 and img.getexif().get(0x0112, 1) == 1)
        if not plain:
            try:
                img.seek(0)
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    img = Image.new("RGB", rgba.size, (255, 255, 255))
                    img.paste(rgba, mask=rgba.getchannel("A"))
                elif img.mode == "I;16" or img.mode == "I":
                    img = img.point(lambda v: v / 256).convert("L")
                img = img.convert("RGB")
                buf = io.BytesIO()
                img.save(buf, "BMP")
                data = buf.getvalue()
            except Exception as e:  # noqa: BLE001
                return (*_FAIL, f"corrupt image: {e}")
        elif not data.rstrip(b"\0").endswith(b"\xff\xd9"):
            # OpenCV half-decodes a truncated JPEG without complaint; its end marker tells.
            return (*_FAIL, "corrupt image: truncated JPEG")
        return super().__call__(io.BytesIO(data), blurring_bbox_list)


def resizer_for(cfg) -> SafeResizer:
    """The resizer a DownloadConfig asks for: the same checks for downloaded and local images."""
    return SafeResizer(
        image_size=cfg.image_size, resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger, encode_quality=cfg.encode_quality,
        encode_format=cfg.encode_format, min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area, max_aspect_ratio=cfg.max_aspect_ratio,
    )

"""Sample images and bad image inputs, drawn on the spot with Pillow.

Nothing binary is shipped and nothing is downloaded: every picture is drawn with Pillow (gradients from
numpy, shapes with ImageDraw, text with Pillow's bundled font), so tests and demos have real image files in
every format and pixel mode the image path must handle. Drawing is deterministic (fixed seeds, no clock),
so the same Pillow build writes byte-identical files; the whole set is under 1 MB and takes about a second.

Good pictures (``generate_images``), in this order:

======================================  =======  ===========================================================
file                                    mode     what it exercises
======================================  =======  ===========================================================
gradient_1024x768.jpg                   RGB      smooth colour gradient with soft discs; plain JPEG
shapes_800x600.png                      RGB      flat shapes with hard edges; PNG
document_1240x1754.png                  L        an A4-like page of rendered text (OCR-like); greyscale
bar_chart_900x600.webp                  RGB      bar chart with axes, ticks and labels; lossy WEBP
line_chart_3000x600.jpg                 RGB      5:1 panorama-shaped line chart
large_scene_4800x3600.jpg               RGB      17.3 MP: more than 20,480 tokens, so it must be capped
small_tall_60x400.png                   RGB      small and tall (6.7:1): grows to the token minimum or so
logo_rgba_512x512.png                   RGBA     transparent background, soft alpha edges
icons_palette_256x256.png               P        palette image with a transparent palette index
exif_rotated_orient6.jpg                RGB      stored 672x448 landscape with EXIF orientation 6: shown as
                                                 448x672 portrait, red top-left, green top-right, blue
                                                 bottom half (see EXIF_EXPECTED_QUADRANTS)
grey16_640x480.png                      I;16     16-bit greyscale horizontal ramp 0..65535
ui_screenshot_1280x800.webp             RGB      UI mock-up with text; lossless WEBP
cmyk_poster_600x800.jpg                 CMYK     CMYK JPEG
animated_200x200.gif                    P        two-frame GIF (the first frame is what counts)
bitmap_128x96.bmp                       RGB      Windows BMP
======================================  =======  ===========================================================

Bad inputs (``generate_bad_images``), keyed by short name:

================  ===============================  =========================================================
key               file                             what ingestion must do
================  ===============================  =========================================================
corrupt           corrupt_random.jpg               4 KiB of random bytes named .jpg: refuse, name the problem
truncated         truncated.jpg                    first 40% of a real JPEG: header fine, data runs out
huge_header       huge_header_50000x50000.png      a tiny PNG whose IHDR claims 50,000x50,000 (a
                                                   decompression bomb): refuse without decoding
one_pixel         one_pixel_1x1.png                1x1 pixel: nothing to learn
not_image         not_an_image.png                 a text file named .png
extreme_aspect    extreme_aspect_3000x10.png       300:1, past the processor's 200:1 limit
empty             empty.webp                       0 bytes
unreadable        dangling.jpg                     dangling symlink: listed by a scan, cannot be opened
================  ===============================  =========================================================

Run ``python -m keyeflow.synthetic.images DEST`` to write the pictures to DEST and the bad inputs to
DEST/bad.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "EXIF_EXPECTED_QUADRANTS",
    "exif_upright",
    "generate_bad_images",
    "generate_images",
    "huge_header_png",
    "main",
]

# How exif_rotated_orient6.jpg looks once shown upright: (top-left, top-right, bottom) colours.
EXIF_EXPECTED_QUADRANTS = ((220, 30, 30), (30, 180, 60), (40, 60, 220))
_WORDS = (
    "keye", "vision", "language", "model", "frames", "tokens", "slow", "fast", "patch", "merge", "resize",
    "budget", "table", "lance", "shard", "quarantine", "reason", "config", "hash", "sample", "image", "video",
    "text", "mixture", "stage", "train", "annealing", "fusion", "reward",
)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow >= 10.1 bundles a scalable font (needs FreeType); otherwise its fixed bitmap font.
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _gradient(width: int, height: int, top_left, top_right, bottom) -> np.ndarray:
    """H×W×3 uint8 blend of three corner colours (bilinear in x, then y)."""
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    top = (1 - x) * np.asarray(top_left, np.float32) + x * np.asarray(top_right, np.float32)
    return ((1 - y) * top + y * np.asarray(bottom, np.float32)).round().astype(np.uint8)


def _gradient_jpg() -> Image.Image:
    image = Image.fromarray(_gradient(1024, 768, (250, 120, 40), (40, 120, 250), (30, 200, 120)))
    draw = ImageDraw.Draw(image)
    for i, (cx, cy, r) in enumerate([(250, 250, 140), (700, 300, 190), (500, 600, 110)]):
        shade = (255, 255 - 60 * i, 200)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=shade, width=18)
    return image


def _shapes_png() -> Image.Image:
    image = Image.new("RGB", (800, 600), (245, 242, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 60, 300, 260), fill=(200, 40, 40))
    draw.ellipse((360, 80, 620, 340), fill=(30, 110, 200))
    draw.polygon([(120, 540), (300, 320), (480, 540)], fill=(40, 160, 70))
    draw.line((520, 400, 760, 560), fill=(20, 20, 20), width=12)
    draw.regular_polygon((660, 180, 90), 6, fill=(240, 190, 30))
    return image


def _document_png() -> Image.Image:
    image = Image.new("L", (1240, 1754), 255)
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(3)
    draw.text((100, 90), "Keye-VL sample report", fill=0, font=_font(48))
    body = _font(24)
    y = 190
    for paragraph in range(6):
        draw.text((100, y), f"{paragraph + 1}. Section on {_WORDS[paragraph * 3]}", fill=0, font=_font(32))
        y += 56
        for _ in range(8):
            line = " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=9))
            draw.text((100, y), line, fill=30, font=body)
            y += 34
        y += 30
    return image


def _axes(draw: ImageDraw.ImageDraw, box, font) -> None:
    x0, y0, x1, y1 = box
    draw.line((x0, y1, x1, y1), fill=(0, 0, 0), width=3)
    draw.line((x0, y0, x0, y1), fill=(0, 0, 0), width=3)
    for k in range(6):
        y = y1 - k * (y1 - y0) // 5
        draw.line((x0 - 10, y, x0, y), fill=(0, 0, 0), width=2)
        draw.text((x0 - 60, y - 12), str(k * 20), fill=(0, 0, 0), font=font)


def _bar_chart_webp() -> Image.Image:
    image = Image.new("RGB", (900, 600), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(20)
    draw.text((300, 20), "Tokens by modality", fill=(0, 0, 0), font=_font(30))
    _axes(draw, (100, 80, 860, 520), font)
    for i, (label, value, colour) in enumerate(
        [("video", 24, (220, 80, 60)), ("image", 50, (60, 120, 220)), ("text", 26, (80, 170, 90))]
    ):
        x = 180 + i * 230
        top = 520 - int(value / 100 * 440)
        draw.rectangle((x, top, x + 140, 520), fill=colour)
        draw.text((x + 40, 530), label, fill=(0, 0, 0), font=font)
        draw.text((x + 50, top - 28), f"{value}%", fill=(0, 0, 0), font=font)
    return image


def _line_chart_jpg() -> Image.Image:
    image = Image.new("RGB", (3000, 600), (252, 252, 255))
    draw = ImageDraw.Draw(image)
    font = _font(22)
    _axes(draw, (120, 60, 2940, 540), font)
    t = np.linspace(0, 12 * np.pi, 400)
    for k, colour in enumerate([(200, 40, 40), (40, 90, 200)]):
        values = 300 + 160 * np.sin(t + k) * np.exp(-t / 40) + 40 * np.cos(3 * t)
        points = [(120 + int(i * 2820 / (len(t) - 1)), int(v)) for i, v in enumerate(values)]
        draw.line(points, fill=colour, width=5)
    draw.text((1300, 15), "loss over steps (two runs)", fill=(0, 0, 0), font=_font(32))
    return image


def _large_scene_jpg() -> Image.Image:
    width, height = 4800, 3600
    pixels = _gradient(width, height, (90, 150, 230), (150, 200, 250), (250, 220, 180))
    horizon = int(height * 0.62)
    pixels[horizon:] = _gradient(width, height - horizon, (70, 120, 50), (90, 140, 60), (40, 80, 30))
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((3500, 400, 4100, 1000), fill=(255, 230, 120))
    draw.polygon([(0, horizon), (900, 1300), (1900, horizon)], fill=(110, 110, 130))
    draw.polygon([(1300, horizon), (2600, 900), (3900, horizon)], fill=(90, 95, 120))
    draw.polygon([(2300, 1150), (2600, 900), (2900, 1150)], fill=(245, 245, 250))
    for i in range(12):
        x = 200 + i * 380
        draw.rectangle((x + 60, 2900, x + 100, 3200), fill=(90, 60, 30))
        draw.ellipse((x, 2600, x + 160, 2950), fill=(30, 100 + 8 * i, 40))
    return image


def _small_tall_png() -> Image.Image:
    rows = np.repeat(np.arange(400, dtype=np.int32)[:, None], 60, axis=1)
    pixels = np.stack([(rows * 5) % 256, (rows * 3 + 80) % 256, 255 - (rows * 2) % 256], axis=2)
    image = Image.fromarray(pixels.astype(np.uint8))
    ImageDraw.Draw(image).ellipse((10, 170, 50, 230), fill=(255, 255, 255))
    return image


def _logo_rgba_png() -> Image.Image:
    image = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for k in range(24):  # a soft halo: alpha fades out over 24 px
        r = 200 - k
        draw.ellipse((256 - r, 256 - r, 256 + r, 256 + r), fill=(20, 60, 160, int(255 * (k + 1) / 24)))
    draw.ellipse((96, 96, 416, 416), fill=(20, 60, 160, 255))
    draw.text((170, 225), "KEYE", fill=(255, 255, 255, 255), font=_font(64))
    return image


def _icons_palette_png() -> Image.Image:
    image = Image.new("P", (256, 256), 0)
    palette = [255, 0, 255, 220, 40, 40, 40, 160, 70, 30, 90, 210, 250, 200, 30, 20, 20, 20]
    image.putpalette(palette + [0] * (768 - len(palette)))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 110, 110), fill=1)
    draw.ellipse((140, 20, 236, 116), fill=2)
    draw.polygon([(20, 236), (65, 140), (110, 236)], fill=3)
    draw.regular_polygon((188, 188, 48), 5, fill=4)
    draw.line((20, 128, 236, 128), fill=5, width=4)
    image.info["transparency"] = 0  # index 0 (magenta) is transparent: must come out white, not magenta
    return image


def exif_upright() -> Image.Image:
    """exif_rotated_orient6.jpg as it should be shown: 448 wide, 672 tall."""
    image = Image.new("RGB", (448, 672), EXIF_EXPECTED_QUADRANTS[2])
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 223, 335), fill=EXIF_EXPECTED_QUADRANTS[0])
    draw.rectangle((224, 0, 447, 335), fill=EXIF_EXPECTED_QUADRANTS[1])
    return image


def _exif_rotated_jpg() -> tuple[Image.Image, dict]:
    # Orientation 6 tells a viewer to turn the stored picture 90° clockwise; so store the upright picture
    # turned 90° counter-clockwise (what a phone held upright writes).
    stored = exif_upright().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return stored, {"exif": exif.tobytes()}


def _grey16_png() -> Image.Image:
    ramp = np.linspace(0, 65535, 640).round().astype(np.uint16)
    pixels = np.repeat(ramp[None, :], 480, axis=0)
    pixels[200:280, 280:360] = 65535 - pixels[200:280, 280:360]
    return Image.fromarray(pixels)  # mode I;16


def _ui_screenshot_webp() -> Image.Image:
    image = Image.new("RGB", (1280, 800), (236, 239, 244))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 1280, 56), fill=(38, 50, 72))
    draw.text((24, 14), "keyeflow - runs", fill=(255, 255, 255), font=_font(26))
    draw.rectangle((0, 56, 240, 800), fill=(250, 250, 252))
    for i, name in enumerate(["Flows", "Tables", "Gates", "Lineage", "Settings"]):
        draw.text((30, 90 + 48 * i), name, fill=(40, 40, 40), font=_font(22))
    font = _font(20)
    for row in range(10):
        y = 100 + row * 60
        draw.rounded_rectangle((280, y, 1240, y + 48), radius=8, fill=(255, 255, 255), outline=(210, 214, 220))
        draw.text((300, y + 12), f"stage-{row + 1}  {_WORDS[row]}  {_WORDS[-row - 1]}", fill=(30, 30, 30), font=font)
        colour = (60, 170, 90) if row % 3 else (210, 70, 60)
        draw.ellipse((1190, y + 14, 1210, y + 34), fill=colour)
    return image


def _cmyk_poster_jpg() -> Image.Image:
    image = Image.fromarray(_gradient(600, 800, (255, 240, 0), (0, 200, 255), (255, 0, 140)))
    draw = ImageDraw.Draw(image)
    draw.rectangle((80, 300, 520, 500), fill=(20, 20, 20))
    draw.text((120, 370), "CMYK", fill=(255, 255, 255), font=_font(72))
    return image.convert("CMYK")


def _animated_gif() -> tuple[Image.Image, dict]:
    frames = []
    for k, colour in enumerate([(230, 60, 60), (60, 60, 230)]):
        frame = Image.new("RGB", (200, 200), (255, 255, 255))
        ImageDraw.Draw(frame).ellipse((20 + 60 * k, 50, 120 + 60 * k, 150), fill=colour)
        frames.append(frame.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    return frames[0], {"save_all": True, "append_images": frames[1:], "duration": 200, "loop": 0}


def _bitmap_bmp() -> Image.Image:
    return Image.fromarray(_gradient(128, 96, (0, 0, 0), (255, 0, 0), (0, 255, 255)))


# name -> (draw function returning an image or (image, extra save args), Pillow save arguments)
_PICTURES: list[tuple[str, Callable, dict]] = [
    ("gradient_1024x768.jpg", _gradient_jpg, {"quality": 85}),
    ("shapes_800x600.png", _shapes_png, {}),
    ("document_1240x1754.png", _document_png, {"optimize": True}),
    ("bar_chart_900x600.webp", _bar_chart_webp, {"quality": 80, "method": 4}),
    ("line_chart_3000x600.jpg", _line_chart_jpg, {"quality": 80}),
    ("large_scene_4800x3600.jpg", _large_scene_jpg, {"quality": 70}),
    ("small_tall_60x400.png", _small_tall_png, {}),
    ("logo_rgba_512x512.png", _logo_rgba_png, {}),
    ("icons_palette_256x256.png", _icons_palette_png, {"transparency": 0}),
    ("exif_rotated_orient6.jpg", _exif_rotated_jpg, {"quality": 90}),
    ("grey16_640x480.png", _grey16_png, {}),
    ("ui_screenshot_1280x800.webp", _ui_screenshot_webp, {"lossless": True, "method": 4}),
    ("cmyk_poster_600x800.jpg", _cmyk_poster_jpg, {"quality": 85}),
    ("animated_200x200.gif", _animated_gif, {}),
    ("bitmap_128x96.bmp", _bitmap_bmp, {}),
]


def _partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    """Write atomically: a crash mid-write never leaves a half file under the final name."""
    partial = _partial_path(path)
    fmt = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF", ".bmp": "BMP"}[path.suffix]
    try:
        image.save(partial, format=fmt, **kwargs)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write_bytes(path: Path, data: bytes) -> None:
    partial = _partial_path(path)
    partial.write_bytes(data)
    os.replace(partial, path)


def generate_images(dest: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the sample images into dest and return their paths, in a fixed order.

    Existing files are kept unless overwrite, so calling this again is cheap.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw, save_args in _PICTURES:
        path = dest / name
        if overwrite or not path.exists():
            drawn = draw()
            image, extra = drawn if isinstance(drawn, tuple) else (drawn, {})
            _save(image, path, **save_args, **extra)
        paths.append(path)
    return paths


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_header_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose IHDR claims width×height 8-bit greyscale, with correct CRCs, carrying 2 rows of data.

    Every chunk is well formed, so any reader parses the header and learns the size; a reader that
    decodes trusts that size and allocates (2.5 GB at 50,000²) before finding the data short.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, deflate, no interlace
    rows = (b"\x00" + b"\x80" * width) * 2  # filter byte 0 + one mid-grey row, twice
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows, 9))
        + _png_chunk(b"IEND", b"")
    )


def generate_bad_images(dest: Path) -> dict[str, Path]:
    """Write the bad inputs an image ingestion must survive into dest; return {short name: path}.

    Idempotent like generate_images: files already present are kept.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def once(key: str, name: str, make: Callable[[Path], None]) -> None:
        path = dest / name
        if not os.path.lexists(path):
            make(path)
        out[key] = path

    once("corrupt", "corrupt_random.jpg",
         lambda p: _write_bytes(p, np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()))

    def truncated(path: Path) -> None:
        rng = np.random.default_rng(11)
        noisy = _gradient(640, 480, (200, 50, 50), (50, 200, 50), (50, 50, 200)).astype(np.int16)
        noisy += rng.integers(-40, 40, noisy.shape, dtype=np.int16)
        whole = dest / ".truncated.whole.jpg"
        try:
            _save(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), whole, quality=90)
            data = whole.read_bytes()
            _write_bytes(path, data[: int(len(data) * 0.4)])
        finally:
            whole.unlink(missing_ok=True)

    once("truncated", "truncated.jpg", truncated)
    once("huge_header", "huge_header_50000x50000.png", lambda p: _write_bytes(p, huge_header_png()))
    once("one_pixel", "one_pixel_1x1.png", lambda p: _save(Image.new("RGB", (1, 1), (255, 0, 0)), p))
    once("not_image", "not_an_image.png",
         lambda p: _write_bytes(p, b"This is not an image. It is plain text with a .png name.\n"))
    once("extreme_aspect", "extreme_aspect_3000x10.png",
         lambda p: _save(Image.fromarray(_gradient(3000, 10, (0, 0, 0), (255, 255, 255), (0, 0, 0))), p))
    once("empty", "empty.webp", lambda p: p.touch())
    # Relative target inside a directory that does not exist: stays dangling wherever dest is moved.
    once("unreadable", "dangling.jpg", lambda p: os.symlink(os.path.join("no-such-directory", "missing.jpg"), p))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyeflow.synthetic.images",
        description="Write sample images to DEST and bad image inputs to DEST/bad, drawn with Pillow.",
    )
    parser.add_argument("dest", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="redraw sample images that exist")
    args = parser.parse_args(argv)
    for path in generate_images(args.dest, overwrite=args.overwrite):
        print(f"{path.stat().st_size:>9}  {path}")
    for key, path in generate_bad_images(args.dest / "bad").items():
        size = path.stat().st_size if path.exists() else "-"
        print(f"{size:>9}  {path}  ({key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

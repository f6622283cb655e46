"""Sample images and bad image inputs, drawn on the spot with Pillow.

Nothing binary is shipped and nothing is downloaded: every picture is drawn with Pillow (gradients from
numpy, shapes with ImageDraw, text with Pillow's bundled font), so tests and demos have real image files in
every format and pixel mode the image path must handle. Drawing is deterministic (fixed seeds, no clock),
so the same Pillow build writes byte-identical files; the whole set is under 1 MB and takes about a second.

Each picture's code also states what the picture shows (``describe_image``: an ``ImageScene`` with the
regions drawn and their boxes, the text that fits on it, counts and questions), from the same coordinates,
texts and counts it paints with, and without painting a pixel; the corpus's captions, OCR, grounding and
questions read that statement, so nothing re-simulates a drawing to know what it shows.

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
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from keyeflow.synthetic import vocabulary

__all__ = [
    "BAR_UNIT",
    "EXIF_EXPECTED_QUADRANTS",
    "TASK_COLOURS",
    "ImageScene",
    "PlacedShape",
    "Question",
    "Region",
    "bar_chart_picture",
    "describe_image",
    "exif_upright",
    "generate_bad_images",
    "generate_images",
    "huge_header_png",
    "main",
    "save_png",
    "shape_count_picture",
    "single_shape_picture",
]

# How exif_rotated_orient6.jpg looks once shown upright: (top-left, top-right, bottom) colours.
EXIF_EXPECTED_QUADRANTS = ((220, 30, 30), (30, 180, 60), (40, 60, 220))
_WORDS = vocabulary.load("picture_words")["words"]  # what the document page and UI rows are written with
_AXIS_LABELS = tuple(str(k * 20) for k in range(6))  # what _axes writes beside its ticks, bottom to top


class Region(NamedTuple):
    """Something drawn that a grounding answer can point at."""

    phrase: str  # how a caption names it: "the red rectangle"
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the picture as shown upright


class Question(NamedTuple):
    question: str
    answer: str  # short
    why: str  # a sentence on where the picture shows it


@dataclass(frozen=True)
class ImageScene:
    """What a picture shows, stated by the code that draws it from the same coordinates, texts and counts:
    what the corpus's captions, OCR, grounding and question rows about that picture say."""

    size: tuple[int, int]  # width, height as shown upright
    summary: str  # a noun phrase: "a smooth colour gradient ..."
    details: tuple[str, ...]  # full sentences of what is visible
    regions: tuple[Region, ...]
    text: tuple[str, ...] = ()  # readable text in reading order: only what fits on the picture
    questions: tuple[Question, ...] = ()


@dataclass(frozen=True)
class _Picture:
    """A picture's scene, known without drawing it, and the painting (the costly part: 17 MP for one)."""

    scene: ImageScene
    paint: Callable[[], Image.Image | tuple[Image.Image, dict]]  # the image, or it and extra save arguments


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


def _disc(cx: int, cy: int, r: int) -> tuple[int, int, int, int]:
    """The box of a circle (also of a regular polygon drawn inside it)."""
    return cx - r, cy - r, cx + r, cy + r


def _extent(points: list[tuple[int, int]]) -> tuple[int, int, int, int]:
    xs, ys = [x for x, _ in points], [y for _, y in points]
    return min(xs), min(ys), max(xs), max(ys)


def _gradient_jpg() -> _Picture:
    rings = [
        (_disc(250, 250, 140), "the upper-left ring"),
        (_disc(700, 300, 190), "the large ring on the right"),
        (_disc(500, 600, 110), "the small ring near the bottom"),
    ]

    def paint() -> Image.Image:
        image = Image.fromarray(_gradient(1024, 768, (250, 120, 40), (40, 120, 250), (30, 200, 120)))
        draw = ImageDraw.Draw(image)
        for i, (box, _) in enumerate(rings):
            shade = (255, 255 - 60 * i, 200)
            draw.ellipse(box, outline=shade, width=18)
        return image

    return _Picture(
        ImageScene(
            (1024, 768),
            "a smooth colour gradient with three pale ring outlines",
            (
                "Orange fills the upper left corner and fades into blue towards the upper right.",
                "Along the bottom the colours turn green.",
                "Three ring outlines in pale cream and pink tones float over the gradient; they are hollow.",
                "The largest ring sits on the right, the smallest near the bottom middle.",
            ),
            tuple(Region(phrase, box) for box, phrase in rings),
            questions=(
                Question(
                    "How many ring outlines are drawn?",
                    str(len(rings)),
                    "There is one on the upper left, a large one on the right and a small one near "
                    "the bottom.",
                ),
                Question(
                    "What colour dominates the bottom edge?",
                    "Green",
                    "The gradient blends into green as it approaches the lower edge.",
                ),
            ),
        ),
        paint,
    )


def _shapes_png() -> _Picture:
    rectangle, circle = (60, 60, 300, 260), (360, 80, 620, 340)
    triangle = [(120, 540), (300, 320), (480, 540)]
    line, hexagon = (520, 400, 760, 560), (660, 180, 90)  # hexagon: centre x, centre y, outer radius

    def paint() -> Image.Image:
        image = Image.new("RGB", (800, 600), (245, 242, 230))
        draw = ImageDraw.Draw(image)
        draw.rectangle(rectangle, fill=(200, 40, 40))
        draw.ellipse(circle, fill=(30, 110, 200))
        draw.polygon(triangle, fill=(40, 160, 70))
        draw.line(line, fill=(20, 20, 20), width=12)
        draw.regular_polygon(hexagon, 6, fill=(240, 190, 30))
        return image

    return _Picture(
        ImageScene(
            (800, 600),
            "flat coloured shapes with hard edges on a cream background",
            (
                "A red rectangle sits in the upper left.",
                "A blue circle is to its right.",
                "A green triangle points upward in the lower half.",
                "A yellow hexagon in the upper right overlaps the edge of the circle.",
                "A thick black line runs diagonally in the lower right.",
            ),
            (
                Region("the red rectangle", rectangle),
                Region("the blue circle", circle),
                Region("the green triangle", _extent(triangle)),
                Region("the black diagonal line", line),
                Region("the yellow hexagon", _disc(*hexagon)),
            ),
            questions=(
                Question(
                    "How many filled shapes are there?",
                    "4",
                    "The rectangle, circle, triangle and hexagon are filled; the black line is a "
                    "stroke, not a shape.",
                ),
                Question(
                    "Which shape is yellow?",
                    "The hexagon",
                    "The only yellow element is the six-sided figure in the upper right.",
                ),
                Question(
                    "Is the circle left or right of the rectangle?",
                    "Right",
                    "The rectangle is near the left edge and the circle lies further to the right.",
                ),
            ),
        ),
        paint,
    )


def _document_png() -> _Picture:
    """Six sections of 358 px each from y=190, more than the 1754-px page holds: the fifth shows its heading
    and two body lines (the third is cut at the bottom edge) and the sixth is off the page."""
    width, height = 1240, 1754
    title = "Keye-VL sample report"
    rng = np.random.default_rng(3)
    sections: list[tuple[tuple[str, int], list[tuple[str, int]]]] = []  # ((heading, y), [(line, y), ...])
    y = 190
    for paragraph in range(6):
        heading = (f"{paragraph + 1}. Section on {_WORDS[paragraph * 3]}", y)
        y += 56
        lines = []
        for _ in range(8):
            lines.append((" ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=9)), y))
            y += 34
        y += 30
        sections.append((heading, lines))

    def paint() -> Image.Image:
        image = Image.new("L", (width, height), 255)
        draw = ImageDraw.Draw(image)
        draw.text((100, 90), title, fill=0, font=_font(48))
        body = _font(24)
        for (heading, heading_y), lines in sections:
            draw.text((100, heading_y), heading, fill=0, font=_font(32))
            for line, line_y in lines:
                draw.text((100, line_y), line, fill=30, font=body)
        return image

    # Legible: a heading's 40-px and a body line's 28-px glyphs end on the page.
    shown = [
        (heading, heading_y, [(line, line_y) for line, line_y in lines if line_y + 28 <= height])
        for (heading, heading_y), lines in sections
        if heading_y + 40 <= height
    ]
    text = [title]
    for heading, _, lines in shown:
        text += [heading, *(line for line, _ in lines)]
    # Right ends of the text (x2) as annotated: the lines' lengths vary with their words.
    regions = [Region("the title", (100, 95, 590, 150))]
    regions += [
        Region(f"the heading of section {k + 1}", (100, heading_y, 390, heading_y + 40))
        for k, (_, heading_y, _) in enumerate(shown)
    ]
    regions += [
        Region(f"the body text of section {k + 1}", (100, lines[0][1], 870, lines[-1][1] + 38))
        for k, (_, _, lines) in enumerate(shown)
        if len(lines) == 8
    ]
    regions += [
        Region(f"the cut-off body text of section {k + 1}", (100, lines[0][1], 790, height - 1))
        for k, (_, _, lines) in enumerate(shown)
        if len(lines) < 8
    ]
    return _Picture(
        ImageScene(
            (width, height),
            "a greyscale A4-like page of printed text with a title and numbered sections",
            (
                "The page is white with black and dark grey lettering.",
                "A large title heads the page.",
                "Four numbered sections with eight lines of body text each fill most of the page.",
                "A fifth section starts near the bottom and is cut off by the lower edge after two lines.",
                "The body lines are lists of short technical words rather than full sentences.",
            ),
            tuple(regions),
            text=tuple(text),
            questions=(
                Question(
                    "How many numbered section headings are visible?",
                    str(len(shown)),
                    "Headings 1 to 5 can be read; the fifth section runs off the bottom of the page.",
                ),
                Question(
                    "What is the title of the page?", title, "It is the large line of text at the very top."
                ),
                Question(
                    "What is the heading of the third section?",
                    shown[2][0],
                    "Section headings are numbered; the third one reads like this.",
                ),
                Question(
                    "Is the whole page of text visible?",
                    "No",
                    "The fifth section is cut off after two lines by the bottom edge, so the page "
                    "continues beyond what is shown.",
                ),
            ),
        ),
        paint,
    )


def _axes(draw: ImageDraw.ImageDraw, box, font) -> None:
    x0, y0, x1, y1 = box
    draw.line((x0, y1, x1, y1), fill=(0, 0, 0), width=3)
    draw.line((x0, y0, x0, y1), fill=(0, 0, 0), width=3)
    for k, label in enumerate(_AXIS_LABELS):
        y = y1 - k * (y1 - y0) // 5
        draw.line((x0 - 10, y, x0, y), fill=(0, 0, 0), width=2)
        draw.text((x0 - 60, y - 12), label, fill=(0, 0, 0), font=font)


def _bar_chart_webp() -> _Picture:
    title = "Tokens by modality"
    bars = [
        ("video", 24, (220, 80, 60), "red"),
        ("image", 50, (60, 120, 220), "blue"),
        ("text", 26, (80, 170, 90), "green"),
    ]  # label, percent, fill, colour name
    base, span = 520, 440  # the axis's 0 and its height in pixels (100%)

    def paint() -> Image.Image:
        image = Image.new("RGB", (900, 600), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        font = _font(20)
        draw.text((300, 20), title, fill=(0, 0, 0), font=_font(30))
        _axes(draw, (100, base - span, 860, base), font)
        for i, (label, value, colour, _) in enumerate(bars):
            x = 180 + i * 230
            top = base - int(value / 100 * span)
            draw.rectangle((x, top, x + 140, base), fill=colour)
            draw.text((x + 40, 530), label, fill=(0, 0, 0), font=font)
            draw.text((x + 50, top - 28), f"{value}%", fill=(0, 0, 0), font=font)
        return image

    # A bar's box reaches its value's height rounded; the drawn bar's top is cut to whole pixels (1 px lower
    # at 24%).
    return _Picture(
        ImageScene(
            (900, 600),
            f"a bar chart titled '{title}' with three coloured bars",
            (
                "The chart has a vertical axis marked from 0 to 100 in steps of 20.",
                *(f"A {name} bar labelled {label} reaches {value}%." for label, value, _, name in bars),
                "Each bar carries its percentage just above it.",
            ),
            (
                *(
                    Region(
                        f"the {label} bar",
                        (180 + i * 230, base - round(value / 100 * span), 320 + i * 230, base),
                    )
                    for i, (label, value, _, _) in enumerate(bars)
                ),
                Region("the chart title", (300, 20, 600, 55)),
            ),
            text=(
                title,
                *(f"{value}%" for _, value, _, _ in bars),
                *(label for label, _, _, _ in bars),
                *_AXIS_LABELS,
            ),
            questions=(
                Question(
                    "Which modality has the tallest bar?",
                    "Image",
                    "The image bar reaches 50%, higher than 24% for video and 26% for text.",
                ),
                Question(
                    "What share of tokens goes to text?", "26%", "The green bar labelled text is marked 26%."
                ),
                Question(
                    "By how many percentage points does image exceed video?",
                    "26",
                    "Image is at 50% and video at 24%, and 50 minus 24 is 26.",
                ),
            ),
        ),
        paint,
    )


def _line_chart_jpg() -> _Picture:
    title, plot = "loss over steps (two runs)", (120, 60, 2940, 540)
    runs = [(200, 40, 40), (40, 90, 200)]

    def paint() -> Image.Image:
        image = Image.new("RGB", (3000, 600), (252, 252, 255))
        draw = ImageDraw.Draw(image)
        font = _font(22)
        _axes(draw, plot, font)
        t = np.linspace(0, 12 * np.pi, 400)
        for k, colour in enumerate(runs):
            values = 300 + 160 * np.sin(t + k) * np.exp(-t / 40) + 40 * np.cos(3 * t)
            points = [(120 + int(i * 2820 / (len(t) - 1)), int(v)) for i, v in enumerate(values)]
            draw.line(points, fill=colour, width=5)
        draw.text((1300, 15), title, fill=(0, 0, 0), font=_font(32))
        return image

    return _Picture(
        ImageScene(
            (3000, 600),
            f"a very wide line chart titled '{title}'",
            (
                "Two curves, one red and one blue, wiggle across a panorama-shaped plot.",
                "Both curves oscillate with a swing that slowly shrinks from left to right.",
                "A vertical axis on the left is marked from 0 to 100.",
            ),
            (Region("the chart title", (1300, 15, 1760, 55)), Region("the plot area", plot)),
            text=(title, *_AXIS_LABELS),
            questions=(
                Question(
                    "How many runs are plotted?",
                    str(len(runs)),
                    "The title says two runs and there are a red and a blue curve.",
                ),
                Question(
                    "Does the swing of the curves grow or shrink to the right?",
                    "It shrinks",
                    "The oscillations are wide near the left axis and narrower towards the right edge.",
                ),
            ),
        ),
        paint,
    )


def _large_scene_jpg() -> _Picture:
    width, height = 4800, 3600
    horizon = int(height * 0.62)
    sun = (3500, 400, 4100, 1000)
    left_mountain = [(0, horizon), (900, 1300), (1900, horizon)]
    right_mountain = [(1300, horizon), (2600, 900), (3900, horizon)]
    snow = [(2300, 1150), (2600, 900), (2900, 1150)]
    trees = [200 + i * 380 for i in range(12)]  # left edge of each crown

    def paint() -> Image.Image:
        pixels = _gradient(width, height, (90, 150, 230), (150, 200, 250), (250, 220, 180))
        pixels[horizon:] = _gradient(width, height - horizon, (70, 120, 50), (90, 140, 60), (40, 80, 30))
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        draw.ellipse(sun, fill=(255, 230, 120))
        draw.polygon(left_mountain, fill=(110, 110, 130))
        draw.polygon(right_mountain, fill=(90, 95, 120))
        draw.polygon(snow, fill=(245, 245, 250))
        for i, x in enumerate(trees):
            draw.rectangle((x + 60, 2900, x + 100, 3200), fill=(90, 60, 30))
            draw.ellipse((x, 2600, x + 160, 2950), fill=(30, 100 + 8 * i, 40))
        return image

    return _Picture(
        ImageScene(
            (width, height),
            "a large drawn landscape with a sun, two grey mountains and a row of trees",
            (
                "A blue sky brightens towards a warm tone near the horizon.",
                "A pale yellow sun hangs in the upper right.",
                "Two grey mountains rise from the horizon; the right one has a white snowy peak.",
                "Green grass fills the lower part, where twelve small trees stand in a row.",
            ),
            (
                Region("the sun", sun),
                Region("the snow-capped peak", _extent(snow)),
                Region("the left mountain", _extent(left_mountain)),
                Region("the right mountain", _extent(right_mountain)),
                Region("the row of trees", (trees[0], 2600, trees[-1] + 160, 3200)),
            ),
            questions=(
                Question(
                    "How many trees are in the row?",
                    str(len(trees)),
                    "Counting the trunks from left to right gives twelve.",
                ),
                Question(
                    "Where is the sun?",
                    "Upper right",
                    "The yellow disc is high in the sky on the right side.",
                ),
            ),
        ),
        paint,
    )


def _small_tall_png() -> _Picture:
    oval = (10, 170, 50, 230)

    def paint() -> Image.Image:
        rows = np.repeat(np.arange(400, dtype=np.int32)[:, None], 60, axis=1)
        pixels = np.stack([(rows * 5) % 256, (rows * 3 + 80) % 256, 255 - (rows * 2) % 256], axis=2)
        image = Image.fromarray(pixels.astype(np.uint8))
        ImageDraw.Draw(image).ellipse(oval, fill=(255, 255, 255))
        return image

    return _Picture(
        ImageScene(
            (60, 400),
            "a narrow, tall strip of repeating colour bands with a white oval in the middle",
            (
                "Colour bands run horizontally and repeat down the strip.",
                "A small white oval sits roughly halfway down.",
            ),
            (Region("the white oval", oval),),
            questions=(
                Question("What shape is drawn in white?", "An oval", "It is taller than it is wide."),
            ),
        ),
        paint,
    )


def _logo_rgba_png() -> _Picture:
    word, halo = "KEYE", 24  # the disc's rim fades out over `halo` px, from radius 200 inwards

    def paint() -> Image.Image:
        image = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        for k in range(halo):
            draw.ellipse(_disc(256, 256, 200 - k), fill=(20, 60, 160, int(255 * (k + 1) / halo)))
        draw.ellipse((96, 96, 416, 416), fill=(20, 60, 160, 255))
        draw.text((170, 225), word, fill=(255, 255, 255, 255), font=_font(64))
        return image

    return _Picture(
        ImageScene(
            (512, 512),
            f"a logo: a blue disc with the word {word} on a transparent background",
            (
                "The disc is deep blue with a soft, fading rim.",
                f"The word {word} is written across it in white.",
                "Everything outside the disc is transparent.",
            ),
            (Region("the blue disc", _disc(256, 256, 200)), Region(f"the word {word}", (170, 225, 340, 290))),
            text=(word,),
            questions=(
                Question("What word is written on the logo?", word, "White capital letters cross the disc."),
            ),
        ),
        paint,
    )


def _icons_palette_png() -> _Picture:
    square, circle = (20, 20, 110, 110), (140, 20, 236, 116)
    triangle, pentagon = [(20, 236), (65, 140), (110, 236)], (188, 188, 48)
    line, line_width = (20, 128, 236, 128), 4

    def paint() -> Image.Image:
        image = Image.new("P", (256, 256), 0)
        palette = [255, 0, 255, 220, 40, 40, 40, 160, 70, 30, 90, 210, 250, 200, 30, 20, 20, 20]
        image.putpalette(palette + [0] * (768 - len(palette)))
        draw = ImageDraw.Draw(image)
        draw.rectangle(square, fill=1)
        draw.ellipse(circle, fill=2)
        draw.polygon(triangle, fill=3)
        draw.regular_polygon(pentagon, 5, fill=4)
        draw.line(line, fill=5, width=line_width)
        image.info["transparency"] = 0  # index 0 (magenta) is transparent: must come out white, not magenta
        return image

    x1, y, x2, _ = line
    return _Picture(
        ImageScene(
            (256, 256),
            "four small flat icons in four colours separated by a dark line",
            (
                "A red square sits in the top left and a green circle in the top right.",
                "A blue triangle sits in the bottom left and a yellow pentagon in the bottom right.",
                "A thin dark line divides the top row from the bottom row.",
            ),
            (
                Region("the red square", square),
                Region("the green circle", circle),
                Region("the blue triangle", _extent(triangle)),
                Region("the yellow pentagon", _disc(*pentagon)),
                Region("the dark dividing line", (x1, y - line_width // 2, x2, y + line_width // 2)),
            ),
            questions=(
                Question(
                    "Which icon is in the bottom right?",
                    "The yellow pentagon",
                    "The bottom row holds a blue triangle on the left and a yellow pentagon on the right.",
                ),
                Question("How many icons are there?", "4", "Two on the top row and two on the bottom row."),
            ),
        ),
        paint,
    )


_EXIF_UPRIGHT_SIZE = (448, 672)


def exif_upright() -> Image.Image:
    """exif_rotated_orient6.jpg as it should be shown: 448 wide, 672 tall."""
    width, height = _EXIF_UPRIGHT_SIZE
    image = Image.new("RGB", (width, height), EXIF_EXPECTED_QUADRANTS[2])
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width // 2 - 1, height // 2 - 1), fill=EXIF_EXPECTED_QUADRANTS[0])
    draw.rectangle((width // 2, 0, width - 1, height // 2 - 1), fill=EXIF_EXPECTED_QUADRANTS[1])
    return image


def _exif_rotated_jpg() -> _Picture:
    def paint() -> tuple[Image.Image, dict]:
        # Orientation 6 tells a viewer to turn the stored picture 90° clockwise; so store the upright picture
        # turned 90° counter-clockwise (what a phone held upright writes).
        stored = exif_upright().transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        return stored, {"exif": exif.tobytes()}

    width, height = _EXIF_UPRIGHT_SIZE
    return _Picture(
        ImageScene(
            (width, height),
            "a portrait picture split into a red block, a green block and a blue band",
            (
                "The top half is divided into a red block on the left and a green block on the right.",
                "The whole bottom half is blue.",
            ),
            (
                Region("the red block", (0, 0, width // 2, height // 2)),
                Region("the green block", (width // 2, 0, width, height // 2)),
                Region("the blue band", (0, height // 2, width, height)),
            ),
            questions=(
                Question(
                    "What colour is the top-left block?", "Red", "The upper left quarter is filled with red."
                ),
                Question(
                    "Is the picture portrait or landscape?",
                    "Portrait",
                    "It is taller than it is wide when shown upright.",
                ),
            ),
        ),
        paint,
    )


def _grey16_png() -> _Picture:
    left, top, side = 280, 200, 80  # the square whose ramp runs the other way

    def paint() -> Image.Image:
        ramp = np.linspace(0, 65535, 640).round().astype(np.uint16)
        pixels = np.repeat(ramp[None, :], 480, axis=0)
        square = (slice(top, top + side), slice(left, left + side))
        pixels[square] = 65535 - pixels[square]
        return Image.fromarray(pixels)  # mode I;16

    return _Picture(
        ImageScene(
            (640, 480),
            "a greyscale ramp from black on the left to white on the right with an inverted square",
            (
                "Brightness rises evenly from the left edge to the right edge.",
                "A square near the centre runs the other way, bright on its left and darker on its right.",
            ),
            (Region("the inverted square", (left, top, left + side, top + side)),),
            questions=(
                Question(
                    "Which side of the picture is brightest?",
                    "The right",
                    "The ramp goes from black at the left to white at the right.",
                ),
            ),
        ),
        paint,
    )


def _ui_screenshot_webp() -> _Picture:
    title, top_bar, sidebar = "keyeflow - runs", (0, 0, 1280, 56), (0, 56, 240, 800)
    menu = ["Flows", "Tables", "Gates", "Lineage", "Settings"]
    rows = [(f"stage-{row + 1}  {_WORDS[row]}  {_WORDS[-row - 1]}", 100 + row * 60) for row in range(10)]
    red_dots = {row for row in range(len(rows)) if row % 3 == 0}  # the other rows' dots are green

    def paint() -> Image.Image:
        image = Image.new("RGB", (1280, 800), (236, 239, 244))
        draw = ImageDraw.Draw(image)
        draw.rectangle(top_bar, fill=(38, 50, 72))
        draw.text((24, 14), title, fill=(255, 255, 255), font=_font(26))
        draw.rectangle(sidebar, fill=(250, 250, 252))
        for i, name in enumerate(menu):
            draw.text((30, 90 + 48 * i), name, fill=(40, 40, 40), font=_font(22))
        font = _font(20)
        for row, (label, y) in enumerate(rows):
            draw.rounded_rectangle(
                (280, y, 1240, y + 48), radius=8, fill=(255, 255, 255), outline=(210, 214, 220)
            )
            draw.text((300, y + 12), label, fill=(30, 30, 30), font=font)
            colour = (210, 70, 60) if row in red_dots else (60, 170, 90)
            draw.ellipse(_status_dot(y), fill=colour)
        return image

    return _Picture(
        ImageScene(
            (1280, 800),
            f"a screenshot of a web dashboard titled '{title}' with a sidebar and ten rows",
            (
                "A dark navy bar across the top holds the title.",
                "A light sidebar on the left lists Flows, Tables, Gates, Lineage and Settings.",
                "Ten rounded white rows list stages one to ten, each with a status dot on the right.",
                "Four of the dots are red and six are green.",
            ),
            (
                Region("the top bar", top_bar),
                Region("the sidebar", sidebar),
                *(
                    Region(f"the row for stage-{k + 1}", (280, y, 1240, y + 48))
                    for k, (_, y) in enumerate(rows)
                ),
                Region("the red status dot of stage-1", _status_dot(rows[0][1])),
            ),
            text=(title, *menu, *(label for label, _ in rows)),
            questions=(
                Question(
                    "How many rows show a red status dot?",
                    str(len(red_dots)),
                    "Stages 1, 4, 7 and 10 have red dots; the other six are green.",
                ),
                Question(
                    "What is the third item in the sidebar?",
                    menu[2],
                    "The sidebar reads Flows, Tables, Gates, Lineage, Settings.",
                ),
                Question(
                    "Which stage is listed last?",
                    f"stage-{len(rows)}",
                    "The rows are numbered from stage-1 down to stage-10.",
                ),
            ),
        ),
        paint,
    )


def _status_dot(row_y: int) -> tuple[int, int, int, int]:
    return 1190, row_y + 14, 1210, row_y + 34


def _cmyk_poster_jpg() -> _Picture:
    word, panel = "CMYK", (80, 300, 520, 500)

    def paint() -> Image.Image:
        image = Image.fromarray(_gradient(600, 800, (255, 240, 0), (0, 200, 255), (255, 0, 140)))
        draw = ImageDraw.Draw(image)
        draw.rectangle(panel, fill=(20, 20, 20))
        draw.text((120, 370), word, fill=(255, 255, 255), font=_font(72))
        return image.convert("CMYK")

    return _Picture(
        ImageScene(
            (600, 800),
            f"a bright poster with a yellow, cyan and magenta gradient and a black panel reading {word}",
            (
                "Yellow at the top left fades into cyan at the top right and magenta at the bottom.",
                f"A black rectangle across the middle carries the word {word} in white.",
            ),
            (Region("the black panel", panel), Region(f"the word {word}", (120, 370, 330, 440))),
            text=(word,),
            questions=(
                Question(
                    "What word is on the black panel?",
                    word,
                    "White letters in the middle of the panel spell it.",
                ),
            ),
        ),
        paint,
    )


def _animated_gif() -> _Picture:
    # (box, colour) of each frame's one disc, which moves 60 px right
    discs = [
        ((20 + 60 * k, 50, 120 + 60 * k, 150), colour)
        for k, colour in enumerate([(230, 60, 60), (60, 60, 230)])
    ]

    def paint() -> tuple[Image.Image, dict]:
        frames = []
        for box, colour in discs:
            frame = Image.new("RGB", (200, 200), (255, 255, 255))
            ImageDraw.Draw(frame).ellipse(box, fill=colour)
            frames.append(frame.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
        return frames[0], {"save_all": True, "append_images": frames[1:], "duration": 200, "loop": 0}

    # What counts is the first frame (a still image of the GIF): its red disc.
    return _Picture(
        ImageScene(
            (200, 200),
            "a small white square picture with a red disc on its left side",
            ("The background is white.", "A red disc sits left of centre."),
            (Region("the red disc", discs[0][0]),),
            questions=(
                Question("What colour is the disc?", "Red", "The only coloured element is a red circle."),
            ),
        ),
        paint,
    )


def _bitmap_bmp() -> _Picture:
    width, height = 128, 96

    def paint() -> Image.Image:
        return Image.fromarray(_gradient(width, height, (0, 0, 0), (255, 0, 0), (0, 255, 255)))

    return _Picture(
        ImageScene(
            (width, height),
            "a tiny gradient blending black, red and cyan",
            (
                "Black in the top left corner warms into red towards the top right.",
                "The bottom edge turns cyan.",
            ),
            (
                Region("the red top-right corner", (width * 3 // 4, 0, width, height // 3)),
                Region("the cyan lower edge", (0, height * 3 // 4, width, height)),
            ),
            questions=(
                Question(
                    "Which corner is black?",
                    "The top left",
                    "The gradient starts from black at the upper left.",
                ),
            ),
        ),
        paint,
    )


# file name -> (the picture: its scene and its painting, Pillow save arguments)
_PICTURES: list[tuple[str, Callable[[], _Picture], dict]] = [
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


def describe_image(name: str) -> ImageScene | None:
    """What the generated picture that a file name starts with (its stem, ``shapes_800x600``) shows, without
    drawing it; None for a name that is no generated picture's."""
    for file_name, picture, _ in _PICTURES:
        if name.startswith(Path(file_name).stem):
            return picture().scene
    return None


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
    for name, picture, save_args in _PICTURES:
        path = dest / name
        if overwrite or not path.exists():
            drawn = picture().paint()
            image, extra = drawn if isinstance(drawn, tuple) else (drawn, {})
            _save(image, path, **save_args, **extra)
        paths.append(path)
    return paths


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


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

    once(
        "corrupt",
        "corrupt_random.jpg",
        lambda p: _write_bytes(p, np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
    )

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
    once(
        "not_image",
        "not_an_image.png",
        lambda p: _write_bytes(p, b"This is not an image. It is plain text with a .png name.\n"),
    )
    once(
        "extreme_aspect",
        "extreme_aspect_3000x10.png",
        lambda p: _save(Image.fromarray(_gradient(3000, 10, (0, 0, 0), (255, 255, 255), (0, 0, 0))), p),
    )
    once("empty", "empty.webp", lambda p: p.touch())
    # Relative target inside a directory that does not exist: stays dangling wherever dest is moved.
    once(
        "unreadable",
        "dangling.jpg",
        lambda p: os.symlink(os.path.join("no-such-directory", "missing.jpg"), p),
    )
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


# ====================================================================== verifiable task pictures

# The colours the task pictures paint with, by the word a question and an answer use for them. Far apart in
# RGB and painted without anti-aliasing into a lossless PNG, so every pixel of a shape is exactly its colour.
TASK_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 200, 30),
}


class PlacedShape(NamedTuple):
    """One shape of a task picture: its kind ("square" or "circle"), colour word and grid cell."""

    kind: str
    colour: str
    row: int
    col: int


def shape_count_picture(shapes: list[PlacedShape], grid: int = 3, cell: int = 20) -> Image.Image:
    """A white ``grid*cell`` square picture with each shape painted in its own cell, a margin of white
    around it, so no two shapes touch (one shape is one connected patch of its colour)."""
    size = grid * cell
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    margin = cell // 5
    for shape in shapes:
        box = (
            shape.col * cell + margin,
            shape.row * cell + margin,
            (shape.col + 1) * cell - margin - 1,
            (shape.row + 1) * cell - margin - 1,
        )
        fill = TASK_COLOURS[shape.colour]
        if shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.ellipse(box, fill=fill)
    return image


def single_shape_picture(kind: str, colour: str, left: int, top: int, size: int) -> Image.Image:
    """A white 60x60 picture with one ``kind`` ("square" or "circle") of ``size`` pixels, its bounding box's
    top-left corner at (``left``, ``top``)."""
    image = Image.new("RGB", (60, 60), (255, 255, 255))
    box = (left, top, left + size - 1, top + size - 1)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if kind == "square" else draw.ellipse)(box, fill=TASK_COLOURS[colour])
    return image


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` as PNG at ``path`` atomically (lossless: the colours stay exact)."""
    _save(image, Path(path))


BAR_UNIT = 8  # pixels per grid square of a task bar chart


def bar_chart_picture(bars: list[tuple[str, int]], unit: int = BAR_UNIT) -> Image.Image:
    """A 60x60 bar chart: light grey grid lines every ``unit`` pixels up from the baseline, then one bar per
    (colour word, height in grid squares), 12 pixels wide, left to right, standing on the baseline."""
    size, baseline = 60, 56
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for y in range(baseline, -1, -unit):
        draw.line([(0, y), (size - 1, y)], fill=(200, 200, 200))
    for k, (colour, height) in enumerate(bars):
        left = 6 + 18 * k
        draw.rectangle((left, baseline - height * unit, left + 11, baseline - 1), fill=TASK_COLOURS[colour])
    return image

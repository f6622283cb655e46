"""A small LongCoT question set for demos and tests: about 30 questions over the seven domains, with reference
answers, some about the sample pictures (``images.generate_images``) and clips
(``videos.generate_videos``).

Nothing is downloaded: the text questions are written here, and the visual ones ask what the generated media
really show (the drawing code fixes the shapes, boxes, texts and colours), so their references are right.
Written in the conversation format ``collect_questions`` reads, over two files (two "sources"):

- ``text_questions.jsonl``: math, STEM, business and counting questions without media; the reference is a
  ``"reference"`` field. References are written in one form while a good answer may use another (0.5 / ½,
  1 km / 1000 m, 9\\pi): the graders must see them as equal.
- ``visual_questions.jsonl``: OCR, grounding, counting, GUI, business (a bar chart) and video questions;
  the reference is the assistant turn (some as ``<think>…</think><answer>…</answer>``, some plain). Media
  paths are relative to the file (``os.path.relpath``), as conversations name them. One row repeats a text
  question with other spacing and case: collection must drop it as a duplicate.

Visual questions are written only for the media found in ``images_dir`` / ``videos_dir``.

Run ``python -m keyeflow.synthetic.longcot_questions DEST [IMAGES_DIR] [VIDEOS_DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["TEXT_QUESTIONS", "VISUAL_QUESTIONS", "generate_longcot_questions", "main"]

# (domain, question, reference)
TEXT_QUESTIONS: list[tuple[str, str, str]] = [
    ("math", "What is 1 divided by 2?", "0.5"),
    (
        "math",
        "A pizza is cut into 8 equal slices and 4 of them are eaten. What fraction of the pizza is eaten?",
        "1/2",
    ),
    ("math", "Solve for x: 3x + 5 = 20.", "5"),
    ("math", "What is 15% of 240?", "36"),
    ("math", "What is the sum of the interior angles of a triangle, in degrees?", "180"),
    ("math", "A train travels 120 km in 1.5 hours. What is its average speed?", "80 km/h"),
    ("math", "Simplify (x + 1)^2 - (x - 1)^2.", "4x"),
    ("math", "What is the area of a circle with radius 3? Give an exact answer.", "9\\pi"),
    ("stem", "A road is 1000 m long. How long is it in kilometres?", "1 km"),
    ("stem", "Water boils at 100 °C at sea level. What is that temperature in kelvin?", "373.15 K"),
    ("stem", "An object of mass 2 kg accelerates at 3 m/s^2. What net force acts on it?", "6 N"),
    ("stem", "How many hydrogen atoms are in one molecule of water?", "2"),
    ("stem", "Is the Sun a star? Answer yes or no.", "yes"),
    (
        "business",
        "A shop buys a lamp for $40 and sells it for $50. What is the profit as a percentage of the cost?",
        "25%",
    ),
    ("business", "Revenue is $1,200 and costs are $900. What is the profit in dollars?", "$300"),
    ("business", "A price of $80 is cut by 25%. What is the new price in dollars?", "$60"),
    ("counting", "How many letters are in the word 'reasoning'?", "9"),
]

# (media file name, kind, domain, question, reference as the assistant turn)
VISUAL_QUESTIONS: list[tuple[str, str, str, str, str]] = [
    (
        "document_1240x1754.png",
        "image",
        "ocr",
        "What is the title of the document?",
        (
            "<think>The largest text at the top of the page reads Keye-VL sample report.</think>"
            "<answer>Keye-VL sample report</answer>"
        ),
    ),
    ("document_1240x1754.png", "image", "ocr", "How many numbered sections does the document have?", "6"),
    ("logo_rgba_512x512.png", "image", "ocr", "What word is written on the logo?", "KEYE"),
    (
        "cmyk_poster_600x800.jpg",
        "image",
        "ocr",
        "What word is printed in the dark box on the poster?",
        "CMYK",
    ),
    # shapes_800x600.png: rectangle (60,60)-(300,260), circle (360,80)-(620,340) on 800x600 → [0, 1000)
    (
        "shapes_800x600.png",
        "image",
        "grounding",
        "Give the bounding box of the red rectangle as [[x1, y1, x2, y2]] in [0, 1000) coordinates.",
        "[[75, 100, 375, 433]]",
    ),
    (
        "shapes_800x600.png",
        "image",
        "grounding",
        "Give the bounding box of the blue circle as [[x1, y1, x2, y2]] in [0, 1000) coordinates.",
        "[[450, 133, 775, 566]]",
    ),
    (
        "shapes_800x600.png",
        "image",
        "counting",
        "How many filled shapes are in the image, not counting the black line?",
        (
            "<think>There is a red rectangle, a blue circle, a green triangle and a yellow hexagon.</think>"
            "<answer>4</answer>"
        ),
    ),
    (
        "icons_palette_256x256.png",
        "image",
        "counting",
        "How many coloured icons are in the image, not counting the line?",
        "4",
    ),
    (
        "large_scene_4800x3600.jpg",
        "image",
        "counting",
        "How many trees stand along the bottom of the picture?",
        "12",
    ),
    (
        "ui_screenshot_1280x800.webp",
        "image",
        "gui",
        "Which sidebar item comes right after 'Gates'?",
        "Lineage",
    ),
    ("ui_screenshot_1280x800.webp", "image", "gui", "How many rows in the list have a red status dot?", "4"),
    (
        "ui_screenshot_1280x800.webp",
        "image",
        "gui",
        "What is the title shown in the top bar?",
        "keyeflow - runs",
    ),
    (
        "bar_chart_900x600.webp",
        "image",
        "business",
        "What share of the tokens does the image bar show?",
        "50%",
    ),
    (
        "bar_chart_900x600.webp",
        "image",
        "business",
        "What is the combined share of the video and text bars?",
        (
            "<think>The video bar shows 24% and the text bar 26%, so together 24% + 26% = 50%.</think>"
            "<answer>50%</answer>"
        ),
    ),
    (
        "solid_colors_640x480_mpeg4_25fps.mp4",
        "video",
        "counting",
        "How many different colours are shown in the video?",
        "5",
    ),
    (
        "solid_colors_640x480_mpeg4_25fps.mp4",
        "video",
        "stem",
        "What colour is shown last in the video?",
        "white",
    ),
]

# A text question again, spaced and cased differently: the same question after normalisation.
DUPLICATE = ("math", "what is 1  divided by 2 ?", "1/2")


def _row(
    domain: str,
    content,
    reference: str | None = None,
    assistant: str | None = None,
    source: str | None = None,
) -> dict:
    messages = [{"role": "user", "content": content}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    row = {"domain": domain, "messages": messages}
    if reference is not None:
        row["reference"] = reference
    if source:
        row["source"] = source
    return row


def _write(path: Path, rows: list[dict]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(partial, path)


def generate_longcot_questions(
    dest: Path, images_dir: Path | None = None, videos_dir: Path | None = None
) -> dict[str, Path]:
    """Write the question files into ``dest``; returns ``{"text": …, "visual": …, "dir": dest}``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    text_rows = [_row(d, q, reference=r, source="longcot-text-synth") for d, q, r in TEXT_QUESTIONS]
    visual_rows = []
    folders = {
        "image": Path(images_dir) if images_dir else None,
        "video": Path(videos_dir) if videos_dir else None,
    }
    for name, kind, domain, question, answer in VISUAL_QUESTIONS:
        folder = folders[kind]
        if folder is None or not (folder / name).is_file():
            continue
        relative = os.path.relpath(folder / name, dest)
        content = [{"type": kind, kind: relative}, {"type": "text", "text": question}]
        visual_rows.append(_row(domain, content, assistant=answer, source="longcot-visual-synth"))
    d, q, r = DUPLICATE
    visual_rows.append(_row(d, [{"type": "text", "text": q}], assistant=r, source="longcot-visual-synth"))
    paths = {"text": dest / "text_questions.jsonl", "visual": dest / "visual_questions.jsonl"}
    _write(paths["text"], text_rows)
    _write(paths["visual"], visual_rows)
    return {**paths, "dir": dest}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m keyeflow.synthetic.longcot_questions",
        description="write the sample LongCoT questions",
    )
    parser.add_argument("dest", type=Path)
    parser.add_argument("images_dir", type=Path, nargs="?")
    parser.add_argument("videos_dir", type=Path, nargs="?")
    args = parser.parse_args(argv)
    for key, path in generate_longcot_questions(args.dest, args.images_dir, args.videos_dir).items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()

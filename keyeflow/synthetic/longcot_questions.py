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

__all__ = ["SOLUTIONS", "TEXT_QUESTIONS", "VISUAL_QUESTIONS", "generate_longcot_questions", "main"]

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


def _solution(
    answer: str,
    steps: list[str],
    concept: str,
    method: str,
    tool: str,
    wrong: list[str],
    forms: list[str] | None = None,
) -> dict:
    return {
        "answer": answer,
        "steps": [f"Step {k + 1}: {s}" for k, s in enumerate(steps)],
        "concept": concept,
        "method": method,
        "tool": tool,
        "answer_forms": forms or [answer],
        "wrong_answers": wrong,
    }


# The reference solution of every sample question, by question text: the reasoning steps (the last one
# states the answer), what to notice (concept), how to attack it (method), the operation to use (tool), the
# ways to write the right answer and plausible wrong answers. The synthetic teacher writes its paths from
# these; an RL item's hints L1-L5 are derived from them.
_PIZZA = "A pizza is cut into 8 equal slices and 4 of them are eaten. What fraction of the pizza is eaten?"
_LAMP = "A shop buys a lamp for $40 and sells it for $50. What is the profit as a percentage of the cost?"
SOLUTIONS: dict[str, dict] = {
    "What is 1 divided by 2?": _solution(
        "0.5",
        [
            "Dividing 1 by 2 splits one whole into 2 equal parts.",
            "Each part is one half of 1, and 1 / 2 = 0.5.",
        ],
        "Dividing by 2 means splitting into two equal parts.",
        "Split the one whole into 2 equal parts and see how big one part is.",
        "Division: numerator / denominator.",
        ["2"],
        ["½", "1/2", "0.5"],
    ),
    _PIZZA: _solution(
        "1/2",
        ["4 of the 8 slices are eaten.", "4 / 8 = 0.5, which is half of the pizza."],
        "A fraction of a whole is the eaten part over all the parts.",
        "Count the eaten slices and the slices in all, then simplify their ratio.",
        "Fraction = eaten / total, reduced.",
        ["1/4", "3/4"],
        ["\\frac{1}{2}", "50%"],
    ),
    "Solve for x: 3x + 5 = 20.": _solution(
        "5",
        [
            "Subtract 5 from both sides: 20 - 5 = 15, so 3x = 15.",
            "Divide both sides by 3: 15 / 3 = 5, so x = 5.",
        ],
        "x is hidden behind two operations: times 3, then plus 5.",
        "Undo the operations in reverse order, doing the same to both sides.",
        "Inverse operations: subtract, then divide.",
        ["15", "6"],
    ),
    "What is 15% of 240?": _solution(
        "36",
        ["15% of 240 means 0.15 times 240.", "0.15 × 240 = 36."],
        "A percentage of a number is a fraction of it.",
        "Write the percentage as a decimal and multiply.",
        "p% of N = p / 100 × N.",
        ["24", "360"],
    ),
    "What is the sum of the interior angles of a triangle, in degrees?": _solution(
        "180",
        [
            "In an equilateral triangle every angle is 60 degrees.",
            "60 + 60 + 60 = 180, and every triangle has the same angle sum: 180 degrees.",
        ],
        "The angle sum is the same for every triangle.",
        "Take a triangle whose angles you know and add them up.",
        "Add the three angles.",
        ["360", "90"],
    ),
    "A train travels 120 km in 1.5 hours. What is its average speed?": _solution(
        "80 km/h",
        ["Average speed is distance divided by time.", "120 / 1.5 = 80, so the speed is 80 km/h."],
        "Average speed relates the whole distance to the whole time.",
        "Divide the distance by the time and keep the units.",
        "speed = distance / time.",
        ["180 km/h", "60 km/h"],
    ),
    "Simplify (x + 1)^2 - (x - 1)^2.": _solution(
        "4x",
        [
            "(x + 1)^2 expands to x^2 + 2x + 1 and (x - 1)^2 to x^2 - 2x + 1.",
            "The squares and the ones cancel, leaving 2x minus -2x, which is 4x.",
        ],
        "The two squares differ only in the sign of the middle term.",
        "Expand both squares, then subtract term by term.",
        "(a + b)^2 = a^2 + 2ab + b^2.",
        ["2x"],
    ),
    "What is the area of a circle with radius 3? Give an exact answer.": _solution(
        "9\\pi",
        [
            "The area of a circle is pi times the radius squared.",
            "3 × 3 = 9, and pi times 9 gives an area of 9\\pi.",
        ],
        "An exact answer keeps pi as a symbol.",
        "Square the radius and multiply by pi.",
        "A = \\pi r^2.",
        ["6\\pi", "3\\pi"],
        ["9\\pi", "9π"],
    ),
    "A road is 1000 m long. How long is it in kilometres?": _solution(
        "1 km",
        [
            "The road is 1000 m long and one kilometre is 1000 m.",
            "So 1000 / 1000 = 1, and the road is 1 km long.",
        ],
        "Kilometres and metres measure the same length at different scales.",
        "Find how many metres make a kilometre and divide.",
        "1 km = 1000 m.",
        ["10 km", "1000 km"],
        ["1000 m", "1 km"],
    ),
    "Water boils at 100 °C at sea level. What is that temperature in kelvin?": _solution(
        "373.15 K",
        ["Kelvin is degrees Celsius plus 273.15.", "100 + 273.15 = 373.15, so it is 373.15 K."],
        "Kelvin and Celsius steps are the same size; only the zero differs.",
        "Shift the Celsius value by the offset between the two zeros.",
        "T(K) = T(°C) + 273.15.",
        ["273.15 K", "173.15 K"],
    ),
    "An object of mass 2 kg accelerates at 3 m/s^2. What net force acts on it?": _solution(
        "6 N",
        ["Newton's second law: force is mass times acceleration.", "2 × 3 = 6, so the net force is 6 N."],
        "A net force is what makes a mass accelerate.",
        "Multiply the mass by the acceleration, in SI units.",
        "F = m a.",
        ["5 N", "1.5 N"],
    ),
    "How many hydrogen atoms are in one molecule of water?": _solution(
        "2",
        ["A water molecule is H2O: hydrogen twice, oxygen once.", "So one molecule has 2 hydrogen atoms."],
        "A chemical formula lists each atom with how many times it occurs.",
        "Write the formula of water and read the count after H.",
        "The formula H2O.",
        ["1", "3"],
    ),
    "Is the Sun a star? Answer yes or no.": _solution(
        "yes",
        [
            "A star is a ball of hot gas that makes its own light by fusion.",
            "The Sun makes its own light by fusion, so the answer is yes.",
        ],
        "What makes something a star is how it makes its light.",
        "Compare what the Sun does with what defines a star.",
        "The definition of a star.",
        ["no"],
    ),
    _LAMP: _solution(
        "25%",
        ["The profit is 50 - 40 = 10 dollars.", "10 / 40 = 0.25, which is 25% of the cost."],
        "A profit percentage is measured against the cost, not the price.",
        "Find the profit in dollars, then compare it with the cost.",
        "profit % = (price - cost) / cost × 100.",
        ["20%", "10%"],
    ),
    "Revenue is $1,200 and costs are $900. What is the profit in dollars?": _solution(
        "$300",
        ["Profit is revenue minus costs.", "1200 - 900 = 300, so the profit is $300."],
        "Profit is what is left of revenue once costs are paid.",
        "Subtract the costs from the revenue.",
        "profit = revenue - costs.",
        ["$2,100", "$200"],
    ),
    "A price of $80 is cut by 25%. What is the new price in dollars?": _solution(
        "$60",
        ["25% of 80 is 0.25 × 80 = 20 dollars.", "80 - 20 = 60, so the new price is $60."],
        "A cut by a percentage removes that share of the old price.",
        "Find the size of the cut, then take it off the old price.",
        "new = old × (1 - p / 100).",
        ["$20", "$55"],
    ),
    "How many letters are in the word 'reasoning'?": _solution(
        "9",
        ["The word spelled out is r-e-a-s-o-n-i-n-g.", "Counting them gives 9 letters."],
        "Repeated letters count every time they appear.",
        "Spell the word out and count as you go.",
        "Counting one by one.",
        ["8", "10"],
    ),
    "What is the title of the document?": _solution(
        "Keye-VL sample report",
        ["The largest text at the top of the page is the title.", "It reads Keye-VL sample report."],
        "A document's title is its largest text, at the top.",
        "Find the biggest line of text near the top of the page and read it.",
        "Reading text (OCR).",
        ["Keye-VL sample data", "Sample report"],
    ),
    "How many numbered sections does the document have?": _solution(
        "6",
        [
            "The page has numbered section headings down its length.",
            "They run from 1 to 6, so there are 6 sections.",
        ],
        "Section headings carry numbers in order.",
        "Find the headings and read the number of the last one.",
        "Reading the heading numbers.",
        ["5", "7"],
    ),
    "What word is written on the logo?": _solution(
        "KEYE",
        ["The logo is a single word in large letters.", "The word is KEYE."],
        "The logo holds one word.",
        "Read the letters of the logo from left to right.",
        "Reading text (OCR).",
        ["KEY", "EYE"],
    ),
    "What word is printed in the dark box on the poster?": _solution(
        "CMYK",
        ["The poster has a dark box with a word printed in it.", "The word in the box is CMYK."],
        "Only the word inside the dark box counts.",
        "Find the dark box, then read the word inside it.",
        "Reading text (OCR).",
        ["RGB", "CMY"],
    ),
    "Give the bounding box of the red rectangle as [[x1, y1, x2, y2]] in [0, 1000) coordinates.": _solution(
        "[[75, 100, 375, 433]]",
        [
            "The red rectangle is in the top left part of the image.",
            "Its left edge is at about 75 and its right edge at about 375 on the 1000 scale.",
            "The rectangle's top is near 100 and its bottom near 433, above the green triangle.",
        ],
        "Box coordinates are relative to the image, scaled to 0-1000.",
        "Find the rectangle's left, top, right and bottom edges and scale them.",
        "x' = x / width × 1000, y' = y / height × 1000.",
        ["[[500, 500, 900, 900]]", "[[450, 133, 775, 566]]"],
        ["[[76, 101, 374, 430]]", "[[75, 100, 375, 433]]"],
    ),
    "Give the bounding box of the blue circle as [[x1, y1, x2, y2]] in [0, 1000) coordinates.": _solution(
        "[[450, 133, 775, 566]]",
        [
            "The blue circle is in the upper middle of the image.",
            "Its left edge is at about 450 and its right edge at about 775 on the 1000 scale.",
            "The circle's top is near 133 and its bottom near 566.",
        ],
        "Box coordinates are relative to the image, scaled to 0-1000.",
        "Find the circle's left, top, right and bottom extremes and scale them.",
        "x' = x / width × 1000, y' = y / height × 1000.",
        ["[[75, 100, 375, 433]]", "[[100, 600, 400, 900]]"],
    ),
    "How many filled shapes are in the image, not counting the black line?": _solution(
        "4",
        [
            "The filled shapes are a red rectangle, a blue circle, a green triangle and a yellow hexagon.",
            "The black line is not a filled shape, so there are 4 filled shapes.",
        ],
        "A line is not a filled shape.",
        "Name every filled shape once, leaving the line out.",
        "Counting one by one.",
        ["5", "3"],
    ),
    "How many coloured icons are in the image, not counting the line?": _solution(
        "4",
        ["The image shows coloured icons and one line.", "Leaving out the line, there are 4 coloured icons."],
        "The line is not an icon.",
        "Count the coloured icons one by one, leaving the line out.",
        "Counting one by one.",
        ["5", "3"],
    ),
    "How many trees stand along the bottom of the picture?": _solution(
        "12",
        [
            "The trees stand in a row along the bottom of the picture.",
            "Counting them from left to right gives 12 trees.",
        ],
        "The trees form one row along the bottom edge.",
        "Go along the row from left to right and count.",
        "Counting one by one.",
        ["11", "10"],
    ),
    "Which sidebar item comes right after 'Gates'?": _solution(
        "Lineage",
        ["The sidebar lists its items from top to bottom.", "The item right below Gates is Lineage."],
        "'Right after' in a list means the next item down.",
        "Find Gates in the sidebar and read the item below it.",
        "Reading text (OCR).",
        ["Settings", "Runs"],
    ),
    "How many rows in the list have a red status dot?": _solution(
        "4",
        ["Each row of the list has a status dot at its start.", "4 of the dots are red."],
        "Only the red dots count, not the rows with other colours.",
        "Go down the list and count the rows whose dot is red.",
        "Counting one by one.",
        ["3", "5"],
    ),
    "What is the title shown in the top bar?": _solution(
        "keyeflow - runs",
        ["The top bar shows the page title at its left.", "The title is keyeflow - runs."],
        "The title sits in the bar across the top of the window.",
        "Find the top bar and read its text.",
        "Reading text (OCR).",
        ["keyeflow", "runs"],
    ),
    "What share of the tokens does the image bar show?": _solution(
        "50%",
        [
            "The chart in the image has three bars: video, image and text.",
            "The image bar is the tallest and its label reads 50%.",
            "The axis on the left confirms the bar ends at 50.",
        ],
        "Each bar's label gives its share.",
        "Find the bar named image and read its label.",
        "Reading a bar chart.",
        ["24%", "26%"],
    ),
    "What is the combined share of the video and text bars?": _solution(
        "50%",
        ["The video bar shows 24% and the text bar 26%.", "24 + 26 = 50, so together they have 50%."],
        "Combined means the two shares added.",
        "Read the two bars' labels, then add them.",
        "Addition of the two shares.",
        ["48%", "24%"],
    ),
    "How many different colours are shown in the video?": _solution(
        "5",
        [
            "The video shows flat colour shots, cut every second.",
            "Each of its 5 shots has its own colour, so 5 colours.",
        ],
        "Each shot shows one flat colour.",
        "Watch the clip shot by shot and count the colours that appear.",
        "Counting one by one.",
        ["4", "6"],
    ),
    "What colour is shown last in the video?": _solution(
        "white",
        ["The video cuts between flat colours every second.", "The last shot is white."],
        "Only the final shot matters.",
        "Go to the end of the clip and name its colour.",
        "Naming a colour.",
        ["black", "red"],
    ),
}


# A text question again, spaced and cased differently: the same question after normalisation.
DUPLICATE = ("math", "what is 1  divided by 2 ?", "1/2")


def _row(
    domain: str,
    content,
    reference: str | None = None,
    assistant: str | None = None,
    source: str | None = None,
    solution: dict | None = None,
) -> dict:
    messages = [{"role": "user", "content": content}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    row = {"domain": domain, "messages": messages}
    if reference is not None:
        row["reference"] = reference
    if source:
        row["source"] = source
    if solution:
        row["solution"] = {k: v for k, v in solution.items() if k != "answer"}
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
    text_rows = [
        _row(d, q, reference=r, source="longcot-text-synth", solution=SOLUTIONS[q])
        for d, q, r in TEXT_QUESTIONS
    ]
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
        visual_rows.append(
            _row(
                domain, content, assistant=answer, source="longcot-visual-synth", solution=SOLUTIONS[question]
            )
        )
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

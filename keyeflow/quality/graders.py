"""Answer-level graders: is a predicted answer the reference answer, and the rule-based RL rewards.

Used by LongCoT's answer-level assessment (SPEC §4.3.1 step 3: "equivalence: formulas, units, paraphrase")
and by the verifiable rewards of RL (math answers, multiple choice, counting, grounding IoU, output format).
Every function here is pure: literal inputs in, a float or a :class:`Verdict` out, so the behaviour can be
pinned by literal tests and a reward never depends on a server.

How :func:`answers_equivalent` decides, in order (the first rule that applies decides, and ``Verdict.method``
names it):

1. ``text``: equal after normalisation (Unicode NFKC, case, LaTeX wrappers such as ``\\boxed{}``/``$…$``/
   ``\\text{}``, sentence punctuation, the articles a/an/the, whitespace; operators and brackets stay).
2. ``choice``: the reference is an option letter A–J ("B", "(B)", "B.", "Option B: …"); the prediction must
   name the same letter ("(b) the red one" is B). A prediction with no letter may instead repeat the
   option text the reference carries ("(B) the red one" vs "the red one").
3. ``yes_no``: the reference is yes/no; synonyms true/false, correct/incorrect, y/n, yeah/yep/nope count.
4. ``sequence``: both are comma-separated lists of the same length ("(1, 2)"); items compared in order,
   each by these same rules, except sets in braces ("{1, 2}" == "{2, 1}"); different bracket kinds
   ("(1, 2)" vs "[1, 2]", open vs closed intervals) differ.
5. ``number`` / ``quantity`` / ``percent``: both are a number, optionally with a unit, a percent sign or
   a trailing label word ("5 apples"). Numbers: thousands separators ("1,000"), scientific notation
   ("1.5e3", "1.5 × 10^3"), fractions ("1/2", "1 1/2", "\\frac{1}{2}", "½"), number words ("three"), closed
   forms ("π/2", "2\\sqrt{2}"). Equal when ``math.isclose(a, b, rel_tol, abs_tol)``, so 3.14159 equals π at
   the default ``rel_tol=1e-4`` (relative gap 8e-7) but 3.14 does not (5e-4): loosen ``rel_tol`` for
   answers rounded to few digits.
   Units (own table, no dependency): SI prefixes, imperial lengths and masses, time, litres, angles,
   temperatures (affine), money (USD), compound units ("m/s^2", "km/h"). Same dimension: compared in SI
   (1000 m == 1 km). Different dimension: not equal, "units differ in dimension: length vs mass".
   A unit or label on one side only: the bare number is read in the other side's unit ("1000" == "1000 m";
   the question usually fixes the unit). A percent sign on one side only is ambiguous in practice
   (datasets often drop it), so either reading is accepted: as a label (50 == 50%) or as ×1/100
   (0.5 == 50%). Both sides with % compare the percentages.
6. ``formula``: both parse as sympy expressions or equations (LaTeX-ish input: ``\\frac``, ``\\sqrt``,
   ``\\cdot``, ``^``, implicit multiplication "2x"). Equal when the difference expands to 0, or when both
   agree at 6 fixed sample points within the tolerance; equations are equal when their sides' differences
   are proportional. Guarded: inputs over 300 characters, factorials, power towers with large exponents
   are refused before sympy evaluates anything, and the sympy work runs in a worker thread that is
   abandoned after ``timeout_s`` (verdict "formula check timed out").
7. otherwise not equal, "texts differ: 'x' vs 'y'".

A leading "x = " on one side only is dropped ("x = 5" vs "5").

Also here: :func:`arithmetic_claims`, the checkable sums a response states and whether each holds (the reward
model's credibility signal), and :func:`reads_as_number` (whether an answer has the form of a number).
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

# ============================================================================================ verdict


@dataclass(frozen=True)
class Verdict:
    """Whether two answers are equivalent, why, and which rule decided (see the module docstring)."""

    equal: bool
    reason: str
    method: str

    def __bool__(self) -> bool:
        return self.equal


# ===================================================================================== answer extraction

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_PHRASE = re.compile(r"(?:\banswer\s+is\b\s*:?|\banswer\s*[:：])", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """The final answer in a model response.

    The content of the last ``<answer>…</answer>`` (or everything after an unclosed ``<answer>``); else
    what follows the last "answer is" / "Answer:" on its line (or the next non-empty line); else the
    last ``\\boxed{…}``; else the last non-empty line. Stripped of whitespace, a trailing full stop and
    markdown bold; a ``\\boxed{}`` inside the chosen text is unwrapped.
    """
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return _tidy_answer(blocks[-1])
    if "<answer>" in text:
        return _tidy_answer(text.rsplit("<answer>", 1)[1])
    body = text.rsplit("</think>", 1)[1] if "</think>" in text else text
    phrases = list(_ANSWER_PHRASE.finditer(body))
    if phrases:
        rest = body[phrases[-1].end() :]
        lines = [ln for ln in rest.split("\n") if ln.strip()]
        if lines:
            return _tidy_answer(lines[0])
    boxed = _last_boxed(body)
    if boxed is not None:
        return _tidy_answer(boxed)
    lines = [ln for ln in body.split("\n") if ln.strip()]
    return _tidy_answer(lines[-1]) if lines else ""


def _tidy_answer(text: str) -> str:
    text = text.strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        text = boxed.strip()
    text = text.strip()
    if text.startswith("**") and text.endswith("**") and len(text) > 4:
        text = text[2:-2].strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return text


def _braced(text: str, open_at: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[open_at] == '{'`` and the index after it."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i], i + 1
    return None


def _last_boxed(text: str) -> str | None:
    at = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if at < 0:
        return None
    group = _braced(text, text.index("{", at))
    return group[0] if group else None


# ======================================================================================= normalisation

_VULGAR = {"½": "1/2", "⅓": "1/3", "⅔": "2/3", "¼": "1/4", "¾": "3/4", "⅕": "1/5", "⅖": "2/5", "⅗": "3/5",
           "⅘": "4/5", "⅙": "1/6", "⅚": "5/6", "⅐": "1/7", "⅛": "1/8", "⅜": "3/8", "⅝": "5/8", "⅞": "7/8",
           "⅑": "1/9", "⅒": "1/10"}  # fmt: skip
_SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_SUPERSCRIPT_RUN = re.compile("[⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺]+")
_LATEX_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit|operatorname|mbox|rm)\s*\{")
_ARTICLES = {"a", "an", "the"}


def _clean(text: object) -> str:
    """Undo presentation: LaTeX wrappers and spacing, Unicode forms; keeps the answer's content."""
    s = str(text).strip()
    boxed = _last_boxed(s)
    if boxed is not None:
        s = boxed
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)]
            break
    while (m := _LATEX_WRAPPERS.search(s)) is not None:
        group = _braced(s, m.end() - 1)
        if group is None:
            break
        s = s[: m.start()] + group[0] + s[group[1] :]
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\degree", "°", s)
    s = s.replace("\\%", "%").replace("\\$", "$").replace("\\{", "{").replace("\\}", "}")
    s = re.sub(r"\\[,;:!> ]|~", " ", s)
    # Vulgar fractions and superscripts before NFKC, which would turn "1½" into "11⁄2" and "x²" into "x2".
    s = re.sub(r"(\d)\s*([½⅓⅔¼¾⅕⅖⅗⅘⅙⅚⅐⅛⅜⅝⅞⅑⅒])", r"\1 \2", s)
    s = "".join(_VULGAR.get(ch, ch) for ch in s)
    s = _SUPERSCRIPT_RUN.sub(lambda m: "^" + m.group().translate(_SUPERSCRIPT), s)
    s = unicodedata.normalize("NFKC", s)
    s = s.replace("⁄", "/").replace("−", "-").replace("∕", "/")
    s = re.sub(r"\s+", " ", s).strip()
    if s.endswith(".") and not re.search(r"\d\.$", s):
        s = s[:-1].rstrip()
    return s


def normalize_text(text: object) -> str:
    """Lower-case words for comparison: NFKC, no punctuation (except inside numbers), no articles."""
    s = _clean(text).casefold()
    s = re.sub(r"['’`]", "", s)
    # Sentence punctuation goes (except inside numbers: "3.5", "1,000"); brackets and operators stay, so
    # "x-5" and "x+5" or "(x+1)^2" and "x+1^2" never normalise to the same text.
    s = re.sub(r"(?<![\d)])!", " ", s)  # "5!" is a factorial, "yes!" is not
    s = re.sub(r"(?<!\d)[.,;:?\"“”]|[.,;:?\"“”](?!\d)", " ", s)
    words = s.split()
    if not re.search(r"[+\-*/^=<>]", s):
        words = [w for w in words if w not in _ARTICLES]
    return " ".join(words)


# ============================================================================================ choices

_CHOICE_PATTERNS = (
    re.compile(r"^\(?([A-J])\)?$", re.IGNORECASE),
    re.compile(r"^([A-J])[.:)]$", re.IGNORECASE),
    re.compile(
        r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*"
        r"[(\[]?([A-J])[)\]]?(?=[\s.:)\]]|$)(.*)$",
        re.IGNORECASE | re.DOTALL,
    ),
    re.compile(r"^[(\[]([A-J])[)\]](.*)$", re.IGNORECASE | re.DOTALL),
    re.compile(r"^([A-J])[.:)]\s+(.*)$", re.IGNORECASE | re.DOTALL),
)


def parse_choice(text: object) -> tuple[str, str] | None:
    """``(letter, option text)`` when ``text`` names an option A–J, else None.

    Accepted: a bare letter, "(B)", "[B]", "B.", "B)", "B:", "Option B", "the answer is (B)", and those
    followed by the option text ("(b) the red one", "B. red", "Option B: red"). "a cat" is not a choice.
    """
    s = _clean(text)
    for pattern in _CHOICE_PATTERNS:
        m = pattern.match(s)
        if (
            m
            and pattern is _CHOICE_PATTERNS[2]
            and m.group(1).islower()
            and re.match(r"\s+\w", s[m.end(1) :])
        ):
            continue  # "the answer is a cat": an article, not option A
        if m:
            rest = m.group(2) if m.lastindex and m.lastindex >= 2 else ""
            return m.group(1).upper(), rest.strip(" \t\n:.-)")
    return None


# ============================================================================================= yes/no

_YES = {"yes", "y", "true", "correct", "yeah", "yep", "affirmative"}
_NO = {"no", "n", "false", "incorrect", "nope", "negative"}


def _yes_no(text: str) -> bool | None:
    words = normalize_text(text).split()
    if not words or (len(words[0]) == 1 and len(words) > 1) or "=" in words:
        return None
    if words[0] in _YES:
        return True
    if words[0] in _NO:
        return False
    return None


# ============================================================================================ numbers

_UNITS_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
                "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19}  # fmt: skip
_TENS_WORDS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
               "eighty": 80, "ninety": 90}  # fmt: skip
_SCALE_WORDS = {"hundred": 100, "thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000}


def parse_number_words(text: str) -> int | None:
    """ "three" → 3, "twenty-one" → 21, "one hundred and five" → 105, "none" → 0; else None."""
    words = [w for w in re.split(r"[\s-]+", text.strip().casefold()) if w]
    if words == ["none"]:
        return 0
    if not words or words[0] == "and" or words[-1] == "and":
        return None
    total, current, seen = 0, 0, False
    for w in words:
        if w in _UNITS_WORDS:
            current += _UNITS_WORDS[w]
        elif w in _TENS_WORDS:
            current += _TENS_WORDS[w]
        elif w == "hundred":
            current = (current or 1) * 100
        elif w in _SCALE_WORDS:
            total += (current or 1) * _SCALE_WORDS[w]
            current = 0
        elif w == "and" and seen:
            continue
        else:
            return None
        seen = True
    return total + current


_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_PLAIN = re.compile(rf"^{_NUM}(?:[eE][+-]?\d+)?$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_FRACTION = re.compile(rf"^({_NUM})\s*/\s*({_NUM})$")
_MIXED = re.compile(r"^([+-]?)(\d+)\s+(\d+)\s*/\s*(\d+)$")
_TIMES_TEN = re.compile(
    rf"^({_NUM})\s*(?:\*|×|x|·|\\times|\\cdot)\s*10\s*(?:\^|\*\*)\s*\{{?\s*([+-]?\d+)\s*\}}?$"
)


def _parse_number(s: str, timeout_s: float) -> float | None:
    """A real number written as a decimal, fraction, number words or a closed form; None otherwise."""
    s = s.strip()
    if not s:
        return None
    if _PLAIN.match(s):
        return float(s)
    if _THOUSANDS.match(s):
        return float(s.replace(",", ""))
    if m := _FRACTION.match(s):
        den = float(m.group(2))
        return float(m.group(1)) / den if den else None
    if m := _MIXED.match(s):
        value = int(m.group(2)) + int(m.group(3)) / int(m.group(4)) if int(m.group(4)) else None
        return None if value is None else (-value if m.group(1) == "-" else value)
    if m := _TIMES_TEN.match(s):
        return float(m.group(1)) * 10.0 ** int(m.group(2))
    if (words := parse_number_words(s)) is not None:
        return float(words)
    # Closed forms (π/2, \frac{\sqrt{2}}{2}, 10^3): sympy, only when it reads as a constant expression.
    try:
        if not _looks_like_formula(_latex_to_plain(s)):
            return None
    except _Refused:
        return None
    try:
        expr = _with_timeout(lambda: _sympify(s), timeout_s)
    except (TimeoutError, _Refused):
        return None
    if expr is None or getattr(expr, "free_symbols", True) or _is_relation(expr):
        return None
    try:
        value = complex(expr.evalf())
    except (TypeError, ValueError, OverflowError):
        return None
    if abs(value.imag) > 1e-12 * max(1.0, abs(value.real)) or not math.isfinite(value.real):
        return None
    return value.real


def _fmt(x: float) -> str:
    return f"{x:.10g}"


# ============================================================================================== units

_DIMS = ("length", "mass", "time", "current", "temperature", "amount", "angle", "money")


def _dim(**powers: int) -> tuple[int, ...]:
    return tuple(powers.get(name, 0) for name in _DIMS)


_L, _M, _T, _I = _dim(length=1), _dim(mass=1), _dim(time=1), _dim(current=1)
_K, _N, _ANG, _USD = _dim(temperature=1), _dim(amount=1), _dim(angle=1), _dim(money=1)
_FORCE, _ENERGY = _dim(mass=1, length=1, time=-2), _dim(mass=1, length=2, time=-2)
_POWER, _PRESSURE = _dim(mass=1, length=2, time=-3), _dim(mass=1, length=-1, time=-2)

# name → (factor to SI, dimension, offset to SI); the offset is only for temperatures on their own.
_UNITS: dict[str, tuple[float, tuple[int, ...], float]] = {
    "m": (1.0, _L, 0.0), "in": (0.0254, _L, 0.0), "inch": (0.0254, _L, 0.0), "inches": (0.0254, _L, 0.0),
    "ft": (0.3048, _L, 0.0), "foot": (0.3048, _L, 0.0), "feet": (0.3048, _L, 0.0),
    "yd": (0.9144, _L, 0.0), "yard": (0.9144, _L, 0.0),
    "mi": (1609.344, _L, 0.0), "mile": (1609.344, _L, 0.0),
    "g": (1e-3, _M, 0.0), "t": (1e3, _M, 0.0), "tonne": (1e3, _M, 0.0),
    "lb": (0.45359237, _M, 0.0), "lbs": (0.45359237, _M, 0.0), "pound": (0.45359237, _M, 0.0),
    "oz": (0.028349523125, _M, 0.0), "ounce": (0.028349523125, _M, 0.0),
    "s": (1.0, _T, 0.0), "sec": (1.0, _T, 0.0), "secs": (1.0, _T, 0.0), "min": (60.0, _T, 0.0),
    "mins": (60.0, _T, 0.0), "minute": (60.0, _T, 0.0), "h": (3600.0, _T, 0.0), "hr": (3600.0, _T, 0.0),
    "hrs": (3600.0, _T, 0.0), "hour": (3600.0, _T, 0.0), "day": (86400.0, _T, 0.0),
    "week": (604800.0, _T, 0.0),
    "L": (1e-3, _dim(length=3), 0.0), "l": (1e-3, _dim(length=3), 0.0), "cc": (1e-6, _dim(length=3), 0.0),
    "ha": (1e4, _dim(length=2), 0.0), "hectare": (1e4, _dim(length=2), 0.0),
    "acre": (4046.8564224, _dim(length=2), 0.0),
    "mph": (0.44704, _dim(length=1, time=-1), 0.0), "kph": (1 / 3.6, _dim(length=1, time=-1), 0.0),
    "Hz": (1.0, _dim(time=-1), 0.0), "N": (1.0, _FORCE, 0.0), "J": (1.0, _ENERGY, 0.0),
    "cal": (4.184, _ENERGY, 0.0), "kcal": (4184.0, _ENERGY, 0.0), "W": (1.0, _POWER, 0.0),
    "Wh": (3600.0, _ENERGY, 0.0),
    "Pa": (1.0, _PRESSURE, 0.0), "atm": (101325.0, _PRESSURE, 0.0), "bar": (1e5, _PRESSURE, 0.0),
    "mmHg": (133.322387415, _PRESSURE, 0.0), "A": (1.0, _I, 0.0), "ampere": (1.0, _I, 0.0),
    "V": (1.0, _dim(mass=1, length=2, time=-3, current=-1), 0.0), "mol": (1.0, _N, 0.0),
    "K": (1.0, _K, 0.0), "kelvin": (1.0, _K, 0.0), "degC": (1.0, _K, 273.15),
    "degF": (5 / 9, _K, 273.15 - 32 * 5 / 9),
    "deg": (math.pi / 180, _ANG, 0.0), "degree": (math.pi / 180, _ANG, 0.0), "°": (math.pi / 180, _ANG, 0.0),
    "rad": (1.0, _ANG, 0.0), "radian": (1.0, _ANG, 0.0),
    "usd": (1.0, _USD, 0.0), "$": (1.0, _USD, 0.0), "dollar": (1.0, _USD, 0.0), "cent": (0.01, _USD, 0.0),
}  # fmt: skip
_PREFIXES = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "c": 1e-2, "d": 1e-1, "m": 1e-3, "μ": 1e-6,
             "u": 1e-6, "n": 1e-9, "p": 1e-12}  # fmt: skip
_PREFIXABLE = {"m", "g", "s", "L", "l", "Hz", "N", "J", "W", "Wh", "Pa", "V", "A", "mol"}
_WORD_PREFIXES = {"kilo": 1e3, "mega": 1e6, "giga": 1e9, "centi": 1e-2, "deci": 1e-1, "milli": 1e-3,
                  "micro": 1e-6, "nano": 1e-9}  # fmt: skip
_WORD_BASES = {"meter": "m", "metre": "m", "gram": "g", "second": "s", "liter": "L", "litre": "L",
               "hertz": "Hz", "newton": "N", "joule": "J", "watt": "W", "pascal": "Pa",
               "volt": "V"}  # fmt: skip
_NAMED_DIMS = {
    _L: "length", _M: "mass", _T: "time", _I: "current", _K: "temperature", _N: "amount of substance",
    _ANG: "angle", _USD: "money", _dim(length=2): "area", _dim(length=3): "volume",
    _dim(length=1, time=-1): "speed", _dim(length=1, time=-2): "acceleration", _dim(time=-1): "frequency",
    _FORCE: "force", _ENERGY: "energy", _POWER: "power", _PRESSURE: "pressure",
    _dim(mass=1, length=-3): "density", _dim(): "dimensionless",
}  # fmt: skip


def _dimension_name(dims: tuple[int, ...]) -> str:
    if dims in _NAMED_DIMS:
        return _NAMED_DIMS[dims]
    return "·".join(name if p == 1 else f"{name}^{p}" for name, p in zip(_DIMS, dims) if p)


def _lookup_unit(token: str) -> tuple[float, tuple[int, ...], float] | None:
    for name in (token, token.lower()) if len(token) > 1 else (token,):
        if name in _UNITS:
            return _UNITS[name]
        if len(name) > 3 and name.endswith("s") and name[:-1] in _UNITS:
            return _UNITS[name[:-1]]
        word = name[:-1] if len(name) > 3 and name.endswith("s") else name
        if word in _WORD_BASES:
            return _UNITS[_WORD_BASES[word]]
        for prefix, factor in _WORD_PREFIXES.items():
            if word.startswith(prefix) and word[len(prefix) :] in _WORD_BASES:
                base = _UNITS[_WORD_BASES[word[len(prefix) :]]]
                return factor * base[0], base[1], 0.0
        if len(name) >= 2 and name[0] in _PREFIXES and name[1:] in _PREFIXABLE:
            base = _UNITS[name[1:]]
            return _PREFIXES[name[0]] * base[0], base[1], 0.0
    return None


@dataclass(frozen=True)
class _Unit:
    text: str
    factor: float
    dims: tuple[int, ...]
    offset: float


_TEMPERATURE_WORDS = (
    (re.compile(r"(?:degrees?|deg|°)\s*(?:celsius|centigrade|c)\b|\bcelsius\b", re.IGNORECASE), " degC "),
    (re.compile(r"(?:degrees?|deg|°)\s*(?:fahrenheit|f)\b|\bfahrenheit\b", re.IGNORECASE), " degF "),
)
_UNIT_TOKEN = re.compile(r"^([A-Za-zμ°$]+)(?:\^\(?([+-]?\d+)\)?)?$")


def _parse_unit(text: str) -> _Unit | None:
    s = text.strip()
    if not s or len(s) > 40:
        return None
    for pattern, repl in _TEMPERATURE_WORDS:
        s = pattern.sub(repl, s)
    s = re.sub(r"\bper\b", "/", s, flags=re.IGNORECASE)
    s = re.sub(r"\b(?:square|sq\.?)\s+([A-Za-z]+)", r"\1^2", s, flags=re.IGNORECASE)
    s = re.sub(r"\bcubic\s+([A-Za-z]+)", r"\1^3", s, flags=re.IGNORECASE)
    s = s.replace("{", "").replace("}", "").replace("**", "^").replace("°", " ° ")
    factor, offset, dims, num_tokens = 1.0, 0.0, [0] * len(_DIMS), 0
    for i, part in enumerate(s.split("/")):
        tokens = [t for t in re.split(r"[\s*·]+", part) if t]
        if not tokens:
            return None
        for token in tokens:
            m = _UNIT_TOKEN.match(token)
            unit = _lookup_unit(m.group(1)) if m else None
            if unit is None:
                return None
            power = int(m.group(2) or 1) * (-1 if i else 1)
            factor *= unit[0] ** power
            dims = [d + power * u for d, u in zip(dims, unit[1])]
            offset = unit[2] if power == 1 else 0.0
            num_tokens += 1
    return _Unit(text.strip(), factor, tuple(dims), offset if num_tokens == 1 else 0.0)


# ========================================================================================= quantities


@dataclass(frozen=True)
class _Quantity:
    value: float  # as written (for "50%": 50)
    unit: _Unit | None = None
    percent: bool = False
    label: str | None = None  # an unknown trailing word, singular, e.g. "apple"

    @property
    def bare(self) -> bool:
        return self.unit is None and not self.percent and self.label is None

    def show(self) -> str:
        if self.percent:
            return f"{_fmt(self.value)}%"
        if self.unit or self.label:
            return f"{_fmt(self.value)} {self.unit.text if self.unit else self.label}"
        return _fmt(self.value)


_HEDGE = re.compile(r"^(?:about|approximately|approx\.?|around|roughly|nearly|~|≈)\s*", re.IGNORECASE)
_PERCENT = re.compile(r"^(.*?)\s*(?:%|percent|per cent|pct)$", re.IGNORECASE)
_LABEL = re.compile(r"^[^\W\d_]{2,}(?:[\s-][^\W\d_]+){0,3}$")


def _parse_quantity(s: str, timeout_s: float) -> _Quantity | None:
    s = _HEDGE.sub("", s).strip()
    if s.startswith("$") and (value := _parse_number(s[1:], timeout_s)) is not None:
        return _Quantity(value, _parse_unit("$"))
    if m := _PERCENT.match(s):
        value = _parse_number(m.group(1), timeout_s)
        return None if value is None else _Quantity(value, percent=True)
    value = _parse_number(s, timeout_s)
    if value is not None:
        return _Quantity(value)
    if len(s) > 80:  # a number with a unit is short; long text is not worth splitting at every letter
        return None
    for i in range(1, len(s)):
        if not (s[i].isalpha() or s[i] in "°μ$") or s[i - 1].isalpha():
            continue
        head, tail = s[:i].strip(), s[i:].strip()
        if not re.search(r"\d|[a-z]", head, re.IGNORECASE):
            continue
        unit = _parse_unit(tail)
        if unit is None and not (
            _LABEL.match(tail) and not _FORMULA_NAMES.intersection(tail.lower().split())
        ):
            continue
        value = _parse_number(head, timeout_s)
        if value is None:
            continue
        if unit is not None:
            return _Quantity(value, unit)
        label = " ".join(
            w[:-1] if len(w) > 3 and w.endswith("s") else w for w in normalize_text(tail).split()
        )
        # A tail of articles only ("5 the", a sampled answer) normalises to nothing: no label, a bare number.
        return _Quantity(value, label=label) if label else _Quantity(value)
    return None


def _close(a: float, b: float, rel_tol: float, abs_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def _compare_quantities(p: _Quantity, r: _Quantity, rel_tol: float, abs_tol: float) -> Verdict:
    def numbers(a: float, b: float, method: str, note: str = "") -> Verdict:
        if _close(a, b, rel_tol, abs_tol):
            return Verdict(True, f"numbers equal: {_fmt(a)} vs {_fmt(b)}{note}", method)
        return Verdict(False, f"numbers differ: {_fmt(a)} vs {_fmt(b)}{note}", method)

    if p.bare and r.bare:
        return numbers(p.value, r.value, "number")
    if p.percent and r.percent:
        return numbers(p.value, r.value, "percent", " (percent)")
    if p.percent or r.percent:
        pct, other = (p, r) if p.percent else (r, p)
        if not other.bare:
            return Verdict(False, f"units differ: % vs {other.show()}", "percent")
        if _close(pct.value / 100, other.value, rel_tol, abs_tol):
            return Verdict(True, f"{pct.show()} equals {_fmt(other.value)} as a fraction", "percent")
        if _close(pct.value, other.value, rel_tol, abs_tol):
            return Verdict(
                True, f"{pct.show()} equals {_fmt(other.value)} with the % sign omitted", "percent"
            )
        return Verdict(False, f"numbers differ: {p.show()} vs {r.show()}", "percent")
    if p.unit and r.unit:
        if p.unit.dims != r.unit.dims:
            return Verdict(False, f"units differ in dimension: {_dimension_name(p.unit.dims)} vs "
                                  f"{_dimension_name(r.unit.dims)}", "quantity")  # fmt: skip
        a = p.value * p.unit.factor + p.unit.offset
        b = r.value * r.unit.factor + r.unit.offset
        if _close(a, b, rel_tol, abs_tol):
            return Verdict(True, f"equal after unit conversion: {p.show()} = {r.show()}", "quantity")
        si = f"{_fmt(a)} vs {_fmt(b)} in SI units"
        return Verdict(False, f"quantities differ: {p.show()} vs {r.show()} ({si})", "quantity")
    if p.label and r.label:
        if p.label != r.label:
            return Verdict(False, f"labels differ: {p.label!r} vs {r.label!r}", "quantity")
        return numbers(p.value, r.value, "quantity", f" ({p.label})")
    if p.bare or r.bare:
        marked = r if p.bare else p
        what = "unit" if marked.unit else "label"
        return numbers(p.value, r.value, "quantity", f" ({what} {marked.show().split(' ', 1)[1]!r} omitted)")
    return Verdict(False, f"units differ: {p.show()} vs {r.show()}", "quantity")


# ============================================================================================ formulas

_MAX_FORMULA_CHARS = 300
_FORMULA_NAMES = {"sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "arcsin", "arccos",
                  "arctan", "sinh", "cosh", "tanh", "log", "ln", "exp", "sqrt", "pi", "abs", "oo", "inf",
                  "infty", "infinity"}  # fmt: skip
_LATEX_FUNCS = re.compile(
    r"\\(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|log|ln|exp|pi|infty)(?![A-Za-z])"
)


class _Refused(Exception):
    """The input is not a formula, or one sympy might never finish (refused before evaluating)."""


def _latex_to_plain(s: str) -> str:
    s = re.sub(r"\\left|\\right|\\displaystyle|\\!|\\,|\\;|\\quad", " ", s)
    s = re.sub(r"\\[dt]?frac\s*(\d)\s*(\d)", r"((\1)/(\2))", s)
    while (m := re.search(r"\\[dt]?frac\s*\{", s)) is not None:
        num = _braced(s, m.end() - 1)
        if num is None or num[1] >= len(s) or s[num[1]] != "{" or (den := _braced(s, num[1])) is None:
            raise _Refused("unbalanced \\frac")
        s = s[: m.start()] + f"(({num[0]})/({den[0]}))" + s[den[1] :]
    while (m := re.search(r"\\sqrt\s*\[([^\]]+)\]\s*\{", s)) is not None:
        arg = _braced(s, m.end() - 1)
        if arg is None:
            raise _Refused("unbalanced \\sqrt")
        s = s[: m.start()] + f"(({arg[0]})**(1/({m.group(1)})))" + s[arg[1] :]
    s = re.sub(r"\\sqrt\s*(\d+|[A-Za-z])", r"sqrt(\1)", s)
    s = s.replace("\\sqrt", "sqrt")
    s = re.sub(r"√\s*(\d+(?:\.\d+)?|[A-Za-z])", r"sqrt(\1)", s).replace("√", "sqrt")
    s = re.sub(r"\\(?:cdot|times)|×|·", "*", s)
    s = re.sub(r"\\div|÷", "/", s)
    s = _LATEX_FUNCS.sub(lambda m: " " + {"infty": "oo"}.get(m.group(1), m.group(1)) + " ", s)
    s = s.replace("π", " pi ").replace("∞", " oo ").replace("{", "(").replace("}", ")").replace("**", "^")
    if "\\" in s:
        raise _Refused("unknown LaTeX command")
    # "sin^2 x" (LaTeX's way of writing (sin x)^2) → "(sin(x))^2"
    s = re.sub(
        r"\b(sinh|cosh|tanh|sin|cos|tan|cot|sec|csc)\s*\^\s*\(?\s*(\d+)\s*\)?\s*([A-Za-z0-9]+|\([^()]*\))",
        r"(\1(\3))^\2",
        s,
    )
    return s


def _looks_like_formula(s: str) -> bool:
    if not s or len(s) > _MAX_FORMULA_CHARS or "!" in s or "__" in s:
        return False
    if re.search(r"[^0-9A-Za-z+\-*/^().,=<> _|]", s):
        return False
    for run in re.findall(r"[A-Za-z]+", s):
        if len(run) > 2 and run.lower() not in _FORMULA_NAMES:
            return False
    return bool(re.search(r"[0-9+\-*/^()=]", s)) or bool(re.fullmatch(r"\s*[A-Za-z]{1,2}\s*", s))


def _sympify(text: str):
    """A sympy expression, Equality or Tuple for ``text``; None if it does not read as one.

    Raises :class:`_Refused` for inputs that could run for ever (checked on the unevaluated tree).
    """
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    try:
        s = _latex_to_plain(text)
    except _Refused:
        return None
    if not _looks_like_formula(s):
        return None
    s = re.sub(r"\|([^|]+)\|", r"abs(\1)", s)
    if "|" in s or "<" in s or ">" in s:
        return None
    if s.count("=") > 1:
        return None
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    names = {"e": sympy.E, "pi": sympy.pi, "ln": sympy.log, "inf": sympy.oo, "infty": sympy.oo,
             "infinity": sympy.oo, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
             "abs": sympy.Abs}  # fmt: skip

    def parse(part: str, evaluate: bool):
        return parse_expr(part, local_dict=dict(names), transformations=transformations, evaluate=evaluate)

    sides = s.split("=")
    try:
        for side in sides:
            _refuse_pathological(parse(side, evaluate=False))
        exprs = [parse(side, evaluate=True) for side in sides]
    except _Refused:
        raise
    except Exception:  # noqa: BLE001 - sympy's parser raises many kinds (SyntaxError, TokenError, …)
        return None
    if len(exprs) == 2:
        return sympy.Eq(exprs[0], exprs[1], evaluate=False)
    return exprs[0]


def _refuse_pathological(expr) -> None:
    """Refuse, on the unevaluated tree, what could make sympy (or a C big-integer power) run for ever."""
    import sympy

    for num_nodes, node in enumerate(sympy.preorder_traversal(expr), start=1):
        if num_nodes > 400:
            raise _Refused("expression too large")
        if isinstance(node, sympy.factorial):
            raise _Refused("factorial")
        if isinstance(node, sympy.Pow):
            for inner in sympy.preorder_traversal(node.exp):
                if (
                    isinstance(inner, sympy.Pow)
                    and inner.exp.is_Number
                    and abs(inner.exp) > 3
                    and not inner.base.free_symbols
                ):
                    raise _Refused("power tower")
    if _power_weight(expr) > _MAX_POWER:
        raise _Refused(f"powers above {_MAX_POWER}")


_MAX_POWER = 1000


def _power_weight(node) -> float:
    """How far nested numeric powers multiply: ((x^a)^b)·… weighs |a·b|; a formula without powers 1."""
    import sympy

    if isinstance(node, sympy.Pow) and node.exp.is_Number:
        return float(abs(node.exp)) * max(1.0, _power_weight(node.base))
    return max([1.0, *(_power_weight(arg) for arg in node.args)])


def _is_relation(expr) -> bool:
    import sympy

    return isinstance(expr, sympy.Equality)


_SAMPLE_POINTS = (0.5772156649, 1.3247179572, -0.6931471806, 2.7182818285, 0.3183098862, -1.4142135624)


def _values_close(a: complex, b: complex, rel_tol: float, abs_tol: float) -> bool:
    if not (math.isfinite(abs(a)) and math.isfinite(abs(b))):
        return False
    return abs(a - b) <= max(rel_tol * max(abs(a), abs(b)), abs_tol)


def _show(expr) -> str:
    """A short printable form of a sympy object (huge integers refuse ``str``)."""
    try:
        text = str(expr)
    except ValueError:
        return "<huge number>"
    return text if len(text) <= 80 else text[:77] + "..."


def _compare_formula_trees(a, b, rel_tol: float, abs_tol: float) -> Verdict:
    import sympy

    if _is_relation(a) != _is_relation(b):
        return Verdict(False, "one answer is an equation and the other is not", "formula")
    if isinstance(a, sympy.Tuple) or isinstance(b, sympy.Tuple):
        return Verdict(False, f"formulas differ: {_show(a)} vs {_show(b)}", "formula")
    if _is_relation(a):
        da, db = a.lhs - a.rhs, b.lhs - b.rhs
        if sympy.expand(da - db) == 0 or sympy.expand(da + db) == 0:
            return Verdict(True, "equations equal after expansion", "formula")
        ratio = _sample(da, db, lambda x, y: x / y if y != 0 else complex("nan"))
        finite = [r for r in ratio if math.isfinite(abs(r))]
        if (
            len(finite) >= 3
            and all(_values_close(r, finite[0], rel_tol, abs_tol) for r in finite)
            and abs(finite[0]) > abs_tol
        ):
            return Verdict(True, f"equations agree up to the factor {_fmt(finite[0].real)}", "formula")
        return Verdict(
            False,
            f"equations differ: {_show(a.lhs)} = {_show(a.rhs)} vs {_show(b.lhs)} = {_show(b.rhs)}",
            "formula",
        )
    if a == b:
        return Verdict(True, f"same expression: {_show(a)}", "formula")
    if sympy.expand(a - b) == 0:
        return Verdict(True, f"equal after expansion: {_show(a)} = {_show(b)}", "formula")
    if not (a.free_symbols or b.free_symbols):
        va, vb = complex(a.evalf()), complex(b.evalf())
        if _values_close(va, vb, rel_tol, abs_tol):
            return Verdict(True, f"values equal: {_show(a)} vs {_show(b)}", "formula")
        return Verdict(
            False, f"values differ: {_show(a)} = {_fmt(va.real)} vs {_show(b)} = {_fmt(vb.real)}", "formula"
        )
    pairs = _sample(a, b, lambda x, y: (x, y))
    usable = [(x, y) for x, y in pairs if math.isfinite(abs(x)) and math.isfinite(abs(y))]
    for point, (x, y) in enumerate(usable):
        if not _values_close(x, y, rel_tol, abs_tol):
            where = f"at sample point {point}: {_fmt(x.real)} vs {_fmt(y.real)}"
            return Verdict(False, f"formulas differ: {_show(a)} vs {_show(b)} ({where})", "formula")
    if len(usable) < 3:
        return Verdict(
            False, f"could not compare {_show(a)} with {_show(b)} (undefined at the sample points)", "formula"
        )
    return Verdict(
        True, f"formulas agree at {len(usable)} sample points: {_show(a)} vs {_show(b)}", "formula"
    )


def _sample(a, b, combine) -> list:
    symbols = sorted(a.free_symbols | b.free_symbols, key=lambda s: s.name)
    out = []
    for k in range(len(_SAMPLE_POINTS)):
        subs = {sym: _SAMPLE_POINTS[(k + 2 * j) % len(_SAMPLE_POINTS)] for j, sym in enumerate(symbols)}
        try:
            out.append(combine(complex(a.evalf(subs=subs)), complex(b.evalf(subs=subs))))
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            continue
    return out


def _with_timeout(fn, timeout_s: float):
    """Run ``fn`` in a daemon thread; raise TimeoutError if it has not finished in ``timeout_s``.

    A thread rather than SIGALRM so that it works off the main thread (Prefect runs tasks in threads);
    a run that times out is abandoned, which is why the pathological inputs are refused beforehand.
    """
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    worker = threading.Thread(target=target, daemon=True, name="keyeflow-grader")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"gave up after {timeout_s} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _compare_formulas(
    pred: str, ref: str, rel_tol: float, abs_tol: float, timeout_s: float
) -> Verdict | None:
    def work():
        a, b = _sympify(pred), _sympify(ref)
        if a is None or b is None:
            return None
        return _compare_formula_trees(a, b, rel_tol, abs_tol)

    try:
        return _with_timeout(work, timeout_s)
    except TimeoutError:
        return Verdict(False, f"formula check timed out after {timeout_s} s", "formula")
    except _Refused as exc:
        return Verdict(False, f"formula refused: {exc}", "formula")
    except (ValueError, TypeError, OverflowError, ZeroDivisionError, RecursionError) as exc:
        return Verdict(False, f"could not compare the formulas: {type(exc).__name__}: {exc}", "formula")


# ========================================================================================= equivalence

_ASSIGNMENT = re.compile(r"^\s*[A-Za-z]\w{0,15}\s*=\s*(?=\S)")
_OPEN_CLOSE = {"(": ")", "[": "]", "{": "}"}


def _split_items(s: str) -> tuple[str, list[str]] | None:
    """``(brackets, items)`` for a comma-separated list at the top level; None if not a list."""
    if _THOUSANDS.match(s):
        return None
    brackets = ""
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        brackets, s = s[0] + s[-1], s[1:-1]
    items, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(s[start:i].strip())
            start = i + 1
    items.append(s[start:].strip())
    return (brackets, items) if len(items) >= 2 and all(items) else None


def answers_equivalent(
    pred: object, ref: object, *, rel_tol: float = 1e-4, abs_tol: float = 1e-9, timeout_s: float = 2.0
) -> Verdict:
    """Whether answer ``pred`` says the same as reference ``ref``; rules in the module docstring."""
    return _equivalent(_clean(pred), _clean(ref), rel_tol, abs_tol, timeout_s, depth=0)


def _equivalent(p: str, r: str, rel_tol: float, abs_tol: float, timeout_s: float, depth: int) -> Verdict:
    if not r:
        return Verdict(False, "empty reference", "none")
    if not p:
        return Verdict(False, "empty prediction", "none")
    if p == r or normalize_text(p) == normalize_text(r):
        return Verdict(True, "same text after normalisation", "text")

    if (ref_choice := parse_choice(r)) is not None:
        pred_choice = parse_choice(p)
        if pred_choice is not None:
            if pred_choice[0] == ref_choice[0]:
                return Verdict(True, f"same option {ref_choice[0]}", "choice")
            return Verdict(False, f"options differ: {pred_choice[0]} vs {ref_choice[0]}", "choice")
        if ref_choice[1] and normalize_text(p) == normalize_text(ref_choice[1]):
            return Verdict(True, f"prediction repeats the text of option {ref_choice[0]}", "choice")
        return Verdict(False, f"no option letter in prediction {p!r} (expected {ref_choice[0]})", "choice")

    if (ref_yes := _yes_no(r)) is not None:
        pred_yes = _yes_no(p)
        if pred_yes is None:
            return Verdict(False, f"expected yes/no, got {p!r}", "yes_no")
        words = {True: "yes", False: "no"}
        if pred_yes == ref_yes:
            return Verdict(True, f"both {words[ref_yes]}", "yes_no")
        return Verdict(False, f"{words[pred_yes]} vs {words[ref_yes]}", "yes_no")

    # "x = 5" vs "5": drop the name on the side that has it when the other side is no equation.
    if ("=" in p) != ("=" in r):
        p, r = _ASSIGNMENT.sub("", p, count=1), _ASSIGNMENT.sub("", r, count=1)

    p_items, r_items = _split_items(p), _split_items(r)
    if p_items and r_items and depth < 3:
        if p_items[0] and r_items[0] and p_items[0] != r_items[0]:
            return Verdict(False, f"brackets differ: {p_items[0]} vs {r_items[0]}", "sequence")
        if len(p_items[1]) != len(r_items[1]):
            return Verdict(False, f"different number of items: {len(p_items[1])} vs {len(r_items[1])}",
                           "sequence")  # fmt: skip
        if p_items[0] == r_items[0] == "{}":  # sets: any order
            unmatched = list(r_items[1])
            for a in p_items[1]:
                match = next(
                    (b for b in unmatched if _equivalent(a, b, rel_tol, abs_tol, timeout_s, depth + 1)), None
                )
                if match is None:
                    return Verdict(False, f"set item {a!r} not in the reference", "sequence")
                unmatched.remove(match)
            return Verdict(True, f"same set of {len(r_items[1])} items", "sequence")
        for k, (a, b) in enumerate(zip(p_items[1], r_items[1]), start=1):
            item = _equivalent(a, b, rel_tol, abs_tol, timeout_s, depth + 1)
            if not item.equal:
                return Verdict(False, f"item {k} differs: {item.reason}", "sequence")
        return Verdict(True, f"all {len(r_items[1])} items equal", "sequence")

    p_quantity, r_quantity = _parse_quantity(p, timeout_s), _parse_quantity(r, timeout_s)
    if p_quantity is not None and r_quantity is not None:
        return _compare_quantities(p_quantity, r_quantity, rel_tol, abs_tol)

    formula = _compare_formulas(p, r, rel_tol, abs_tol, timeout_s)
    if formula is not None:
        return formula
    return Verdict(False, f"texts differ: {normalize_text(p)!r} vs {normalize_text(r)!r}", "text")


# ============================================================================================= rewards


def math_reward(response: str, reference: object, *, rel_tol: float = 1e-4, abs_tol: float = 1e-9) -> float:
    """1.0 when the response's final answer (:func:`extract_answer`) is equivalent to ``reference``."""
    return float(
        answers_equivalent(extract_answer(response), reference, rel_tol=rel_tol, abs_tol=abs_tol).equal
    )


def multiple_choice_reward(response: str, reference: str, options: Mapping[str, str] | None = None) -> float:
    """1.0 when the response's final answer picks the reference option letter.

    ``options`` (letter → option text), when given, lets an answer that repeats an option's text instead
    of its letter count as that option.
    """
    ref = parse_choice(reference)
    if ref is None:
        raise ValueError(f"reference {reference!r} is not an option letter")
    answer = extract_answer(response)
    pred = parse_choice(answer)
    if pred is None and options:
        said = normalize_text(answer)
        matches = [letter.upper() for letter, text in options.items() if normalize_text(text) == said]
        pred = (matches[0], "") if len(matches) == 1 else None
    return float(pred is not None and pred[0] == ref[0])


_COUNT_TOKEN = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[+-]?\d+(?:\.\d+)?|[A-Za-z]+(?:-[A-Za-z]+)*")


def parse_count(text: object) -> int | None:
    """The last number in ``text`` as a non-negative integer: "3", "There are three." → 3; else None.

    Digits (with thousands separators) or number words ("twenty-one", "one hundred and five", "none"). A
    last number that is negative or not whole ("3.5") is no count.
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, int):
        return text if text >= 0 else None
    tokens = _COUNT_TOKEN.findall(unicodedata.normalize("NFKC", str(text)))
    last: float | None = None
    run: list[str] = []

    def flush() -> None:
        nonlocal last, run
        while run and run[-1].lower() == "and":
            run.pop()
        if run and (value := parse_number_words(" ".join(run))) is not None:
            last = value
        run = []

    for token in tokens:
        if token[0].isalpha():
            words = token.lower().split("-")
            if all(
                w in _UNITS_WORDS or w in _TENS_WORDS or w in _SCALE_WORDS or w == "none" for w in words
            ) or (token.lower() == "and" and run):
                run.append(token)
                continue
            flush()
        else:
            flush()
            last = float(token.replace(",", ""))
    flush()
    if last is None or last < 0 or last != int(last):
        return None
    return int(last)


def counting_reward(response: str, reference: object) -> float:
    """1.0 when the count in the response's final answer equals the reference count."""
    ref = parse_count(reference)
    if ref is None:
        raise ValueError(f"reference {reference!r} is not a count")
    return float(parse_count(extract_answer(response)) == ref)


# =========================================================================================== grounding

_NUMBER = r"[+-]?\d+(?:\.\d+)?"
_FOUR = rf"\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*"
_BOX_TOKENS = re.compile(rf"<\|box_start\|>\s*\[\[{_FOUR}\]\]\s*<\|box_end\|>")
_BOX_LIST = re.compile(rf"[\[(]{_FOUR}[\])]")

Box = tuple[float, float, float, float]


def parse_box(value: object) -> Box:
    """``(x1, y1, x2, y2)`` from a box in text or a sequence; the first box when text holds several.

    Text: ``<|box_start|>[[x1,y1,x2,y2]]<|box_end|>`` (integer coordinates in [0, 1000), SPEC §3), else a
    plain ``[x1, y1, x2, y2]`` / ``[[…]]`` / ``(…)`` list (any finite numbers, e.g. pixels). Sequences: four
    numbers or one nested list of four. Raises ValueError saying what is wrong (no box, a coordinate
    outside [0, 1000) or not an integer in the token form, x2 < x1 or y2 < y1), TypeError for other types.
    """
    if isinstance(value, str):
        if m := _BOX_TOKENS.search(value):
            coords = [float(g) for g in m.groups()]
            for c in coords:
                if c != int(c) or not 0 <= c < 1000:
                    raise ValueError(
                        f"box coordinate {m.group(0)!r}: {_fmt(c)} is not an integer in [0, 1000)"
                    )
        elif m := _BOX_LIST.search(value):
            coords = [float(g) for g in m.groups()]
        else:
            raise ValueError(f"no box in {value!r}")
    elif isinstance(value, Sequence):
        items = list(value)
        if len(items) == 1 and isinstance(items[0], Sequence) and not isinstance(items[0], str):
            items = list(items[0])
        if len(items) != 4:
            raise ValueError(f"a box has four coordinates, got {len(items)}")
        try:
            coords = [float(c) for c in items]
        except (TypeError, ValueError):
            raise ValueError(f"box coordinates must be numbers, got {items}") from None
    else:
        raise TypeError(f"cannot read a box from {type(value).__name__}")
    x1, y1, x2, y2 = coords
    if not all(math.isfinite(c) for c in coords):
        raise ValueError(f"box {coords} has a non-finite coordinate")
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {coords} has x2 < x1 or y2 < y1")
    return x1, y1, x2, y2


def grounding_iou(pred_box: object, ref_box: object) -> float:
    """Intersection over union of two boxes (text or sequences, see :func:`parse_box`); 0 if both empty."""
    a, b = parse_box(pred_box), parse_box(ref_box)
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def iou_reward(response: str, reference: object, threshold: float = 0.5) -> float:
    """1.0 when the first box of the response's answer has IoU ≥ ``threshold`` with the reference box.

    The box is looked for inside ``<answer>…</answer>`` when there is one, else in the whole response. A
    response without a readable box scores 0; an unreadable reference raises ValueError.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    ref = parse_box(reference)
    blocks = _ANSWER_BLOCK.findall(response)
    try:
        pred = parse_box(blocks[-1] if blocks else response)
    except ValueError:
        return 0.0
    return float(grounding_iou(pred, ref) >= threshold)


# ===================================================================================== arithmetic claims

_CLAIM_NUMBER = r"[0-9]{1,30}(?:\.[0-9]{1,30})?"  # longer digit runs are no claim anyone checks
_CLAIM_OP = r"(?:\\times|\\cdot|\\div|[-+*/×x÷·−])"
_CLAIM = re.compile(
    rf"(?P<chain>[-−]?{_CLAIM_NUMBER}(?:[ \t]*{_CLAIM_OP}[ \t]*{_CLAIM_NUMBER})+)[ \t]*=[ \t]*"
    rf"(?P<result>[-−]?{_CLAIM_NUMBER})"
)
_CLAIM_TOKEN = re.compile(rf"{_CLAIM_NUMBER}|{_CLAIM_OP}")
# Before the chain: an operator with an operand before it ("y^2 + 3 = 7", "(1) + 2 = 3") continues it.
_LEFT_OPERATORS = "+-*/×÷·−^"
# After the result: more of an expression ("= 5 + 1", "= 5x", "= 5^2", "= 1,000"), so "= 5" is not all of it.
_CONTINUES_RIGHT = re.compile(
    r"[\w^(%°\[{\\]|[.,]\d|[ \t]*(?:[-+*/×÷·−=^]|\\times|\\cdot|\\div)[ \t]*[\w(\\]"
    r"|[ \t]*x[ \t]*[\d(]"  # "x" continues only before a number: "= 48 xqzt" is a word after the claim
)


def _claim_value(chain: str) -> Fraction | None:
    """The value of ``a op b op c …`` with × and ÷ before + and −; None on a division by zero."""
    sign = -1 if chain[0] in "-−" else 1
    tokens = _CLAIM_TOKEN.findall(chain.lstrip("-−"))
    terms: list[Fraction] = []
    current = sign * Fraction(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2]):
        value = Fraction(number)
        if op in ("*", "×", "x", "·", "\\times", "\\cdot"):
            current *= value
        elif op in ("/", "÷", "\\div"):
            if value == 0:
                return None
            current /= value
        else:
            terms.append(current)
            current = value if op == "+" else -value
    return sum(terms, current)


def arithmetic_claims(text: object) -> list[tuple[str, bool]]:
    """Every arithmetic claim ``a <op> b = c`` stated in ``text`` (chains ``a + b × c = d`` too), with
    whether it holds: ``[("6 × 7 = 42", True), ("2 + 2 = 5", False)]``.

    Operands are integers or decimals (a leading minus allowed); operators ``+ - − * × x · / ÷`` and LaTeX
    ``\\times \\cdot \\div``, × and ÷ binding tighter. Evaluated exactly (fractions). A whole-number
    result must be exact; a decimal result holds when the true value rounds to it at its own number of
    places ("10 / 3 = 3.33" holds, "10 / 3 = 3" does not). A division by zero does not hold. Only claims
    whose both sides are plain numbers are checkable: one with a variable, power, bracket or unit attached
    on either side ("x^2 + 3 = 7", "(2 + 3) × 4 = 20", "2 + 3 = 5x") is skipped, and in a running chain
    "3 × 4 = 12 + 2 = 14" only "12 + 2 = 14" is. Never raises; non-text gives [].
    """
    if not isinstance(text, str):
        return []
    claims: list[tuple[str, bool]] = []
    position = 0
    while (m := _CLAIM.search(text, position)) is not None:
        position = m.start("result")  # the result may open the next claim of a running chain
        start, end = m.start(), m.end()
        if start and (text[start - 1].isalnum() or text[start - 1] in "._,^)]}\\"):
            continue  # the chain continues to the left: part of a longer expression
        before = text[max(0, start - 80) : start].rstrip()  # a window: the whole prefix would be quadratic
        if before and before[-1] in _LEFT_OPERATORS:
            operand = before[:-1].rstrip()
            if operand and (operand[-1].isalnum() or operand[-1] in ")]}"):
                continue
        if _CONTINUES_RIGHT.match(text, end):
            continue
        value = _claim_value(m.group("chain").strip())
        result_text = m.group("result")
        result = (-1 if result_text[0] in "-−" else 1) * Fraction(result_text.lstrip("-−"))
        places = len(result_text.partition(".")[2])
        if value is None:
            holds = False
        elif places == 0:
            holds = value == result
        else:
            holds = abs(value - result) <= Fraction(1, 2 * 10**places)
        claims.append((m.group(0), holds))
    return claims


def reads_as_number(text: object, *, timeout_s: float = 2.0) -> bool:
    """Whether ``text`` reads as a number (the forms :func:`answers_equivalent` compares as numbers: digits,
    fractions, number words, closed forms, optionally with a unit, percent sign or label; a leading
    "x = " dropped)."""
    s = _ASSIGNMENT.sub("", _clean(text), count=1)
    return bool(s) and _parse_quantity(s, timeout_s) is not None


# ============================================================================================== format

FORMAT_MODES = ("think", "no_think", "auto_think")
_TAG = re.compile(r"</?(?:think|answer)>")
_THINK_FORMAT = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_EMPTY_THINK = re.compile(r"^\s*<think>\s*</think>", re.DOTALL)


def format_problem(text: str, mode: str) -> str | None:
    """Why ``text`` breaks the output format of ``mode``; None when it is well formed.

    - ``think``: exactly one non-empty ``<think>…</think>`` first, then exactly one non-empty
      ``<answer>…</answer>``, nothing else around them but whitespace.
    - ``no_think``: no reasoning block. An empty ``<think></think>`` at the start is allowed (chat templates
      that pre-fill it, as Qwen3 does); the rest is the answer, either plain text (what keyeflow's
      ``/no_think`` samples contain) or one ``<answer>…</answer>``; it must not be empty.
    - ``auto_think``: either of the two; which one the model should have picked is not a format question.
    """
    if mode not in FORMAT_MODES:
        raise ValueError(f"mode must be one of {FORMAT_MODES}, got {mode!r}")
    if mode == "auto_think":
        think, no_think = format_problem(text, "think"), format_problem(text, "no_think")
        return (
            None
            if think is None or no_think is None
            else f"neither think ({think}) nor no_think ({no_think})"
        )
    if mode == "think":
        tags = _TAG.findall(text)
        if tags != ["<think>", "</think>", "<answer>", "</answer>"]:
            return f"expected <think>…</think><answer>…</answer>, found tags {tags}"
        m = _THINK_FORMAT.match(text)
        if m is None:
            return "text outside the <think> and <answer> blocks"
        if not m.group(1).strip():
            return "empty <think> block"
        if not m.group(2).strip():
            return "empty <answer> block"
        return None
    rest = _EMPTY_THINK.sub("", text, count=1)
    if "<think>" in rest or "</think>" in rest:
        return "a <think> block with content in no_think mode"
    tags = _TAG.findall(rest)
    if tags:
        m = re.fullmatch(r"\s*<answer>(.*?)</answer>\s*", rest, re.DOTALL)
        if tags != ["<answer>", "</answer>"] or m is None:
            return f"malformed <answer> block, found tags {tags}"
        rest = m.group(1)
    if not rest.strip():
        return "empty answer"
    return None


def format_reward(text: str, mode: str) -> float:
    """1.0 when ``text`` follows the output format of ``mode`` (see :func:`format_problem`), else 0.0."""
    return float(format_problem(text, mode) is None)

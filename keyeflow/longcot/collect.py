"""LongCoT step 1 (SPEC §4.3.1): multi-source collection and question enhancement.

:func:`collect_questions` reads JSONL questions in the conversation format (``{"messages": [user turn,
optional assistant turn], "reference"?, "domain", "source"?}``; the reference is the ``reference`` field,
else the assistant turn's answer), checks the domain tag (:data:`DOMAINS`) and the media (paths relative to
the file, inside the source root, as ``conversations`` does), keeps the optional reference solution
(``"solution"``: ``steps`` — the reasoning that derives the answer — and optionally ``concept``, ``method``,
``tool``, ``answer_forms``, ``wrong_answers``; see :func:`check_solution`) as JSON in the ``solution``
column (RL items derive their hints from it), and dedupes on the normalised question text
plus the media's content hashes. Optional enhancement: ``rewrite`` asks a generator for a harder version of
each new question and keeps it only if it passes :func:`rewrite_problem` (else the original is kept and the
reason recorded); ``merge`` joins two questions on the same media into one two-part question whose reference
is ``(answer 1, answer 2)`` (a template, so the reference stays right). Table ``longcot_questions``; bad
lines and duplicates go to ``quarantine`` (stage ``longcot_collect``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from keyeflow.config import config_hash as hash_config
from keyeflow.datasets import tables
from keyeflow.datasets.conversations import BadRecord, resolve_media
from keyeflow.datasets.video import content_hash
from keyeflow.longcot.common import chunks, json_text, read_ref_rows
from keyeflow.longcot.generate import GenerationConfig, generate_each
from keyeflow.quality import graders
from keyeflow.quality.judges import content_terms

STAGE_COLLECT = "longcot_collect"
DOMAINS = ("math", "stem", "ocr", "grounding", "counting", "gui", "business")
REWRITE_PROMPT = (
    "Rewrite the question below so that answering it needs more reasoning steps, without changing its "
    "answer. Keep every number and name it uses. Reply with the new question only.\n\nQuestion: {question}"
)


@dataclass(frozen=True)
class CollectConfig:
    """Step 1: which questions are taken and how they are enhanced."""

    rewrite: bool = False  # ask the generator for a harder rewrite of every new question
    merge: bool = False  # join pairs of questions on the same media into two-part questions
    rewrite_max_new_tokens: int = 128
    rewrite_min_overlap: float = 0.5  # share of the original's content words a rewrite must keep
    max_question_chars: int = 4000
    default_domain: str | None = None  # for rows without a "domain" tag; None: such rows are quarantined

    def __post_init__(self) -> None:
        if not 0.0 <= self.rewrite_min_overlap <= 1.0:
            raise ValueError(
                f"CollectConfig.rewrite_min_overlap must be in [0, 1], got {self.rewrite_min_overlap}"
            )
        if self.rewrite_max_new_tokens < 1 or self.max_question_chars < 1:
            raise ValueError("CollectConfig: rewrite_max_new_tokens and max_question_chars must be >= 1")
        if self.default_domain is not None and self.default_domain not in DOMAINS:
            raise ValueError(
                f"CollectConfig.default_domain must be one of {DOMAINS}, got {self.default_domain!r}"
            )


@dataclass
class Question:
    question_id: str
    source: str
    source_uri: str
    domain: str
    text: str
    reference: str
    media: list[dict]  # {"type": "image"|"video", "path": absolute path, "hash": sha256 of the bytes}
    solution: dict | None = None  # the reference solution (check_solution), when the row gives one


@dataclass
class CollectReport:
    num_lines: int = 0
    num_new: int = 0
    num_already_present: int = 0
    num_duplicates: int = 0
    num_quarantined: int = 0  # bad lines + duplicates
    num_rewritten: int = 0
    num_rewrites_discarded: int = 0
    num_merged: int = 0
    question_ids: list[str] = field(default_factory=list)  # this batch, in file order (merged ones last)
    quarantined: dict[str, str] = field(default_factory=dict)


_MODE_SWITCH = re.compile(r"\s*/(?:no_)?think\s*$")


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def question_id(text: str, media_hashes: Sequence[tuple[str, str]]) -> str:
    """The dedupe key: the normalised question text (graders.normalize_text) plus the media's
    (kind, content hash) pairs, order-free."""
    payload = json_text({"q": graders.normalize_text(text), "media": sorted(map(list, media_hashes))})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


SOLUTION_TEXT_FIELDS = ("concept", "method", "tool")
SOLUTION_LIST_FIELDS = ("steps", "answer_forms", "wrong_answers")


def check_solution(solution: object) -> dict:
    """A question's reference solution, checked: a mapping with ``steps`` (a non-empty list of non-empty
    strings, the reasoning in order, the last one reaching the answer), optional ``concept`` / ``method`` /
    ``tool`` (non-empty strings: what to notice, how to attack it, the operation to use) and optional
    ``answer_forms`` / ``wrong_answers`` (lists of non-empty strings). Raises BadRecord otherwise."""
    if not isinstance(solution, dict):
        raise BadRecord(f"'solution' must be an object, got {type(solution).__name__}")
    unknown = set(solution) - set(SOLUTION_TEXT_FIELDS) - set(SOLUTION_LIST_FIELDS)
    if unknown:
        raise BadRecord(f"'solution' has unknown fields {sorted(unknown)}")
    if "steps" not in solution:
        raise BadRecord("'solution' needs 'steps'")
    for key in SOLUTION_LIST_FIELDS:
        value = solution.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise BadRecord(f"'solution.{key}' must be a list of non-empty strings")
    if not solution["steps"]:
        raise BadRecord("'solution.steps' is empty")
    for key in SOLUTION_TEXT_FIELDS:
        if key in solution and not (isinstance(solution[key], str) and solution[key].strip()):
            raise BadRecord(f"'solution.{key}' must be a non-empty string")
    return dict(solution)


def _parse_question(
    row, uri: str, file: Path, source_root: Path, config: CollectConfig, digest: Callable[[Path], str]
) -> Question:
    if not isinstance(row, dict):
        raise BadRecord(f"expected a JSON object, got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord("'messages' must be a non-empty list")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles not in (["user"], ["user", "assistant"]):
        raise BadRecord(f"expected one user turn and an optional assistant turn, got roles {roles}")
    user = messages[0]
    if not isinstance(user.get("content"), (str, list)):
        raise BadRecord("the user turn's content must be a string or a list of parts")
    text = _MODE_SWITCH.sub("", _text_of(user["content"])).strip()
    if not text:
        raise BadRecord("the user turn has no question text")
    if len(text) > config.max_question_chars:
        raise BadRecord(f"question longer than {config.max_question_chars} characters ({len(text)})")
    if "reference" in row and row["reference"] is not None:
        reference = str(row["reference"]).strip()
    elif len(messages) == 2:
        content = messages[1].get("content")
        if not isinstance(content, (str, list)):
            raise BadRecord("the assistant turn's content must be a string or a list of parts")
        answer_text = _text_of(content)
        reference = (
            graders.extract_answer(answer_text)
            if re.search(r"<answer>|answer", answer_text, re.IGNORECASE)
            else answer_text.strip()
        )
    else:
        raise BadRecord("no reference: give a 'reference' field or an assistant turn")
    if not reference:
        raise BadRecord("empty reference answer")
    domain = row.get("domain") or config.default_domain
    if domain not in DOMAINS:
        raise BadRecord(f"domain must be one of {list(DOMAINS)}, got {row.get('domain')!r}")
    media = []
    if isinstance(user["content"], list):
        for part in user["content"]:
            if isinstance(part, dict) and part.get("type") in ("image", "video"):
                path = resolve_media(part, file.parent, source_root)
                media.append({"type": part["type"], "path": str(path), "hash": digest(path)})
            elif not (isinstance(part, dict) and part.get("type") == "text"):
                raise BadRecord(f"unsupported content part {part!r:.80}")
    solution = check_solution(row["solution"]) if row.get("solution") is not None else None
    qid = question_id(text, [(m["type"], m["hash"]) for m in media])
    return Question(qid, str(row.get("source") or file.stem), uri, domain, text, reference, media, solution)


def read_questions(
    path: Path,
    source_root: Path,
    config: CollectConfig,
    bad: list[tuple[str, str]],
    digest: Callable[[Path], str],
) -> tuple[int, list[Question]]:
    """(lines read, questions) of one JSONL file; every unusable line is appended to ``bad``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        bad.append((str(path), f"unreadable: {exc.strerror or exc}"))
        return 0, []
    out, num_lines = [], 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        num_lines += 1
        uri = f"{path}#L{number}"
        try:
            out.append(
                _parse_question(json.loads(line.decode("utf-8")), uri, path, source_root, config, digest)
            )
        except UnicodeDecodeError as exc:
            bad.append((uri, f"invalid UTF-8 at line {number}, byte {exc.start} of the line"))
        except json.JSONDecodeError as exc:
            bad.append((uri, f"invalid JSON at line {number}: {exc.msg} (column {exc.colno})"))
        except BadRecord as exc:
            bad.append((uri, f"line {number}: {exc}"))
    return num_lines, out


def rewrite_problem(original: str, rewrite: str, reference: str, min_overlap: float = 0.5) -> str | None:
    """Why a generated rewrite cannot replace the original question; None when it passes.

    The checks a rewrite must pass (a junk or answer-changing rewrite would poison the reference): some
    text of 3+ words, at most 4× (+200 characters) and at least half the original's length, plain
    printable text (≥ 90% letters, digits, spaces and punctuation, no control or replacement characters),
    no ``<think>``/``<answer>`` markup, every number of the original kept, at least ``min_overlap`` of the
    original's content words kept, and the reference not given away when the original did not state it.
    """
    text = rewrite.strip()
    if len(text.split()) < 3:
        return f"too short ({len(text.split())} words)"
    if len(text) > 4 * len(original) + 200 or len(text) < len(original) / 2:
        return f"length {len(text)} outside [{len(original) // 2}, {4 * len(original) + 200}] characters"
    if re.search(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]", text):
        return "contains control or replacement characters"
    plain = sum(ch.isalnum() or ch.isspace() or ch in ".,;:!?'\"()-/%$+=*<>[]" for ch in text)
    if plain < 0.9 * len(text):
        return f"not plain text ({100 * (1 - plain / len(text)):.0f}% unusual characters)"
    if re.search(r"</?(?:think|answer)>", text):
        return "contains answer markup"
    original_numbers = set(re.findall(r"\d+(?:\.\d+)?", original))
    missing = sorted(original_numbers - set(re.findall(r"\d+(?:\.\d+)?", text)))
    if missing:
        return f"drops the number(s) {', '.join(missing)} of the original"
    words = content_terms(original)
    if words:
        kept = len(words & content_terms(text)) / len(words)
        if kept < min_overlap:
            return (
                f"keeps only {100 * kept:.0f}% of the original's content words (< {100 * min_overlap:.0f}%)"
            )

    def states(question: str) -> bool:
        norm_ref = graders.normalize_text(reference)
        return (
            bool(norm_ref)
            and re.search(rf"(?<!\w){re.escape(norm_ref)}(?!\w)", graders.normalize_text(question))
            is not None
        )

    if states(text) and not states(original):
        return "gives the answer away"
    return None


def _merge_pairs(questions: Sequence[Question]) -> list[tuple[Question, Question]]:
    """Pairs of questions on the same media (consecutive in file order), references without commas or
    brackets (they become one ``(a, b)`` answer), grounding excluded."""
    groups: dict[str, list[Question]] = {}
    for q in questions:
        if q.media and q.domain != "grounding" and not re.search(r"[,()\[\]{}]", q.reference):
            key = json_text(sorted((m["type"], m["hash"]) for m in q.media))
            groups.setdefault(key, []).append(q)
    pairs = []
    for group in groups.values():
        pairs += [(group[i], group[i + 1]) for i in range(0, len(group) - 1, 2)]
    return pairs


def _merged(a: Question, b: Question) -> Question:
    kind = " and ".join(sorted({m["type"] for m in a.media}))
    text = (
        f"Answer both questions about the same {kind}.\n(1) {a.text}\n(2) {b.text}\n"
        "Give the final answer as (answer 1, answer 2)."
    )
    qid = hashlib.sha256(f"merge:{a.question_id}:{b.question_id}".encode()).hexdigest()[:20]
    return Question(
        qid,
        a.source,
        f"merge:{a.source_uri}+{b.source_uri}",
        a.domain,
        text,
        f"({a.reference}, {b.reference})",
        a.media,
        _merged_solution(a, b),
    )


def _merged_solution(a: Question, b: Question) -> dict | None:
    """Both solutions one after the other, marked (1) and (2); None unless both questions have one."""
    if a.solution is None or b.solution is None:
        return None
    merged: dict = {"steps": [f"({k}) {s}" for k, q in ((1, a), (2, b)) for s in q.solution["steps"]]}
    for key in SOLUTION_TEXT_FIELDS:
        if key in a.solution and key in b.solution:
            merged[key] = f"(1) {a.solution[key]} (2) {b.solution[key]}"
    merged["answer_forms"] = [f"({a.reference}, {b.reference})"]
    merged["wrong_answers"] = [f"({w}, {b.reference})" for w in a.solution.get("wrong_answers", [])] + [
        f"({a.reference}, {w})" for w in b.solution.get("wrong_answers", [])
    ]
    return merged


def read_question_files(
    paths: Sequence[str], source_root: str, config: CollectConfig, bad: list[tuple[str, str]]
) -> tuple[int, list[list[Question]]]:
    """(lines read, the questions of each file) of JSONL files or folders of them (in path order, each
    file once); every unusable line is appended to ``bad``. Media are hashed once per path."""
    root_dir = Path(source_root)
    hashes: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in hashes:
            hashes[path] = content_hash(str(path))[0]
        return hashes[path]

    files: list[Path] = []
    for item in paths:
        p = Path(item)
        files += sorted(x for x in p.rglob("*.jsonl") if x.is_file()) if p.is_dir() else [p]
    num_lines, out = 0, []
    for file in dict.fromkeys(files):
        lines, questions = read_questions(file, root_dir, config, bad, digest)
        num_lines += lines
        out.append(questions)
    return num_lines, out


def collect_questions(
    paths: Sequence[str],
    source_root: str,
    config: CollectConfig = CollectConfig(),
    generator=None,
    generation: GenerationConfig | None = None,
    root: str | None = None,
) -> CollectReport:
    """Read, check, dedupe and optionally enhance questions into ``longcot_questions`` (module docstring).

    ``paths``: JSONL files or folders of them. ``generator``/``generation`` are needed for ``rewrite``.
    A question already in the table keeps its row (its text is fixed the first time it is collected).
    """
    if config.rewrite and generator is None:
        raise ValueError("CollectConfig.rewrite needs a generator")
    report = CollectReport()
    bad: list[tuple[str, str]] = []
    first: dict[str, Question] = {}
    num_lines, read = read_question_files(paths, source_root, config, bad)
    report.num_lines += num_lines
    for questions in read:
        for q in questions:
            if q.question_id in first:
                kept = first[q.question_id]
                differs = (
                    ""
                    if graders.answers_equivalent(q.reference, kept.reference)
                    else f"; its reference {q.reference!r} differs from {kept.reference!r}"
                )
                bad.append(
                    (q.source_uri, f"duplicate of question {q.question_id} ({kept.source_uri}){differs}")
                )
                report.num_duplicates += 1
            else:
                first[q.question_id] = q
    batch = list(first.values())
    if config.merge:
        batch += [_merged(a, b) for a, b in _merge_pairs(batch)]
    present = tables.existing_keys("longcot_questions", [q.question_id for q in batch], root)
    new = [q for q in batch if q.question_id not in present]
    rewrites: dict[str, tuple[str, str]] = {}  # question_id -> (text, note)
    originals = [q for q in new if not q.source_uri.startswith("merge:")]  # merges are made from originals
    if config.rewrite and originals:
        rewrites = _rewrite(originals, config, generator, generation or GenerationConfig())
    chash = hash_config(
        {
            "collect": asdict(config),
            "generation": generation.config_hash() if (config.rewrite and generation) else None,
        }
    )
    rows = []
    for q in new:
        text, note = rewrites.get(q.question_id, (q.text, ""))
        merged = q.source_uri.startswith("merge:")
        kind = "merged" if merged else "harder" if text != q.text else "none"
        if merged:
            note = f"merged from {q.source_uri.removeprefix('merge:')}"
        report.num_merged += merged
        report.num_rewritten += kind == "harder"
        report.num_rewrites_discarded += note.startswith("rewrite discarded")
        rows.append({
            "question_id": q.question_id, "source": q.source, "source_uri": q.source_uri, "domain": q.domain,
            "question": text, "original_question": q.text, "reference": q.reference,
            "solution": json_text(q.solution) if q.solution is not None else None,
            "media": json_text(q.media), "num_media": len(q.media), "rewrite": kind, "rewrite_note": note,
            "config_hash": chash, "created_at": tables.now(),
        })  # fmt: skip
    tables.upsert(
        "quarantine",
        [tables.quarantine_row(u, why, STAGE_COLLECT, config_hash=chash) for u, why in bad],
        root,
    )
    tables.upsert("longcot_questions", rows, root)
    report.num_new = len(rows)
    report.num_already_present = len(batch) - len(new)
    report.quarantined = dict(bad)
    report.num_quarantined = len(report.quarantined)
    report.question_ids = [q.question_id for q in batch]
    return report


def _rewrite(
    questions: Sequence[Question], config: CollectConfig, generator, generation: GenerationConfig
) -> dict[str, tuple[str, str]]:
    prompts = [[{"role": "user", "content": REWRITE_PROMPT.format(question=q.text)}] for q in questions]
    out: dict[str, tuple[str, str]] = {}
    for batch_q, batch_p in zip(
        chunks(questions, generation.batch_size), chunks(prompts, generation.batch_size)
    ):
        results = generate_each(
            generator,
            list(batch_p),
            {
                "n": 1,
                "max_new_tokens": config.rewrite_max_new_tokens,
                "temperature": 0.0,
                "seed": generation.seed,
                "logprobs": False,
            },
        )
        replies = [r if isinstance(r, Exception) else r[0].text for r in results]
        for q, reply in zip(batch_q, replies):
            if isinstance(reply, Exception):
                out[q.question_id] = (q.text, f"rewrite discarded: generation failed ({reply})")
                continue
            text = reply.strip().strip('"').strip()
            problem = rewrite_problem(q.text, text, q.reference, config.rewrite_min_overlap)
            if problem is None and graders.normalize_text(text) == graders.normalize_text(q.text):
                problem = "the same question"
            out[q.question_id] = (
                (q.text, f"rewrite discarded: {problem}") if problem else (text, "rewrite accepted")
            )
    return out


def referenced_media(questions: tables.TableRef, question_ids: Sequence[str]) -> dict[str, list[str]]:
    """The image and video files the questions show (absolute paths), for ingestion."""
    media: dict[str, set[str]] = {"image": set(), "video": set()}
    for row in read_ref_rows(questions, "question_id", question_ids):
        for m in json.loads(row["media"]):
            media[m["type"]].add(m["path"])
    return {kind: sorted(p) for kind, p in media.items()}

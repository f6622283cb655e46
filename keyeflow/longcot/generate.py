"""LongCoT cold-start data (SPEC §4.3.1): collect questions, generate several reasoning paths per question,
grade them on two levels, send the doubtful ones to people, score what is kept, and publish an SFT table.

Every step is a plain function over Lance tables (no Prefect here; ``keyeflow/tasks/longcot.py`` wraps each
one) and every path, drop, verdict and decision stays in a table with its reason:

1. :func:`collect_questions` reads JSONL questions in the conversation format (``{"messages": [user turn,
   optional assistant turn], "reference"?, "domain", "source"?}``; the reference is the ``reference`` field,
   else the assistant turn's answer), checks the domain tag (:data:`DOMAINS`) and the media (paths relative
   to the file, inside the source root, as ``conversations`` does), and dedupes on the normalised question
   text plus the media's content hashes. Optional enhancement: ``rewrite`` asks a generator for a harder
   version of each new question and keeps it only if it passes :func:`rewrite_problem` (else the original is
   kept and the reason recorded); ``merge`` joins two questions on the same media into one two-part question
   whose reference is ``(answer 1, answer 2)`` (a template, so the reference stays right). Table
   ``longcot_questions``; bad lines and duplicates go to ``quarantine`` (stage ``longcot_collect``).
2. :func:`generate_paths` samples ``n`` paths per question from a :class:`~keyeflow.model.generation.Generator`
   (our model in process, or any OpenAI-compatible server), computes each path's step and response
   confidence from the token logprobs (``longcot_scoring.path_confidence``), its answer-level verdict
   (:func:`check_answer`: ``graders.answers_equivalent``, IoU ≥ 0.5 for grounding) and keeps diverse
   correct paths, most confident first (``longcot_scoring.select_paths``). Wrong answers are graded C
   there. Table ``longcot_paths``: every path, kept or dropped with its reason.
3. :func:`assess_paths`: the process level by a :class:`~keyeflow.quality.judges.Judge` and the grade
   (``longcot_scoring.grade``): A, or B / borderline A flagged for review.
4. :func:`apply_reviews` stores every review decision in ``longcot_reviews`` (who, what, the edit, when,
   and whether it was a person or a policy) and applies it: approve keeps the path, edit keeps the edited
   text if it is still in the think/answer format and still reaches the reference, reject drops it.
5. :func:`score_samples`: the 1–5 quality score by the judge and the training repeat count
   (``longcot_scoring.training_repeats``).
6. :func:`paths_gate_frame` / :func:`samples_gate_frame` feed the gates (``quality/gates.py``), and
   :func:`publish_longcot` writes ``longcot``: one row per kept sample, messages ready for SFT.

A path's ``status`` moves selected → review → kept, or to dropped at any step (``stage`` says where,
``reason`` why). Path ids are ``<question_id>/<generation config hash>/<k>``: a rerun with the same settings
finds its paths and generates nothing; a question whose generation failed is tried again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import mimetypes
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from keyeflow.config import config_hash as hash_config
from keyeflow.config import get_settings
from keyeflow.datasets import tables
from keyeflow.datasets.conversations import BadRecord, resolve_media
from keyeflow.quality import graders
from keyeflow.quality.judges import Judge, JudgeInput, ModelJudge, RuleJudge
from keyeflow.quality.longcot_scoring import (
    GRADES,
    LongCoTConfig,
    ReasoningPath,
    grade,
    path_confidence,
    select_paths,
    split_steps,
    training_repeats,
)

STAGE_COLLECT = "longcot_collect"
STAGE_GENERATE = "longcot_generate"
DOMAINS = ("math", "stem", "ocr", "grounding", "counting", "gui", "business")
BACKENDS = ("local", "openai")
JUDGES = ("rule", "model")
REVIEW_MODES = ("keep_out", "auto_approve", "prefect")
TIMEOUT_POLICIES = ("keep_out", "auto_approve")
ACTIONS = ("approve", "edit", "reject")
STATUSES = ("selected", "review", "kept", "dropped")
DEFAULT_SYSTEM_PROMPT = (
    "Think step by step inside <think></think>, one step per paragraph (separate steps with a blank line), "
    "then give only the final answer inside <answer></answer>."
)
DEFAULT_SCORING = LongCoTConfig()  # frozen: one shared default for the step functions' signatures
REWRITE_PROMPT = (
    "Rewrite the question below so that answering it needs more reasoning steps, without changing its "
    "answer. Keep every number and name it uses. Reply with the new question only.\n\nQuestion: {question}"
)

# ============================================================================================= configs


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
            raise ValueError(f"CollectConfig.rewrite_min_overlap must be in [0, 1], got {self.rewrite_min_overlap}")
        if self.rewrite_max_new_tokens < 1 or self.max_question_chars < 1:
            raise ValueError("CollectConfig: rewrite_max_new_tokens and max_question_chars must be >= 1")
        if self.default_domain is not None and self.default_domain not in DOMAINS:
            raise ValueError(f"CollectConfig.default_domain must be one of {DOMAINS}, got {self.default_domain!r}")


@dataclass(frozen=True)
class GenerationConfig:
    """Step 2: where paths come from and how they are sampled.

    ``backend="local"``: our model in this process (``model_path``; None = the tiny random checkpoint made
    under ``KEYEFLOW_HOME/models/tiny-random``), images and videos looked up pre-tokenised
    (``max_image_tokens``; videos with ``video_preset`` and a ``max_video_tokens`` budget).
    ``backend="openai"``: an OpenAI-compatible server (``base_url`` with ``/v1``, ``model``; key from the
    environment variable ``api_key_env``), images sent as data URLs and videos as ``file://`` URLs
    (vLLM: ``--allowed-local-media-path``).
    """

    backend: str = "local"
    model_path: str | None = None
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    n: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 8  # questions per generate call (and per commit)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    think_suffix: str = " /think"  # appended to the question: Keye's switch to thinking mode
    max_image_tokens: int = 256
    video_preset: str = "paper"
    max_video_tokens: int = 1024
    request_timeout_s: float = 600.0  # per attempt; a request that takes longer counts as a failed attempt
    # Further attempts for a transient failure (timeout, refused connection, 408/429/5xx), 0.5 s · 2^k apart;
    # malformed output and other errors are not retried. A question still failing is quarantined.
    max_retries: int = 4

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"GenerationConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "openai" and not (self.base_url and self.model):
            raise ValueError("GenerationConfig: the openai backend needs base_url and model")
        for name in ("n", "max_new_tokens", "batch_size", "max_image_tokens", "max_video_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GenerationConfig.{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"GenerationConfig.temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.request_timeout_s, (int, float)) and self.request_timeout_s > 0):
            raise ValueError(f"GenerationConfig.request_timeout_s must be a number > 0, got {self.request_timeout_s!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"GenerationConfig.max_retries must be an integer >= 0, got {self.max_retries!r}")

    def resolved_model_path(self) -> str | None:
        if self.backend != "local":
            return None
        return str(Path(self.model_path).resolve()) if self.model_path else str(default_model_path())

    def config_hash(self) -> str:
        """What changes the completions (not batching, timeouts or the key's variable)."""
        payload = asdict(self)
        for name in ("api_key_env", "batch_size", "request_timeout_s", "max_retries", "model_path"):
            payload.pop(name)
        payload["model_path"] = self.resolved_model_path()
        return hash_config(payload)


@dataclass(frozen=True)
class JudgeConfig:
    """Steps 3 and 5: which judge grades processes and scores samples."""

    kind: str = "rule"  # "rule" or "model"
    generation: GenerationConfig | None = None  # the judge model; None: the path generator's settings
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.kind not in JUDGES:
            raise ValueError(f"JudgeConfig.kind must be one of {JUDGES}, got {self.kind!r}")
        if isinstance(self.generation, dict):
            object.__setattr__(self, "generation", GenerationConfig(**self.generation))


@dataclass(frozen=True)
class ReviewConfig:
    """Step 4: who decides on every B and borderline A.

    ``mode``: ``keep_out`` (unattended: nothing that needs a person goes in), ``auto_approve`` (unattended:
    everything goes in as graded), ``prefect`` (the flow pauses for a person's decision on each item; see
    ``keyeflow/flows/longcot.py``). ``on_timeout``: what an item gets when no decision comes back within
    ``timeout_s`` seconds; once that happens, nobody is assumed to be watching and the rest of the queue
    gets the same policy without waiting.
    """

    mode: str = "keep_out"
    timeout_s: int = 3600
    on_timeout: str = "keep_out"
    poll_interval_s: int = 10

    def __post_init__(self) -> None:
        if self.mode not in REVIEW_MODES:
            raise ValueError(f"ReviewConfig.mode must be one of {REVIEW_MODES}, got {self.mode!r}")
        if self.on_timeout not in TIMEOUT_POLICIES:
            raise ValueError(f"ReviewConfig.on_timeout must be one of {TIMEOUT_POLICIES}, got {self.on_timeout!r}")
        if self.timeout_s < 1 or self.poll_interval_s < 1:
            raise ValueError("ReviewConfig: timeout_s and poll_interval_s must be >= 1 second")


@dataclass(frozen=True)
class GateConfig:
    """Step 6: what the output must satisfy. ``grade_share_bounds``: per grade, the [min, max] share of
    the kept samples it may have (UNSTATED in Keye; the defaults ask that most kept samples were sound
    without a person's edit)."""

    min_samples: int = 1  # 0 lets an empty output through (a random tiny model solves nothing)
    grade_share_bounds: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"A": (0.2, 1.0), "B": (0.0, 0.8)})

    def __post_init__(self) -> None:
        if self.min_samples < 0:
            raise ValueError(f"GateConfig.min_samples must be >= 0, got {self.min_samples}")
        bounds = {}
        for key, value in dict(self.grade_share_bounds).items():
            if key not in ("A", "B"):
                raise ValueError(f"GateConfig.grade_share_bounds: kept samples are A or B, got {key!r}")
            lo, hi = (float(v) for v in value)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"GateConfig.grade_share_bounds[{key!r}] must be 0 <= min <= max <= 1, got {value}")
            bounds[key] = (lo, hi)
        object.__setattr__(self, "grade_share_bounds", bounds)


# ===================================================================================== tiny model default


def default_model_path() -> Path:
    return get_settings().root / "models" / "tiny-random"


def ensure_tiny_model(path: str | Path | None = None) -> Path:
    """The project's tiny randomly initialised checkpoint (seed 0), saved once to ``path`` (default
    ``KEYEFLOW_HOME/models/tiny-random``) with the shipped tokenizer; an existing one is reused."""
    import torch

    from keyeflow.model.config import tiny
    from keyeflow.model.modeling import KeyeForConditionalGeneration
    from keyeflow.model.tokenizer import load_tokenizer

    path = Path(path) if path else default_model_path()
    if (path / "config.json").is_file():
        return path
    tokenizer = load_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = KeyeForConditionalGeneration(tiny(tokenizer))
    staged = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        staged.rename(path)
    except OSError:  # another process saved it first: theirs is the same model
        shutil.rmtree(staged, ignore_errors=True)
    return path


# ============================================================================================ helpers


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _read(name: str, version: int | None, column: str, keys: Sequence[str], root: str | None) -> list[dict]:
    """Rows of a table (at a version) whose ``column`` is one of ``keys``."""
    if not keys or not tables.exists(name, root):
        return []
    ds = tables.open_table(name, version=version, root=root)
    return ds.to_table(filter=pc.field(column).isin(list(keys))).to_pylist()


def _read_ref(ref: tables.TableRef, column: str, keys: Sequence[str]) -> list[dict]:
    if not keys:
        return []
    ds = tables.dataset(ref.uri, version=ref.version)
    return ds.to_table(filter=pc.field(column).isin(list(keys))).to_pylist()


def _sql_list(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# ========================================================================================= 1. collect


@dataclass
class Question:
    question_id: str
    source: str
    source_uri: str
    domain: str
    text: str
    reference: str
    media: list[dict]  # {"type": "image"|"video", "path": absolute path, "hash": sha256 of the bytes}


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
    payload = _json({"q": graders.normalize_text(text), "media": sorted(map(list, media_hashes))})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _parse_question(row, uri: str, file: Path, source_root: Path, config: CollectConfig,
                    digest: Callable[[Path], str]) -> Question:
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
        reference = graders.extract_answer(answer_text) if re.search(r"<answer>|answer", answer_text, re.IGNORECASE) \
            else answer_text.strip()
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
    qid = question_id(text, [(m["type"], m["hash"]) for m in media])
    return Question(qid, str(row.get("source") or file.stem), uri, domain, text, reference, media)


def read_questions(path: Path, source_root: Path, config: CollectConfig, bad: list[tuple[str, str]],
                   digest: Callable[[Path], str]) -> tuple[int, list[Question]]:
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
            out.append(_parse_question(json.loads(line.decode("utf-8")), uri, path, source_root, config, digest))
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
    from keyeflow.quality.judges import content_terms

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
            return f"keeps only {100 * kept:.0f}% of the original's content words (< {100 * min_overlap:.0f}%)"
    def states(question: str) -> bool:
        norm_ref = graders.normalize_text(reference)
        return bool(norm_ref) and re.search(rf"(?<!\w){re.escape(norm_ref)}(?!\w)",
                                            graders.normalize_text(question)) is not None
    if states(text) and not states(original):
        return "gives the answer away"
    return None


def _merge_pairs(questions: Sequence[Question]) -> list[tuple[Question, Question]]:
    """Pairs of questions on the same media (consecutive in file order), references without commas or
    brackets (they become one ``(a, b)`` answer), grounding excluded."""
    groups: dict[str, list[Question]] = {}
    for q in questions:
        if q.media and q.domain != "grounding" and not re.search(r"[,()\[\]{}]", q.reference):
            key = _json(sorted((m["type"], m["hash"]) for m in q.media))
            groups.setdefault(key, []).append(q)
    pairs = []
    for group in groups.values():
        pairs += [(group[i], group[i + 1]) for i in range(0, len(group) - 1, 2)]
    return pairs


def _merged(a: Question, b: Question) -> Question:
    kind = " and ".join(sorted({m["type"] for m in a.media}))
    text = (f"Answer both questions about the same {kind}.\n(1) {a.text}\n(2) {b.text}\n"
            "Give the final answer as (answer 1, answer 2).")
    qid = hashlib.sha256(f"merge:{a.question_id}:{b.question_id}".encode()).hexdigest()[:20]
    return Question(qid, a.source, f"merge:{a.source_uri}+{b.source_uri}", a.domain, text,
                    f"({a.reference}, {b.reference})", a.media)


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
    from keyeflow.datasets.video import content_hash

    if config.rewrite and generator is None:
        raise ValueError("CollectConfig.rewrite needs a generator")
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
    report = CollectReport()
    bad: list[tuple[str, str]] = []
    first: dict[str, Question] = {}
    for file in dict.fromkeys(files):
        num_lines, questions = read_questions(file, root_dir, config, bad, digest)
        report.num_lines += num_lines
        for q in questions:
            if q.question_id in first:
                kept = first[q.question_id]
                differs = "" if graders.answers_equivalent(q.reference, kept.reference) else \
                    f"; its reference {q.reference!r} differs from {kept.reference!r}"
                bad.append((q.source_uri, f"duplicate of question {q.question_id} ({kept.source_uri}){differs}"))
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
    chash = hash_config({"collect": asdict(config), "generation": generation.config_hash() if
                         (config.rewrite and generation) else None})
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
            "question": text, "original_question": q.text, "reference": q.reference, "media": _json(q.media),
            "num_media": len(q.media), "rewrite": kind, "rewrite_note": note, "config_hash": chash,
            "created_at": tables.now(),
        })  # fmt: skip
    tables.upsert("quarantine", [tables.quarantine_row(u, why, STAGE_COLLECT, config_hash=chash) for u, why in bad],
                  root)
    tables.upsert("longcot_questions", rows, root)
    report.num_new = len(rows)
    report.num_already_present = len(batch) - len(new)
    report.quarantined = dict(bad)
    report.num_quarantined = len(report.quarantined)
    report.question_ids = [q.question_id for q in batch]
    return report


def _rewrite(questions: Sequence[Question], config: CollectConfig, generator,
             generation: GenerationConfig) -> dict[str, tuple[str, str]]:
    prompts = [[{"role": "user", "content": REWRITE_PROMPT.format(question=q.text)}] for q in questions]
    out: dict[str, tuple[str, str]] = {}
    for batch_q, batch_p in zip(_chunks(questions, generation.batch_size), _chunks(prompts, generation.batch_size)):
        results = _generate_each(generator, list(batch_p), {
            "n": 1, "max_new_tokens": config.rewrite_max_new_tokens, "temperature": 0.0, "seed": generation.seed,
            "logprobs": False})
        replies = [r if isinstance(r, Exception) else r[0].text for r in results]
        for q, reply in zip(batch_q, replies):
            if isinstance(reply, Exception):
                out[q.question_id] = (q.text, f"rewrite discarded: generation failed ({reply})")
                continue
            text = reply.strip().strip('"').strip()
            problem = rewrite_problem(q.text, text, q.reference, config.rewrite_min_overlap)
            if problem is None and graders.normalize_text(text) == graders.normalize_text(q.text):
                problem = "the same question"
            out[q.question_id] = (q.text, f"rewrite discarded: {problem}") if problem else \
                (text, "rewrite accepted")
    return out


def referenced_media(questions: tables.TableRef, question_ids: Sequence[str]) -> dict[str, list[str]]:
    """The image and video files the questions show (absolute paths), for ingestion."""
    media: dict[str, set[str]] = {"image": set(), "video": set()}
    for row in _read_ref(questions, "question_id", question_ids):
        for m in json.loads(row["media"]):
            media[m["type"]].add(m["path"])
    return {kind: sorted(p) for kind, p in media.items()}


# ============================================================================= 2. prompts, media, generators


def user_content(question: dict, suffix: str) -> str | list[dict]:
    """The user turn as the conversation format has it: media parts (absolute paths) then the text."""
    media = json.loads(question["media"]) if isinstance(question["media"], str) else question["media"]
    text = question["question"] + suffix
    if not media:
        return text
    return [{"type": m["type"], m["type"]: m["path"]} for m in media] + [{"type": "text", "text": text}]


def _server_part(part: dict) -> dict:
    """An internal media part as an OpenAI-compatible server takes it."""
    path = Path(part[part["type"]])
    if part["type"] == "image":
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        url = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}
    return {"type": "video_url", "video_url": {"url": path.resolve().as_uri()}}


def generation_messages(question: dict, config: GenerationConfig) -> list[dict]:
    content = user_content(question, config.think_suffix)
    if config.backend == "openai" and isinstance(content, list):
        content = [p if p["type"] == "text" else _server_part(p) for p in content]
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    return [*system, {"role": "user", "content": content}]


class StoredMediaLookup:
    """Resolves an image/video part (an absolute path) to its pre-tokenised patches: content hash →
    ``image_samples``/``video_samples`` row for the given configs (what the flow ingests first)."""

    def __init__(self, image_config, slowfast, root: str | None = None):
        self.image_config, self.slowfast, self.root = image_config, slowfast, root
        self._hashes: dict[str, str] = {}

    def __call__(self, part):
        from keyeflow.datasets import images, pretokenize
        from keyeflow.datasets.video import content_hash
        from keyeflow.datasets.sample_reader import read_media

        kind = part["type"]
        path = str(part[kind])
        if path not in self._hashes:
            self._hashes[path] = content_hash(path)[0]
        digest = self._hashes[path]
        sample = images.sample_id(digest, self.image_config) if kind == "image" else \
            pretokenize.sample_id(digest, self.slowfast)
        try:
            return read_media({sample}, self.root)[sample]
        except KeyError as error:
            raise ValueError(f"{kind} {Path(path).name} has no pre-tokenised sample {sample} for this "
                             f"config ({error}); ingest it first") from None


def media_configs(config: GenerationConfig):
    """The image and Slow-Fast configs the local backend reads media with."""
    from keyeflow.datasets.images import ImageConfig
    from keyeflow.datasets.slowfast import resolve_config

    return (ImageConfig(max_tokens=config.max_image_tokens),
            resolve_config(config.video_preset, total_token_budget=config.max_video_tokens))


def make_generator(config: GenerationConfig, root: str | None = None):
    """The :class:`~keyeflow.model.generation.Generator` a generation config names."""
    from keyeflow.model.generation import LocalGenerator, OpenAICompatibleGenerator

    if config.backend == "openai":
        return OpenAICompatibleGenerator(config.base_url, config.model, api_key_env=config.api_key_env,
                                         timeout=config.request_timeout_s, max_retries=config.max_retries)
    path = config.model_path or ensure_tiny_model()
    return LocalGenerator(path, media_lookup=StoredMediaLookup(*media_configs(config), root=root))


def make_judge(config: JudgeConfig, generation: GenerationConfig, root: str | None = None) -> Judge:
    if config.kind == "rule":
        return RuleJudge()
    judge_generation = config.generation or generation
    return ModelJudge(make_generator(judge_generation, root), max_new_tokens=config.max_new_tokens,
                      seed=judge_generation.seed)


# ===================================================================================== answers and text


@dataclass(frozen=True)
class AnswerCheck:
    ok: bool
    answer: str
    method: str
    reason: str


def check_answer(domain: str, response: str, reference: str, iou_threshold: float = 0.5) -> AnswerCheck:
    """Answer-level verdict of a response: its final answer (graders.extract_answer) against the reference;
    grounding answers by box IoU ≥ ``iou_threshold`` when both sides hold a box."""
    answer = graders.extract_answer(response)
    if domain == "grounding":
        try:
            iou = graders.grounding_iou(answer, reference)
        except (ValueError, TypeError):
            pass
        else:
            ok = iou >= iou_threshold
            return AnswerCheck(ok, answer, "iou", f"IoU {iou:.2f} {'≥' if ok else '<'} {iou_threshold}")
    verdict = graders.answers_equivalent(answer, reference)
    return AnswerCheck(verdict.equal, answer, verdict.method, verdict.reason)


_TAGS = re.compile(r"</?think>")
_ANSWER_BLOCK = re.compile(r"<answer>.*?(?:</answer>|$)", re.DOTALL)


def reasoning_text(response: str) -> str:
    """The reasoning of a response: the ``<think>`` block, else the text without its answer block."""
    if "</think>" in response:
        return response.split("</think>", 1)[0].replace("<think>", "").strip()
    return _TAGS.sub("", _ANSWER_BLOCK.sub("", response)).strip()


def reasoning_steps(response: str) -> list[str]:
    text = reasoning_text(response)
    return [text[a:b] for a, b in split_steps(text)]


def as_think_answer(response: str) -> str:
    """The response in ``<think>…</think><answer>…</answer>`` form (unchanged when it already is)."""
    if graders.format_problem(response, "think") is None:
        return response.strip()
    return f"<think>\n{reasoning_text(response)}\n</think>\n<answer>{graders.extract_answer(response)}</answer>"


def judge_input(question: dict, response: str) -> JudgeInput:
    media = json.loads(question["media"])
    return JudgeInput(question["question"], question["reference"], tuple(reasoning_steps(response)),
                      graders.extract_answer(response), tuple(m["type"] for m in media))


# ======================================================================================= 2. generate


@dataclass
class GenerateReport:
    num_questions: int = 0
    num_generated: int = 0  # questions sampled now
    num_already_done: int = 0
    num_failed: int = 0
    num_paths: int = 0
    num_correct: int = 0
    num_selected: int = 0
    quarantined: dict[str, str] = field(default_factory=dict)


def _confidence(completion, config: LongCoTConfig) -> tuple[float, list[float], str]:
    if not completion.token_logprobs:
        return 0.0, [], "no token logprobs: confidence 0"
    offsets = [(start, start + len(token)) for start, token in zip(completion.token_offsets, completion.tokens)]
    try:
        conf = path_confidence(completion.text, completion.token_logprobs, offsets, config)
    except ValueError as error:
        return 0.0, [], f"confidence 0: {error}"
    return float(conf.response), [float(c) for c in conf.step_confidences], ""


def path_rows(question: dict, completions: Sequence, gen_hash: str, config: LongCoTConfig) -> list[dict]:
    """One ``longcot_paths`` row per completion: answer verdict, confidences, selection."""
    qid = question["question_id"]
    built = []
    for k, completion in enumerate(completions):
        check = check_answer(question["domain"], completion.text, question["reference"])
        confidence, steps, note = _confidence(completion, config)
        path = ReasoningPath(qid, completion.text, check.ok, confidence)
        built.append((path, completion, check, steps, note))
    selection = select_paths([b[0] for b in built], config)
    dropped = {id(p): why for p, why in selection.dropped}
    now = tables.now()
    rows = []
    for k, (path, completion, check, steps, note) in enumerate(built):
        row = empty_path_row()
        row.update({
            "path_id": f"{qid}/{gen_hash}/{k}", "question_id": qid, "domain": question["domain"],
            "gen_config_hash": gen_hash, "path_index": k, "text": completion.text,
            "finish_reason": completion.finish_reason, "num_tokens": len(completion.tokens),
            "answer": check.answer, "answer_ok": check.ok, "answer_method": check.method,
            "answer_reason": check.reason, "format_problem": graders.format_problem(completion.text, "think") or "",
            "confidence": path.confidence, "step_confidences": steps, "num_steps": len(steps),
            "confidence_note": note, "selected": id(path) not in dropped, "created_at": now, "updated_at": now,
        })  # fmt: skip
        if not check.ok:
            row.update(grade="C", needs_review=False, grade_reasons="answer wrong", status="dropped",
                       stage="generate", reason=f"C: answer wrong ({check.reason})")
        elif id(path) in dropped:
            row.update(status="dropped", stage="select", reason=dropped[id(path)])
        else:
            row.update(status="selected", stage="select", reason="selected: correct, diverse, most confident first")
        rows.append(row)
    return rows


def empty_path_row() -> dict:
    return {name: None for name in tables.SCHEMAS["longcot_paths"].names}


def generate_paths(
    questions: tables.TableRef,
    question_ids: Sequence[str],
    generator,
    config: GenerationConfig,
    scoring: LongCoTConfig = DEFAULT_SCORING,
    root: str | None = None,
    on_item: Callable[[], None] | None = None,
) -> GenerateReport:
    """Sample ``config.n`` paths for every question not yet done with this config; one commit per batch.

    Failures are per question: a question whose generation fails (the server timed out or was unreachable
    after the generator's retries, answered malformed output or an error, a prompt too long, media not
    pre-tokenised or gone) is quarantined (stage ``longcot_generate``, the reason naming the question id and
    the problem) and the rest of its batch is kept. It has no paths, so the next run tries it again; when it
    succeeds, its quarantine row is removed (the table's earlier versions keep it), so the quarantine
    table says what is failing now. Questions done before are not generated again.
    """
    gen_hash = config.config_hash()
    rows = {r["question_id"]: r for r in _read_ref(questions, "question_id", question_ids)}
    ordered = [rows[q] for q in dict.fromkeys(question_ids) if q in rows]
    done = set()
    if tables.exists("longcot_paths", root):
        ds = tables.open_table("longcot_paths", root=root)
        found = ds.to_table(columns=["question_id"], filter=pc.field("question_id").isin([q["question_id"] for q in ordered])
                            & (pc.field("gen_config_hash") == gen_hash))
        done = set(found.column("question_id").to_pylist())
    report = GenerateReport(num_questions=len(ordered), num_already_done=len(done & set(rows)))
    # A run that stopped between writing a question's paths and clearing its quarantine row repairs it here.
    _clear_generate_quarantine(sorted(done & set(rows)), gen_hash, root)
    pending = [q for q in ordered if q["question_id"] not in done]
    for _ in range(len(ordered) - len(pending)):
        if on_item:
            on_item()
    args = {"n": config.n, "max_new_tokens": config.max_new_tokens, "temperature": config.temperature,
            "seed": config.seed, "logprobs": True}
    for batch in _chunks(pending, config.batch_size):
        results: list = [None] * len(batch)
        asked, messages = [], []
        for k, q in enumerate(batch):
            try:
                messages.append(generation_messages(q, config))
                asked.append(k)
            except OSError as error:  # an image sent to a server was moved or deleted since collection
                results[k] = error
        for k, result in zip(asked, _generate_each(generator, messages, args)):
            results[k] = result
        new_rows, bad, generated = [], [], []
        for q, result in zip(batch, results):
            if isinstance(result, Exception):
                reason = f"question {q['question_id']}: generation failed: {type(result).__name__}: {result}"
                bad.append(tables.quarantine_row(q["source_uri"], reason, STAGE_GENERATE, q["question_id"], gen_hash))
                report.quarantined[q["source_uri"]] = reason
                report.num_failed += 1
                continue
            new_rows += path_rows(q, result, gen_hash, scoring)
            generated.append(q["question_id"])
            report.num_generated += 1
        # update_rows, not upsert: a question that fails again keeps one row, with the latest reason.
        tables.update_rows("quarantine", bad, root)
        tables.upsert("longcot_paths", new_rows, root)
        _clear_generate_quarantine(generated, gen_hash, root)
        report.num_paths += len(new_rows)
        report.num_correct += sum(r["answer_ok"] for r in new_rows)
        report.num_selected += sum(r["status"] == "selected" for r in new_rows)
        for _ in batch:
            if on_item:
                on_item()
    return report


_GENERATION_ERRORS = (RuntimeError, ValueError, OSError, KeyError)


def _generate_each(generator, messages: list[list[dict]], args: dict) -> list:
    """Per conversation, its completions or the error it failed with.

    Our generators report a partial failure with ``BatchGenerationError`` and the good results are kept
    as they are; a generator that fails a whole batch at once is asked again one conversation at a time,
    so that one bad question does not sink the others.
    """
    from keyeflow.model.generation import BatchGenerationError

    if not messages:
        return []
    try:
        return generator.generate(messages, **args)
    except BatchGenerationError as error:
        return error.results
    except _GENERATION_ERRORS as error:
        if len(messages) == 1:
            return [error]
    out: list = []
    for m in messages:
        try:
            out.append(generator.generate([m], **args)[0])
        except _GENERATION_ERRORS as single:
            out.append(single)
    return out


def _clear_generate_quarantine(question_ids: Sequence[str], gen_hash: str, root: str | None) -> None:
    """Remove the generation failures of questions that now have paths with these settings."""
    if not question_ids or not tables.exists("quarantine", root):
        return
    where = (f"stage = '{STAGE_GENERATE}' AND config_hash = '{gen_hash}' "
             f"AND content_hash IN ({_sql_list(question_ids)})")
    ds = tables.open_table("quarantine", root=root)
    if ds.count_rows(filter=where):  # a delete commits a new version even when it removes nothing
        ds.delete(where)


# ======================================================================================== 3. assess


@dataclass
class AssessReport:
    num_assessed: int = 0
    grades: dict[str, int] = field(default_factory=dict)
    num_needs_review: int = 0
    judges: dict[str, int] = field(default_factory=dict)


def _batch_rows(paths: tables.TableRef, question_ids: Sequence[str]) -> list[dict]:
    return sorted(_read_ref(paths, "question_id", question_ids), key=lambda r: r["path_id"])


def _questions(questions: tables.TableRef, ids: Iterable[str]) -> dict[str, dict]:
    return {r["question_id"]: r for r in _read_ref(questions, "question_id", sorted(set(ids)))}


def assess_paths(
    paths: tables.TableRef,
    questions: tables.TableRef,
    question_ids: Sequence[str],
    judge: Judge,
    scoring: LongCoTConfig = DEFAULT_SCORING,
    batch_size: int = 16,
    root: str | None = None,
) -> AssessReport:
    """Process-level assessment and grade of every selected path of the batch (module docstring)."""
    todo = [r for r in _batch_rows(paths, question_ids) if r["status"] == "selected"]
    qs = _questions(questions, (r["question_id"] for r in todo))
    report = AssessReport()
    for batch in _chunks(todo, batch_size):
        verdicts = judge.assess([judge_input(qs[r["question_id"]], r["text"]) for r in batch])
        updated = []
        for row, verdict in zip(batch, verdicts):
            scores = verdict.process_scores()
            result = grade(True, scores, verdict.redundancy, scoring)
            row = dict(row)
            row.update(scores)
            row.update({
                "judge": verdict.judge, "judge_notes": "; ".join(verdict.all_notes()),
                "redundancy": verdict.redundancy, "step_scores": _json([s.to_dict() for s in verdict.steps]),
                "grade": result.grade, "needs_review": result.needs_review,
                "grade_reasons": "; ".join(result.reasons), "stage": "assess", "updated_at": tables.now(),
            })  # fmt: skip
            if result.needs_review:
                row.update(status="review", reason=f"{result.grade} needs review: {'; '.join(result.reasons)}")
            else:
                row.update(status="kept", reason="A: answer right, process sound",
                           response=as_think_answer(row["text"]))
            updated.append(row)
            report.grades[result.grade] = report.grades.get(result.grade, 0) + 1
            report.num_needs_review += result.needs_review
            report.judges[verdict.judge] = report.judges.get(verdict.judge, 0) + 1
        tables.update_rows("longcot_paths", updated, root)
        report.num_assessed += len(updated)
    return report


# ======================================================================================== 4. review


@dataclass(frozen=True)
class Decision:
    """One review decision on one path (``item_id`` is the path id)."""

    item_id: str
    action: str  # approve | edit | reject
    reviewer: str
    edited_text: str = ""
    note: str = ""
    source: str = "person"  # "person" (a reviewer in Prefect) or "policy" (a mode or a timeout)
    mode: str = "prefect"
    decided_at: datetime | None = None
    flow_run_id: str = ""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"review action must be one of {ACTIONS}, got {self.action!r}")
        if self.action == "edit" and not self.edited_text.strip():
            raise ValueError("an edit needs the edited text")
        if self.source not in ("person", "policy"):
            raise ValueError(f"decision source must be 'person' or 'policy', got {self.source!r}")

    @property
    def review_id(self) -> str:
        if self.source == "policy":  # the same policy on a rerun is the same decision
            return f"{self.item_id}@policy:{self.reviewer}:{self.action}"
        stamp = self.decided_at.isoformat() if self.decided_at else ""
        return f"{self.item_id}@{stamp}"


def policy_decision(path_id: str, policy: str, mode: str, note: str) -> Decision:
    """What an unattended policy decides: ``auto_approve`` approves, ``keep_out`` rejects."""
    if policy not in TIMEOUT_POLICIES:
        raise ValueError(f"policy must be one of {TIMEOUT_POLICIES}, got {policy!r}")
    action = "approve" if policy == "auto_approve" else "reject"
    return Decision(path_id, action, f"policy:{policy}", note=note, source="policy", mode=mode,
                    decided_at=tables.now())


def _decision(r: dict) -> Decision:
    return Decision(r["path_id"], r["action"], r["reviewer"], r["edited_text"] or "", r["note"] or "", r["source"],
                    r["mode"], r["decided_at"], r["flow_run_id"] or "")


def person_decisions(path_ids: Sequence[str], root: str | None = None) -> dict[str, Decision]:
    """The latest decision a person made on each of these paths (what a rerun reuses)."""
    rows = [r for r in _read("longcot_reviews", None, "path_id", path_ids, root) if r["source"] == "person"]
    return {r["path_id"]: _decision(r) for r in sorted(rows, key=lambda r: r["decided_at"])}


def _review_row(d: Decision, path: dict, outcome: str, outcome_reason: str) -> dict:
    return {
        "review_id": d.review_id, "path_id": d.item_id, "question_id": path["question_id"], "grade": path["grade"],
        "review_reason": path["grade_reasons"] or "", "action": d.action, "edited_text": d.edited_text,
        "reviewer": d.reviewer or "anonymous", "note": d.note, "source": d.source, "mode": d.mode, "outcome": outcome,
        "outcome_reason": outcome_reason, "flow_run_id": d.flow_run_id, "decided_at": d.decided_at or tables.now(),
    }  # fmt: skip


def record_decision(paths: tables.TableRef, decision: Decision, root: str | None = None) -> None:
    """Store a decision the moment it is made (outcome ``pending``), so a crash before it is applied does
    not ask the person again: :func:`review_plan` hands it back to be applied."""
    path = _read_ref(paths, "path_id", [decision.item_id])[0]
    tables.upsert("longcot_reviews", [_review_row(decision, path, "pending", "")], root)


@dataclass
class ReviewPlan:
    ask: list[str]  # path ids that need a decision now
    pending: list[Decision]  # decisions people made that were not applied yet (a crash in between)


def review_plan(paths: tables.TableRef, question_ids: Sequence[str], root: str | None = None) -> ReviewPlan:
    """What step 4 has to do for the batch: ask about every path graded for review that no person has
    decided on (items a policy handled on an earlier run are asked again: a person may be there now), and
    apply the people's decisions still pending."""
    candidates = [r["path_id"] for r in _batch_rows(paths, question_ids)
                  if r["needs_review"] and r["grade"] in ("A", "B") and r["stage"] in ("assess", "review", "score")]
    rows = [r for r in _read("longcot_reviews", None, "path_id", candidates, root) if r["source"] == "person"]
    decided = {r["path_id"] for r in rows}
    pending = [_decision(r) for r in sorted(rows, key=lambda r: r["decided_at"]) if r["outcome"] == "pending"]
    return ReviewPlan([p for p in candidates if p not in decided], pending)


def review_queue(paths: tables.TableRef, question_ids: Sequence[str], root: str | None = None) -> list[str]:
    """Path ids that need a decision now (:func:`review_plan`)."""
    return review_plan(paths, question_ids, root).ask


def review_item(paths: tables.TableRef, questions: tables.TableRef, path_id: str) -> dict:
    """What a reviewer needs to see of one path."""
    row = _read_ref(paths, "path_id", [path_id])[0]
    question = _questions(questions, [row["question_id"]])[row["question_id"]]
    return {"path": row, "question": question}


def review_markdown(item: dict) -> str:
    """The item as a reviewer reads it in the Prefect UI (artifact and resume form)."""
    row, q = item["path"], item["question"]
    media = ", ".join(f"{m['type']} `{Path(m['path']).name}`" for m in json.loads(q["media"])) or "none"
    steps = json.loads(row["step_scores"] or "[]")
    table = ["| step | logic | facts | relevance | redundant | notes |", "|---|---|---|---|---|---|"]
    for k, s in enumerate(steps, start=1):
        table.append(f"| {k} | {s['logical_consistency']:.2f} | {s['factual_accuracy']:.2f} | {s['relevance']:.2f} "
                     f"| {'yes' if s['redundant'] else ''} | {'; '.join(s['notes'])} |")
    return "\n".join([
        f"## LongCoT review: `{row['path_id']}`",
        f"**Grade {row['grade']}** — {row['grade_reasons']}  ",
        (f"Domain: {q['domain']} · media: {media} · confidence {row['confidence']:.3f} · "
         f"redundancy {row['redundancy']:.2f} · judge: {row['judge']}"),
        "", f"**Question:** {q['question']}", "",
        f"**Reference:** `{q['reference']}` · **answer given:** `{row['answer']}`",
        "", "**Response:**", "", "```", row["text"], "```", "", *table, "",
        ("Decide: `approve` keeps the response as it is, `edit` keeps your `edited_text` (a full "
         "`<think>…</think><answer>…</answer>` response, or just the reasoning to keep the answer), `reject` "
         "drops it. Set `reviewer` to your name; `note` is kept with the decision."),
    ])  # fmt: skip


def edited_response(edited: str, original: str) -> str:
    """An edit as a full response: tagged text is taken as it is; plain text is the new reasoning and the
    original's final answer is kept."""
    text = edited.strip()
    if re.search(r"</?(?:think|answer)>", text):
        return text
    return f"<think>\n{text}\n</think>\n<answer>{graders.extract_answer(original)}</answer>"


@dataclass
class ReviewReport:
    num_decisions: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    num_kept: int = 0
    num_dropped: int = 0


def apply_reviews(
    paths: tables.TableRef,
    questions: tables.TableRef,
    decisions: Sequence[Decision],
    root: str | None = None,
) -> ReviewReport:
    """Store every decision in ``longcot_reviews`` and apply it to its path (module docstring)."""
    by_id = {r["path_id"]: r for r in _read_ref(paths, "path_id", [d.item_id for d in decisions])}
    qs = _questions(questions, (r["question_id"] for r in by_id.values()))
    report = ReviewReport()
    reviews, updated = [], []
    for d in decisions:
        row = by_id.get(d.item_id)
        if row is None:
            raise ValueError(f"review decision for unknown path {d.item_id!r}")
        q = qs[row["question_id"]]
        who = d.reviewer or "anonymous"
        row = dict(row, reviewer=who, review_action=d.action, stage="review", updated_at=tables.now(),
                   score=None, score_reason=None, repeats=None)
        label = f"{row['grade']} ({row['grade_reasons'] or ''})"
        if d.action == "reject":
            outcome = f"{label} rejected by {who}" + (f": {d.note}" if d.note else "")
            row.update(status="dropped", reason=outcome, response=None)
        else:
            response = as_think_answer(row["text"]) if d.action == "approve" else edited_response(d.edited_text, row["text"])
            problem = graders.format_problem(response, "think")
            check = check_answer(q["domain"], response, q["reference"])
            verb = "approved" if d.action == "approve" else "edited"
            if problem:
                outcome = f"{label} {verb} by {who} but unusable: {problem}"
                row.update(status="dropped", reason=outcome, response=None)
            elif not check.ok:
                outcome = f"{label} {verb} by {who} but the answer no longer matches the reference ({check.reason})"
                row.update(status="dropped", reason=outcome, response=None)
            else:
                outcome = f"{label} {verb} by {who}" + (f": {d.note}" if d.note else "")
                row.update(status="kept", reason=outcome, response=response)
        updated.append(row)
        reviews.append(_review_row(d, row, row["status"], outcome))
        report.actions[d.action] = report.actions.get(d.action, 0) + 1
        report.sources[d.source] = report.sources.get(d.source, 0) + 1
        report.num_kept += row["status"] == "kept"
        report.num_dropped += row["status"] == "dropped"
    # A decision stored when it was made (or by an earlier run) keeps its time; its outcome is filled in.
    first = {r["review_id"]: r["decided_at"] for r in _read("longcot_reviews", None, "review_id",
                                                             [r["review_id"] for r in reviews], root)}
    for r in reviews:
        r["decided_at"] = first.get(r["review_id"], r["decided_at"])
    tables.update_rows("longcot_reviews", reviews, root)
    tables.update_rows("longcot_paths", updated, root)
    report.num_decisions = len(decisions)
    return report


# ========================================================================================= 5. score


@dataclass
class ScoreReport:
    num_scored: int = 0
    scores: dict[int, int] = field(default_factory=dict)
    total_repeats: int = 0
    num_unused: int = 0  # kept, but the keep draw for a low score gave 0 repeats


def score_samples(
    paths: tables.TableRef,
    questions: tables.TableRef,
    question_ids: Sequence[str],
    judge: Judge,
    scoring: LongCoTConfig = DEFAULT_SCORING,
    batch_size: int = 16,
    root: str | None = None,
) -> ScoreReport:
    """The 1–5 quality score and training repeats of every kept, not yet scored path of the batch."""
    todo = [r for r in _batch_rows(paths, question_ids) if r["status"] == "kept" and r["score"] is None]
    qs = _questions(questions, (r["question_id"] for r in todo))
    report = ScoreReport()
    for batch in _chunks(todo, batch_size):
        scores = judge.score([judge_input(qs[r["question_id"]], r["response"]) for r in batch])
        updated = []
        for row, quality in zip(batch, scores):
            repeats = training_repeats(row["path_id"], quality.score, scoring)
            reason = row["reason"]
            if repeats == 0:
                reason += f"; score {quality.score}: left out of this epoch by the keep draw"
            updated.append(dict(row, score=quality.score, score_reason=f"{quality.judge}: {quality.reason}",
                                repeats=repeats, stage="score", reason=reason, updated_at=tables.now()))
            report.scores[quality.score] = report.scores.get(quality.score, 0) + 1
            report.total_repeats += repeats
            report.num_unused += repeats == 0
        tables.update_rows("longcot_paths", updated, root)
        report.num_scored += len(updated)
    return report


# ========================================================================================= 6. gates


def paths_gate_frame(paths: tables.TableRef, question_ids: Sequence[str]) -> pd.DataFrame:
    """One row per path of the batch with the columns the path checks read."""
    rows = _batch_rows(paths, question_ids)
    out = []
    for r in rows:
        conf = r["confidence"]
        out.append({
            "path_id": r["path_id"],
            "confidence_in_range": conf is not None and 0.0 <= conf <= 1.0
                                   and all(0.0 <= c <= 1.0 for c in (r["step_confidences"] or [])),
            "status": r["status"],
            "grade_known": r["grade"] in GRADES or (r["grade"] is None and r["stage"] in ("generate", "select")),
            "drop_has_reason": r["status"] != "dropped" or bool((r["reason"] or "").strip()),
            "c_dropped": r["grade"] != "C" or r["status"] == "dropped",
        })  # fmt: skip
    return pd.DataFrame(out, columns=["path_id", "confidence_in_range", "status", "grade_known", "drop_has_reason",
                                      "c_dropped"])


def samples_gate_frame(paths: tables.TableRef, questions: tables.TableRef, question_ids: Sequence[str],
                       config: GateConfig) -> pd.DataFrame:
    """One row per kept path of the batch with the columns the sample checks read."""
    kept = [r for r in _batch_rows(paths, question_ids) if r["status"] == "kept"]
    qs = _questions(questions, (r["question_id"] for r in kept))
    counts: dict[str, int] = {}
    for r in kept:
        counts[r["grade"]] = counts.get(r["grade"], 0) + 1
    out = []
    for r in kept:
        q = qs[r["question_id"]]
        response = r["response"] or ""
        share = counts[r["grade"]] / len(kept)
        lo, hi = config.grade_share_bounds.get(r["grade"], (0.0, 1.0))
        out.append({
            "sample_id": r["path_id"], "grade": r["grade"],
            "answer_matches": check_answer(q["domain"], response, q["reference"]).ok,
            "format_ok": graders.format_problem(response, "think") is None,
            "score": r["score"], "repeats": r["repeats"],
            "confidence": r["confidence"],
            "grade_share_ok": lo - 1e-9 <= share <= hi + 1e-9,
            "reviewed": (not r["needs_review"]) or r["review_action"] in ("approve", "edit"),
        })  # fmt: skip
    columns = ["sample_id", "grade", "answer_matches", "format_ok", "score", "repeats", "confidence",
               "grade_share_ok", "reviewed"]
    frame = pd.DataFrame(out, columns=columns)
    if not out:  # keep the dtypes GX expects even with no rows
        frame = frame.astype({"score": "float64", "repeats": "float64", "confidence": "float64"})
    return frame


def grade_shares(paths: tables.TableRef, question_ids: Sequence[str]) -> dict[str, float]:
    kept = [r["grade"] for r in _batch_rows(paths, question_ids) if r["status"] == "kept"]
    return {g: kept.count(g) / len(kept) for g in sorted(set(kept))} if kept else {}


# ====================================================================================== 7. publish


def sft_messages(question: dict, response: str, config: GenerationConfig) -> list[dict]:
    """The training conversation: the question (media parts, text + the think switch), the response. The
    generation system prompt is left out: in training, ``/think`` asks for the format."""
    return [{"role": "user", "content": user_content(question, config.think_suffix)},
            {"role": "assistant", "content": response}]


def publish_longcot(
    paths: tables.TableRef,
    questions: tables.TableRef,
    question_ids: Sequence[str],
    config: GenerationConfig,
    root: str | None = None,
) -> int:
    """Write the batch's kept samples to ``longcot`` (replacing the rows these questions had); returns the
    table version. Unchanged rows leave the table alone."""
    kept = [r for r in _batch_rows(paths, question_ids) if r["status"] == "kept"]
    qs = _questions(questions, (r["question_id"] for r in kept))
    now = tables.now()
    rows = []
    for r in kept:
        q = qs[r["question_id"]]
        rows.append({
            "sample_id": r["path_id"], "question_id": r["question_id"], "domain": r["domain"], "source": q["source"],
            "question": q["question"], "reference": q["reference"], "media": q["media"], "response": r["response"],
            "answer": graders.extract_answer(r["response"]), "grade": r["grade"], "redundancy": r["redundancy"],
            "confidence": r["confidence"], "score": r["score"], "repeats": r["repeats"],
            "reviewer_action": r["review_action"] or "none", "reviewer": r["reviewer"] or "", "reason": r["reason"],
            "judge": r["judge"], "messages": _json(sft_messages(q, r["response"], config)),
            "gen_config_hash": r["gen_config_hash"], "created_at": now,
        })  # fmt: skip
    ds = tables.ensure("longcot", root)
    ids = sorted(set(question_ids))
    existing = _read("longcot", None, "question_id", ids, root)

    def key(row: dict) -> tuple:
        return tuple(row[c] for c in ("sample_id", "response", "grade", "score", "repeats", "reviewer_action", "reason"))

    if sorted(map(key, existing)) == sorted(map(key, rows)):
        return ds.version
    if existing:
        ds.delete(f"question_id IN ({_sql_list(ids)})")
    if rows:
        tables.write_dataset(pa.Table.from_pylist(rows, schema=tables.SCHEMAS["longcot"]),
                             tables.table_uri("longcot", root), mode="append")
    return tables.open_table("longcot", root=root).version


# ====================================================================================== summaries


def batch_summary(paths: tables.TableRef, question_ids: Sequence[str]) -> dict:
    """Counts of this batch's paths by grade and status, for metrics and the CLI."""
    rows = _batch_rows(paths, question_ids)
    out: dict = {"num_paths": len(rows)}
    for g in GRADES:
        out[f"num_{g}"] = sum(r["grade"] == g for r in rows)
    for s in STATUSES:
        out[f"num_{s}"] = sum(r["status"] == s for r in rows)
    return out

